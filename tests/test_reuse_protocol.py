"""The reuse protocol without a model: a random encoder and decoder saved as real artifacts, a
real embedded store; what is promised, fetched, refused and counted."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from prometheus_client import CollectorRegistry
from test_codec_core import PS, _save_artifacts, _states

from sgl_scd.codec import manifest as mf
from sgl_scd.reuse import Consumer, GateLedger, Publisher, store_identity, usable_pages
from sgl_scd.store import StoreMetrics, open_store


@pytest.fixture()
def adapter(tmp_path):
    return mf.load_adapter(_save_artifacts(tmp_path)[1])

@pytest.fixture()
def store(tmp_path, adapter):
    s = open_store(f"embedded://{tmp_path}/s.sqlite3", store_identity(adapter.encoder), stats_flush_s=0,
                   metrics=StoreMetrics(CollectorRegistry()))
    yield s
    s.close()


def _publish(adapter, store, t: int) -> list[int]:
    ids = list(range(100, 100 + t))
    assert Publisher(adapter.encoder, store).publish(ids, _states(t)) == t // PS
    return ids


def _misses(store, label="tiny-lora"):
    return store.stats()["adapters"][label]["misses_by_cause"]


def test_a_full_hit_decodes_exactly_what_was_encoded(adapter, store):
    ids = _publish(adapter, store, 5 * PS + 2)
    got = Consumer(adapter, store).fetch(ids)
    assert (got.pages, got.usable, got.cause) == (5, 5, None)
    want = adapter.encoder.codec.encode(_states(5 * PS + 2))
    assert all(torch.equal(got.codes[s], want[s][: 5 * PS]) for s in want)


def test_the_last_token_and_the_calibration_bound_limit_the_promise(adapter, store):
    assert usable_pages(4 * PS, PS) == (3, None)  # the last token's page is never reused
    assert usable_pages(4 * PS + 1, PS) == (4, None)
    assert usable_pages(20 * PS, PS, max_tokens=6 * PS) == (6, "beyond_calibration")
    ids = _publish(adapter, store, 9 * PS)
    got = Consumer(adapter, store).fetch(ids)
    assert (got.pages, got.cause) == (6, "beyond_calibration")  # the adapter saw <= 6 pages
    assert _misses(store)["decode:beyond_calibration"] == 1


def test_a_corrupt_page_keeps_the_pages_before_it(adapter, store):
    ids = _publish(adapter, store, 5 * PS + 1)
    hashes = store.page_hashes(ids)
    blobs = Publisher(adapter.encoder, store).encode(_states(5 * PS + 1))
    blobs[3] = blobs[3][:-1] + bytes([blobs[3][-1] ^ 1])  # wire CRC fails, the store record is intact
    store.publish(hashes[3:4], blobs[3:4], first_page=3)
    got = Consumer(adapter, store).fetch(ids)
    assert (got.pages, got.cause) == (3, "wire")
    assert store.stats()["adapters"]["tiny-lora"]["counters"]["rejected_pages"] == 2  # pages 3 and 4


def test_pages_after_a_prefix_the_engine_already_holds(adapter, store):
    ids = _publish(adapter, store, 5 * PS + 1)
    got = Consumer(adapter, store).fetch(ids, first_page=2)
    assert (got.first_page, got.pages) == (2, 3)
    want = adapter.encoder.codec.encode(_states(5 * PS + 1))
    assert all(torch.equal(got.codes[s], want[s][2 * PS : 5 * PS]) for s in want)


def test_kill_switch_and_store_down_are_counted_misses(adapter, store, tmp_path):
    ids = _publish(adapter, store, 3 * PS + 1)
    off = Consumer(adapter, store, enabled=False).fetch(ids)
    assert (off.pages, off.cause) == (0, "disabled") and _misses(store)["decode:disabled"] == 1
    down = open_store("redis://127.0.0.1:1/0", store_identity(adapter.encoder), metrics=StoreMetrics(CollectorRegistry()))
    got = Consumer(adapter, down).fetch(ids)
    assert (got.pages, got.cause, got.codes) == (0, "store_miss", None)
    down.close()


def test_bad_labels_and_foreign_stores_are_refused_at_construction(adapter, store, tmp_path):
    with pytest.raises(ValueError, match="adapter='bad label'"):
        Consumer(adapter, store, label="bad label")
    other = open_store(f"embedded://{tmp_path}/o.sqlite3",
                       dataclasses.replace(store_identity(adapter.encoder), codec_revision="f" * 64))
    with pytest.raises(ValueError, match="identity"):
        Consumer(adapter, other)
    with pytest.raises(ValueError, match="page boundary"):
        Publisher(adapter.encoder, store).encode(_states(2 * PS).slice(1, 2 * PS))
    other.close()


def test_the_background_publisher_publishes_and_drops_when_full(adapter, store):
    import threading
    import time

    from sgl_scd.serving.publish_worker import PublishWorker

    done, gate = [], threading.Event()
    pub = Publisher(adapter.encoder, store)
    slow = Publisher(adapter.encoder, store)
    slow.encode = lambda states: (gate.wait(10), pub.encode(states))[1]  # holds the worker until released
    worker = PublishWorker(slow, max_queued=1, on_done=lambda *a: done.append(a))
    t = 3 * PS + 1
    ids = [list(range(i, i + t)) for i in (100, 200, 300)]
    assert worker.submit(ids[0], _states(t))  # taken by the worker, which then waits at the gate
    deadline = time.monotonic() + 5
    while worker.queued and time.monotonic() < deadline:  # until the worker took the first job
        time.sleep(0.01)
    assert worker.submit(ids[1], _states(t))  # waits in the queue
    assert not worker.submit(ids[2], _states(t))  # the queue is full: dropped, counted
    gate.set()
    assert worker.drain(10)
    assert sorted(d[2] or "ok" for d in done) == ["ok", "ok", "queue_full"] and worker.dropped == 1
    assert [d[0] for d in done if d[2] is None] == [3, 3]
    assert Consumer(adapter, store).fetch(ids[1] + [7]).pages == 3
    worker.close()


def test_the_device_paths_publish_and_fetch_what_the_cpu_reference_does(adapter, store):
    """Publisher(device=) encodes and packs in torch ops, Consumer(device=) unpacks in torch ops:
    on the CPU they give the reference's bytes and codes exactly (the GPU's run: scripts/gpu_run.sh)."""
    states = _states(3 * PS + 1, start=PS)
    assert Publisher(adapter.encoder, store, device="cpu").encode(states) == Publisher(adapter.encoder, store).encode(states)
    ids = _publish(adapter, store, 4 * PS + 1)
    want = Consumer(adapter, store).fetch(ids)
    got = Consumer(adapter, store, device="cpu").fetch(ids)
    assert got.pages == want.pages == 4 and all(torch.equal(got.codes[s], want.codes[s]) for s in want.codes)


def test_the_gate_ledger_skips_where_trying_costs_more_than_a_prefill_and_probes():
    ledger = GateLedger(window=6, min_seen=4, probe_every=3)
    assert all(ledger.should_try(90) for _ in range(5))  # nothing seen: always try
    # short prompts (64-127 tokens): every rebuild dropped, each attempt 0.5x the prefill it adds to
    for _ in range(4):
        ledger.record(90, dropped=True, attempt_s=0.05, prefill_s=0.1)
    assert ledger.expected_cost(100) == pytest.approx(1.5)  # c 0.5 + f 1.0 prefills
    tries = [ledger.should_try(100) for _ in range(6)]
    assert tries == [False, False, True, False, False, True]  # every 3rd skipped request probes
    # another length class keeps its own record; one where the gate drops a quarter pays (0.25 + 0.2 < 1)
    assert ledger.expected_cost(500) is None and ledger.should_try(500)
    for dropped in (True, False, False, False):
        ledger.record(500, dropped, attempt_s=0.02, prefill_s=0.1)
    assert ledger.expected_cost(500) == pytest.approx(0.45) and ledger.should_try(500)
    # the window follows the workload: once the short prompts' rebuilds are kept, they try again
    for _ in range(6):
        ledger.record(90, dropped=False)
    assert ledger.expected_cost(90) == 0.0 and ledger.should_try(90)
    with pytest.raises(ValueError, match="window=2, min_seen=4"):
        GateLedger(window=2, min_seen=4)
