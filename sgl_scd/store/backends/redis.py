"""Redis backend (redis:// and rediss://): one connection pool, explicit timeouts, pipelines.

Reads and writes of a batch go out as one non-transactional pipeline (one round
trip). A value is written with ``SET key value PX ttl`` so its expiry is set in
the same command. redis-py exceptions are translated into StoreUnavailable
here and nowhere else. Connections that died (Redis restarted) are replaced
on the next call; a call is retried once on a connection error, never on a
timeout, so a hung server costs at most one op timeout per call.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Sequence
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from sgl_scd.store.backends.base import (
    DEFAULT_TIMEOUTS,
    CounterUpdate,
    StoreBackend,
    Timeouts,
    counter_value,
)
from sgl_scd.store.errors import StoreUnavailable

logger = logging.getLogger(__name__)

_INFO_FIELDS = (
    "redis_version",
    "used_memory",
    "maxmemory",
    "maxmemory_policy",
    "evicted_keys",
    "expired_keys",
    "keyspace_hits",
    "keyspace_misses",
)


def translate_redis_error(exc: BaseException, op: str) -> StoreUnavailable:
    """Map a redis-py exception to StoreUnavailable with a metric-friendly cause."""
    if isinstance(exc, redis.exceptions.TimeoutError):
        cause = "timeout"
    elif isinstance(exc, redis.exceptions.OutOfMemoryError) or str(exc).startswith("OOM"):
        cause = "oom"
    elif isinstance(exc, redis.exceptions.ReadOnlyError):
        cause = "readonly"
    elif isinstance(
        exc,
        (redis.exceptions.ClusterError, redis.exceptions.RedisClusterException),
    ):
        cause = "cluster"
    elif isinstance(exc, (redis.exceptions.ConnectionError, OSError)):
        cause = "unavailable"
    else:
        cause = "error"
    return StoreUnavailable(f"redis {op} failed: {type(exc).__name__}: {exc}", cause=cause)


def redact_url(url: str) -> str:
    """url without its password."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = parts.netloc.rsplit("@", 1)[1]
    user = parts.username or ""
    return urlunsplit(parts._replace(netloc=f"{user}:***@{netloc}"))


def connection_kwargs(timeouts: Timeouts) -> dict[str, Any]:
    """redis-py connection settings shared by the single-node and cluster backends."""
    return {
        "socket_connect_timeout": timeouts.connect_s,
        "socket_timeout": timeouts.op_s,
        "socket_keepalive": True,
    }


def glob_escape(text: str) -> str:
    return "".join("\\" + c if c in "*?[]\\" else c for c in text)


class RedisBackend(StoreBackend):
    """A single Redis server (or a proxy that speaks its protocol)."""

    def __init__(
        self, url: str, timeouts: Timeouts = DEFAULT_TIMEOUTS, max_connections: int = 32
    ) -> None:
        self.url = redact_url(url)
        self._timeouts = timeouts
        self._pool = redis.ConnectionPool.from_url(
            url,
            max_connections=max_connections,
            retry=Retry(NoBackoff(), 1, supported_errors=(redis.exceptions.ConnectionError,)),
            **connection_kwargs(timeouts),
        )
        self._client = redis.Redis(connection_pool=self._pool)
        self._closed = threading.Event()

    # -- StoreBackend ------------------------------------------------------------------
    def get_many(self, keys: Sequence[str]) -> list[bytes | None]:
        if not keys:
            return []
        return self._run("get", lambda p: [p.get(k) for k in keys])

    def exists_many(self, keys: Sequence[str]) -> list[bool]:
        if not keys:
            return []
        return [bool(n) for n in self._run("exists", lambda p: [p.exists(k) for k in keys])]

    def set_many(self, items: Sequence[tuple[str, bytes]], ttl_ms: int | None) -> None:
        if not items:
            return
        results = self._run(
            "set", lambda p: [p.set(k, v, px=ttl_ms) for k, v in items], raise_on_error=False
        )
        self._raise_partial(results, "set")

    def incr_counters(self, updates: Sequence[CounterUpdate]) -> None:
        def queue(p: Any) -> None:
            for u in updates:
                for name, delta in u.deltas.items():
                    p.hincrby(u.key, name, int(delta))
                if u.ttl_ms is not None:
                    p.pexpire(u.key, u.ttl_ms)

        if updates:
            self._raise_partial(self._run("hincrby", queue, raise_on_error=False), "hincrby")

    def read_counters(self, key_prefix: str) -> dict[str, dict[str, int]]:
        try:
            keys = sorted(
                k.decode() if isinstance(k, bytes) else k
                for k in self._client.scan_iter(
                    match=glob_escape(key_prefix) + "*", count=1000, _type="hash"
                )
            )
        except (redis.exceptions.RedisError, redis.exceptions.RedisClusterException) as exc:
            raise translate_redis_error(exc, "scan") from exc
        out: dict[str, dict[str, int]] = {}
        for i in range(0, len(keys), 256):
            chunk = keys[i : i + 256]
            hashes = self._run("hgetall", lambda p, c=chunk: [p.hgetall(k) for k in c])
            for key, fields in zip(chunk, hashes, strict=True):
                row = out[key] = {}
                for f, v in fields.items():
                    n = counter_value(v)
                    if n is None:  # another writer's value: skipped, the rest still reported
                        logger.warning("redis %s: counter %s/%r holds %r, not an integer; skipped", self.url, key, f, v)
                        continue
                    row[f.decode(errors="replace") if isinstance(f, bytes) else str(f)] = n
        return out

    def info(self) -> dict[str, int | str]:
        try:
            raw = self._client.info()
            keys = self._client.dbsize()
        except redis.exceptions.RedisError as exc:
            raise translate_redis_error(exc, "info") from exc
        out: dict[str, int | str] = {k: raw[k] for k in _INFO_FIELDS if k in raw}
        out["keys"] = int(keys)
        out["backend"] = "redis"
        return out

    def close(self) -> None:
        if not self._closed.is_set():
            self._closed.set()
            self._client.close()
            self._pool.disconnect()

    # -- helpers -----------------------------------------------------------------------
    def _pipeline(self) -> Any:
        return self._client.pipeline(transaction=False)

    def _run(self, op: str, queue: Any, raise_on_error: bool = True) -> list[Any]:
        """Queue commands on a fresh pipeline, execute it, translate failures."""
        if self._closed.is_set():
            raise StoreUnavailable(f"{self.url} is closed", cause="unavailable")
        try:
            with self._pipeline() as pipe:
                queue(pipe)
                return pipe.execute(raise_on_error=raise_on_error)
        except (redis.exceptions.RedisError, redis.exceptions.RedisClusterException, OSError) as exc:
            raise translate_redis_error(exc, op) from exc

    @staticmethod
    def _raise_partial(results: list[Any], op: str) -> None:
        errors = [r for r in results if isinstance(r, Exception)]
        if errors:
            err = translate_redis_error(errors[0], op)
            err.written = len(results) - len(errors)
            raise err
