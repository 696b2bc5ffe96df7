"""Store analytics counters: field names, the in-process delta buffer, derived figures.

Counters are HINCRBY'd into ``{prefix}:{ns}:stats:{adapter}`` (the embedded
backend keeps the same hashes in SQLite). Fields:

    lookups, lookup_pages, lookup_tokens, lookup_hit_pages, lookup_hit_tokens   (probe)
    fetches, fetch_pages, fetch_tokens, hit_pages, hit_tokens, bytes_read        (retrieve)
    publishes, pages_written, bytes_written
    miss:{op}:{cause}      one per request that stopped short (op = lookup | fetch)
    write_error:{cause}    one per publish that did not store every page

The client buffers deltas and flushes them at most every ``flush_s`` seconds in
one batched call, so the serving path does not pay an extra round trip per
request; deltas survive a failed flush and are retried.
"""

from __future__ import annotations

import threading
from collections.abc import Mapping

from sgl_scd.store.backends.base import CounterUpdate

# Bound on distinct pending prefix fields while the backend is unreachable.
MAX_PENDING_FIELDS = 10_000


class StatsBuffer:
    """Pending counter deltas keyed by counter-hash key. Thread-safe."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._pending: dict[str, dict[str, int]] = {}
        self._ttl_ms: dict[str, int | None] = {}
        self._n_fields = 0
        self.dropped = 0  # deltas dropped because the buffer was full

    def add(self, key: str, deltas: Mapping[str, int], ttl_ms: int | None = None) -> None:
        with self._lock:
            fields = self._pending.setdefault(key, {})
            self._ttl_ms[key] = ttl_ms
            for name, n in deltas.items():
                if not n:
                    continue
                if name not in fields:
                    if self._n_fields >= MAX_PENDING_FIELDS:
                        self.dropped += 1
                        continue
                    self._n_fields += 1
                fields[name] = fields.get(name, 0) + n

    def drain(self) -> list[CounterUpdate]:
        """Remove and return every pending delta."""
        with self._lock:
            out = [CounterUpdate(k, d, self._ttl_ms.get(k)) for k, d in self._pending.items() if d]
            self._pending.clear()
            self._ttl_ms.clear()
            self._n_fields = 0
            return out

    def restore(self, updates: list[CounterUpdate]) -> None:
        """Put back deltas whose flush failed."""
        for u in updates:
            self.add(u.key, u.deltas, u.ttl_ms)

    def pending(self) -> dict[str, dict[str, int]]:
        with self._lock:
            return {k: dict(v) for k, v in self._pending.items()}


def derived(counters: Mapping[str, int], raw_kv_bytes_per_token: int | None = None) -> dict:
    """Figures computed from one stats hash: hit rates, misses by cause, bytes saved."""
    fetch_tokens = counters.get("fetch_tokens", 0)
    hit_tokens = counters.get("hit_tokens", 0)
    lookup_tokens = counters.get("lookup_tokens", 0)
    out: dict = {
        "fetch_hit_rate": hit_tokens / fetch_tokens if fetch_tokens else None,
        "lookup_hit_rate": (
            counters.get("lookup_hit_tokens", 0) / lookup_tokens if lookup_tokens else None
        ),
        "misses_by_cause": {
            name.split(":", 1)[1]: n for name, n in sorted(counters.items())
            if name.startswith("miss:")
        },
        "write_errors_by_cause": {
            name.split(":", 1)[1]: n for name, n in sorted(counters.items())
            if name.startswith("write_error:")
        },
    }
    if raw_kv_bytes_per_token is not None:
        raw = hit_tokens * raw_kv_bytes_per_token
        out["raw_kv_bytes_equivalent"] = raw
        out["bytes_saved_vs_raw_kv"] = raw - counters.get("bytes_read", 0)
        read = counters.get("bytes_read", 0)
        out["compression_vs_raw_kv"] = raw / read if read else None
    return out
