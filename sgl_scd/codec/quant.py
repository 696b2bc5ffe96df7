"""Scalar quantization of whitened codes and bit packing.

Codes are projected on a PCA basis and divided by each component's standard deviation, so
each component is ~N(0, 1). A b-bit component uses the mean-squared-error optimal uniform
quantizer for a unit Gaussian (steps solved offline, shipped as constants), so no per-token scale
is shipped: the steps are static calibration constants. Bits go to components by reverse
water-filling: each next bit goes where it removes the most (variance-weighted) error.
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np
import torch

MAX_BITS = 8


# MSE-optimal uniform (midrise) step for a unit Gaussian per bit width, and the MSE it achieves.
# Solved offline by golden-section search on a fine grid; tests/test_quant_tables.py re-solves
# them and checks these values (solving at import took seconds on a loaded 2-core machine).
GAUSS_STEP = {
    1: 1.595769135771874,
    2: 0.9956898568165614,
    3: 0.5860224927865361,
    4: 0.335198238829457,
    5: 0.18813905799267555,
    6: 0.10406374775774618,
    7: 0.0568678255934162,
    8: 0.03076245135885137,
}
GAUSS_MSE = {
    0: 1.0,
    1: 0.36338022784786544,
    2: 0.1188460504441206,
    3: 0.037439659416129596,
    4: 0.011542884446237075,
    5: 0.003495211363736091,
    6: 0.0010400454101893426,
    7: 0.0003043327710965023,
    8: 8.768618584838363e-05,
}


def allocate_bits(var: torch.Tensor, budget_bits: int) -> torch.Tensor:
    """Integer widths [r] (0..8) summing to <= budget_bits that greedily minimize sum var_i * mse(b_i)."""
    if budget_bits < 0:
        raise ValueError(f"budget_bits must be >= 0, got {budget_bits}")
    v = var.double().clamp_min(0).numpy()
    widths = np.zeros(len(v), dtype=np.int64)
    gain = v * (GAUSS_MSE[0] - GAUSS_MSE[1])
    for _ in range(min(budget_bits, len(v) * MAX_BITS)):
        i = int(gain.argmax())
        if gain[i] <= 0:
            break
        widths[i] += 1
        b = widths[i]
        gain[i] = v[i] * (GAUSS_MSE[b] - GAUSS_MSE[b + 1]) if b < MAX_BITS else -1.0
    return torch.from_numpy(widths)


def quantize(z: torch.Tensor, widths: torch.Tensor) -> torch.Tensor:
    """Whitened codes z [T, r] -> unsigned integers [T, r] of the given widths (0 -> 0); uint8,
    as widths are <= MAX_BITS = 8."""
    out = torch.zeros(z.shape, dtype=torch.uint8)
    for b in widths.unique().tolist():
        if b == 0:
            continue
        cols = (widths == b).nonzero().squeeze(1)
        half = 1 << (b - 1)
        q = torch.floor(z[:, cols] / GAUSS_STEP[b]).clamp(-half, half - 1) + half
        out[:, cols] = q.to(torch.uint8)
    return out


def dequantize(q: torch.Tensor, widths: torch.Tensor) -> torch.Tensor:
    """Inverse of quantize(): reconstruction levels (midpoints) [T, r] float32; width 0 -> 0."""
    out = torch.zeros(q.shape, dtype=torch.float32)
    for b in widths.unique().tolist():
        if b == 0:
            continue
        cols = (widths == b).nonzero().squeeze(1)
        half = 1 << (b - 1)
        out[:, cols] = (q[:, cols].float() - half + 0.5) * GAUSS_STEP[b]
    return out


def _groups(widths: np.ndarray) -> tuple[tuple[int, int, tuple[tuple[int, int, int], ...]], ...]:
    """Per nonzero width b (ascending): (b, its column count n_b, the column runs
    ((dst_start, dst_stop, src_start), ...) that place its packed group, the columns of width b
    in order, into the full row). PCA order makes the widths non-increasing within a slot: a few
    runs per slot, not one per column."""
    return _groups_of(np.ascontiguousarray(widths, np.int64).tobytes())


@lru_cache(maxsize=16)
def _groups_of(widths_bytes: bytes) -> tuple:
    widths = np.frombuffer(widths_bytes, np.int64)
    out = []
    for b in sorted(set(widths.tolist()) - {0}):
        cols = np.flatnonzero(widths == b)
        runs, src = [], 0
        for run in np.split(cols, np.flatnonzero(np.diff(cols) != 1) + 1):
            runs.append((int(run[0]), int(run[-1]) + 1, src))
            src += len(run)
        out.append((b, len(cols), tuple(runs)))
    return tuple(out)


def pack_bits(q: np.ndarray, widths: np.ndarray) -> bytes:
    """Pack q [T, r] (values < 2**widths) into bytes: per width group b (ascending), the group's
    [T, n_b] values row by row as one LSB-first stream of b-bit fields."""
    out = []
    for b, _, runs in _groups(widths):
        vals = np.concatenate([q[:, dst:stop] for dst, stop, _ in runs], 1).astype(np.uint8, copy=False)  # [T, n_b]
        out.append(_pack_fields(vals.reshape(-1), b))
    return b"".join(out)


def _pack_fields(vals: np.ndarray, b: int) -> bytes:
    """Inverse of _unpack_fields for one page: uint8 values [count] -> ceil(count * b / 8) bytes."""
    count = len(vals)
    chunks = -(-count // 8)
    v = np.zeros(chunks * 8, np.uint8)
    v[:count] = vals
    v = v.reshape(chunks, 8)
    c = np.zeros((chunks, b), np.uint8)
    for i in range(8):
        byte, shift = divmod(i * b, 8)
        c[:, byte] |= v[:, i] << shift  # uint8: the bits that spill over wrap away ...
        if shift + b > 8:
            c[:, byte + 1] |= v[:, i] >> (8 - shift)  # ... and land in the next byte
    return c.reshape(-1)[: (count * b + 7) // 8].tobytes()


def packed_size(num_tokens: int, widths: np.ndarray) -> int:
    """Bytes of pack_bits() for num_tokens tokens: each width group padded to whole bytes."""
    return sum((num_tokens * n * b + 7) // 8 for b, n, _ in _groups(widths))


def _unpack_fields(group: np.ndarray, count: int, b: int) -> np.ndarray:
    """[P, count] values of an LSB-first stream of b-bit fields, group [P, bytes].

    Eight b-bit fields fill exactly b bytes, so the stream is viewed as [P, chunks, b] bytes and
    field i of every chunk is one strided shift-and-mask of fixed byte columns: no per-bit pass."""
    pages, nbytes = group.shape
    chunks = -(-count // 8)
    if chunks * b != nbytes:  # a partial last chunk: zero-pad it
        group = np.concatenate([group, np.zeros((pages, chunks * b - nbytes), np.uint8)], 1)
    c = group.reshape(pages, chunks, b)
    vals = np.empty((pages, chunks, 8), np.uint8)
    mask = (1 << b) - 1
    for i in range(8):
        byte, shift = divmod(i * b, 8)
        v = c[:, :, byte] >> shift
        if shift + b > 8:
            v = v | (c[:, :, byte + 1] << (8 - shift))  # uint8: the carried high bits wrap away
        vals[:, :, i] = v & mask
    return vals.reshape(pages, chunks * 8)[:, :count]


def unpack_pages(payloads: list[bytes], num_tokens: int, widths: np.ndarray) -> np.ndarray:
    """unpack_bits() of several same-length pages at once -> [pages * num_tokens, r].
    One pass per width group over all pages (the hot path of a rebuild)."""
    expected = packed_size(num_tokens, widths)
    for p in payloads:
        if len(p) != expected:
            raise ValueError(f"packed codes are {len(p)} bytes, expected {expected}")
    pages = len(payloads)
    buf = np.frombuffer(b"".join(payloads), np.uint8).reshape(pages, expected)  # [P, bytes]
    out = np.empty((pages, num_tokens, len(widths)), dtype=np.uint8)
    out[:, :, widths == 0] = 0
    off = 0
    for b, n, runs in _groups(widths):
        nbytes = (num_tokens * n * b + 7) // 8
        vals = _unpack_fields(buf[:, off : off + nbytes], num_tokens * n, b).reshape(pages, num_tokens, n)
        for dst, stop, src in runs:
            out[:, :, dst:stop] = vals[:, :, src : src + stop - dst]
        off += nbytes
    return out.reshape(pages * num_tokens, len(widths))


def unpack_bits(blob: bytes, num_tokens: int, widths: np.ndarray) -> np.ndarray:
    """Inverse of pack_bits(); raises ValueError if blob has the wrong length."""
    return unpack_pages([blob], num_tokens, widths)
