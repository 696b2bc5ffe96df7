"""Failure policy against test-owned redis-server processes: a Redis that dies, hangs, fills
up or is flushed yields misses (counted by cause), never an exception, and the client
recovers when Redis comes back."""

from __future__ import annotations

import time

import pytest
from store_fixtures import (  # noqa: F401 - fixtures
    _fixture_redis_servers,
    make_store,
    metric,
    payloads_for,
    token_ids,
)

from sgl_scd.store import Breaker, Timeouts

pytestmark = pytest.mark.redis


def misses(store, cause: str, op: str = "fetch", adapter: str = "base") -> float:
    return metric(store, "scd_store_misses_total", identity=store._label, adapter=adapter,
                  op=op, cause=cause)


def wait_until(predicate, timeout_s: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.05)
    return False


def test_redis_killed_mid_run_then_restarted(redis_servers):
    server = redis_servers()
    store = make_store(server.url)
    hashes = store.page_hashes(token_ids(16 * 6))
    payloads = payloads_for(6, 2000)
    assert store.publish(hashes, payloads) == 6
    assert store.fetch_prefix(hashes) == payloads

    server.kill()
    t0 = time.monotonic()
    for _ in range(20):  # nothing raises, and the breaker keeps the calls cheap
        assert store.fetch_prefix(hashes) == []
        assert store.lookup_prefix(hashes) == 0
        assert store.publish(hashes, payloads) == 0
    assert time.monotonic() - t0 < 2.0
    assert misses(store, "unavailable") + misses(store, "breaker_open") == 20
    assert misses(store, "unavailable") >= 1

    server.start()  # same port, empty (no persistence)
    assert wait_until(lambda: store.publish(hashes, payloads) == 6)
    assert store.fetch_prefix(hashes) == payloads
    # counters buffered during the outage reached the restarted (empty) Redis after recovery:
    # 20 fetches during the outage + 1 after; the one before the crash died with the server
    counters = store.stats()["adapters"]["base"]["counters"]
    assert counters["miss:fetch:unavailable"] >= 1
    assert counters["fetches"] == 21
    store.close()


def test_hung_redis_times_out_as_a_miss(redis_servers):
    server = redis_servers()
    store = make_store(server.url, timeouts=Timeouts(connect_s=0.2, op_s=0.3),
                       breaker=Breaker(0.2, 0.2))
    hashes = store.page_hashes(token_ids(16 * 3))
    payloads = payloads_for(3, 500)
    assert store.publish(hashes, payloads) == 3
    server.pause()
    try:
        t0 = time.monotonic()
        assert store.fetch_prefix(hashes) == []
        assert time.monotonic() - t0 < 1.0  # one op timeout, no retries on timeout
        assert misses(store, "timeout") == 1
        assert store.fetch_prefix(hashes) == []  # breaker open: no second timeout
        assert misses(store, "breaker_open") == 1
    finally:
        server.resume()
    assert wait_until(lambda: store.fetch_prefix(hashes) == payloads)
    store.close()


def test_flushed_redis_is_a_plain_miss(redis_servers):
    server = redis_servers()
    store = make_store(server.url)
    hashes = store.page_hashes(token_ids(16 * 2))
    store.publish(hashes, payloads_for(2, 100))
    server.client().flushall()
    assert store.fetch_prefix(hashes) == []
    assert misses(store, "absent") == 1
    assert store.publish(hashes, payloads_for(2, 100)) == 2  # and it refills
    assert len(store.fetch_prefix(hashes)) == 2
    store.close()


def _limit_memory(server, headroom: int, policy: str) -> None:
    raw = server.client()
    used = int(raw.info("memory")["used_memory"])
    raw.config_set("maxmemory", used + headroom)
    raw.config_set("maxmemory-policy", policy)
    raw.config_set("maxmemory-samples", 10)


