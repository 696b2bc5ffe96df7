"""Embedded backend (embedded://): a server-less store in one SQLite file, in WAL mode.

It survives restarts and is shared by processes on one machine (SQLite locks
the file; WAL lets readers run beside one writer). Stored bytes (keys +
values) are bounded by ``max_bytes``: after each write the least recently
used values are deleted until the total fits. Reads refresh a value's LRU
clock. TTLs are honoured on read and expired rows are removed when space is
needed. Counter hashes live in their own table and are never evicted.

URL forms: ``embedded://`` (default file under the user cache dir),
``embedded:///abs/path/store.sqlite3`` (a directory path gets store.sqlite3
appended), optional query ``?max_bytes=2GiB``.
"""

from __future__ import annotations

import logging
import re
import sqlite3
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from urllib.parse import parse_qs, unquote, urlsplit

from sgl_scd import settings
from sgl_scd.store.backends.base import (
    DEFAULT_TIMEOUTS,
    CounterUpdate,
    StoreBackend,
    Timeouts,
    counter_value,
)
from sgl_scd.store.errors import StoreUnavailable

logger = logging.getLogger(__name__)

DEFAULT_MAX_BYTES = 2 * 1024**3
_FILE_NAME = "store.sqlite3"
_SIZE_RE = re.compile(r"^\s*(\d+)\s*([kmgt]?)(i?b)?\s*$", re.IGNORECASE)
_EVICT_BATCH = 64

_SCHEMA = """
CREATE TABLE IF NOT EXISTS kv (
    key TEXT PRIMARY KEY,
    value BLOB NOT NULL,
    nbytes INTEGER NOT NULL,
    expires_at REAL,
    atime REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS kv_atime ON kv (atime);
CREATE INDEX IF NOT EXISTS kv_expires ON kv (expires_at) WHERE expires_at IS NOT NULL;
CREATE TABLE IF NOT EXISTS counters (
    hkey TEXT NOT NULL,
    field TEXT NOT NULL,
    value INTEGER NOT NULL,
    PRIMARY KEY (hkey, field)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS meta (name TEXT PRIMARY KEY, value INTEGER NOT NULL);
INSERT OR IGNORE INTO meta VALUES ('bytes', 0), ('evicted_keys', 0), ('expired_keys', 0);
CREATE TRIGGER IF NOT EXISTS kv_ins AFTER INSERT ON kv BEGIN
    UPDATE meta SET value = value + NEW.nbytes WHERE name = 'bytes'; END;
CREATE TRIGGER IF NOT EXISTS kv_del AFTER DELETE ON kv BEGIN
    UPDATE meta SET value = value - OLD.nbytes WHERE name = 'bytes'; END;
CREATE TRIGGER IF NOT EXISTS kv_upd AFTER UPDATE OF nbytes ON kv BEGIN
    UPDATE meta SET value = value + NEW.nbytes - OLD.nbytes WHERE name = 'bytes'; END;
"""


def default_store_dir() -> Path:
    """<cache dir>/store: $SCD_CACHE_DIR/store, else $XDG_CACHE_HOME/sgl_scd/store or ~/.cache/sgl_scd/store."""
    return settings.store_dir()


def parse_size(text: str) -> int:
    """'1048576', '512MiB', '2g', '64kb' -> bytes (binary multiples). Raises ValueError."""
    m = _SIZE_RE.match(text)
    if not m:
        raise ValueError(f"size {text!r}: expected an integer with optional k/m/g/t suffix")
    power = "kmgt".find(m.group(2).lower()) + 1 if m.group(2) else 0
    return int(m.group(1)) * 1024**power


def parse_embedded_url(url: str) -> tuple[Path, int]:
    """embedded:// URL -> (sqlite file, max_bytes). Raises ValueError naming the bad part."""
    parts = urlsplit(url)
    if parts.scheme != "embedded":
        raise ValueError(f"url={url!r}: expected scheme embedded://")
    if parts.netloc:
        raise ValueError(
            f"url={url!r}: embedded URLs take an absolute path (embedded:///path), "
            f"not a host {parts.netloc!r}"
        )
    query = parse_qs(parts.query, keep_blank_values=True)
    unknown = sorted(set(query) - {"max_bytes"})
    if unknown:
        raise ValueError(f"url={url!r}: unknown query parameter(s) {unknown}; known: ['max_bytes']")
    max_bytes = parse_size(query["max_bytes"][-1]) if "max_bytes" in query else DEFAULT_MAX_BYTES
    if max_bytes <= 0:
        raise ValueError(f"url={url!r}: max_bytes must be > 0")
    path = Path(unquote(parts.path)) if parts.path not in ("", "/") else default_store_dir()
    if path.suffix not in (".sqlite3", ".sqlite", ".db"):
        path = path / _FILE_NAME
    return path, max_bytes


