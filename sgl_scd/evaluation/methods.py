"""The SCD method for the evaluation harness: producer codes over the wire -> consumer rebuild -> continue."""

from __future__ import annotations

import time

from sgl_scd.codec.manifest import Adapter
from sgl_scd.hf import runtime
from sgl_scd.hf.scd import encode_capture, rebuild_kv


def scd_method(adapter: Adapter, tail: int = 0, min_margin: float = 0.0):
    """An evaluate.Method: producer codes over the wire -> consumer rebuild -> continue.

    tail > 0 rebuilds all but the last `tail` prompt tokens from codes and prefills those (at
    least the last token is always prefilled): quality bought with a longer suffix forward.
    min_margin > 0 is the serving gate: a near-tie first answer token on the rebuilt cache
    (top-1 - top-2 probability below it) falls back to the consumer's prefill."""
    if tail < 0:
        raise ValueError(f"tail must be >= 0 prompt tokens, got {tail}")

    def run(p) -> runtime.Continuation:
        keep = min(max(1, len(p.ids) - max(tail, 1)), p.producer_capture.num_tokens)
        blobs = encode_capture(adapter.encoder, p.producer_capture, tokens=keep)
        t0 = time.perf_counter()
        k, v = rebuild_kv(adapter, p.consumer.model, blobs)
        rebuild_s = time.perf_counter() - t0
        out = p.continue_consumer(k, v, min_margin=min_margin)
        out.timings.update(rebuild_s=rebuild_s, payload_bytes=sum(map(len, blobs)), tokens=k.shape[1])
        return out

    return run
