"""Page-granular wire format for one prompt's SCD codes.

One page = `page_size` consecutive tokens (the last page of a prompt may be shorter). Layout:

  header  <4s H H 16s I H H I   magic b"SCDW", format version, flags (0), codec digest (16 bytes
                                 of the manifest's codec revision), page index, page size,
                                 tokens in this page, payload length
  payload                        every slot's quantized codes for these tokens, bit-packed
                                 (quant.pack_bits over the encoder's component widths)
  crc32   <I                     over header + payload

decode_page() refuses (WireError) a wrong magic, unknown version, codec digest or page index
other than expected, a token count that does not fit, a truncated or padded blob, or a bad CRC.
"""

from __future__ import annotations

import struct
import zlib

import numpy as np
import torch

from sgl_scd.codec import quant
from sgl_scd.codec.codec import ProducerEncoder, Slot
from sgl_scd.codec.device import PageLayout

MAGIC = b"SCDW"
VERSION = 1
_HEADER = struct.Struct("<4sHH16sIHHI")
_CRC = struct.Struct("<I")
HEADER_BYTES = _HEADER.size + _CRC.size


class WireError(ValueError):
    """A payload that must not be used: the caller treats it as a cache miss."""


def _flatten(encoder: ProducerEncoder, codes: dict[Slot, torch.Tensor]) -> np.ndarray:
    missing = [s.name for s in encoder.slots if s not in codes]
    if missing:
        raise ValueError(f"codes lack slots {missing}")
    return torch.cat([codes[s] for s in encoder.slots], 1).numpy()  # [T, C]


def encode_page(encoder: ProducerEncoder, codes: dict[Slot, torch.Tensor], codec_digest: bytes,
                page_index: int, page_size: int) -> bytes:
    """One page's blob from codes {slot: uint8 [T, r]} of exactly this page's tokens."""
    if len(codec_digest) != 16:
        raise ValueError(f"codec digest must be 16 bytes, got {len(codec_digest)}")
    flat = _flatten(encoder, codes)
    n = flat.shape[0]
    if not 0 < n <= page_size:
        raise ValueError(f"a page holds 1..{page_size} tokens, got {n}")
    return frame_page(quant.pack_bits(flat, encoder.widths_array()), codec_digest, page_index, page_size, n)


def frame_page(payload: bytes, codec_digest: bytes, page_index: int, page_size: int, num_tokens: int) -> bytes:
    """One page's blob around its packed payload (header + payload + CRC)."""
    header = _HEADER.pack(MAGIC, VERSION, 0, codec_digest, page_index, page_size, num_tokens, len(payload))
    return header + payload + _CRC.pack(zlib.crc32(header + payload))


def frame_pages(packed, codec_digest: bytes, page_size: int, first_page: int = 0) -> list[bytes]:
    """Blobs of full pages whose payloads were packed elsewhere (rows of packed, e.g. a
    device.PageLayout.pack result copied to the host), pages first_page, first_page + 1, ..."""
    return [frame_page(row.tobytes(), codec_digest, first_page + i, page_size, page_size)
            for i, row in enumerate(packed)]


