"""Store backends, chosen by URL scheme.

    embedded:// | embedded:///path[?max_bytes=2GiB]   SQLite file, no server (default)
    redis://host:port/db | rediss://...                 one Redis server
    redis+cluster://host:port | rediss+cluster://...    Redis Cluster (any node)
"""

from __future__ import annotations

from sgl_scd.store.backends.base import DEFAULT_TIMEOUTS, CounterUpdate, StoreBackend, Timeouts

SCHEMES = ("embedded", "redis", "rediss", "redis+cluster", "rediss+cluster")

__all__ = ["DEFAULT_TIMEOUTS", "SCHEMES", "CounterUpdate", "StoreBackend", "Timeouts", "open_backend"]


def open_backend(url: str, timeouts: Timeouts = DEFAULT_TIMEOUTS) -> StoreBackend:
    """Backend for url. Opening never contacts a Redis server (failures surface on use);
    the embedded backend opens (and creates) its file. Raises ValueError for an unknown
    scheme or a malformed URL, StoreUnavailable if the embedded file cannot be opened."""
    scheme = url.partition("://")[0] if "://" in url else ""
    if scheme == "embedded":
        from sgl_scd.store.backends.embedded import EmbeddedBackend

        return EmbeddedBackend(url, timeouts)
    if scheme in ("redis", "rediss"):
        from sgl_scd.store.backends.redis import RedisBackend

        return RedisBackend(url, timeouts)
    if scheme in ("redis+cluster", "rediss+cluster"):
        from sgl_scd.store.backends.cluster import RedisClusterBackend

        return RedisClusterBackend(url, timeouts)
    shown = url.split("@")[-1]
    raise ValueError(f"store url {shown!r}: unknown scheme {scheme!r}; expected one of {SCHEMES}")