def test_eviction_under_maxmemory_gives_misses_not_errors(redis_servers):
    """With the deployment's volatile-lru policy, a full Redis evicts old pages (they carry
    TTLs): later fetches miss, writes keep succeeding, the counter hashes (no TTL) survive."""
    server = redis_servers()
    store = make_store(server.url, batch_pages=4)
    store.publish(store.page_hashes(token_ids(16)), [b"warm"])  # create the stats hash first
    _limit_memory(server, 3 * 2**20, "volatile-lru")
    hashes = store.page_hashes(token_ids(16 * 100))
    payloads = payloads_for(100, 100_000)  # 10 MB into 3 MB of headroom
    assert store.publish(hashes, payloads) == 100
    assert int(server.client().info("stats")["evicted_keys"]) > 0
    got = store.fetch_prefix(hashes)
    assert len(got) < 100 and got == payloads[: len(got)]
    assert misses(store, "absent") == 1
    # Redis's LRU clock has 1 s resolution, so which pages written within that second go is
    # arbitrary; what holds: some pages were evicted and the rest (about 3 MB) are still served
    resident = sum(store.backend.exists_many([store.keys.page_key(h) for h in hashes]))
    assert 10 <= resident < 100
    assert store.stats()["adapters"]["base"]["counters"]["pages_written"] == 101
    store.close()


def test_writes_into_a_full_redis_do_not_raise(redis_servers):
    """noeviction + maxmemory: SETs fail with OOM; publish stores what fits, counts
    write_error:oom, and reads keep working (OOM does not open the breaker)."""
    server = redis_servers()
    store = make_store(server.url, batch_pages=4)
    hashes = store.page_hashes(token_ids(16 * 40))
    payloads = payloads_for(40, 100_000)
    store.publish(hashes[:1], payloads[:1])  # identity descriptor + stats hash exist
    _limit_memory(server, 2**20, "noeviction")
    written = store.publish(hashes[1:], payloads[1:], first_page=1)
    assert 0 <= written < 39
    assert metric(store, "scd_store_write_errors_total", identity=store._label, adapter="base",
                  cause="oom") == 1
    assert store.publish(hashes[1:], payloads[1:], first_page=1) < 39  # still no exception
    assert store.breaker.allow()
    assert store.fetch_prefix(hashes) == payloads[: 1 + written]


def test_foreign_values_in_the_embedded_file_are_counted_misses(tmp_path):
    """Another writer left a TEXT page value and a non-integer counter in the SQLite file: the
    page is a corrupt miss (never returned) and stats() still reports the other counters."""
    import sqlite3

    store = make_store(f"embedded://{tmp_path}/x.sqlite3", stats_flush_s=0)
    ids = token_ids(16 * 3)
    hashes = store.page_hashes(ids)
    assert store.publish(hashes, payloads_for(3, 64)) == 3
    store.flush_stats()
    db = sqlite3.connect(tmp_path / "x.sqlite3")
    db.execute("UPDATE kv SET value = 'not bytes' WHERE key = ?", (store.keys.page_key(hashes[1]),))
    db.execute("UPDATE counters SET value = 'x' WHERE field = 'publishes'")
    db.commit()
    db.close()
    assert len(store.fetch_prefix(hashes)) == 1  # page 0 intact, page 1 refused
    assert misses(store, "corrupt_truncated") == 1
    counters = store.stats()["adapters"]["base"]["counters"]
    assert "publishes" not in counters and counters["pages_written"] == 3
    store.close()


def test_a_non_integer_counter_in_redis_does_not_break_stats(redis_servers):
    server = redis_servers()
    store = make_store(server.url, stats_flush_s=0)
    store.publish(store.page_hashes(token_ids(32)), payloads_for(2, 64))
    store.flush_stats()
    client = server.client()
    key = next(k for k in client.scan_iter(match="*stats*") if client.type(k) == b"hash")
    client.hset(key, "publishes", "garbage")
    counters = store.stats()["adapters"]["base"]["counters"]
    assert "publishes" not in counters and counters["pages_written"] == 2
    store.close()
