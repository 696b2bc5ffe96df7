"""SCD artifacts used with reference-runtime models: encode a capture, rebuild a consumer's K/V,
check that models are the ones an adapter was calibrated for."""

from __future__ import annotations

from pathlib import Path

import torch

from sgl_scd.codec import wire
from sgl_scd.codec.fold import FoldedDecoder
from sgl_scd.codec.manifest import Adapter, Encoder, load_adapter
from sgl_scd.hf import models, runtime
from sgl_scd.settings import ADAPTERS_DIR


def encode_capture(encoder: Encoder, cap: runtime.PrefillCapture, tokens: int | None = None,
                   full_pages_only: bool = False) -> list[bytes]:
    """Producer side: page blobs of a capture's first `tokens` tokens (all by default)."""
    codes = encoder.codec.encode(cap.states(encoder.codec.patch_layers, tokens))
    return wire.encode_pages(encoder.codec, codes, encoder.digest, encoder.page_size, full_pages_only=full_pages_only)


def folded(adapter: Adapter, consumer_model) -> FoldedDecoder:
    """The adapter's serving decoder folded with this consumer model's projections (built once per model)."""
    cache = adapter.__dict__.setdefault("_folded", {})
    if id(consumer_model) not in cache:
        cache.clear()
        cache[id(consumer_model)] = adapter.fold(runtime.projections(consumer_model, adapter.patch_layers))
    return cache[id(consumer_model)]


@torch.inference_mode()
def rebuild_kv(adapter: Adapter, consumer_model, blobs: list[bytes], first_page: int = 0
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """Consumer side: K/V [L, T, H, D] of consecutive pages from first_page (WireError on a bad page)."""
    enc = adapter.encoder
    codes = wire.decode_pages(enc.codec, blobs, enc.digest, enc.page_size, first_page)
    return folded(adapter, consumer_model).rebuild(codes, start=first_page * enc.page_size)


def check_models(adapter: Adapter, producer: models.LoadedModel | None = None,
                 consumer: models.LoadedModel | None = None) -> Adapter:
    """The adapter, after ManifestMismatch checks against the given models (and their tokenizer)."""
    adapter.check_models(producer.identity() if producer else None, consumer.identity() if consumer else None,
                         (producer or consumer).tokenizer_digest() if (producer or consumer) else None)
    return adapter


def adapter_dir(consumer_spec: str, path: str | Path | None = None) -> Path:
    """path if given, else where calibrate writes a consumer's adapter by default (adapters/<name>)."""
    return Path(path) if path else ADAPTERS_DIR / Path(consumer_spec).name


def load_with_models(consumer_spec: str, path: str | Path | None = None, producer_spec: str = "base"
                     ) -> tuple[models.LoadedModel, models.LoadedModel, Adapter]:
    """(producer, consumer, adapter) as analysis scripts need them, the adapter checked against both."""
    producer, consumer = models.load(producer_spec), models.load(consumer_spec)
    return producer, consumer, check_models(load_adapter(adapter_dir(consumer_spec, path)), producer, consumer)
