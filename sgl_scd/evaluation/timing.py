"""Where a rebuild's time goes: every SCD stage timed beside the consumer's own prefill."""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from sgl_scd.codec import wire
from sgl_scd.codec.manifest import Adapter
from sgl_scd.hf import runtime
from sgl_scd.hf.models import LoadedModel
from sgl_scd.hf.scd import encode_capture, folded

STAGES = ("prefill_s", "encode_s", "decode_s", "fold_s", "suffix_s")


def token_counts(text: str) -> list[int]:
    """Sorted distinct prompt lengths (>= 2) from "256,512"; an argparse type."""
    try:
        counts = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"--tokens takes comma-separated integers, got {text!r}") from None
    if not counts or min(counts) < 2:
        raise argparse.ArgumentTypeError(f"--tokens needs prompt lengths >= 2, got {text!r}")
    return sorted(set(counts))


def timed(fn, *args):
    t0 = time.perf_counter()
    out = fn(*args)
    return out, time.perf_counter() - t0


def measure(adapter: Adapter, producer: LoadedModel, consumer: LoadedModel, ids: list[int], repeats: int) -> dict:
    """Median seconds of each stage for one prompt (rebuild covers all tokens but the last)."""
    enc = adapter.encoder
    cap = runtime.capture_prefill(producer.model, ids[:-1], hidden=True, residual=True)
    fold = folded(adapter, consumer.model)
    fold.rebuild(wire.decode_pages(enc.codec, encode_capture(enc, cap), enc.digest, enc.page_size))  # warm up
    t = {k: [] for k in STAGES}
    for _ in range(repeats):
        t["prefill_s"].append(runtime.continue_from_kv(consumer.model, consumer.tokenizer, ids,
                                                       max_new_tokens=0).forward_s)
        blobs, s = timed(encode_capture, enc, cap)
        t["encode_s"].append(s)
        with torch.inference_mode():
            codes, s = timed(wire.decode_pages, enc.codec, blobs, enc.digest, enc.page_size)
            t["decode_s"].append(s)
            (k, v), s = timed(fold.rebuild, codes)
            t["fold_s"].append(s)
        t["suffix_s"].append(runtime.continue_from_kv(consumer.model, consumer.tokenizer, ids, k, v,
                                                      max_new_tokens=0).forward_s)
    row = {k: statistics.median(v) for k, v in t.items()}
    row["payload_bytes"] = sum(map(len, blobs))
    row["compute_ratio"] = (row["decode_s"] + row["fold_s"] + row["suffix_s"]) / row["prefill_s"]
    return row
