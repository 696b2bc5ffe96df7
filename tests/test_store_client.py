"""PrefixStore behaviour on the embedded backend: prefix semantics, isolation, stats, metrics,
the failure policy and the circuit breaker."""

from __future__ import annotations

import pytest
from prometheus_client import CollectorRegistry
from store_fixtures import free_port, make_identity, make_store, metric, payloads_for, token_ids

from sgl_scd.store import (
    STORE_REGISTRY,
    Breaker,
    PrefixStore,
    StoreMetrics,
    open_store,
    resolve_url,
)
from sgl_scd.store.backends import Timeouts
from sgl_scd.store.backends.redis import RedisBackend
from sgl_scd.store.record import encode_record


@pytest.fixture(name="store")
def _fixture_store(tmp_path):
    store = make_store(f"embedded://{tmp_path}")
    yield store
    store.close()


def test_round_trip_and_longest_prefix(store):
    hashes = store.page_hashes(token_ids(16 * 10 + 5))
    assert len(hashes) == 10  # the partial page is never keyed
    payloads = payloads_for(10, 700)
    assert store.publish(hashes[:6], payloads[:6]) == 6
    assert store.lookup_prefix(hashes) == 6
    assert store.fetch_prefix(hashes) == payloads[:6]
    # a hole stops the run even if later pages exist
    assert store.publish(hashes[7:], payloads[7:], first_page=7) == 3
    assert store.lookup_prefix(hashes) == 6
    assert store.fetch_prefix(hashes) == payloads[:6]
    assert store.fetch_prefix(hashes[7:], first_page=7) == payloads[7:]
    assert store.fetch_prefix([]) == [] and store.lookup_prefix([]) == 0


def test_page_index_is_checked(store):
    """A page published at one chain position is not served at another."""
    hashes = store.page_hashes(token_ids(32))
    store.publish(hashes[1:], payloads_for(1, 10), first_page=1)
    assert store.fetch_prefix(hashes[1:], first_page=0) == []
    assert metric(store, "scd_store_misses_total", identity=store._label, adapter="base",
                  op="fetch", cause="corrupt_page") == 1


def test_identities_are_isolated(tmp_path):
    url = f"embedded://{tmp_path}"
    a = make_store(url, make_identity())
    b = make_store(url, make_identity(codec_revision="codec-r2"))
    hashes = a.page_hashes(token_ids(64))
    assert hashes == b.page_hashes(token_ids(64))  # same chain, different namespace
    a.publish(hashes, payloads_for(4, 50))
    assert b.lookup_prefix(hashes) == 0 and b.fetch_prefix(hashes) == []
    # a value planted under b's key by a writer of identity a is refused as foreign
    foreign = encode_record(a.identity.digest, hashes[0], 0, 16, b"x")
    b.backend.set_many([(b.keys.page_key(hashes[0]), foreign)], None)
    assert b.fetch_prefix(hashes) == []
    assert b.stats()["adapters"]["base"]["counters"]["miss:fetch:corrupt_identity"] == 1
    a.close()
    b.close()


def test_salted_identity_uses_a_seeded_chain(tmp_path):
    plain = make_store(f"embedded://{tmp_path}")
    salted = make_store(f"embedded://{tmp_path}", make_identity(cache_salt="tenant-a"))
    tokens = token_ids(64)
    assert plain.page_hashes(tokens) != salted.page_hashes(tokens)


def test_stats_per_adapter_and_derived_figures(store):
    hashes = store.page_hashes(token_ids(16 * 4))
    payloads = payloads_for(4, 1000)
    store.publish(hashes[:3], payloads[:3], adapter="producer")
    store.fetch_prefix(hashes, adapter="demo-ft")
    store.fetch_prefix(hashes[:2], adapter="demo-ft")
    store.lookup_prefix(hashes, adapter="other")
    stats = store.stats()
    assert stats["backend_error"] is None
    ft = stats["adapters"]["demo-ft"]
    assert ft["counters"]["fetches"] == 2
    assert ft["counters"]["fetch_tokens"] == 6 * 16
    assert ft["counters"]["hit_tokens"] == 5 * 16
    assert ft["counters"]["miss:fetch:absent"] == 1
    assert ft["fetch_hit_rate"] == pytest.approx(5 / 6)
    assert ft["counters"]["bytes_read"] == 5 * (84 + 1000)
    assert stats["adapters"]["producer"]["counters"]["bytes_written"] == 3 * (84 + 1000)
    assert stats["adapters"]["other"]["lookup_hit_rate"] == pytest.approx(3 / 4)
    prefixes = store.backend.read_counters(store.keys.prefixes_key("demo-ft"))
    assert prefixes == {store.keys.prefixes_key("demo-ft"): {
        f"3:{hashes[2][:16]}": 1, f"2:{hashes[1][:16]}": 1}}


