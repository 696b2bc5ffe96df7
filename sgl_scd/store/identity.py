"""StoreIdentity: the frozen reuse scope that namespaces every store key.

Two deployments may exchange semantic codes only if every field matches: the
codes depend on the producer's weights (model, revision), on how text became
token ids (tokenizer), on page boundaries (page_size), on the codec that wrote
them (codec_revision, from the calibration manifest), on the KV dtype and
sharding they were captured from, and on the tenant (cache_salt). The digest
is SHA-256 over an explicit, length-prefixed byte encoding of the fields, so
it is the same in every process and on every machine.
"""

from __future__ import annotations

import dataclasses
import hashlib
import re
from collections.abc import Mapping
from dataclasses import dataclass
from functools import cached_property
from typing import Any

from sgl_scd.store.page_hash import namespace_seed

# Bump when the encoding below changes: every key changes with it.
_IDENTITY_SCHEMA = b"sgl-scd-store-identity-v1"
_MAX_FIELD_LEN = 256
_MAX_PAGE_SIZE = 4096
_LABEL_RE = re.compile(r"^[a-z0-9][a-z0-9_.\-]*$")
_TEXT_RE = re.compile(r"^[^\x00-\x1f\x7f]*$")


@dataclass(frozen=True)
class StoreIdentity:
    """Immutable identity of one store keyspace. Constructing validates; raises ValueError.

    producer_model / producer_revision: the model that produced the KV (e.g. a HF
    repo id and commit). tokenizer: tokenizer name or content hash. page_size:
    tokens per page (SGLang --page-size). codec_revision: the calibration
    manifest's codec revision (bases, ranks, patch set). dtype: KV dtype captured
    (e.g. "bfloat16"). sharding: e.g. "tp1", "tp2pp2". cache_salt: tenant salt,
    "" for none (it also seeds the page-hash chain the way SGLang seeds salted
    requests).
    """

    producer_model: str
    producer_revision: str
    tokenizer: str
    page_size: int
    codec_revision: str
    dtype: str
    sharding: str = "tp1"
    cache_salt: str = ""

    def __post_init__(self) -> None:
        for name in ("producer_model", "producer_revision", "tokenizer", "codec_revision"):
            _check_text(name, getattr(self, name), allow_empty=False)
        _check_text("cache_salt", self.cache_salt, allow_empty=True)
        for name in ("dtype", "sharding"):
            value = getattr(self, name)
            if not isinstance(value, str) or not _LABEL_RE.match(value):
                raise ValueError(
                    f"StoreIdentity.{name}={value!r}: expected a lowercase label "
                    f"matching {_LABEL_RE.pattern}"
                )
        ps = self.page_size
        if isinstance(ps, bool) or not isinstance(ps, int) or not 1 <= ps <= _MAX_PAGE_SIZE:
            raise ValueError(
                f"StoreIdentity.page_size={ps!r}: expected an int in [1, {_MAX_PAGE_SIZE}]"
            )

    @cached_property
    def digest(self) -> bytes:
        """SHA-256 (32 bytes) over the length-prefixed UTF-8 fields, in declaration order."""
        h = hashlib.sha256(_IDENTITY_SCHEMA)
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            encoded = (str(value) if field.name == "page_size" else value).encode("utf-8")
            name = field.name.encode("ascii")
            h.update(len(name).to_bytes(2, "little") + name)
            h.update(len(encoded).to_bytes(4, "little") + encoded)
        return h.digest()

    @property
    def digest_hex(self) -> str:
        return self.digest.hex()

    @property
    def namespace(self) -> str:
        """128-bit hex prefix of the digest: the identity's segment in every store key."""
        return self.digest_hex[:32]

    @property
    def chain_seed(self) -> str | None:
        """Prior hash the page-hash chain starts from: None (SGLang's base chain) unless salted."""
        return namespace_seed(None, self.cache_salt) if self.cache_salt else None

    def to_mapping(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_mapping(cls, data: Mapping[str, Any]) -> StoreIdentity:
        """Build from a mapping (e.g. a manifest section); unknown or missing keys raise ValueError."""
        names = [f.name for f in dataclasses.fields(cls)]
        unknown = sorted(set(data) - set(names))
        if unknown:
            raise ValueError(f"StoreIdentity: unknown field(s) {unknown}; expected {names}")
        required = [f.name for f in dataclasses.fields(cls) if f.default is dataclasses.MISSING]
        missing = [n for n in required if n not in data]
        if missing:
            raise ValueError(f"StoreIdentity: missing field(s) {missing}")
        return cls(**dict(data))


def _check_text(name: str, value: object, *, allow_empty: bool) -> None:
    if not isinstance(value, str) or (not value and not allow_empty):
        raise ValueError(f"StoreIdentity.{name}={value!r}: expected a non-empty str")
    if len(value) > _MAX_FIELD_LEN or not _TEXT_RE.match(value):
        raise ValueError(
            f"StoreIdentity.{name}={value[:64]!r}: at most {_MAX_FIELD_LEN} characters, "
            "no control characters"
        )
