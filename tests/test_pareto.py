"""evaluation.pareto (bench_pareto's frontier and plot, scripts/pareto_table.py's table) and
evaluation.flips (answer_flips), on hand-made rows."""

from __future__ import annotations

import json
import subprocess
import sys

from store_fixtures import REPO

from sgl_scd.evaluation import flips, pareto, plotstyle


def row(method: str, kl: float, ttft: float, f1: float = 0.5) -> dict:
    return {"dataset": "tomi", "method": method, "n": 4, "f1": f1, "kl": kl, "top1": 0.5, "same_answer": 0.5,
            "payload_ratio": 0.2, "compute_ratio_vs_prefill": 0.3, "rebuild_s": 0.01,
            "ttft_s": {"1": ttft, "200": ttft}}


def test_frontier_drops_only_dominated_methods():
    rows = [row("oracle", 0.0, 1.0), row("fast", 0.5, 0.1), row("slow_bad", 0.6, 0.2), row("tie", 0.5, 0.1)]
    front = pareto.pareto(rows, 200)
    assert front == {"oracle", "fast", "tie"}  # slow_bad is slower and worse than fast; ties dominate nothing


def test_plot_names_each_method_family_once(tmp_path):
    assert plotstyle.split_variant("scd_gate0.2") == ("scd_gate", "0.2") and plotstyle.split_variant("scd") == ("scd", "")
    assert plotstyle.split_variant("droidspeak_w8") == ("droidspeak", "w8")
    assert plotstyle.method_color("scd_gate0.5") == plotstyle.COLORS["scd_gate"]
    rows = [row("oracle", 0.0, 1.0), row("scd", 0.1, 0.1), row("scd_gate0.2", 0.08, 0.2), row("scd_gate0.5", 0.05, 0.4)]
    for r in rows:
        r["on_pareto"] = {"1": True, "200": True}
    pareto.plot({"tomi": rows}, [1, 200], tmp_path / "p.png")
    assert (tmp_path / "p.png").stat().st_size > 10_000  # a rendered figure, not an empty canvas


def test_table_renders_every_row(tmp_path):
    rows = [row("oracle", 0.0, 1.0, f1=0.8), row("scd", 0.1, 0.1, f1=0.76)]
    for r in rows:
        r["on_pareto"] = {"1": True, "200": True}
    path = tmp_path / "p.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = subprocess.run([sys.executable, str(REPO / "scripts" / "pareto_table.py"), str(path), "--bandwidths", "200"],
                         capture_output=True, text=True, check=True).stdout.splitlines()
    assert len(out) == 4 and "TTFT@200" in out[0] and "prefilled" in out[0]
    assert "| tomi | scd | 4 | 0.760 | 0.95 | 0.100 | 0.50 |" in out[3]  # F1 / oracle F1 = 0.76 / 0.8
    assert "KL ans" not in out[0]  # a run from before quality.answer_kl
    rows[1]["kl_answer"] = 0.02
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = subprocess.run([sys.executable, str(REPO / "scripts" / "pareto_table.py"), str(path), "--bandwidths", "200"],
                         capture_output=True, text=True, check=True).stdout.splitlines()
    assert "KL ans" in out[0] and "| tomi | scd | 4 | 0.760 | 0.95 | 0.100 | 0.020 | 0.50 |" in out[3]
    assert "| tomi | oracle | 4 | 0.800 | 1.00 | 0.000 | nan |" in out[2]  # not reported for that row


def test_answer_flips_buckets_by_oracle_margin():
    rows = [{"kl": 0.5, "margin": 0.05, "flip": True}, {"kl": 0.1, "margin": 0.05, "flip": False},
            {"kl": 0.02, "margin": 0.9, "flip": False}, {"kl": 0.0, "margin": 1.0, "flip": False}]
    s = flips.summarize(rows)
    by = {r["bucket"]: r for r in s}
    assert by["[0.0, 0.1)"]["items"] == 2 and by["[0.0, 0.1)"]["flip_rate"] == 0.5
    assert by["[0.7, 1.0)"]["items"] == 2  # a margin of exactly 1 lands in the last bucket
    assert sum(r["items"] for r in s[:-1]) == by["all"]["items"] == 4
    assert abs(by["all"]["mean_kl"] - 0.155) < 1e-9 and by["all"]["top5pct_kl_share"] == 0.5 / 0.62


def test_answer_flips_gate_curve_prefills_the_least_sure_first():
    rows = [{"kl": 0.5, "flip": True, "scd_margin": 0.05}, {"kl": 0.1, "flip": False, "scd_margin": 0.3},
            {"kl": 0.02, "flip": False, "scd_margin": 0.9}, {"kl": 0.0, "flip": False, "scd_margin": 1.0}]
    curve = flips.gate_curve(rows, "scd_margin", shares=(0.0, 0.25, 0.5))
    assert [g["prefilled"] for g in curve] == [0.0, 0.25, 0.5]
    assert abs(curve[0]["mean_kl"] - 0.155) < 1e-9 and curve[0]["flip_rate"] == 0.25  # nothing gated
    assert abs(curve[1]["mean_kl"] - 0.03) < 1e-9 and curve[1]["flip_rate"] == 0.0  # the flip was the least sure
    assert abs(curve[2]["mean_kl"] - 0.005) < 1e-9


def test_write_jsonl_stamps_every_row_with_the_runs_provenance(tmp_path):
    from sgl_scd.runinfo import write_jsonl

    out = tmp_path / "nested" / "rows.jsonl"  # the folder does not exist yet
    write_jsonl(out, [{"method": "scd", "kl": 0.1}, {"method": "oracle", "kl": 0.0}], {"n": 2})
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["method"] for r in rows] == ["scd", "oracle"]
    assert all(r["config"] == {"n": 2} and r["git_sha"] and r["machine"]["cpus"] for r in rows)


def test_adapter_dir_defaults_to_where_calibrate_writes(tmp_path):
    from sgl_scd.hf.scd import adapter_dir
    from sgl_scd.settings import ADAPTERS_DIR

    assert adapter_dir("demo-ft") == ADAPTERS_DIR / "demo-ft"
    assert adapter_dir("/models/my-lora") == ADAPTERS_DIR / "my-lora"  # a PEFT directory's name
    assert adapter_dir("demo-ft", tmp_path) == tmp_path
