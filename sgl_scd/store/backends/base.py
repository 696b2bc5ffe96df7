"""StoreBackend: the one small interface every store backend implements.

A backend is a byte key-value store with per-value TTL plus atomic integer
counter hashes. It knows nothing of records, identities or adapters. Every
method may block for at most about the configured timeouts and raises only
StoreUnavailable (translated from the client library at this boundary);
callers on the serving path turn that into a counted miss.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Self


@dataclass(frozen=True)
class Timeouts:
    """Seconds a backend call may wait: connect (TCP) and per operation (socket read/write,
    sqlite busy wait). Raises ValueError for a non-positive value."""

    connect_s: float = 0.25
    op_s: float = 1.0

    def __post_init__(self) -> None:
        for name in ("connect_s", "op_s"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or not value > 0:
                raise ValueError(f"Timeouts.{name}={value!r}: expected seconds > 0")


DEFAULT_TIMEOUTS = Timeouts()


def counter_value(value) -> int | None:
    """A counter read back from a backend as an int, or None when it is not an integer (a value
    some other writer left there): stats() skips it instead of failing."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    try:
        return int(value.decode() if isinstance(value, (bytes, bytearray)) else value)
    except (TypeError, ValueError, UnicodeDecodeError):
        return None


@dataclass(frozen=True)
class CounterUpdate:
    """Add ``deltas`` to the integer fields of counter hash ``key`` (created on first use).

    ttl_ms, if set, (re)sets the hash's expiry in the same round trip; the embedded
    backend keeps counters without expiry.
    """

    key: str
    deltas: Mapping[str, int] = field(default_factory=dict)
    ttl_ms: int | None = None


class StoreBackend(ABC):
    """Byte values with TTL plus counter hashes. Thread-safe. Raises only StoreUnavailable."""

    #: URL with any password removed, for logs and reports.
    url: str

    @abstractmethod
    def get_many(self, keys: Sequence[str]) -> list[bytes | None]:
        """Values of keys, None where absent or expired, in one batched round trip. Reads only
        (the embedded backend also refreshes its LRU clock)."""

    @abstractmethod
    def exists_many(self, keys: Sequence[str]) -> list[bool]:
        """Whether each key holds a live value, in one batched round trip. Reads only."""

    @abstractmethod
    def set_many(self, items: Sequence[tuple[str, bytes]], ttl_ms: int | None) -> None:
        """Store every (key, value), each with expiry ttl_ms (None: no expiry) set in the same
        command. Each value is replaced atomically: readers see the old or the new bytes,
        never a mix. On failure raises StoreUnavailable whose ``written`` counts values stored."""

    @abstractmethod
    def incr_counters(self, updates: Sequence[CounterUpdate]) -> None:
        """Atomically add each update's deltas (HINCRBY semantics), batched."""

    @abstractmethod
    def read_counters(self, key_prefix: str) -> dict[str, dict[str, int]]:
        """Every counter hash whose key starts with key_prefix: {key: {field: value}}.
        Scans the keyspace: for reports, not for the serving path."""

    @abstractmethod
    def info(self) -> dict[str, int | str]:
        """Capacity figures (used bytes, limit, evictions, ...) for reports."""

    @abstractmethod
    def close(self) -> None:
        """Release connections/files. Idempotent."""

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
