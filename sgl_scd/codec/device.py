"""The codec on a torch device: wire payloads unpacked, codes packed and producer states encoded
with torch ops only (no numpy round trip), so a GPU keeps the whole path resident. In fp32 the
results equal the numpy / CPU reference (quant.unpack_pages / pack_bits, ProducerEncoder.encode)
bit for bit; tests compare them.

  PageLayout(widths, num_tokens, device)  one page's bit layout as index tensors
      .unpack(payloads uint8 [P, page_bytes]) -> codes uint8 [P * num_tokens, C]
      .pack(codes uint8 [P * num_tokens, C])  -> payloads uint8 [P, page_bytes]
  DeviceEncoder(encoder, device, dtype)   producer K (after RoPE) / V / h on the device -> codes [T, C]

Layout (quant.pack_bits): per width group b ascending, the group's [T, n_b] values row by row as
one LSB-first stream of b-bit fields, each group padded to whole bytes. Field (t, c) of width b
starts at bit 8 * (group's byte offset) + (t * n_b + c's rank in its group) * b. As b <= 8 it
spans at most two bytes: value = ((byte[lo] | byte[lo + 1] << 8) >> shift) & mask, so one gather
of every field's two bytes and three elementwise ops unpack a whole batch of pages (int16 is
wide enough: shift + b <= 15). Zero-width columns read byte 0 under mask 0.
"""

from __future__ import annotations

import numpy as np
import torch
from torch.nn import functional as F

from sgl_scd.codec import quant
from sgl_scd.codec.codec import ProducerEncoder, slot_input
from sgl_scd.codec.states import ProducerStates


class PageLayout:
    """Bit positions of every (token, column) field of a page of num_tokens tokens."""

    def __init__(self, widths: np.ndarray, num_tokens: int, device: torch.device | str = "cpu"):
        widths = np.asarray(widths, np.int64)
        if num_tokens < 1:
            raise ValueError(f"a page holds >= 1 token, got {num_tokens}")
        if widths.min(initial=0) < 0 or widths.max(initial=0) > quant.MAX_BITS:
            raise ValueError(f"widths must lie in 0..{quant.MAX_BITS}")
        self.num_tokens, self.columns = num_tokens, len(widths)
        bit = np.zeros((num_tokens, len(widths)), np.int64)
        offset = 0
        for b, n, _ in quant._groups(widths):
            cols = np.flatnonzero(widths == b)  # a group's fields in column order, as pack_bits lays them
            bit[:, cols] = offset * 8 + (np.arange(num_tokens)[:, None] * n + np.arange(n)[None, :]) * b
            offset += (num_tokens * n * b + 7) // 8
        self.page_bytes = offset
        assert offset == quant.packed_size(num_tokens, widths)
        mask = np.broadcast_to((1 << widths) - 1, bit.shape).copy()
        dev = torch.device(device)
        self.lo = torch.as_tensor((bit // 8).reshape(-1), device=dev)  # int64 gather index
        self.shift = torch.as_tensor((bit % 8).reshape(-1), dtype=torch.int16, device=dev)
        self.mask = torch.as_tensor(mask.reshape(-1), dtype=torch.int16, device=dev)

    def unpack(self, payloads: torch.Tensor) -> torch.Tensor:
        """uint8 [P, page_bytes] (on this layout's device) -> codes uint8 [P * num_tokens, C]."""
        if payloads.dtype != torch.uint8 or payloads.dim() != 2 or payloads.shape[1] != self.page_bytes:
            raise ValueError(f"payloads must be uint8 [pages, {self.page_bytes}], got {payloads.dtype} "
                             f"{list(payloads.shape)}")
        x = F.pad(payloads, (0, 1)).to(torch.int16)  # a zero byte after the last for lo + 1
        both = x[:, self.lo] | (x[:, self.lo + 1] << 8)
        return ((both >> self.shift) & self.mask).to(torch.uint8).view(-1, self.columns)

    def pack(self, codes: torch.Tensor) -> torch.Tensor:
        """Inverse of unpack(): codes uint8 [P * num_tokens, C] (values < 2**width) -> [P, page_bytes]."""
        if codes.dtype != torch.uint8 or codes.dim() != 2 or codes.shape[1] != self.columns \
                or codes.shape[0] % self.num_tokens:
            raise ValueError(f"codes must be uint8 [pages * {self.num_tokens}, {self.columns}], got "
                             f"{codes.dtype} {list(codes.shape)}")
        pages = codes.shape[0] // self.num_tokens
        v = (codes.view(pages, -1).to(torch.int32) & self.mask) << self.shift  # < 2**15: two bytes
        out = torch.zeros(pages, self.page_bytes + 1, dtype=torch.int32, device=codes.device)
        lo = self.lo.expand(pages, -1)
        out.scatter_add_(1, lo, v & 0xFF)  # fields never share bits: adding is or-ing
        out.scatter_add_(1, lo + 1, v >> 8)
        return out[:, : self.page_bytes].to(torch.uint8)


class DeviceEncoder:
    """ProducerEncoder.encode on a device: every slot's whitening and the quantizer in torch ops
    on the states' device, codes [T, C] in wire column order (slot order)."""

    def __init__(self, encoder: ProducerEncoder, device: torch.device | str = "cpu",
                 dtype: torch.dtype = torch.float32):
        self.encoder, self.theta = encoder, encoder.theta
        self.device, self.dtype = torch.device(device), dtype
        mv = lambda t: t.to(self.device, dtype)
        self.slots = [(s, mv(e.mean), mv(e.basis), mv(e.std)) for s, e in encoder.slots.items()]
        widths = torch.cat([e.widths for e in encoder.slots.values()]).long()
        step = torch.tensor([quant.GAUSS_STEP.get(int(b), 1.0) for b in widths], dtype=torch.float32)
        half = torch.where(widths > 0, torch.pow(2.0, (widths - 1).clamp_min(0).float()), torch.zeros(()))
        self.step, self.half = step.to(self.device), half.to(self.device)
        self.zero = (widths == 0).to(self.device)

    @torch.inference_mode()
    def encode(self, states: ProducerStates) -> torch.Tensor:
        """Codes uint8 [T, C] of states whose tensors live on this encoder's device."""
        if states.theta != self.theta:
            raise ValueError(f"states were rotated with RoPE base {states.theta}, the encoder expects {self.theta}")
        k_derot = states.k_derotated()
        z = torch.cat([((slot_input(states, s, k_derot).to(self.dtype) - mean) @ basis) / std
                       for s, mean, basis, std in self.slots], 1).float()
        q = torch.floor(z / self.step).clamp(-self.half, self.half - 1) + self.half
        return q.masked_fill(self.zero, 0).to(torch.uint8)
