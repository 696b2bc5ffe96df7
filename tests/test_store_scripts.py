"""scripts/cache_report.py and scripts/bench_store.py, run as a user would run them."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from store_fixtures import REPO, free_port, make_identity, make_store, payloads_for, token_ids


def run_script(name: str, *args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(REPO / "scripts" / name), *args], check=False,
                          cwd=REPO,
                          capture_output=True, text=True, timeout=120,
                          env={**os.environ, **(env or {})})


@pytest.fixture(name="traffic_store_url")
def _fixture_traffic_store_url(tmp_path):
    """An embedded store with known traffic: 10 pages published, 3 fetches by demo-ft."""
    url = f"embedded://{tmp_path}/store"
    store = make_store(url)
    hashes = store.page_hashes(token_ids(16 * 10))
    store.publish(hashes, payloads_for(10, 1000), adapter="producer")
    store.fetch_prefix(hashes, adapter="demo-ft")          # 10/10 pages
    store.fetch_prefix(hashes[:4], adapter="demo-ft")      # 4/4
    store.fetch_prefix(store.page_hashes(token_ids(32, seed=5)), adapter="demo-ft")  # 0/2
    store.close()
    other = make_store(url, make_identity(producer_revision="rev-2"))
    other.fetch_prefix(hashes, adapter="demo-ft")  # another identity: all absent
    other.close()
    return url


def test_cache_report_json(traffic_store_url, tmp_path):
    out = run_script("cache_report.py", "--store-url", traffic_store_url, "--json",
                     "--plots-dir", str(tmp_path / "plots"))
    assert out.returncode == 0, out.stderr
    report = json.loads(out.stdout)
    ident = make_identity()
    by_ns = {i["namespace"]: i for i in report["identities"]}
    assert set(by_ns) == {ident.namespace, make_identity(producer_revision="rev-2").namespace}
    mine = by_ns[ident.namespace]
    assert mine["identity"]["producer_model"] == ident.producer_model
    ft = next(a for a in mine["adapters"] if a["adapter"] == "demo-ft")
    assert ft["tokens_served"] == 14 * 16
    assert ft["fetch_hit_rate"] == pytest.approx(14 / 16)
    assert ft["misses_by_cause"] == {"fetch:absent": 1}
    assert ft["bytes_read"] == 14 * 1084
    assert ft["bytes_saved_vs_raw_kv"] == 14 * 16 * 23040 - 14 * 1084
    top = mine["top_prefixes"]
    assert [(p["pages"], p["tokens"], p["requests"]) for p in top] == [(10, 160, 1), (4, 64, 1)]
    assert by_ns[make_identity(producer_revision="rev-2").namespace]["identity"] is None
    assert report["totals"]["hit_tokens"] == 14 * 16
    assert sorted(os.path.basename(p) for p in report["plots"]) == [
        "bytes_by_adapter.png", "hit_rate_by_adapter.png", "misses_by_cause.png"]
    for path in report["plots"]:
        with open(path, "rb") as f:
            assert f.read(8) == b"\x89PNG\r\n\x1a\n"


def test_cache_report_table_uses_env_url_and_flag(traffic_store_url):
    out = run_script("cache_report.py", "--no-plots", "--raw-kv-bytes-per-token", "1000",
                     env={"SCD_STORE_URL": traffic_store_url})
    assert out.returncode == 0, out.stderr
    assert "demo-ft" in out.stdout and "87.5%" in out.stdout
    assert "(1000 B/token)" in out.stdout


def test_cache_report_unreachable_store_exits_2():
    out = run_script("cache_report.py", "--store-url", f"redis://127.0.0.1:{free_port()}/0",
                     "--no-plots")
    assert out.returncode == 2
    assert "cannot read the store" in out.stderr


def test_cache_report_help_explains():
    out = run_script("cache_report.py", "--help")
    assert out.returncode == 0
    for text in ("--store-url", "SCD_STORE_URL", "--raw-kv-bytes-per-token", "23040", "--json"):
        assert text in out.stdout


def test_bench_store_json_lines(tmp_path):
    out_file = tmp_path / "bench.jsonl"
    out = run_script("bench_store.py", "--json", str(out_file), "--backends", "embedded",
                     "--sizes", "code,4096", "--batches", "1,4", "--min-iters", "2",
                     "--max-iters", "3")
    assert out.returncode == 0, out.stderr
    lines = [json.loads(line) for line in out_file.read_text().splitlines()]
    assert len(lines) == 2 * 2 * 2  # sizes x batches x {put, get}
    for line in lines:
        assert {"git_sha", "machine", "config", "gbps", "p50_ms", "p99_ms", "iters"} <= set(line)
        assert line["machine"]["cpu_count"] == os.cpu_count()
        assert line["config"]["op"] in ("put", "get") and line["gbps"] > 0
        assert line["p99_ms"] >= line["p50_ms"] > 0
    assert {line["config"]["value_bytes"] for line in lines} == {87624, 4096}  # the demo code page: 16 x 5,474 + 40
