"""Embedded (SQLite) backend: byte-bounded LRU, TTL, restart survival, sharing across processes."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest
from store_fixtures import REPO, make_store, metric, payloads_for, token_ids

from sgl_scd.store.backends import Timeouts, open_backend
from sgl_scd.store.backends.embedded import (
    DEFAULT_MAX_BYTES,
    EmbeddedBackend,
    default_store_dir,
    parse_embedded_url,
    parse_size,
)
from sgl_scd.store.errors import StoreUnavailable


def test_url_forms(tmp_path, monkeypatch):
    monkeypatch.delenv("SCD_CACHE_DIR", raising=False)  # it would win over XDG_CACHE_HOME
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert parse_embedded_url("embedded://") == (
        tmp_path / "xdg" / "sgl_scd" / "store" / "store.sqlite3", DEFAULT_MAX_BYTES)
    assert default_store_dir() == tmp_path / "xdg" / "sgl_scd" / "store"
    assert parse_embedded_url(f"embedded://{tmp_path}/d?max_bytes=64MiB") == (
        tmp_path / "d" / "store.sqlite3", 64 * 2**20)
    assert parse_embedded_url(f"embedded://{tmp_path}/x.db")[0] == tmp_path / "x.db"
    assert parse_size("2g") == 2 * 2**30 and parse_size("4096") == 4096
    with pytest.raises(ValueError, match=r"unknown query parameter\(s\) \['maxbytes'\]"):
        parse_embedded_url("embedded:///tmp/x?maxbytes=1")
    with pytest.raises(ValueError, match="not a host 'tmp'"):
        parse_embedded_url("embedded://tmp/x")
    with pytest.raises(ValueError, match="size '1 zb'"):
        parse_size("1 zb")


def test_lru_eviction_by_bytes(tmp_path):
    backend = EmbeddedBackend(f"embedded://{tmp_path}?max_bytes=64KiB")
    value = b"v" * 10_000  # ~10 KB per entry: at most 6 fit
    for i in range(6):
        backend.set_many([(f"k{i}", value)], None)
    assert backend.get_many(["k0"]) == [value]  # k0 becomes the most recently used
    for i in range(6, 10):
        backend.set_many([(f"k{i}", value)], None)
    info = backend.info()
    assert info["used_memory"] <= 64 * 1024
    assert info["evicted_keys"] >= 4
    present = backend.exists_many([f"k{i}" for i in range(10)])
    assert present[0], "recently read entry must survive"
    assert not present[1], "least recently used entry must be evicted first"
    assert all(present[7:]), "the newest entries must be kept"
    backend.close()


def test_value_over_budget_is_refused_as_full(tmp_path):
    backend = EmbeddedBackend(f"embedded://{tmp_path}?max_bytes=1000")
    with pytest.raises(StoreUnavailable) as info:
        backend.set_many([("big", b"x" * 2000)], None)
    assert info.value.cause == "oom"


def test_ttl_expiry(tmp_path):
    backend = EmbeddedBackend(f"embedded://{tmp_path}")
    backend.set_many([("a", b"1"), ("b", b"2")], ttl_ms=100)
    backend.set_many([("c", b"3")], ttl_ms=None)
    assert backend.get_many(["a", "b", "c"]) == [b"1", b"2", b"3"]
    time.sleep(0.25)
    assert backend.get_many(["a", "b", "c"]) == [None, None, b"3"]
    assert backend.exists_many(["a", "c"]) == [False, True]


def test_store_survives_reopen(tmp_path):
    url = f"embedded://{tmp_path}"
    store = make_store(url)
    hashes = store.page_hashes(token_ids(16 * 5))
    payloads = payloads_for(5, 600)
    assert store.publish(hashes, payloads, adapter="producer") == 5
    assert store.fetch_prefix(hashes, adapter="demo-ft") == payloads
    store.close()
    reopened = make_store(url)
    assert reopened.fetch_prefix(hashes, adapter="demo-ft") == payloads
    counters = reopened.stats()["adapters"]["demo-ft"]["counters"]
    assert counters["fetches"] == 2 and counters["hit_pages"] == 10
    reopened.close()


_CHILD = """
import sys
sys.path.insert(0, "tests")
from store_fixtures import make_store, payloads_for, token_ids
store = make_store(sys.argv[1])
for round_ in range(int(sys.argv[3])):
    hashes = store.page_hashes(token_ids(16 * 8, seed=int(sys.argv[2]) * 1000 + round_))
    assert store.publish(hashes, payloads_for(8, 500, tag=sys.argv[2].encode())) == 8
store.close()
"""


def test_two_processes_share_one_store(tmp_path):
    """A child process writes while this one writes and reads the same file; both see all."""
    url = f"embedded://{tmp_path}"
    child = subprocess.Popen([sys.executable, "-c", _CHILD, url, "1", "20"], cwd=REPO,
                             stderr=subprocess.PIPE, text=True)
    mine = make_store(url, timeouts=Timeouts(connect_s=1, op_s=5))
    for round_ in range(20):
        hashes = mine.page_hashes(token_ids(16 * 8, seed=2000 + round_))
        assert mine.publish(hashes, payloads_for(8, 500, tag=b"2")) == 8
    _, err = child.communicate(timeout=60)
    assert child.returncode == 0, err
    for round_ in range(20):
        hashes = mine.page_hashes(token_ids(16 * 8, seed=1000 + round_))
        assert mine.fetch_prefix(hashes) == payloads_for(8, 500, tag=b"1")
    # counters from both processes add up atomically
    assert mine.stats()["adapters"]["base"]["counters"]["pages_written"] == 2 * 20 * 8
    mine.close()


def test_client_publish_over_budget_is_a_counted_write_error(tmp_path):
    store = make_store(f"embedded://{tmp_path}?max_bytes=4KiB")
    hashes = store.page_hashes(token_ids(16))
    assert store.publish(hashes, [b"x" * 8000]) == 0
    assert metric(store, "scd_store_write_errors_total", identity=store._label, adapter="base",
                  cause="oom") == 1
    assert store.fetch_prefix(hashes) == []


def test_unopenable_file_is_store_unavailable(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    with pytest.raises(StoreUnavailable, match="cannot open embedded store"):
        open_backend(f"embedded://{blocker}/sub")


def test_default_url_uses_user_cache_dir(tmp_path, monkeypatch):
    monkeypatch.delenv("SCD_CACHE_DIR", raising=False)  # it would win over XDG_CACHE_HOME
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    backend = open_backend("embedded://")
    assert Path(backend.info()["path"]) == tmp_path / "sgl_scd" / "store" / "store.sqlite3"
    backend.close()
