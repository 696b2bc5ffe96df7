"""Record format: round trip, every rejection cause, and fuzzing of the parser."""

from __future__ import annotations

import struct

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sgl_scd.store.errors import RecordError
from sgl_scd.store.record import FORMAT_VERSION, HEADER_LEN, MAGIC, decode_record, encode_record

IDENT = bytes(range(32))
OTHER_IDENT = bytes(range(1, 33))
PAGE = "cd" * 32
OTHER_PAGE = "ef" * 32


def decode(blob, **overrides):
    expect = {"identity_digest": IDENT, "page_hash": PAGE, "page_index": 3, "token_count": 16}
    expect.update(overrides)
    return decode_record(blob, **expect)


def good(payload: bytes = b"semantic-code-bytes" * 10) -> bytes:
    return encode_record(IDENT, PAGE, 3, 16, payload)


def test_round_trip_and_layout():
    payload = bytes(range(256)) * 3
    blob = good(payload)
    assert len(blob) == HEADER_LEN + len(payload) == 84 + len(payload)
    assert blob[:4] == MAGIC
    assert struct.unpack_from("<HH", blob, 4) == (FORMAT_VERSION, 0)
    assert decode(blob) == payload
    assert decode(good(b"")) == b""
    assert decode(memoryview(blob)) == payload
    assert decode(bytearray(blob)) == payload


def with_version(blob: bytes, version: int) -> bytes:
    return blob[:4] + struct.pack("<H", version) + blob[6:]


@pytest.mark.parametrize("mutate,overrides,cause", [
    (lambda b: b[:3], {}, "truncated"),
    (lambda b: b[:HEADER_LEN - 1], {}, "truncated"),
    (lambda b: b[:-1], {}, "truncated"),
    (lambda b: b + b"\x00", {}, "length"),
    (lambda b: b"XXXX" + b[4:], {}, "magic"),
    (lambda b: with_version(b, 2), {}, "version"),
    (lambda b: b[:6] + b"\x01\x00" + b[8:], {}, "version"),
    (lambda b: b[:-1] + bytes([b[-1] ^ 1]), {}, "checksum"),
    (lambda b: b[:10] + bytes([b[10] ^ 0x80]) + b[11:], {}, "checksum"),
    (lambda b: b, {"identity_digest": OTHER_IDENT}, "identity"),
    (lambda b: b, {"page_hash": OTHER_PAGE}, "page"),
    (lambda b: b, {"page_index": 4}, "page"),
    (lambda b: b, {"token_count": 32}, "page"),
])
def test_rejections_carry_their_cause(mutate, overrides, cause):
    with pytest.raises(RecordError) as info:
        decode(mutate(good()), **overrides)
    assert info.value.cause == cause


def test_not_bytes_is_a_record_error():
    with pytest.raises(RecordError):
        decode("a string")  # type: ignore[arg-type]


def test_encode_validates_arguments():
    with pytest.raises(ValueError, match="page_index=-1"):
        encode_record(IDENT, PAGE, -1, 16, b"x")
    with pytest.raises(ValueError, match="page_hash='zz'"):
        encode_record(IDENT, "zz", 0, 16, b"x")
    with pytest.raises(ValueError, match="identity_digest"):
        encode_record(b"short", PAGE, 0, 16, b"x")
    with pytest.raises(TypeError, match="payload: expected bytes, got str"):
        encode_record(IDENT, PAGE, 0, 16, "x")  # type: ignore[arg-type]


FUZZ = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@FUZZ
@given(st.binary(max_size=400))
def test_fuzz_arbitrary_bytes_never_crash(blob):
    """Any byte string either decodes (only if it is a valid record for this page) or raises
    RecordError; no other exception escapes."""
    try:
        payload = decode(blob)
    except RecordError:
        return
    assert blob == good(payload)


@FUZZ
@given(payload=st.binary(max_size=300), data=st.data())
def test_fuzz_mutated_records_are_never_served(payload, data):
    """Flip, overwrite, insert, delete or truncate bytes of a valid record: always rejected."""
    blob = bytearray(good(payload))
    kind = data.draw(st.sampled_from(["flip", "set", "insert", "delete", "truncate", "extend"]))
    pos = data.draw(st.integers(0, len(blob) - 1))
    if kind == "flip":
        blob[pos] ^= data.draw(st.integers(1, 255))
    elif kind == "set":
        new = data.draw(st.integers(0, 255).filter(lambda v: v != blob[pos]))
        blob[pos] = new
    elif kind == "insert":
        blob[pos:pos] = data.draw(st.binary(min_size=1, max_size=8))
    elif kind == "delete":
        del blob[pos : pos + data.draw(st.integers(1, 8))]
    elif kind == "truncate":
        del blob[pos:]
    else:
        blob += data.draw(st.binary(min_size=1, max_size=8))
    with pytest.raises(RecordError):
        decode(bytes(blob))


@FUZZ
@given(st.binary(max_size=200), st.binary(min_size=HEADER_LEN, max_size=HEADER_LEN))
def test_fuzz_random_headers_with_valid_magic(payload, header):
    """Random headers that pass the magic/version gate still never yield a payload."""
    blob = MAGIC + struct.pack("<HH", FORMAT_VERSION, 0) + header[8:] + payload
    with pytest.raises(RecordError):
        decode(blob)
