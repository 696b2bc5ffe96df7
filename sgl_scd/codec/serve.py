"""Serving-side use of an adapter in the reference runtime: encode a producer capture, ship it
through the wire format, rebuild the consumer's K/V and continue."""

from __future__ import annotations

import time

import torch

from sgl_scd import runtime
from sgl_scd.codec import wire
from sgl_scd.codec.manifest import Adapter


def encode_prompt(adapter: Adapter, cap: runtime.PrefillCapture, page_size: int | None = None,
                  full_pages_only: bool = False, tokens: int | None = None) -> list[bytes]:
    """Producer side: page blobs for a capture's tokens (only the first `tokens` if given)."""
    ps = page_size or adapter.manifest["codec"]["page_size"]
    codes = adapter.encoder.encode(cap)
    if tokens is not None:
        codes = {s: q[:tokens] for s, q in codes.items()}
    return wire.encode_pages(adapter.encoder, codes, adapter.codec_digest, ps, full_pages_only=full_pages_only)


@torch.inference_mode()
def rebuild_kv(adapter: Adapter, consumer_model, blobs: list[bytes], page_size: int | None = None
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """Consumer side: K/V [L, T, H, D] from page blobs (WireError on a bad page)."""
    ps = page_size or adapter.manifest["codec"]["page_size"]
    return adapter.rebuild(consumer_model, wire.decode_pages(adapter.encoder, blobs, adapter.codec_digest, ps))


def scd_method(adapter: Adapter, tail: int = 0, min_margin: float = 0.0):
    """An evaluate.Method: producer codes over the wire -> consumer rebuild -> continue.

    tail > 0 rebuilds all but the last `tail` prompt tokens from codes and prefills those (at
    least the last token is always prefilled): quality bought with a longer suffix forward.
    min_margin > 0 is the serving gate: a near-tie first answer token on the rebuilt cache
    (top-1 - top-2 probability below it) falls back to the consumer's prefill."""
    if tail < 0:
        raise ValueError(f"tail must be >= 0 prompt tokens, got {tail}")

    def run(p) -> runtime.Continuation:
        keep = max(1, len(p.ids) - max(tail, 1))
        blobs = encode_prompt(adapter, p.producer_capture, tokens=keep)
        t0 = time.perf_counter()
        k, v = rebuild_kv(adapter, p.consumer.model, blobs)
        rebuild_s = time.perf_counter() - t0
        out = p.continue_consumer(k, v, min_margin=min_margin)
        out.timings.update(rebuild_s=rebuild_s, payload_bytes=sum(map(len, blobs)), tokens=k.shape[1])
        return out

    return run
