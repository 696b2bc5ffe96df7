"""PrefixStore against the real Redis (SCD_TEST_REDIS_URL, default db 13 on 127.0.0.1:6379),
under a random key prefix deleted on teardown."""

from __future__ import annotations

import json
import struct
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
from store_fixtures import (  # noqa: F401 - fixtures
    _fixture_shared_redis,
    make_identity,
    make_store,
    metric,
    payloads_for,
    token_ids,
)

from sgl_scd.store.record import encode_record

pytestmark = pytest.mark.redis


@pytest.fixture(name="store")
def _fixture_store(shared_redis):
    url, prefix, _ = shared_redis
    store = make_store(url, key_prefix=prefix)
    yield store
    store.close()


def test_round_trip_counters_and_identity_descriptor(store, shared_redis):
    _, prefix, raw = shared_redis
    hashes = store.page_hashes(token_ids(16 * 300))
    payloads = payloads_for(300, 6000)  # code-sized pages; 300 > one 128-page batch
    assert store.publish(hashes, payloads, adapter="producer") == 300
    assert store.lookup_prefix(hashes, adapter="demo-ft") == 300
    assert store.fetch_prefix(hashes, adapter="demo-ft") == payloads
    stats = raw.hgetall(store.keys.stats_key("demo-ft"))
    assert int(stats[b"hit_tokens"]) == 300 * 16
    assert int(stats[b"bytes_read"]) == 300 * (84 + 6000)
    assert int(raw.hget(store.keys.stats_key("producer"), "pages_written")) == 300
    desc = json.loads(raw.get(store.keys.identity_key()))
    assert desc["digest"] == store.identity.digest_hex and desc["page_size"] == 16
    assert raw.ttl(store.keys.identity_key()) == -1  # descriptors never expire
    assert all(k.decode().startswith(f"{prefix}:") for k in raw.scan_iter(f"{prefix}:*"))


def test_raw_kv_sized_values(store):
    hashes = store.page_hashes(token_ids(16 * 8))
    payloads = payloads_for(8, 23040 * 16)  # 368,640 B: raw bf16 KV of a 16-token page
    assert store.publish(hashes, payloads) == 8
    assert store.fetch_prefix(hashes) == payloads


def test_ttl_is_set_with_the_value_and_expires(shared_redis):
    url, prefix, raw = shared_redis
    store = make_store(url, key_prefix=prefix, ttl_s=0.3)
    hashes = store.page_hashes(token_ids(48))
    assert store.publish(hashes, payloads_for(3, 100)) == 3
    assert 0 < raw.pttl(store.keys.page_key(hashes[0])) <= 300
    assert len(store.fetch_prefix(hashes)) == 3
    time.sleep(0.45)
    assert store.fetch_prefix(hashes) == []
    assert store.stats()["adapters"]["base"]["counters"]["miss:fetch:absent"] == 1
    store.close()


@pytest.mark.parametrize("damage,cause", [
    (lambda blob: blob[:-1] + bytes([blob[-1] ^ 0x40]), "corrupt_checksum"),
    (lambda blob: blob[: len(blob) // 2], "corrupt_truncated"),
    (lambda blob: blob[:4] + struct.pack("<H", 9) + blob[6:], "corrupt_version"),
    (lambda blob: b"garbage, not a record", "corrupt_magic"),
    (lambda blob: b"", "corrupt_truncated"),
])
def test_corrupted_values_are_misses(store, shared_redis, damage, cause):
    _, _, raw = shared_redis
    hashes = store.page_hashes(token_ids(16 * 4))
    payloads = payloads_for(4, 3000)
    store.publish(hashes, payloads)
    key = store.keys.page_key(hashes[2])
    raw.set(key, damage(raw.get(key)))
    assert store.fetch_prefix(hashes, adapter="victim") == payloads[:2]
    assert metric(store, "scd_store_misses_total", identity=store._label, adapter="victim",
                  op="fetch", cause=cause) == 1
    assert raw.hget(store.keys.stats_key("victim"), f"miss:fetch:{cause}") == b"1"


def test_a_value_copied_to_another_key_is_refused(store, shared_redis):
    _, _, raw = shared_redis
    hashes = store.page_hashes(token_ids(16 * 2))
    store.publish(hashes, payloads_for(2, 100))
    raw.set(store.keys.page_key(hashes[1]), raw.get(store.keys.page_key(hashes[0])))
    assert len(store.fetch_prefix(hashes)) == 1
    assert metric(store, "scd_store_misses_total", identity=store._label, adapter="base",
                  op="fetch", cause="corrupt_page") == 1


def test_foreign_identity_value_is_refused(store, shared_redis):
    _, _, raw = shared_redis
    hashes = store.page_hashes(token_ids(16))
    other = make_identity(producer_revision="rev-2")
    raw.set(store.keys.page_key(hashes[0]), encode_record(other.digest, hashes[0], 0, 16, b"x"))
    assert store.fetch_prefix(hashes) == []
    assert metric(store, "scd_store_misses_total", identity=store._label, adapter="base",
                  op="fetch", cause="corrupt_identity") == 1


def test_racing_writers_never_produce_a_torn_value(shared_redis):
    """Two writers overwrite the same pages with different payloads while a reader fetches:
    every page read is wholly one writer's payload; no read ever fails validation."""
    url, prefix, _ = shared_redis
    writers = [make_store(url, key_prefix=prefix) for _ in range(2)]
    reader = make_store(url, key_prefix=prefix)
    hashes = reader.page_hashes(token_ids(16 * 4))
    versions = [payloads_for(4, 50_000, tag=b"A"), payloads_for(4, 50_000, tag=b"B")]
    writers[0].publish(hashes, versions[0])
    stop = threading.Event()

    def write(store, payloads) -> int:
        rounds = 0
        while not stop.is_set():
            assert store.publish(hashes, payloads) == 4
            rounds += 1
        return rounds

    reads = 0
    with ThreadPoolExecutor(max_workers=2) as pool:
        futures = [pool.submit(write, w, v) for w, v in zip(writers, versions, strict=True)]
        deadline = time.monotonic() + 1.5
        try:
            while time.monotonic() < deadline:
                got = reader.fetch_prefix(hashes)
                assert len(got) == 4
                for i, payload in enumerate(got):
                    assert payload in (versions[0][i], versions[1][i])
                reads += 1
        finally:
            stop.set()
        rounds = [f.result() for f in futures]  # re-raises a writer's failure here
    assert min(rounds) > 5, rounds
    assert reads > 10
    assert reader.stats()["adapters"]["base"]["misses_by_cause"] == {}
    for s in (*writers, reader):
        s.close()
