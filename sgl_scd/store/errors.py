"""The store's one exception root and its two families.

Everything the store raises on purpose is a StoreError. Backends translate their
client libraries' exceptions (redis-py, sqlite3) into StoreUnavailable at the
boundary; record parsing raises RecordError. On the serving path PrefixStore
catches both, counts them by ``cause`` and degrades to a miss.
"""

from __future__ import annotations


class StoreError(Exception):
    """Root of every error the store raises; ``cause`` is a short metric label."""

    cause: str = "error"

    def __init__(self, message: str, *, cause: str | None = None) -> None:
        super().__init__(message)
        if cause is not None:
            self.cause = cause


class StoreUnavailable(StoreError):
    """The backend could not serve the call.

    ``cause`` is one of: ``unavailable`` (connection refused/reset), ``timeout``,
    ``oom`` (full: maxmemory with no evictable key, or a value over the embedded
    budget), ``readonly``, ``cluster`` (cluster down or slot not covered),
    ``busy`` (embedded database locked past the timeout), ``error`` (anything else).
    ``written`` counts the values a partly failed write did store.
    """

    cause = "unavailable"

    def __init__(self, message: str, *, cause: str = "unavailable", written: int = 0) -> None:
        super().__init__(message, cause=cause)
        self.written = written


class RecordError(StoreError):
    """A stored value that must not be served; ``cause`` says why."""

    cause = "corrupt"


class RecordTruncated(RecordError):
    cause = "truncated"


class RecordBadMagic(RecordError):
    cause = "magic"


class RecordUnknownVersion(RecordError):
    cause = "version"


class RecordBadLength(RecordError):
    cause = "length"


class RecordChecksumMismatch(RecordError):
    cause = "checksum"


class RecordIdentityMismatch(RecordError):
    cause = "identity"


class RecordPageMismatch(RecordError):
    cause = "page"
