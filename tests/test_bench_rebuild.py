"""evaluation.timing (scripts/bench_rebuild.py): every stage timed on the real models and an adapter."""

from __future__ import annotations

import argparse

import pytest

from sgl_scd.codec import wire
from sgl_scd.demo import data
from sgl_scd.evaluation import timing


def test_token_counts_refuses_bad_lengths():
    assert timing.token_counts("512,256,512") == [256, 512]
    for bad in ("", "1,64", "12a"):
        with pytest.raises(argparse.ArgumentTypeError, match=repr(bad)):
            timing.token_counts(bad)


def test_measure_times_every_stage(base, ci_ft, small_adapter):
    ids = data.prompt_ids(ci_ft.tokenizer, data.load_tomi("test")[0])
    row = timing.measure(small_adapter, base, ci_ft, ids, repeats=1)
    assert all(row[k] > 0 for k in ("prefill_s", "encode_s", "decode_s", "fold_s", "suffix_s"))
    ps = small_adapter.encoder.page_size
    pages = -(-(len(ids) - 1) // ps)  # all prompt tokens but the last, the last page partial
    assert pages * wire.HEADER_BYTES < row["payload_bytes"] < pages * ps * wire.payload_bytes_per_token(small_adapter.encoder.codec, ps)
    assert row["compute_ratio"] == pytest.approx((row["decode_s"] + row["fold_s"] + row["suffix_s"]) / row["prefill_s"])
