"""The SCD method for the evaluation harness: producer codes over the wire -> consumer rebuild -> continue."""

from __future__ import annotations

import time

from sgl_scd.codec.manifest import Adapter
from sgl_scd.hf import runtime
from sgl_scd.hf.scd import encode_capture, rebuild_kv


def scd_method(adapter: Adapter, tail: int = 0, min_margin: float = 0.0, recompute_pages: int = 0):
    """An evaluate.Method: producer codes over the wire -> consumer rebuild -> continue.

    tail > 0 rebuilds all but the last `tail` prompt tokens from codes and prefills those (at
    least the last token is always prefilled): quality bought with a longer suffix forward.
    min_margin > 0 is the serving gate: a near-tie first answer token on the rebuilt cache
    (top-1 - top-2 probability below it) falls back to the consumer's prefill.
    recompute_pages > 0 rebuilds all but the last recompute_pages pages of the shipped prefix and
    prefills those with the consumer's own weights, on top of the rebuilt pages."""
    if tail < 0 or recompute_pages < 0:
        raise ValueError(f"tail and recompute_pages must be >= 0, got {tail}, {recompute_pages}")

    def run(p) -> runtime.Continuation:
        shipped = p.producer_capture.num_tokens - recompute_pages * adapter.encoder.page_size
        keep = min(max(1, len(p.ids) - max(tail, 1)), shipped)
        if keep < 1:  # nothing left to rebuild: the consumer's own prefill
            out = p.continue_consumer()
            out.timings.update(rebuild_s=0.0, payload_bytes=0, tokens=0)
            return out
        blobs = encode_capture(adapter.encoder, p.producer_capture, tokens=keep)
        t0 = time.perf_counter()
        k, v = rebuild_kv(adapter, p.consumer.model, blobs)
        rebuild_s = time.perf_counter() - t0
        out = p.continue_consumer(k, v, min_margin=min_margin)
        out.timings.update(rebuild_s=rebuild_s, payload_bytes=sum(map(len, blobs)), tokens=k.shape[1])
        return out

    return run