class EmbeddedBackend(StoreBackend):
    """SQLite-file store bounded by bytes with LRU eviction. Thread-safe (one lock per instance);
    process-safe through SQLite's file locks."""

    def __init__(self, url: str = "embedded://", timeouts: Timeouts = DEFAULT_TIMEOUTS) -> None:
        self.path, self.max_bytes = parse_embedded_url(url)
        self.url = f"embedded://{self.path}?max_bytes={self.max_bytes}"
        self._lock = threading.Lock()
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._db: sqlite3.Connection | None = sqlite3.connect(
                self.path, timeout=timeouts.op_s, isolation_level=None, check_same_thread=False
            )
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=NORMAL")
            self._db.executescript(f"BEGIN IMMEDIATE; {_SCHEMA} COMMIT;")
        except (sqlite3.Error, OSError) as exc:
            raise StoreUnavailable(
                f"cannot open embedded store at {self.path}: {exc}", cause="unavailable"
            ) from exc

    # -- StoreBackend ------------------------------------------------------------------
    def get_many(self, keys: Sequence[str]) -> list[bytes | None]:
        if not keys:
            return []
        now = time.time()
        rows = self._query(
            f"SELECT key, value FROM kv WHERE key IN ({_marks(keys)}) "
            "AND (expires_at IS NULL OR expires_at > ?)",
            (*keys, now),
        )
        # a value another writer stored as TEXT or INTEGER comes back as b"": the record check
        # refuses it (corrupt_truncated), a counted miss like any other bad value
        found = {k: bytes(v) if isinstance(v, (bytes, memoryview)) else b"" for k, v in rows}
        if found:
            self._touch(list(found), now)
        return [found.get(k) for k in keys]

    def exists_many(self, keys: Sequence[str]) -> list[bool]:
        if not keys:
            return []
        rows = self._query(
            f"SELECT key FROM kv WHERE key IN ({_marks(keys)}) "
            "AND (expires_at IS NULL OR expires_at > ?)",
            (*keys, time.time()),
        )
        live = {r[0] for r in rows}
        return [k in live for k in keys]

    def set_many(self, items: Sequence[tuple[str, bytes]], ttl_ms: int | None) -> None:
        if not items:
            return
        too_big = [k for k, v in items if len(k) + len(v) > self.max_bytes]
        if too_big:
            raise StoreUnavailable(
                f"value for {too_big[0]!r} exceeds the embedded store's max_bytes={self.max_bytes}",
                cause="oom",
            )
        now = time.time()
        expires = None if ttl_ms is None else now + ttl_ms / 1000.0
        rows = [(k, v, len(k) + len(v), expires, now) for k, v in items]
        with self._op("set"), self._write():
            assert self._db is not None
            self._db.executemany(
                "INSERT INTO kv (key, value, nbytes, expires_at, atime) VALUES (?, ?, ?, ?, ?) "
                "ON CONFLICT(key) DO UPDATE SET value = excluded.value, nbytes = excluded.nbytes, "
                "expires_at = excluded.expires_at, atime = excluded.atime",
                rows,
            )
            self._evict_locked(now)

    def incr_counters(self, updates: Sequence[CounterUpdate]) -> None:
        rows = [(u.key, f, int(d)) for u in updates for f, d in u.deltas.items()]
        if not rows:
            return
        with self._op("hincrby"), self._write():
            assert self._db is not None
            self._db.executemany(
                "INSERT INTO counters (hkey, field, value) VALUES (?, ?, ?) "
                "ON CONFLICT(hkey, field) DO UPDATE SET value = value + excluded.value",
                rows,
            )

    def read_counters(self, key_prefix: str) -> dict[str, dict[str, int]]:
        rows = self._query(
            "SELECT hkey, field, value FROM counters WHERE hkey >= ? AND hkey < ? "
            "ORDER BY hkey, field",
            (key_prefix, key_prefix + "\U0010ffff"),
        )
        out: dict[str, dict[str, int]] = {}
        for hkey, field, value in rows:
            n = counter_value(value)
            if n is None:
                logger.warning("embedded store %s: counter %s/%s holds %r, not an integer; skipped",
                               self.path, hkey, field, value)
                continue
            out.setdefault(hkey, {})[field] = n
        return out

    def info(self) -> dict[str, int | str]:
        meta = dict(self._query("SELECT name, value FROM meta", ()))
        (keys,) = self._query("SELECT COUNT(*) FROM kv", ())[0]
        return {
            "backend": "embedded",
            "path": str(self.path),
            "used_memory": int(meta.get("bytes", 0)),
            "maxmemory": self.max_bytes,
            "maxmemory_policy": "allkeys-lru",
            "evicted_keys": int(meta.get("evicted_keys", 0)),
            "expired_keys": int(meta.get("expired_keys", 0)),
            "keys": int(keys),
        }

    def close(self) -> None:
        with self._lock:
            if self._db is not None:
                self._db.close()
                self._db = None

    # -- helpers -----------------------------------------------------------------------
    def _query(self, sql: str, params: Sequence[object]) -> list[tuple]:
        with self._op("read"):
            assert self._db is not None
            return self._db.execute(sql, tuple(params)).fetchall()

    def _touch(self, keys: list[str], now: float) -> None:
        """Refresh the LRU clock of keys just read. Best effort: a busy database skips it."""
        try:
            with self._op("touch"), self._write():
                assert self._db is not None
                self._db.execute(f"UPDATE kv SET atime = ? WHERE key IN ({_marks(keys)})",
                                 (now, *keys))
        except StoreUnavailable as exc:
            logger.debug("embedded store: LRU touch skipped: %s", exc)

    def _evict_locked(self, now: float) -> None:
        """Inside a write transaction: drop expired, then least recently used, rows until the
        stored bytes fit max_bytes."""
        assert self._db is not None
        if self._used_locked() <= self.max_bytes:
            return
        n = self._db.execute(
            "DELETE FROM kv WHERE expires_at IS NOT NULL AND expires_at <= ?", (now,)
        ).rowcount
        self._bump("expired_keys", n)
        excess = self._used_locked() - self.max_bytes
        if excess <= 0:
            return
        victims: list[int] = []
        cursor = self._db.execute("SELECT rowid, nbytes FROM kv ORDER BY atime")
        while excess > 0:
            rows = cursor.fetchmany(_EVICT_BATCH)
            if not rows:
                break
            for rowid, nbytes in rows:
                victims.append(rowid)
                excess -= nbytes
                if excess <= 0:
                    break
        cursor.close()
        for i in range(0, len(victims), 500):
            chunk = victims[i : i + 500]
            self._db.execute(f"DELETE FROM kv WHERE rowid IN ({_marks(chunk)})", chunk)
        self._bump("evicted_keys", len(victims))

    def _used_locked(self) -> int:
        assert self._db is not None
        return int(self._db.execute("SELECT value FROM meta WHERE name = 'bytes'").fetchone()[0])

    def _bump(self, name: str, n: int) -> None:
        if n > 0:
            assert self._db is not None
            self._db.execute("UPDATE meta SET value = value + ? WHERE name = ?", (n, name))

    def _op(self, op: str) -> _Guard:
        return _Guard(self, op)

    def _write(self) -> _Txn:
        assert self._db is not None
        return _Txn(self._db)


