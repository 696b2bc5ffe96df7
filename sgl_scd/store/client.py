"""PrefixStore: publish and fetch per-page semantic codes under one StoreIdentity.

Failure policy: a backend that is down, slow, full, flushed or returns bad
bytes never raises out of publish / lookup_prefix / fetch_prefix / stats; the
call reports a miss (or fewer pages written), counts the cause and logs it.
After a backend failure a circuit breaker skips the backend for a short,
growing pause (cause ``breaker_open``), then probes it again, so a dead Redis
costs one timeout per pause, not one per request. Only caller bugs raise
(ValueError: malformed page hash, payload count mismatch, bad adapter label).

Miss causes: absent (never written, expired, evicted or flushed), the
backend's StoreUnavailable causes (unavailable, timeout, oom, readonly,
cluster, busy, error), breaker_open, and corrupt_{truncated, magic, version,
length, checksum, identity, page} for values that failed record validation.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Sequence
from typing import Self

from sgl_scd.store.backends.base import StoreBackend
from sgl_scd.store.breaker import Breaker
from sgl_scd.store.errors import RecordError, StoreUnavailable
from sgl_scd.store.identity import StoreIdentity
from sgl_scd.store.keys import KeySpace, check_adapter
from sgl_scd.store.metrics import StoreMetrics
from sgl_scd.store.page_hash import page_hashes as _page_hashes
from sgl_scd.store.record import decode_record, encode_record
from sgl_scd.store.stats import StatsBuffer, derived

logger = logging.getLogger(__name__)

DEFAULT_TTL_S = 24 * 3600.0
DEFAULT_BATCH_PAGES = 128  # pages per round trip, as SGLang's STORAGE_BATCH_SIZE
PREFIX_STATS_TTL_S = 7 * 24 * 3600.0
# Causes that mean "the backend is not answering": they open the breaker.
_TRIPPING = frozenset({"unavailable", "timeout", "cluster", "busy"})


class PrefixStore:
    """Per-page codes of one identity in one backend. Thread-safe if the backend is.

    ttl_s: expiry of every published page (None: no expiry; the backend's
    eviction bounds it). stats_flush_s: how often buffered analytics counters
    are pushed (0: after every call). The store owns ``backend`` and closes it.
    """

    def __init__(
        self,
        backend: StoreBackend,
        identity: StoreIdentity,
        *,
        ttl_s: float | None = DEFAULT_TTL_S,
        key_prefix: str = "scd",
        metrics: StoreMetrics | None = None,
        breaker: Breaker | None = None,
        stats_flush_s: float = 1.0,
        batch_pages: int = DEFAULT_BATCH_PAGES,
    ) -> None:
        if ttl_s is not None and not ttl_s >= 0.001:
            raise ValueError(f"ttl_s={ttl_s!r}: expected seconds >= 0.001 or None")
        if not isinstance(batch_pages, int) or batch_pages < 1:
            raise ValueError(f"batch_pages={batch_pages!r}: expected an int >= 1")
        if not stats_flush_s >= 0:
            raise ValueError(f"stats_flush_s={stats_flush_s!r}: expected seconds >= 0")
        self.backend = backend
        self.identity = identity
        self.keys = KeySpace(identity, key_prefix)
        self.ttl_ms = None if ttl_s is None else int(ttl_s * 1000)
        self.metrics = metrics or StoreMetrics.default()
        self.breaker = breaker or Breaker()
        self.batch_pages = batch_pages
        self._stats = StatsBuffer()
        self._stats_flush_s = stats_flush_s
        self._last_flush = time.monotonic()
        self._identity_written = False
        self._label = identity.digest_hex[:12]

    @property
    def url(self) -> str:
        return self.backend.url

    def page_hashes(self, token_ids: Sequence[int]) -> list[str]:
        """Chained page hashes of token_ids' full pages under this identity (SGLang's base chain
        when cache_salt is empty). Pure; ValueError on bad token ids."""
        return _page_hashes(token_ids, self.identity.page_size, self.identity.chain_seed)

    # -- write path --------------------------------------------------------------------
    def publish(
        self,
        page_hashes: Sequence[str],
        payloads: Sequence[bytes],
        *,
        adapter: str = "base",
        first_page: int = 0,
    ) -> int:
        """Store payloads[i] as page first_page + i (key page_hashes[i]), each with the TTL.

        Returns the number of pages stored; fewer than asked when the backend fails
        (counted as write_error:{cause}). Raises ValueError only for caller bugs.
        """
        check_adapter(adapter)
        if len(page_hashes) != len(payloads):
            raise ValueError(
                f"publish: {len(page_hashes)} page hashes but {len(payloads)} payloads"
            )
        _check_first_page(first_page)
        digest, tokens = self.identity.digest, self.identity.page_size
        items = [
            (self.keys.page_key(h), encode_record(digest, h, first_page + i, tokens, p))
            for i, (h, p) in enumerate(zip(page_hashes, payloads, strict=True))
        ]
        t0 = time.perf_counter()
        written, nbytes, cause = 0, 0, None
        for start in range(0, len(items), self.batch_pages):
            chunk = items[start : start + self.batch_pages]
            if not self.breaker.allow():
                cause = "breaker_open"
                break
            try:
                self._write_identity_once()
                self.backend.set_many(chunk, self.ttl_ms)
            except StoreUnavailable as exc:
                written += exc.written
                nbytes += sum(len(v) for _, v in chunk[: exc.written])
                cause = self._backend_failed(exc, "publish")
                break
            self.breaker.success()
            written += len(chunk)
            nbytes += sum(len(v) for _, v in chunk)
        self.metrics.latency.labels("publish").observe(time.perf_counter() - t0)
        self.metrics.record_publish(self._label, adapter, written, nbytes, cause)
        deltas = {"publishes": 1, "pages_written": written, "bytes_written": nbytes}
        if cause is not None:
            deltas[f"write_error:{cause}"] = 1
        self._count(adapter, deltas)
        return written

    # -- read path ---------------------------------------------------------------------
    def lookup_prefix(
        self, page_hashes: Sequence[str], *, adapter: str = "base", first_page: int = 0
    ) -> int:
        """How many leading pages of page_hashes are present (EXISTS only: cheap, unvalidated;
        fetch_prefix is the authority). Never raises on backend failure (returns the run so far)."""
        check_adapter(adapter)
        _check_first_page(first_page)
        keys = [self.keys.page_key(h) for h in page_hashes]
        t0 = time.perf_counter()
        hit, cause = 0, None
        for start in range(0, len(keys), self.batch_pages):
            if not self.breaker.allow():
                cause = "breaker_open"
                break
            try:
                present = self.backend.exists_many(keys[start : start + self.batch_pages])
            except StoreUnavailable as exc:
                cause = self._backend_failed(exc, "lookup")
                break
            self.breaker.success()
            run = _leading_true(present)
            hit += run
            if run < len(present):
                cause = "absent"
                break
        self.metrics.latency.labels("lookup").observe(time.perf_counter() - t0)
        ps = self.identity.page_size
        self.metrics.record_probe(self._label, adapter, len(keys) * ps, hit * ps, cause)
        deltas = {
            "lookups": 1,
            "lookup_pages": len(keys),
            "lookup_tokens": len(keys) * ps,
            "lookup_hit_pages": hit,
            "lookup_hit_tokens": hit * ps,
        }
        if cause is not None:
            deltas[f"miss:lookup:{cause}"] = 1
        self._count(adapter, deltas)
        return hit

    def fetch_prefix(
        self, page_hashes: Sequence[str], *, adapter: str = "base", first_page: int = 0
    ) -> list[bytes]:
        """Payloads of the longest leading run of present, intact pages (validated records).

        Stops at the first absent or invalid page; an invalid value is never returned.
        Never raises on backend failure: returns the run so far and counts the cause.
        """
        check_adapter(adapter)
        _check_first_page(first_page)
        keys = [self.keys.page_key(h) for h in page_hashes]
        digest, ps = self.identity.digest, self.identity.page_size
        t0 = time.perf_counter()
        out: list[bytes] = []
        nbytes, cause = 0, None
        for start in range(0, len(keys), self.batch_pages):
            if not self.breaker.allow():
                cause = "breaker_open"
                break
            try:
                blobs = self.backend.get_many(keys[start : start + self.batch_pages])
            except StoreUnavailable as exc:
                cause = self._backend_failed(exc, "fetch")
                break
            self.breaker.success()
            for j, blob in enumerate(blobs):
                i = start + j
                if blob is None:
                    cause = "absent"
                    break
                try:
                    payload = decode_record(
                        blob,
                        identity_digest=digest,
                        page_hash=page_hashes[i],
                        page_index=first_page + i,
                        token_count=ps,
                    )
                except RecordError as exc:
                    cause = f"corrupt_{exc.cause}"
                    logger.warning(
                        "store %s: page %d (%s) not served: %s",
                        self.url, first_page + i, keys[i], exc,
                    )
                    break
                out.append(payload)
                nbytes += len(blob)
            if cause is not None:
                break
        self.metrics.latency.labels("fetch").observe(time.perf_counter() - t0)
        self.metrics.record_fetch(self._label, adapter, len(keys) * ps, len(out) * ps, nbytes,
                                  cause)
        deltas = {
            "fetches": 1,
            "fetch_pages": len(keys),
            "fetch_tokens": len(keys) * ps,
            "hit_pages": len(out),
            "hit_tokens": len(out) * ps,
            "bytes_read": nbytes,
        }
        if cause is not None:
            deltas[f"miss:fetch:{cause}"] = 1
        self._count(adapter, deltas)
        if out:
            depth = first_page + len(out)
            self._stats.add(
                self.keys.prefixes_key(adapter),
                {f"{depth}:{page_hashes[len(out) - 1][:16]}": 1},
                int(PREFIX_STATS_TTL_S * 1000),
            )
        return out

    def record_rejected(self, *, adapter: str, pages: int, cause: str) -> None:
        """Count pages that the store served intact but the consumer refused to use (e.g. the
        codec's wire check failed): a miss of its own cause, counted like the store's."""
        check_adapter(adapter)
        self.metrics.misses.labels(self._label, adapter, "decode", cause).inc()
        self._count(adapter, {f"miss:decode:{cause}": 1, "rejected_pages": pages})

    # -- analytics ---------------------------------------------------------------------
    def flush_stats(self) -> bool:
        """Push buffered counter deltas to the backend now. False (deltas kept) on failure."""
        self._last_flush = time.monotonic()
        updates = self._stats.drain()
        if not updates:
            return True
        if not self.breaker.allow():
            self._stats.restore(updates)
            return False
        try:
            self.backend.incr_counters(updates)
        except StoreUnavailable as exc:
            self._stats.restore(updates)
            self._backend_failed(exc, "stats")
            return False
        self.breaker.success()
        return True

    def stats(self) -> dict:
        """This identity's counters per adapter, from the backend (flushed first), plus any
        deltas not yet flushed. Never raises; ``backend_error`` names a failure."""
        self.flush_stats()
        result: dict = {
            "url": self.url,
            "identity": self.identity.to_mapping(),
            "identity_digest": self.identity.digest_hex,
            "adapters": {},
            "backend_error": None,
        }
        counters: dict[str, dict[str, int]] = {}
        try:
            counters = self.backend.read_counters(f"{self.keys.base}:stats:")
        except StoreUnavailable as exc:
            result["backend_error"] = exc.cause
        for key, pending in self._stats.pending().items():
            if ":stats:" in key:
                merged = counters.setdefault(key, {})
                for name, n in pending.items():
                    merged[name] = merged.get(name, 0) + n
        for key, fields in sorted(counters.items()):
            adapter = key.rsplit(":stats:", 1)[1]
            result["adapters"][adapter] = {"counters": dict(sorted(fields.items())),
                                           **derived(fields)}
        return result

    def close(self) -> None:
        """Flush stats (best effort) and close the backend. Idempotent."""
        self.flush_stats()
        self.backend.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- helpers -----------------------------------------------------------------------
    def _write_identity_once(self) -> None:
        """Record what this namespace is (for reports), once per client; raises StoreUnavailable."""
        if self._identity_written:
            return
        desc = {"digest": self.identity.digest_hex, **self.identity.to_mapping()}
        self.backend.set_many(
            [(self.keys.identity_key(), json.dumps(desc, sort_keys=True).encode())], None
        )
        self._identity_written = True

    def _backend_failed(self, exc: StoreUnavailable, op: str) -> str:
        """Count a backend failure, open the breaker if it is unreachable, log; return cause."""
        if exc.cause in _TRIPPING:
            first = self.breaker.consecutive_failures == 0
            self.breaker.failure()
            level = logging.WARNING if first else logging.DEBUG
        else:
            level = logging.WARNING
        logger.log(level, "store %s: %s degraded to a miss: %s", self.url, op, exc)
        return exc.cause

    def _count(self, adapter: str, deltas: dict[str, int]) -> None:
        self._stats.add(self.keys.stats_key(adapter), deltas)
        if time.monotonic() - self._last_flush >= self._stats_flush_s:
            self.flush_stats()


def _leading_true(flags: Sequence[bool]) -> int:
    n = 0
    for f in flags:
        if not f:
            break
        n += 1
    return n


def _check_first_page(first_page: int) -> None:
    if isinstance(first_page, bool) or not isinstance(first_page, int) or first_page < 0:
        raise ValueError(f"first_page={first_page!r}: expected an int >= 0")
