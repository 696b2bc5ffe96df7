"""Store key layout. Every key an identity owns starts with ``{prefix}:{namespace}:``.

    {prefix}:{ns}:p:{page_hash}          one page's record (TTL)
    {prefix}:{ns}:identity               JSON description of the identity (no TTL)
    {prefix}:{ns}:stats:{adapter}        counter hash (HINCRBY; no TTL)
    {prefix}:{ns}:prefixes:{adapter}     counter hash "{hit_pages}:{hash16}" -> requests (TTL)

ns is StoreIdentity.namespace (128-bit digest prefix). Page keys carry no hash
tag, so on Redis Cluster a prompt's pages spread over slots and nodes.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from sgl_scd.store.identity import StoreIdentity

_PREFIX_RE = re.compile(r"^[A-Za-z0-9_.\-]{1,64}$")
_ADAPTER_RE = re.compile(r"^[A-Za-z0-9_.@/\-]{1,128}$")
_HASH_RE = re.compile(r"^[0-9a-f]{64}$")
_NS_RE = re.compile(r"^[0-9a-f]{32}$")


def check_adapter(adapter: str) -> str:
    """Return adapter if it is a valid label (1-128 of [A-Za-z0-9_.@/-]); else ValueError."""
    if not isinstance(adapter, str) or not _ADAPTER_RE.match(adapter):
        raise ValueError(f"adapter={adapter!r}: expected 1-128 characters of [A-Za-z0-9_.@/-]")
    return adapter


def check_prefix(prefix: str) -> str:
    if not isinstance(prefix, str) or not _PREFIX_RE.match(prefix):
        raise ValueError(f"key_prefix={prefix!r}: expected 1-64 characters of [A-Za-z0-9_.-]")
    return prefix


@dataclass(frozen=True)
class KeySpace:
    """Keys of one identity under one prefix. Pure: builds strings, touches nothing."""

    identity: StoreIdentity
    prefix: str = "scd"

    def __post_init__(self) -> None:
        check_prefix(self.prefix)

    @property
    def base(self) -> str:
        return f"{self.prefix}:{self.identity.namespace}"

    def page_key(self, page_hash: str) -> str:
        """Key of one page; raises ValueError unless page_hash is 64 lowercase hex characters."""
        if not isinstance(page_hash, str) or not _HASH_RE.match(page_hash):
            raise ValueError(f"page_hash={page_hash!r}: expected 64 lowercase hex characters")
        return f"{self.base}:p:{page_hash}"

    def identity_key(self) -> str:
        return f"{self.base}:identity"

    def stats_key(self, adapter: str) -> str:
        return f"{self.base}:stats:{check_adapter(adapter)}"

    def prefixes_key(self, adapter: str) -> str:
        return f"{self.base}:prefixes:{check_adapter(adapter)}"


@dataclass(frozen=True)
class CounterKey:
    """A parsed counter-hash key: ``kind`` is "stats" or "prefixes"."""

    prefix: str
    namespace: str
    kind: str
    adapter: str


def parse_counter_key(key: str) -> CounterKey | None:
    """Parse a stats/prefixes key written by KeySpace; None for any other key."""
    parts = key.split(":", 3)
    if len(parts) != 4:
        return None
    prefix, ns, kind, adapter = parts
    if kind not in ("stats", "prefixes") or not _NS_RE.match(ns):
        return None
    if not _PREFIX_RE.match(prefix) or not _ADAPTER_RE.match(adapter):
        return None
    return CounterKey(prefix, ns, kind, adapter)
