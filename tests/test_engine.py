"""Producer publishes codes, consumer fetches and rebuilds, through a real store; any miss
falls back to prefill with identical output to the oracle."""

import pytest
from store_fixtures import _fixture_redis_servers  # noqa: F401 - fixture

from sgl_scd.demo import data
from sgl_scd.hf import runtime
from sgl_scd.hf.scd import encode_capture
from sgl_scd.reuse import GateLedger, store_identity
from sgl_scd.serving.engine import ReuseEngine
from sgl_scd.store import open_store

pytestmark = pytest.mark.model


@pytest.fixture()
def engine(tmp_path, base, ci_ft, small_adapter):
    store = open_store(f"embedded://{tmp_path}/store.sqlite3", store_identity(small_adapter.encoder), stats_flush_s=0)
    yield ReuseEngine(base, small_adapter.encoder, store, {"ci-ft": (ci_ft, small_adapter)})
    store.close()


def _ids(base, i=0):
    return data.prompt_ids(base.tokenizer, data.load_tomi("test")[i])


def _oracle_text(ci_ft, ids):
    return runtime.continue_from_kv(ci_ft.model, ci_ft.tokenizer, ids).text


def test_full_hit_rebuilds_all_full_pages(engine, base):
    ids = _ids(base)
    produced = engine.serve_producer(ids)
    ps = engine.page_size
    assert produced.published_pages == len(ids) // ps
    got = engine.serve_consumer("ci-ft", ids)
    assert got.reused_tokens == ((len(ids) - 1) // ps) * ps and got.miss_cause is None
    stats = engine.store.stats()
    assert stats["adapters"]["ci-ft"]["counters"]["hit_tokens"] == got.reused_tokens


def test_partial_hit_rebuilds_shared_pages_and_prefills_the_rest(engine, base, ci_ft):
    a, b = _ids(base, 0), _ids(base, 1)
    shared = next(i for i, (x, y) in enumerate(zip(a, b)) if x != y)  # common system prompt + more
    engine.serve_producer(a)
    got = engine.serve_consumer("ci-ft", b)
    assert got.reused_tokens == (shared // engine.page_size) * engine.page_size > 0
    assert got.miss_cause == "store_miss"


def test_corrupt_codes_are_a_counted_miss_and_output_equals_oracle(engine, base, ci_ft):
    ids = _ids(base, 2)
    cap = runtime.capture_prefill(base.model, ids)
    blobs = encode_capture(engine.encoder, cap, full_pages_only=True)
    tampered = [b[:60] + bytes([b[60] ^ 0xFF]) + b[61:] for b in blobs]  # wire CRC now fails
    engine.store.publish(engine.store.page_hashes(ids), tampered)
    got = engine.serve_consumer("ci-ft", ids)
    assert got.reused_tokens == 0 and got.miss_cause == "wire"
    assert got.text == _oracle_text(ci_ft, ids)
    assert engine.store.stats()["adapters"]["ci-ft"]["misses_by_cause"]["decode:wire"] == 1


def test_store_down_falls_back_to_prefill(base, ci_ft, small_adapter):
    store = open_store("redis://127.0.0.1:1/0", store_identity(small_adapter.encoder))  # nothing listens
    eng = ReuseEngine(base, small_adapter.encoder, store, {"ci-ft": (ci_ft, small_adapter)})
    ids = _ids(base, 4)
    assert eng.serve_producer(ids).published_pages == 0
    got = eng.serve_consumer("ci-ft", ids)
    assert got.reused_tokens == 0 and got.text == _oracle_text(ci_ft, ids)
    store.close()


def test_prefix_beyond_calibrated_length_is_prefilled_and_counted(engine, base):
    ids = _ids(base, 3)
    engine.serve_producer(ids)
    engine.consumers["ci-ft"].reuse.max_tokens = 2 * engine.page_size  # as if calibration had seen 2 pages
    got = engine.serve_consumer("ci-ft", ids)
    assert got.reused_tokens == 2 * engine.page_size and got.miss_cause == "beyond_calibration"
    causes = engine.store.stats()["adapters"]["ci-ft"]["misses_by_cause"]
    assert causes["decode:beyond_calibration"] == 1


def test_manifest_bounds_reuse_by_calibrated_length(small_adapter, engine):
    assert engine.consumers["ci-ft"].reuse.max_tokens == small_adapter.manifest.max_tokens


def test_near_tie_gate_prefills_and_counts(tmp_path, base, ci_ft, small_adapter):
    """min_margin=1.0 rejects every rebuilt cache (a top-1 - top-2 gap of 1 needs a one-hot
    distribution): the request is answered by prefill, exactly the oracle, and counted."""
    store = open_store(f"embedded://{tmp_path}/gate.sqlite3", store_identity(small_adapter.encoder), stats_flush_s=0)
    eng = ReuseEngine(base, small_adapter.encoder, store, {"ci-ft": (ci_ft, small_adapter)}, min_margin=1.0)
    ids = _ids(base, 5)
    eng.serve_producer(ids)
    got = eng.serve_consumer("ci-ft", ids)
    assert got.reused_tokens == 0 and got.miss_cause == "low_margin"
    assert got.text == _oracle_text(ci_ft, ids)
    assert store.stats()["adapters"]["ci-ft"]["misses_by_cause"]["decode:low_margin"] == 1
    store.close()


def test_a_gate_that_drops_every_rebuild_stops_trying_and_probes(tmp_path, base, ci_ft, small_adapter):
    """min_margin=1.0 drops every rebuild, so once min_seen attempts are in, trying costs more
    than a prefill: requests prefill at once (gate_skip, counted), every probe_every-th tries."""
    store = open_store(f"embedded://{tmp_path}/skip.sqlite3", store_identity(small_adapter.encoder), stats_flush_s=0)
    eng = ReuseEngine(base, small_adapter.encoder, store, {"ci-ft": (ci_ft, small_adapter)}, min_margin=1.0)
    eng.consumers["ci-ft"].ledger = GateLedger(window=2, min_seen=2, probe_every=2)
    ids = _ids(base, 5)
    eng.serve_producer(ids)
    causes = [eng.serve_consumer("ci-ft", ids).miss_cause for _ in range(5)]
    assert causes == ["low_margin", "low_margin", "gate_skip", "low_margin", "gate_skip"]
    got = store.stats()["adapters"]["ci-ft"]["misses_by_cause"]
    assert got["decode:low_margin"] == 3 and got["decode:gate_skip"] == 2
    store.close()


def test_engine_refuses_a_bad_min_margin(tmp_path, base, ci_ft, small_adapter):
    store = open_store(f"embedded://{tmp_path}/bad.sqlite3", store_identity(small_adapter.encoder))
    with pytest.raises(ValueError, match="got -0.1"):
        ReuseEngine(base, small_adapter.encoder, store, {"ci-ft": (ci_ft, small_adapter)}, min_margin=-0.1)
    store.close()


def test_a_corrupt_page_reuses_the_pages_before_it(engine, base, ci_ft):
    """Page k of n fails the wire check: pages 0..k-1 are still rebuilt, the rest prefilled,
    and only the refused pages are counted (cause wire)."""
    ids = _ids(base, 6)
    ps = engine.page_size
    blobs = encode_capture(engine.encoder, runtime.capture_prefill(base.model, ids), full_pages_only=True)
    assert len(blobs) >= 3
    blobs[2] = blobs[2][:60] + bytes([blobs[2][60] ^ 0xFF]) + blobs[2][61:]
    engine.store.publish(engine.store.page_hashes(ids), blobs)
    got = engine.serve_consumer("ci-ft", ids)
    assert got.reused_tokens == 2 * ps and got.miss_cause == "wire"
    counters = engine.store.stats()["adapters"]["ci-ft"]["counters"]
    assert counters["rejected_pages"] == min(len(blobs), (len(ids) - 1) // ps) - 2


def test_two_consumers_reuse_one_published_code_set(tmp_path, base, ci_ft, ci_lora, small_adapter, lora_adapter):
    store = open_store(f"embedded://{tmp_path}/two.sqlite3", store_identity(small_adapter.encoder), stats_flush_s=0)
    eng = ReuseEngine(base, small_adapter.encoder, store,
                      {"ci-ft": (ci_ft, small_adapter), "ci-lora": (ci_lora, lora_adapter)})
    ids = _ids(base, 7)
    assert eng.serve_producer(ids).published_pages == len(ids) // eng.page_size  # published once
    full = ((len(ids) - 1) // eng.page_size) * eng.page_size
    for name in ("ci-ft", "ci-lora"):
        got = eng.serve_consumer(name, ids)
        assert got.reused_tokens == full and got.miss_cause is None
        assert store.stats()["adapters"][name]["counters"]["hit_tokens"] == full
    eng.consumers["ci-lora"].reuse.enabled = False  # the kill switch
    got = eng.serve_consumer("ci-lora", ids)
    assert got.reused_tokens == 0 and got.miss_cause == "disabled"
    assert store.stats()["adapters"]["ci-lora"]["misses_by_cause"]["decode:disabled"] == 1
    assert got.text == runtime.continue_from_kv(ci_lora.model, ci_lora.tokenizer, ids).text
    store.close()


@pytest.mark.redis
def test_reuse_through_a_real_redis(redis_servers, base, ci_ft, small_adapter):
    """The same path through a test-owned redis-server: published once, reused, counted there."""
    server = redis_servers()
    store = open_store(server.url, store_identity(small_adapter.encoder), stats_flush_s=0)
    eng = ReuseEngine(base, small_adapter.encoder, store, {"ci-ft": (ci_ft, small_adapter)})
    ids = _ids(base, 8)
    assert eng.serve_producer(ids).published_pages == len(ids) // eng.page_size
    got = eng.serve_consumer("ci-ft", ids)
    assert got.reused_tokens == ((len(ids) - 1) // eng.page_size) * eng.page_size and got.miss_cause is None
    assert store.stats()["adapters"]["ci-ft"]["counters"]["hit_tokens"] == got.reused_tokens
    store.close()
