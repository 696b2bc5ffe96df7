"""Cross-model prefix reuse in the reference runtime, through the shared prefix store.

  producer request:  prefill -> encode codes of every full page -> publish -> decode its answer
  consumer request:  page hashes -> fetch the longest valid leading run of pages (never the
                     page holding the last prompt token) -> decode wire -> rebuild its own K/V
                     -> prefill only the uncovered suffix -> decode.

A rebuilt cache whose first answer token is a near-tie (top-1 - top-2 probability below
min_margin) is dropped for a prefill: a small error flips such answers (miss cause low_margin).

Any miss (store down, slow, full, flushed; corrupt or mismatched payload) shrinks the reused
prefix, down to a plain prefill; it is counted, never raised. Keys: the base chain (SGLang's
page hash) inside the namespace of the adapter's frozen StoreIdentity.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import torch

from sgl_scd import runtime
from sgl_scd.codec import wire
from sgl_scd.codec.manifest import Adapter
from sgl_scd.codec.serve import encode_prompt
from sgl_scd.models import LoadedModel
from sgl_scd.store import StoreIdentity
from sgl_scd.store.client import PrefixStore

logger = logging.getLogger(__name__)


def store_identity(adapter: Adapter, cache_salt: str = "") -> StoreIdentity:
    """The reuse scope of an adapter's codes: producer, tokenizer, page size, codec revision."""
    m = adapter.manifest
    return StoreIdentity(
        producer_model=m["producer"]["spec"] if "/" not in m["producer"]["spec"] else "custom",
        producer_revision=m["producer"]["revision"],
        tokenizer=m["tokenizer"]["digest"],
        page_size=m["codec"]["page_size"],
        codec_revision=m["codec"]["revision"],
        dtype="float32",
        sharding="tp1",
        cache_salt=cache_salt,
    )


@dataclass
class RequestResult:
    text: str
    tokens: list[int]
    prompt_tokens: int
    reused_tokens: int  # prompt tokens rebuilt from codes (0 on a full miss)
    published_pages: int = 0
    miss_cause: str | None = None  # why fewer pages than possible were reused
    timings: dict | None = None


class ReuseEngine:
    """One producer and one consumer sharing codes through a PrefixStore (not thread-safe)."""

    def __init__(self, producer: LoadedModel, consumer: LoadedModel, adapter: Adapter, store: PrefixStore,
                 *, adapter_label: str | None = None, max_new_tokens: int = 16, min_margin: float = 0.0):
        if store.identity != store_identity(adapter, store.identity.cache_salt):
            raise ValueError("the store's identity does not match the adapter's (codec revision or producer differ)")
        self.producer, self.consumer, self.adapter, self.store = producer, consumer, adapter, store
        self.label = adapter_label or adapter.name
        self.page_size = store.identity.page_size
        self.max_new_tokens = max_new_tokens
        runtime.check_min_margin(min_margin)  # fail at construction, not on the first request
        self.min_margin = min_margin
        # Decoders are only trusted on positions calibration saw: longer prefixes reuse that much
        # and prefill the rest (older manifests carry no bound).
        max_tokens = adapter.manifest.get("calibration", {}).get("max_tokens")
        self.max_reuse_pages = None if max_tokens is None else max_tokens // self.page_size

    @torch.inference_mode()
    def serve_producer(self, ids: list[int]) -> RequestResult:
        """The producer answers its own request and publishes codes of the prompt's full pages."""
        t0 = time.perf_counter()
        cap = runtime.capture_prefill(self.producer.model, ids, hidden=self.adapter.encoder.needs_hidden)
        n_pages = len(ids) // self.page_size
        published = 0
        if n_pages:
            t1 = time.perf_counter()
            blobs = encode_prompt(self.adapter, cap, self.page_size, full_pages_only=True)
            encode_s = time.perf_counter() - t1
            hashes = self.store.page_hashes(ids)
            published = self.store.publish(hashes, blobs, adapter="base")
        else:
            encode_s = 0.0
        out = runtime.continue_from_kv(self.producer.model, self.producer.tokenizer, ids,
                                       cap.k[:, :-1], cap.v[:, :-1], max_new_tokens=self.max_new_tokens)
        return RequestResult(out.text, out.tokens, len(ids), 0, published_pages=published,
                             timings={"total_s": time.perf_counter() - t0, "encode_s": encode_s})

    @torch.inference_mode()
    def serve_consumer(self, ids: list[int]) -> RequestResult:
        """The consumer answers, rebuilding as many leading pages from codes as the store holds."""
        t0 = time.perf_counter()
        usable = (len(ids) - 1) // self.page_size  # the last prompt token is always prefilled
        beyond = 0
        if self.max_reuse_pages is not None and usable > self.max_reuse_pages:
            beyond, usable = usable - self.max_reuse_pages, self.max_reuse_pages
            self.store.record_rejected(adapter=self.label, pages=beyond, cause="beyond_calibration")
        hashes = self.store.page_hashes(ids)[:usable]
        blobs = self.store.fetch_prefix(hashes, adapter=self.label) if hashes else []
        cause = None if len(blobs) == usable else "store_miss"
        if cause is None and beyond:
            cause = "beyond_calibration"
        k = v = None
        rebuild_s = 0.0
        if blobs:
            t1 = time.perf_counter()
            try:
                k, v = self._rebuild(blobs)
            except wire.WireError as exc:
                logger.warning("codes for %d pages refused (%s): falling back to prefill", len(blobs), exc)
                self.store.record_rejected(adapter=self.label, pages=len(blobs), cause="wire")
                k = v = None
                cause = "wire"
            rebuild_s = time.perf_counter() - t1
        out = runtime.continue_from_kv(self.consumer.model, self.consumer.tokenizer, ids, k, v,
                                       max_new_tokens=self.max_new_tokens, min_margin=self.min_margin)
        if out.fell_back:
            self.store.record_rejected(adapter=self.label, pages=len(blobs), cause="low_margin")
            k, cause = None, "low_margin"
        reused = 0 if k is None else k.shape[1]
        return RequestResult(out.text, out.tokens, len(ids), reused, miss_cause=cause,
                             timings={"total_s": time.perf_counter() - t0, "rebuild_s": rebuild_s,
                                      "forward_s": out.forward_s})

    def _rebuild(self, blobs: list[bytes]) -> tuple[torch.Tensor, torch.Tensor]:
        codes = wire.decode_pages(self.adapter.encoder, blobs, self.adapter.codec_digest, self.page_size)
        return self.adapter.rebuild(self.consumer.model, codes)
