"""sgl_scd.store: the shared prefix store for semantic codes.

Modules, lowest layer first (a module imports only from layers above it in this list):

    errors      StoreError root; StoreUnavailable (backend), RecordError (bad value)
    page_hash   SGLang-identical chained SHA-256 page hashes (pure)
    identity    StoreIdentity: frozen reuse scope and its digest (pure)
    keys        key layout of one identity (pure)
    record      versioned, checksummed value format (pure)
    backends/   StoreBackend interface; embedded (SQLite), redis, cluster
    breaker     circuit breaker for a failing backend
    metrics     in-process Prometheus metrics
    stats       analytics counter names, delta buffer, derived figures
    client      PrefixStore: publish / lookup_prefix / fetch_prefix / stats

Configuration precedence for the store URL: the ``url`` argument (CLI flag) >
the SCD_STORE_URL environment variable > ``embedded://`` (SQLite under
~/.cache/sgl_scd/store/).
"""

from __future__ import annotations

import os

from sgl_scd import settings
from sgl_scd.store.backends import DEFAULT_TIMEOUTS, Timeouts, open_backend
from sgl_scd.store.breaker import Breaker
from sgl_scd.store.client import DEFAULT_TTL_S, PrefixStore
from sgl_scd.store.errors import RecordError, StoreError, StoreUnavailable
from sgl_scd.store.identity import StoreIdentity
from sgl_scd.store.metrics import STORE_REGISTRY, StoreMetrics
from sgl_scd.store.page_hash import namespace_seed, page_hashes

DEFAULT_URL = "embedded://"
URL_ENV = settings.STORE_URL_ENV

__all__ = [
    "DEFAULT_URL",
    "STORE_REGISTRY",
    "URL_ENV",
    "Breaker",
    "PrefixStore",
    "RecordError",
    "StoreError",
    "StoreIdentity",
    "StoreMetrics",
    "StoreUnavailable",
    "Timeouts",
    "namespace_seed",
    "open_store",
    "page_hashes",
    "resolve_url",
]


def resolve_url(url: str | None = None) -> str:
    """url if given, else $SCD_STORE_URL if set and non-empty, else embedded://."""
    return url or os.environ.get(URL_ENV) or DEFAULT_URL


def open_store(
    url: str | None,
    identity: StoreIdentity,
    *,
    ttl_s: float | None = DEFAULT_TTL_S,
    timeouts: Timeouts = DEFAULT_TIMEOUTS,
    key_prefix: str = "scd",
    metrics: StoreMetrics | None = None,
    breaker: Breaker | None = None,
    stats_flush_s: float = 1.0,
    batch_pages: int = 128,
) -> PrefixStore:
    """A PrefixStore for identity on the backend named by url (see resolve_url).

    Does not contact a Redis server (an unreachable one shows up as misses).
    Raises ValueError for a malformed URL or argument, StoreUnavailable only if the
    embedded store's file cannot be opened.
    """
    backend = open_backend(resolve_url(url), timeouts)
    try:
        return PrefixStore(
            backend,
            identity,
            ttl_s=ttl_s,
            key_prefix=key_prefix,
            metrics=metrics,
            breaker=breaker,
            stats_flush_s=stats_flush_s,
            batch_pages=batch_pages,
        )
    except ValueError:
        backend.close()
        raise