class _Guard:
    """Holds the instance lock and translates sqlite3 errors into StoreUnavailable."""

    def __init__(self, backend: EmbeddedBackend, op: str):
        self._backend, self._op = backend, op

    def __enter__(self) -> None:
        self._backend._lock.acquire()
        if self._backend._db is None:
            self._backend._lock.release()
            raise StoreUnavailable(f"{self._backend.url} is closed", cause="unavailable")

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: object
    ) -> None:
        self._backend._lock.release()
        if isinstance(exc, sqlite3.Error):
            busy = isinstance(exc, sqlite3.OperationalError) and "locked" in str(exc)
            full = isinstance(exc, sqlite3.OperationalError) and "full" in str(exc)
            cause = "busy" if busy else "oom" if full else "error"
            raise StoreUnavailable(
                f"embedded {self._op} failed: {type(exc).__name__}: {exc}", cause=cause
            ) from exc


class _Txn:
    """BEGIN IMMEDIATE ... COMMIT, rolled back on any error."""

    def __init__(self, db: sqlite3.Connection):
        self._db = db

    def __enter__(self) -> None:
        self._db.execute("BEGIN IMMEDIATE")

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: object
    ) -> None:
        if exc is None:
            self._db.execute("COMMIT")
            return
        try:
            self._db.execute("ROLLBACK")
        except sqlite3.Error as rollback_exc:  # the failed statement may have ended it already
            logger.warning("embedded store: rollback after %r failed: %s", exc, rollback_exc)


def _marks(items: Sequence[object]) -> str:
    return ",".join("?" * len(items))
