"""scripts/bench_gpu.py and the synthetic codecs it times (evaluation/shapes.py), on CPU."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

from sgl_scd.codec import wire
from sgl_scd.evaluation.shapes import DEMO_PROFILE, SHAPES, synthetic_codec

ROOT = Path(__file__).resolve().parent.parent
DEMO_RATIO = 0.238  # adapters/quick-encoder's payload / raw bf16 KV (make adapters-quick)


def _bench():
    spec = importlib.util.spec_from_file_location("bench_gpu", ROOT / "scripts" / "bench_gpu.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_the_demo_profile_at_smollm2s_shape_reproduces_the_demo_code_sets_size():
    """Ranks and bits per dimension scaled back to the shape they were read from: the same payload
    within 3% (rounding ranks and width shares per slot)."""
    enc, fold = synthetic_codec(SHAPES["smollm2-135m"], DEMO_PROFILE)
    ratio = wire.payload_bytes_per_token(enc, 16) / SHAPES["smollm2-135m"].raw_kv_bytes_per_token()
    assert ratio == pytest.approx(DEMO_RATIO, rel=0.03)
    assert enc.patch_layers == [18, 19, 20, 21, 22, 23, 24, 27]
    assert fold.num_layers == 30 and (fold.kv_heads, fold.head_dim) == (3, 64)


@pytest.mark.parametrize("name", ["llama-3.1-8b", "qwen2.5-7b"])
def test_big_shapes_get_the_demo_profile_scaled_to_their_dimensions(name):
    shape = SHAPES[name]
    enc, fold = synthetic_codec(shape, DEMO_PROFILE)
    assert fold.num_layers == shape.layers and (fold.kv_heads, fold.head_dim) == (shape.kv_heads, shape.head_dim)
    assert len(enc.patch_layers) == len(DEMO_PROFILE.patch_depths)
    ratio = wire.payload_bytes_per_token(enc, 16) / shape.raw_kv_bytes_per_token()
    # h codes scale with the hidden size and K/V codes with the KV width: a wider GQA ratio
    # (Qwen: hidden 7x the KV width, SmolLM2 3x) makes patch layers relatively dearer
    assert 0.5 * DEMO_RATIO < ratio < 2.5 * DEMO_RATIO


def test_the_bench_times_every_stage_and_writes_lines_and_a_plot(tmp_path):
    out, png = tmp_path / "b.jsonl", tmp_path / "b.png"
    _bench().main(["--tokens", "32,64", "--batch", "1,2", "--adapters", "1,2", "--repeats", "1", "--layers", "4",
                   "--vocab", "512", "--json", str(out), "--plot", str(png), "--max-batch-tokens", "64"])
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(rows) == 2 * 2 * 2  # tokens x batch x adapters, one skipped point included
    skipped = [r for r in rows if "skipped" in r]
    assert [(r["tokens"], r["batch"]) for r in skipped] == [(64, 2), (64, 2)]  # over --max-batch-tokens
    for r in rows:
        assert r["config"]["weights"] == "random" and r["config"]["layers"] == 4 and r["git_sha"]
        if "skipped" in r:
            continue
        assert all(r[k] > 0 for k in ("prefill_s", "prefix_s", "encode_s", "validate_s", "unpack_s",
                                      "rebuild_s", "suffix_s", "unpack_gbs", "rebuild_tflops"))
        assert r["h2d_s"] == 0.0  # on the CPU the payloads are unpacked where they landed
        assert set(r["speedup"]) == {"10", "25", "100", "200", "400"}
        assert r["speedup"]["400"] > r["speedup"]["10"]  # a faster link never hurts
        pages = r["batch"] * r["tokens"] // 16
        assert r["payload_bytes"] % pages == 0  # whole pages, every one framed alike
        raw = r["batch"] * r["tokens"] * 2 * 4 * 3 * 64 * 2  # bf16 K + V, 4 layers of 3 x 64
        assert r["payload_ratio"] == pytest.approx(r["payload_bytes"] / raw)
    assert png.stat().st_size > 10_000


def test_bad_arguments_name_the_value(capsys):
    with pytest.raises(SystemExit):
        _bench().main(["--shapes", "gpt-5", "--json", "/dev/null"])
    assert "gpt-5" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        _bench().main(["--tokens", "100", "--json", "/dev/null"])
    assert "multiples of the page size 16" in capsys.readouterr().err