def encode_pages(encoder: ProducerEncoder, codes: dict[Slot, torch.Tensor], codec_digest: bytes,
                 page_size: int, *, full_pages_only: bool = True, first_page: int = 0) -> list[bytes]:
    """Split codes of consecutive tokens starting at page first_page into page blobs (by default
    only full pages, as SGLang keys them)."""
    t = next(iter(codes.values())).shape[0]
    end = (t // page_size) * page_size if full_pages_only else t
    return [encode_page(encoder, {s: q[i : i + page_size] for s, q in codes.items()}, codec_digest,
                        first_page + i // page_size, page_size)
            for i in range(0, end, page_size)]


def _check_page(encoder: ProducerEncoder, blob: bytes, codec_digest: bytes, page_index: int,
                page_size: int) -> tuple[int, bytes]:
    """Validate one page's frame; return (token count, packed payload). WireError otherwise."""
    if len(blob) < HEADER_BYTES:
        raise WireError(f"page blob of {len(blob)} bytes is shorter than the {HEADER_BYTES}-byte frame")
    magic, version, _flags, digest, index, psize, n, plen = _HEADER.unpack_from(blob)
    if magic != MAGIC:
        raise WireError(f"bad magic {magic!r}")
    if version != VERSION:
        raise WireError(f"unknown wire format version {version} (this build reads {VERSION})")
    if digest != codec_digest:
        raise WireError(f"codec digest {digest.hex()} does not match the adapter's {codec_digest.hex()}")
    if index != page_index:
        raise WireError(f"page index {index} where {page_index} was expected")
    if psize != page_size or not 0 < n <= page_size:
        raise WireError(f"page size {psize} / token count {n} invalid for page size {page_size}")
    if plen != quant.packed_size(n, encoder.widths_array()) or len(blob) != _HEADER.size + plen + _CRC.size:
        raise WireError(f"truncated or padded page: {len(blob)} bytes for a {plen}-byte payload")
    (crc,) = _CRC.unpack_from(blob, _HEADER.size + plen)
    if crc != zlib.crc32(memoryview(blob)[: _HEADER.size + plen]):
        raise WireError("checksum mismatch")
    return n, blob[_HEADER.size : _HEADER.size + plen]


def decode_page(encoder: ProducerEncoder, blob: bytes, codec_digest: bytes, page_index: int,
                page_size: int) -> dict[Slot, torch.Tensor]:
    """Codes {slot: uint8 [n, r]} of one page; WireError if anything does not match."""
    n, payload = _check_page(encoder, blob, codec_digest, page_index, page_size)
    return encoder.split(torch.from_numpy(quant.unpack_bits(payload, n, encoder.widths_array())))


def valid_prefix(encoder: ProducerEncoder, blobs: list[bytes], codec_digest: bytes, page_size: int,
                 first_page: int = 0) -> tuple[int, WireError | None]:
    """How many leading pages of blobs (pages first_page, first_page + 1, ...) are valid, and the
    error of the first invalid one (None when all are): a corrupt page k of n leaves the k before
    it usable. Only the last page of a run may be partial."""
    for i, blob in enumerate(blobs):
        try:
            n, _ = _check_page(encoder, blob, codec_digest, first_page + i, page_size)
        except WireError as exc:
            return i, exc
        if n != page_size and i != len(blobs) - 1:
            return i, WireError(f"page {first_page + i} holds {n} of {page_size} tokens but is not the last page")
    return len(blobs), None


def decode_pages(encoder: ProducerEncoder, blobs: list[bytes], codec_digest: bytes,
                 page_size: int, first_page: int = 0, layout: PageLayout | None = None) -> dict[Slot, torch.Tensor]:
    """Concatenated codes of consecutive pages first_page, first_page + 1, ... (every page checked
    first, WireError on the first bad one; full pages are unpacked together, a shorter last page
    on its own). layout: a device.PageLayout of full pages: they are copied to its device and
    unpacked there (codes on that device; a partial last page is unpacked on the CPU and moved)."""
    if not blobs:
        raise ValueError("no pages to decode")
    checked = [_check_page(encoder, b, codec_digest, first_page + i, page_size) for i, b in enumerate(blobs)]
    widths = encoder.widths_array()
    full = [p for n, p in checked if n == page_size]
    if any(n != page_size for n, _ in checked[:-1]):
        raise WireError("only the last page of a prompt may be partial")
    parts = []
    if layout is not None:
        if layout.num_tokens != page_size or layout.columns != len(widths):
            raise ValueError(f"layout of {layout.num_tokens} x {layout.columns} does not fit pages of "
                             f"{page_size} x {len(widths)}")
        device = layout.lo.device
        if full:
            parts.append(layout.unpack(torch.frombuffer(bytearray(b"".join(full)), dtype=torch.uint8)
                                       .view(len(full), -1).to(device, non_blocking=True)))
    else:
        device = torch.device("cpu")
        if full:
            parts.append(torch.from_numpy(quant.unpack_pages(full, page_size, widths)))
    last_n, last_payload = checked[-1]
    if last_n != page_size:
        parts.append(torch.from_numpy(quant.unpack_bits(last_payload, last_n, widths)).to(device))
    return encoder.split(parts[0] if len(parts) == 1 else torch.cat(parts))


def payload_bytes_per_token(encoder: ProducerEncoder, page_size: int) -> float:
    """Wire bytes per token for full pages, framing included."""
    return (quant.packed_size(page_size, encoder.widths_array()) + HEADER_BYTES) / page_size
