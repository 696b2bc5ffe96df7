"""One page's stored value: a versioned, checksummed header around opaque payload bytes.

Layout (little-endian), version 1:

    offset size field
         0    4 magic          b"SCDP"
         4    2 version        1
         6    2 flags          0 (reserved; any other value is an unknown format)
         8   16 identity       StoreIdentity.digest[:16]
        24   32 page_hash      the page's chained SHA-256 (binds the value to its key)
        56    4 page_index     position of the page in its chain (0 = first page)
        60    4 token_count    tokens the page covers
        64    4 payload_len    bytes of payload that follow the header
        68   16 checksum       BLAKE2b-128 over bytes [0, 68) + payload
        84    n payload        opaque (the codec's bytes)

decode_record never returns a payload unless every byte checks out; anything
else raises a RecordError subclass whose ``cause`` names the defect. No pickle.
"""

from __future__ import annotations

import hashlib
import struct

from sgl_scd.store.errors import (
    RecordBadLength,
    RecordBadMagic,
    RecordChecksumMismatch,
    RecordError,
    RecordIdentityMismatch,
    RecordPageMismatch,
    RecordTruncated,
    RecordUnknownVersion,
)

MAGIC = b"SCDP"
FORMAT_VERSION = 1
_FIXED = struct.Struct("<4sHH16s32sIII")
_CHECKSUM_LEN = 16
HEADER_LEN = _FIXED.size + _CHECKSUM_LEN  # 84
_PREAMBLE = struct.Struct("<4sHH")  # magic, version, flags: readable in every version
_U32_MAX = 2**32 - 1


def encode_record(
    identity_digest: bytes,
    page_hash: str,
    page_index: int,
    token_count: int,
    payload: bytes | bytearray | memoryview,
) -> bytes:
    """Header + payload for one page. Pure; raises ValueError naming a bad argument
    (TypeError if payload is not bytes-like)."""
    ident = _identity16(identity_digest)
    page = _page_hash_bytes(page_hash)
    for name, value in (("page_index", page_index), ("token_count", token_count)):
        if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= _U32_MAX:
            raise ValueError(f"{name}={value!r}: expected an int in [0, 2**32)")
    if not isinstance(payload, (bytes, bytearray, memoryview)):
        raise TypeError(f"payload: expected bytes, got {type(payload).__name__}")
    payload = bytes(payload)
    if len(payload) > _U32_MAX:
        raise ValueError(f"payload of {len(payload)} bytes exceeds 2**32 - 1")
    fixed = _FIXED.pack(
        MAGIC, FORMAT_VERSION, 0, ident, page, page_index, token_count, len(payload)
    )
    return fixed + _checksum(fixed, payload) + payload


def decode_record(
    blob: bytes | bytearray | memoryview,
    *,
    identity_digest: bytes,
    page_hash: str,
    page_index: int,
    token_count: int,
) -> bytes:
    """The payload of blob if it is an intact v1 record for exactly this page; else RecordError.

    Check order: preamble (magic, version, flags), length, checksum, then the
    expected identity / page hash / index / token count. Pure; never raises
    anything but RecordError for any blob (ValueError only for bad expectations).
    """
    ident = _identity16(identity_digest)
    page = _page_hash_bytes(page_hash)
    if not isinstance(blob, (bytes, bytearray, memoryview)):
        raise RecordError(f"value of type {type(blob).__name__} is not bytes")
    view = memoryview(blob).cast("B") if isinstance(blob, memoryview) else memoryview(blob)
    n = len(view)
    if n < _PREAMBLE.size:
        raise RecordTruncated(f"value of {n} bytes is shorter than the preamble")
    magic, version, flags = _PREAMBLE.unpack_from(view, 0)
    if magic != MAGIC:
        raise RecordBadMagic(f"magic {bytes(magic)!r} != {MAGIC!r}")
    if version != FORMAT_VERSION or flags != 0:
        raise RecordUnknownVersion(
            f"format version {version} flags {flags:#x}; this reader knows version 1 flags 0"
        )
    if n < HEADER_LEN:
        raise RecordTruncated(f"value of {n} bytes is shorter than the {HEADER_LEN}-byte header")
    _, _, _, r_ident, r_page, r_index, r_tokens, r_len = _FIXED.unpack_from(view, 0)
    if n != HEADER_LEN + r_len:
        cls = RecordTruncated if n < HEADER_LEN + r_len else RecordBadLength
        raise cls(f"value of {n} bytes, header says {HEADER_LEN} + {r_len}")
    payload = view[HEADER_LEN:]
    if _checksum(view[: _FIXED.size], payload) != bytes(view[_FIXED.size : HEADER_LEN]):
        raise RecordChecksumMismatch("checksum mismatch")
    if r_ident != ident:
        raise RecordIdentityMismatch(f"identity {r_ident.hex()} != expected {ident.hex()}")
    if r_page != page or r_index != page_index or r_tokens != token_count:
        raise RecordPageMismatch(
            f"record is page {r_index} ({r_page.hex()[:16]}..., {r_tokens} tokens); "
            f"expected page {page_index} ({page_hash[:16]}..., {token_count} tokens)"
        )
    return bytes(payload)


def _checksum(header: bytes | memoryview, payload: bytes | memoryview) -> bytes:
    h = hashlib.blake2b(digest_size=_CHECKSUM_LEN)
    h.update(header)
    h.update(payload)
    return h.digest()


def _identity16(identity_digest: bytes) -> bytes:
    if not isinstance(identity_digest, (bytes, bytearray)) or len(identity_digest) < 16:
        raise ValueError(f"identity_digest={identity_digest!r}: expected >= 16 bytes")
    return bytes(identity_digest[:16])


def _page_hash_bytes(page_hash: str) -> bytes:
    try:
        raw = bytes.fromhex(page_hash)
    except (TypeError, ValueError):
        raw = b""
    if len(raw) != 32:
        raise ValueError(f"page_hash={page_hash!r}: expected 64 hex characters")
    return raw
