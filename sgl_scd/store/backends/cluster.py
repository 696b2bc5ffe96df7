"""Redis Cluster backend (redis+cluster:// and rediss+cluster://): the scale-out path.

Page keys carry no hash tag, so one prompt's pages land in many slots on
several nodes; redis-py's cluster pipeline splits a batch per node and sends
the per-node pipelines in one pass. The cluster client is created lazily, so
opening a store while the cluster is down succeeds and the first calls miss.
"""

from __future__ import annotations

import logging
import threading
from typing import Any

import redis
from redis.backoff import NoBackoff
from redis.cluster import RedisCluster
from redis.retry import Retry

from sgl_scd.store.backends.base import DEFAULT_TIMEOUTS, Timeouts
from sgl_scd.store.backends.redis import (
    _INFO_FIELDS,
    RedisBackend,
    connection_kwargs,
    redact_url,
    translate_redis_error,
)
from sgl_scd.store.errors import StoreUnavailable

logger = logging.getLogger(__name__)

_SUMMED_INFO = ("used_memory", "maxmemory", "evicted_keys", "expired_keys",
                "keyspace_hits", "keyspace_misses")


class RedisClusterBackend(RedisBackend):
    """A Redis Cluster reached through any one of its nodes (topology discovered)."""

    def __init__(
        self, url: str, timeouts: Timeouts = DEFAULT_TIMEOUTS, max_connections: int = 32
    ) -> None:
        scheme, sep, rest = url.partition("://")
        if not sep or scheme not in ("redis+cluster", "rediss+cluster"):
            raise ValueError(f"url={redact_url(url)!r}: expected redis+cluster:// or rediss+cluster://")
        self.url = redact_url(url)
        self._node_url = f"{scheme.split('+')[0]}://{rest}"
        self._timeouts = timeouts
        self._max_connections = max_connections
        self._lock = threading.Lock()
        self._client: Any = None
        self._closed = threading.Event()

    def _pipeline(self) -> Any:
        return self._cluster().pipeline()

    def _cluster(self) -> RedisCluster:
        """The cluster client, created (topology fetched) on first use; raises StoreUnavailable."""
        if self._closed.is_set():
            raise StoreUnavailable(f"{self.url} is closed", cause="unavailable")
        with self._lock:
            if self._client is None:
                try:
                    self._client = RedisCluster.from_url(
                        self._node_url,
                        retry=Retry(NoBackoff(), 1),
                        max_connections=self._max_connections,
                        **connection_kwargs(self._timeouts),
                    )
                except (redis.exceptions.RedisError, redis.exceptions.RedisClusterException,
                        OSError) as exc:
                    raise translate_redis_error(exc, "connect") from exc
            return self._client

    def read_counters(self, key_prefix: str) -> dict[str, dict[str, int]]:
        self._cluster()
        return super().read_counters(key_prefix)

    def info(self) -> dict[str, int | str]:
        client = self._cluster()
        try:
            per_node = client.info(target_nodes=RedisCluster.PRIMARIES)
            keys = client.dbsize(target_nodes=RedisCluster.PRIMARIES)
        except (redis.exceptions.RedisError, redis.exceptions.RedisClusterException) as exc:
            raise translate_redis_error(exc, "info") from exc
        if not isinstance(next(iter(per_node.values()), None), dict):
            per_node = {"node": per_node}  # a one-primary cluster answers with a flat dict
        out: dict[str, int | str] = {"backend": "redis-cluster", "nodes": len(per_node)}
        for name in _INFO_FIELDS:
            values = [info[name] for info in per_node.values() if name in info]
            if values:
                out[name] = sum(values) if name in _SUMMED_INFO else values[0]
        out["keys"] = int(keys)
        return out

    def close(self) -> None:
        if not self._closed.is_set():
            self._closed.set()
            with self._lock:
                if self._client is not None:
                    self._client.close()
