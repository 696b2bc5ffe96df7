"""PrefixStore on a 3-node Redis Cluster started by store/redis-local.sh: a prompt's pages
spread over slots and nodes; one node dying costs the pages it owns, never an exception."""

from __future__ import annotations

import time
import uuid

import pytest
import redis
from redis.cluster import RedisCluster, key_slot
from store_fixtures import (  # noqa: F401 - fixtures
    _fixture_redis_cluster,
    free_port,
    kill_cluster_node,
    local_cluster,
    make_store,
    metric,
    payloads_for,
    raw_client,
    token_ids,
)

pytestmark = pytest.mark.redis


def node_ports(cluster_url: str, keys: list[str]) -> list[int]:
    """Port of the primary that owns each key."""
    client = RedisCluster.from_url(cluster_url.replace("redis+cluster", "redis"))
    try:
        return [client.get_node_from_key(k).port for k in keys]
    finally:
        client.close()


def test_pages_span_slots_and_nodes(redis_cluster):
    store = make_store(redis_cluster["url"], key_prefix=f"t{uuid.uuid4().hex[:8]}")
    hashes = store.page_hashes(token_ids(16 * 200))
    keys = [store.keys.page_key(h) for h in hashes]
    assert len({key_slot(k.encode()) for k in keys}) > 150
    assert set(node_ports(redis_cluster["url"], keys)) == set(redis_cluster["ports"])
    payloads = payloads_for(200, 6000)
    assert store.publish(hashes, payloads, adapter="producer") == 200
    assert store.lookup_prefix(hashes, adapter="demo-ft") == 200
    assert store.fetch_prefix(hashes, adapter="demo-ft") == payloads
    stats = store.stats()  # counter hashes are found by scanning every primary
    assert stats["backend_error"] is None
    assert stats["adapters"]["demo-ft"]["counters"]["hit_pages"] == 200
    assert stats["adapters"]["producer"]["counters"]["pages_written"] == 200
    info = store.backend.info()
    assert info["backend"] == "redis-cluster" and info["nodes"] == 3
    store.close()


def test_opening_while_the_cluster_is_down_is_not_an_error():
    store = make_store(f"redis+cluster://127.0.0.1:{free_port()}")
    hashes = store.page_hashes(token_ids(32))
    assert store.fetch_prefix(hashes) == []
    assert store.publish(hashes, [b"a", b"b"]) == 0
    assert metric(store, "scd_store_misses_total", identity=store._label, adapter="base",
                  op="fetch", cause="cluster") == 1
    store.close()


def test_a_dead_node_costs_only_its_pages(tmp_path):
    with local_cluster(tmp_path) as cluster:
        store = make_store(cluster["url"])
        hashes = store.page_hashes(token_ids(16 * 30))
        payloads = payloads_for(30, 1000)
        assert store.publish(hashes, payloads) == 30
        owners = node_ports(cluster["url"], [store.keys.page_key(h) for h in hashes])
        victim = owners[5] if owners[5] != owners[0] else next(p for p in owners if p != owners[0])
        first_lost = owners.index(victim)
        assert first_lost > 0
        kill_cluster_node(cluster, victim)
        t0 = time.monotonic()
        got = store.fetch_prefix(hashes)
        assert time.monotonic() - t0 < 3.0
        # the run stops at or before the first page the dead node owned; nothing raises
        assert got == payloads[: len(got)] and len(got) <= first_lost
        assert store.publish(hashes, payloads) < 30
        cause_total = sum(
            metric(store, "scd_store_misses_total", identity=store._label, adapter="base",
                   op="fetch", cause=c)
            for c in ("unavailable", "cluster", "timeout", "breaker_open")
        )
        assert cause_total == 1
        store.close()
        with pytest.raises(redis.exceptions.ConnectionError):
            raw_client(victim, 0.2).ping()
