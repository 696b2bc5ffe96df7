"""SGLang 0.5.23's chained SHA-256 page hash, in pure Python.

page_hash[i] = SHA256(prior_digest || page i's token ids as little-endian uint32);
the digest of page i is the prior of page i + 1; the first page of an unseeded
(base-namespace) chain hashes the tokens alone. A page holding a token id that
does not fit in uint32 is hashed as SGLang's "wide" page instead:
SHA256(prior || 0xff || token ids as little-endian uint64). Reference:
sglang/srt/mem_cache/cpp_utils/hash_binding.cpp and mem_cache/utils.py
(get_hash_str, storage_namespace_seed); tests/test_store_page_hash.py pins
both against SGLang itself.
"""

from __future__ import annotations

import hashlib
import sys
from array import array
from collections.abc import Sequence

_U32_MAX = 2**32 - 1
_I64_MAX = 2**63 - 1
_WIDE_TAG = b"\xff"
_NAMESPACE_SCHEMA = b"sglang-cache-namespace-v1"


def page_hashes(
    token_ids: Sequence[int], page_size: int, prior_hex: str | None = None
) -> list[str]:
    """Hex page hashes of the FULL pages of token_ids (a trailing partial page is ignored).

    prior_hex continues a chain (the last hash of the preceding pages, or a
    namespace seed). Raises ValueError for page_size < 1, a malformed prior_hex
    or a token id outside [0, 2**63).
    """
    if isinstance(page_size, bool) or not isinstance(page_size, int) or page_size < 1:
        raise ValueError(f"page_size={page_size!r}: expected a positive int")
    prior = _parse_prior(prior_hex)
    n_full = len(token_ids) // page_size
    if n_full == 0:
        return []
    tokens = list(token_ids[: n_full * page_size])
    try:
        packed = array("I", tokens)
        if packed.itemsize != 4:  # pragma: no cover - exotic platforms
            raise OverflowError("array('I') is not 32-bit here")
        if sys.byteorder != "little":  # pragma: no cover
            packed.byteswap()
        raw = memoryview(packed.tobytes())
    except (OverflowError, TypeError):
        raw = None  # some token needs the wide (uint64) encoding, or is invalid: go page by page

    out: list[str] = []
    stride = page_size * 4
    for i in range(n_full):
        h = hashlib.sha256()
        if prior is not None:
            h.update(prior)
        if raw is not None:
            h.update(raw[i * stride : (i + 1) * stride])
        else:
            h.update(_page_bytes(tokens[i * page_size : (i + 1) * page_size], i * page_size))
        prior = h.digest()
        out.append(h.hexdigest())
    return out


def namespace_seed(extra_key: str | None, cache_salt: str | None) -> str | None:
    """SGLang's storage_namespace_seed: the prior that starts a namespaced chain.

    None when both parts are None (the base chain). Presence and UTF-8 byte
    length are encoded, so an empty salt differs from no salt.
    """
    if extra_key is None and cache_salt is None:
        return None
    h = hashlib.sha256(_NAMESPACE_SCHEMA)
    for part in (extra_key, cache_salt):
        if part is None:
            h.update(b"\x00")
            continue
        encoded = part.encode("utf-8")
        h.update(b"\x01" + len(encoded).to_bytes(8, "little") + encoded)
    return h.hexdigest()


def _parse_prior(prior_hex: str | None) -> bytes | None:
    if prior_hex is None or prior_hex == "":
        return None  # SGLang treats an empty prior like no prior
    try:
        prior = bytes.fromhex(prior_hex)
    except (TypeError, ValueError):
        raise ValueError(f"prior_hex={prior_hex!r}: expected 64 hex characters") from None
    if len(prior) != 32:
        raise ValueError(f"prior_hex={prior_hex!r}: expected 64 hex characters")
    return prior


def _page_bytes(page: list[int], offset: int) -> bytes:
    """One page's hashed bytes; offset (of page[0] in the sequence) only names bad tokens."""
    for j, t in enumerate(page):
        if isinstance(t, bool) or not isinstance(t, int) or not 0 <= t <= _I64_MAX:
            raise ValueError(
                f"token_ids[{offset + j}]={t!r}: expected an int in [0, 2**63)"
            )
    if max(page) > _U32_MAX:
        return _WIDE_TAG + b"".join(t.to_bytes(8, "little") for t in page)
    return b"".join(t.to_bytes(4, "little") for t in page)
