"""In-process Prometheus metrics of the store client.

All metrics live in one StoreMetrics object bound to one CollectorRegistry.
``StoreMetrics.default()`` is bound to the module-level STORE_REGISTRY (created
once per process, so repeated clients never re-register); tests and embedders
pass their own registry. Expose STORE_REGISTRY with
``prometheus_client.start_http_server(port, registry=STORE_REGISTRY)`` or merge
it into the server's /metrics.

Labels: identity (first 12 hex of the identity digest), adapter, op
("lookup" = existence probe, "fetch" = retrieve), cause (miss/write-error cause).
"""

from __future__ import annotations

import threading
from typing import Self

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

STORE_REGISTRY = CollectorRegistry(auto_describe=True)

_RATE_BUCKETS = (0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.99, 1.0)
_LATENCY_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1,
                    0.25, 0.5, 1.0, 2.5)


class ProcessDefault:
    """Mixin: cls.default() is one process-wide instance, built without arguments on first call
    (a Prometheus registry refuses the same metric names twice)."""

    _default_lock = threading.Lock()

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        cls._default = None

    @classmethod
    def default(cls) -> Self:
        with ProcessDefault._default_lock:
            if cls._default is None:
                cls._default = cls()
            return cls._default


class StoreMetrics(ProcessDefault):
    """The store's Prometheus metrics in one registry. Recording methods are thread-safe."""

    def __init__(self, registry: CollectorRegistry = STORE_REGISTRY) -> None:
        self.registry = registry
        ia = ["identity", "adapter"]
        self.lookup_tokens = Counter(
            "scd_store_lookup_tokens", "Tokens asked for (full pages x page size)",
            [*ia, "op"], registry=registry)
        self.hit_tokens = Counter(
            "scd_store_hit_tokens", "Tokens found as a valid leading run of pages",
            [*ia, "op"], registry=registry)
        self.hit_rate = Gauge(
            "scd_store_hit_rate", "Cumulative fetched hit tokens / asked tokens", ia,
            registry=registry)
        self.request_hit_rate = Histogram(
            "scd_store_request_hit_rate", "Per-request fraction of asked pages fetched", ia,
            buckets=_RATE_BUCKETS, registry=registry)
        self.latency = Histogram(
            "scd_store_op_seconds", "Store call latency, failures included", ["op"],
            buckets=_LATENCY_BUCKETS, registry=registry)
        self.bytes = Counter(
            "scd_store_bytes", "Record bytes moved (header + payload)",
            [*ia, "direction"], registry=registry)
        self.misses = Counter(
            "scd_store_misses", "Requests that stopped short of all asked pages, by cause",
            [*ia, "op", "cause"], registry=registry)
        self.write_errors = Counter(
            "scd_store_write_errors", "Publish calls that did not store every page, by cause",
            [*ia, "cause"], registry=registry)
        self.pages_written = Counter(
            "scd_store_pages_written", "Pages published", ia, registry=registry)
        self._lock = threading.Lock()
        self._asked: dict[tuple[str, str], float] = {}
        self._hit: dict[tuple[str, str], float] = {}

    def record_probe(self, identity: str, adapter: str, asked: int, hit: int,
                     cause: str | None) -> None:
        self.lookup_tokens.labels(identity, adapter, "lookup").inc(asked)
        self.hit_tokens.labels(identity, adapter, "lookup").inc(hit)
        if cause is not None:
            self.misses.labels(identity, adapter, "lookup", cause).inc()

    def record_fetch(self, identity: str, adapter: str, asked: int, hit: int, nbytes: int,
                     cause: str | None) -> None:
        self.lookup_tokens.labels(identity, adapter, "fetch").inc(asked)
        self.hit_tokens.labels(identity, adapter, "fetch").inc(hit)
        self.bytes.labels(identity, adapter, "read").inc(nbytes)
        if asked:
            self.request_hit_rate.labels(identity, adapter).observe(hit / asked)
        if cause is not None:
            self.misses.labels(identity, adapter, "fetch", cause).inc()
        with self._lock:
            key = (identity, adapter)
            self._asked[key] = self._asked.get(key, 0.0) + asked
            self._hit[key] = self._hit.get(key, 0.0) + hit
            if self._asked[key]:
                self.hit_rate.labels(identity, adapter).set(self._hit[key] / self._asked[key])

    def record_publish(self, identity: str, adapter: str, pages: int, nbytes: int,
                       cause: str | None) -> None:
        self.pages_written.labels(identity, adapter).inc(pages)
        self.bytes.labels(identity, adapter, "write").inc(nbytes)
        if cause is not None:
            self.write_errors.labels(identity, adapter, cause).inc()