def test_prometheus_metrics(store):
    hashes = store.page_hashes(token_ids(16 * 4))
    store.publish(hashes[:2], payloads_for(2, 100))
    store.fetch_prefix(hashes, adapter="a1")
    labels = {"identity": store._label, "adapter": "a1"}
    assert metric(store, "scd_store_lookup_tokens_total", op="fetch", **labels) == 64
    assert metric(store, "scd_store_hit_tokens_total", op="fetch", **labels) == 32
    assert metric(store, "scd_store_hit_rate", **labels) == 0.5
    assert metric(store, "scd_store_request_hit_rate_count", **labels) == 1
    assert metric(store, "scd_store_request_hit_rate_sum", **labels) == 0.5
    assert metric(store, "scd_store_bytes_total", direction="read", **labels) == 2 * 184
    assert metric(store, "scd_store_op_seconds_count", op="fetch") == 1
    assert metric(store, "scd_store_misses_total", op="fetch", cause="absent", **labels) == 1


def test_default_metrics_registry_is_shared_without_duplicate_registration(tmp_path):
    first = open_store(f"embedded://{tmp_path}/a", make_identity())
    second = open_store(f"embedded://{tmp_path}/b", make_identity())
    assert first.metrics is second.metrics is StoreMetrics.default()
    assert first.metrics.registry is STORE_REGISTRY
    first.close()
    second.close()


def test_url_precedence(monkeypatch):
    monkeypatch.delenv("SCD_STORE_URL", raising=False)
    assert resolve_url(None) == "embedded://"
    monkeypatch.setenv("SCD_STORE_URL", "redis://h:1/0")
    assert resolve_url(None) == "redis://h:1/0"
    assert resolve_url("redis+cluster://c:2") == "redis+cluster://c:2"


def test_caller_bugs_raise_value_errors(store):
    hashes = store.page_hashes(token_ids(32))
    with pytest.raises(ValueError, match="2 page hashes but 1 payloads"):
        store.publish(hashes, [b"x"])
    with pytest.raises(ValueError, match="page_hash='nothex'"):
        store.fetch_prefix(["nothex"])
    with pytest.raises(ValueError, match="adapter='bad adapter'"):
        store.lookup_prefix(hashes, adapter="bad adapter")
    with pytest.raises(ValueError, match="first_page=-1"):
        store.fetch_prefix(hashes, first_page=-1)
    with pytest.raises(ValueError, match="unknown scheme 'memcached'"):
        open_store("memcached://x", make_identity())
    with pytest.raises(ValueError, match="ttl_s=0"):
        make_store(f"embedded://{store.backend.path.parent}/t", ttl_s=0)


class _CountingRedisBackend(RedisBackend):
    """A real Redis backend aimed at a closed loopback port (connection refused), counting the
    calls that reach it, to check the breaker's timing with a controlled clock."""

    def __init__(self) -> None:
        super().__init__(f"redis://127.0.0.1:{free_port()}/0", Timeouts(0.2, 0.2))
        self.calls = 0

    def _run(self, op, queue, raise_on_error=True):
        self.calls += 1
        return super()._run(op, queue, raise_on_error)


def test_breaker_skips_a_failing_backend_then_probes_again():
    clock = [0.0]
    backend = _CountingRedisBackend()
    store = PrefixStore(backend, make_identity(), metrics=StoreMetrics(CollectorRegistry()),
                        breaker=Breaker(1.0, 4.0, clock=lambda: clock[0]), stats_flush_s=0)
    hashes = store.page_hashes(token_ids(32))
    assert store.fetch_prefix(hashes) == []
    assert backend.calls == 1  # the stats flush was skipped: breaker open
    for _ in range(5):
        assert store.fetch_prefix(hashes) == [] and store.publish(hashes, [b"a", b"b"]) == 0
    assert backend.calls == 1
    clock[0] = 1.0  # pause over: one probe, which fails and doubles the pause
    assert store.lookup_prefix(hashes) == 0
    assert backend.calls == 2
    clock[0] = 2.5
    assert store.fetch_prefix(hashes) == [] and backend.calls == 2
    stats = store.stats()  # analytics bypass the breaker to report what they can
    assert stats["backend_error"] == "unavailable"
    counters = stats["adapters"]["base"]["counters"]
    assert counters["miss:fetch:unavailable"] == 1
    assert counters["miss:lookup:unavailable"] == 1
    assert counters["miss:fetch:breaker_open"] == 6
    assert counters["write_error:breaker_open"] == 5
    store.close()


def test_full_store_does_not_open_the_breaker(tmp_path):
    store = make_store(f"embedded://{tmp_path}?max_bytes=1KiB", breaker=Breaker(60, 60))
    hashes = store.page_hashes(token_ids(16))
    assert store.publish(hashes, [b"a" * 2000]) == 0
    assert store.breaker.allow()  # reads keep going to a full store
    assert store.publish(hashes, [b"a" * 10]) == 1
    assert store.fetch_prefix(hashes) == [b"a" * 10]
    store.close()


def test_breaker_validation():
    with pytest.raises(ValueError, match=r"base_s \(2\) <= max_s \(1\)"):
        Breaker(2, 1)
