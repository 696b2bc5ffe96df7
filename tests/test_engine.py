"""Producer publishes codes, consumer fetches and rebuilds, through a real store; any miss
falls back to prefill with identical output to the oracle."""

import pytest

from sgl_scd.demo import data
from sgl_scd.hf import runtime
from sgl_scd.serving.engine import ReuseEngine, store_identity
from sgl_scd.store import open_store

pytestmark = pytest.mark.model


@pytest.fixture()
def engine(tmp_path, base, demo_ft, small_adapter):
    store = open_store(f"embedded://{tmp_path}/store.sqlite3", store_identity(small_adapter), stats_flush_s=0)
    yield ReuseEngine(base, demo_ft, small_adapter, store, adapter_label="demo-ft")
    store.close()


def _ids(base, i=0):
    return data.prompt_ids(base.tokenizer, data.load_tomi("test")[i])


def _oracle_text(demo_ft, ids):
    return runtime.continue_from_kv(demo_ft.model, demo_ft.tokenizer, ids).text


def test_full_hit_rebuilds_all_full_pages(engine, base):
    ids = _ids(base)
    produced = engine.serve_producer(ids)
    ps = engine.page_size
    assert produced.published_pages == len(ids) // ps
    got = engine.serve_consumer(ids)
    assert got.reused_tokens == ((len(ids) - 1) // ps) * ps and got.miss_cause is None
    stats = engine.store.stats()
    assert stats["adapters"]["demo-ft"]["counters"]["hit_tokens"] == got.reused_tokens


def test_partial_hit_rebuilds_shared_pages_and_prefills_the_rest(engine, base, demo_ft):
    a, b = _ids(base, 0), _ids(base, 1)
    shared = next(i for i, (x, y) in enumerate(zip(a, b)) if x != y)  # common system prompt + more
    engine.serve_producer(a)
    got = engine.serve_consumer(b)
    assert got.reused_tokens == (shared // engine.page_size) * engine.page_size > 0
    assert got.miss_cause == "store_miss"


def test_corrupt_codes_are_a_counted_miss_and_output_equals_oracle(engine, base, demo_ft):
    ids = _ids(base, 2)
    cap = runtime.capture_prefill(base.model, ids)
    from sgl_scd.evaluation.methods import encode_prompt

    blobs = encode_prompt(engine.adapter, cap, engine.page_size, full_pages_only=True)
    tampered = [b[:60] + bytes([b[60] ^ 0xFF]) + b[61:] for b in blobs]  # wire CRC now fails
    engine.store.publish(engine.store.page_hashes(ids), tampered)
    got = engine.serve_consumer(ids)
    assert got.reused_tokens == 0 and got.miss_cause == "wire"
    assert got.text == _oracle_text(demo_ft, ids)
    assert engine.store.stats()["adapters"]["demo-ft"]["misses_by_cause"]["decode:wire"] == 1


def test_store_down_falls_back_to_prefill(base, demo_ft, small_adapter):
    store = open_store("redis://127.0.0.1:1/0", store_identity(small_adapter))  # nothing listens
    eng = ReuseEngine(base, demo_ft, small_adapter, store)
    ids = _ids(base, 4)
    assert eng.serve_producer(ids).published_pages == 0
    got = eng.serve_consumer(ids)
    assert got.reused_tokens == 0 and got.text == _oracle_text(demo_ft, ids)
    store.close()


def test_prefix_beyond_calibrated_length_is_prefilled_and_counted(engine, base):
    ids = _ids(base, 3)
    engine.serve_producer(ids)
    engine.max_reuse_pages = 2  # as if calibration had seen prompts of at most 2 pages
    got = engine.serve_consumer(ids)
    assert got.reused_tokens == 2 * engine.page_size and got.miss_cause == "beyond_calibration"
    causes = engine.store.stats()["adapters"]["demo-ft"]["misses_by_cause"]
    assert causes["decode:beyond_calibration"] == 1


def test_manifest_bounds_reuse_by_calibrated_length(small_adapter, engine):
    assert engine.max_reuse_pages == small_adapter.manifest["calibration"]["max_tokens"] // engine.page_size


def test_near_tie_gate_prefills_and_counts(tmp_path, base, demo_ft, small_adapter):
    """min_margin=1.0 rejects every rebuilt cache (a top-1 - top-2 gap of 1 needs a one-hot
    distribution): the request is answered by prefill, exactly the oracle, and counted."""
    store = open_store(f"embedded://{tmp_path}/gate.sqlite3", store_identity(small_adapter), stats_flush_s=0)
    eng = ReuseEngine(base, demo_ft, small_adapter, store, adapter_label="demo-ft", min_margin=1.0)
    ids = _ids(base, 5)
    eng.serve_producer(ids)
    got = eng.serve_consumer(ids)
    assert got.reused_tokens == 0 and got.miss_cause == "low_margin"
    assert got.text == _oracle_text(demo_ft, ids)
    assert store.stats()["adapters"]["demo-ft"]["misses_by_cause"]["decode:low_margin"] == 1
    store.close()


def test_engine_refuses_a_bad_min_margin(tmp_path, base, demo_ft, small_adapter):
    store = open_store(f"embedded://{tmp_path}/bad.sqlite3", store_identity(small_adapter))
    with pytest.raises(ValueError, match="got -0.1"):
        ReuseEngine(base, demo_ft, small_adapter, store, min_margin=-0.1)
    store.close()
