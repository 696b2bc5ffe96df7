"""The codec's engine-neutral inputs: what a producer forward hands the encoder, and what a
consumer hands the decoder. The HF runtime (sgl_scd.hf.runtime) and the SGLang hooks both fill them.

  ProducerStates       K (after RoPE), V of every layer and h (the normalized attention input)
                       at the layers asked for, for tokens at absolute positions [start, start+T)
  KVProjection         one consumer layer's k/v projections as tensors: base weights and biases,
                       an optional unmerged LoRA delta per projection (or weights already merged);
                       from_fused_qkv slices a fused qkv_proj (SGLang's layout)
  ConsumerProjections  the consumer's RoPE base, KV shape and its projections at the patch layers
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from sgl_scd.codec import rope


@dataclass
class ProducerStates:
    k: torch.Tensor  # [L, T, H_kv, D] keys after the producer's RoPE
    v: torch.Tensor  # [L, T, H_kv, D]
    h: dict[int, torch.Tensor]  # layer -> [T, hidden] input_layernorm output (patch layers)
    theta: float  # the RoPE base the keys were rotated with
    start: int = 0  # absolute position of the first token

    def __post_init__(self):
        if self.k.dim() != 4 or self.k.shape != self.v.shape:
            raise ValueError(f"expected k and v of shape [L, T, H_kv, D], got {tuple(self.k.shape)} "
                             f"and {tuple(self.v.shape)}")
        if self.start < 0:
            raise ValueError(f"start must be a position >= 0, got {self.start}")
        for layer, h in self.h.items():
            if h.dim() != 2 or h.shape[0] != self.num_tokens:
                raise ValueError(f"h of layer {layer} must be [T={self.num_tokens}, hidden], got {tuple(h.shape)}")

    @property
    def num_tokens(self) -> int:
        return self.k.shape[1]

    def k_derotated(self) -> torch.Tensor:
        """Keys with RoPE removed, [L, T, H_kv, D]."""
        return rope.derotate(self.k, self.theta, self.start)

    def slice(self, lo: int, hi: int) -> ProducerStates:
        """The states of tokens [lo, hi) of these (positions move with them)."""
        return ProducerStates(self.k[:, lo:hi], self.v[:, lo:hi], {l: h[lo:hi] for l, h in self.h.items()},
                              self.theta, self.start + lo)


@dataclass(frozen=True)
class LoraDelta:
    """y += scaling * (x @ a.T) @ b.T  (a [r, in], b [out, r]): PEFT's and SGLang's LoRA form."""

    a: torch.Tensor
    b: torch.Tensor
    scaling: float

    def __post_init__(self):
        if self.a.dim() != 2 or self.b.dim() != 2 or self.a.shape[0] != self.b.shape[1]:
            raise ValueError(f"LoRA a [r, in] and b [out, r] do not fit: {tuple(self.a.shape)}, {tuple(self.b.shape)}")

    def dense(self) -> torch.Tensor:  # [out, in] float64
        return self.scaling * (self.b.double() @ self.a.double())


@dataclass(frozen=True)
class KVProjection:
    """One layer's K and V projections: k = h @ k_weight.T + k_bias (+ LoRA), the same for v."""

    k_weight: torch.Tensor  # [kv_dim, hidden]
    v_weight: torch.Tensor  # [kv_dim, hidden]
    k_bias: torch.Tensor | None = None
    v_bias: torch.Tensor | None = None
    k_lora: LoraDelta | None = None
    v_lora: LoraDelta | None = None

    def __post_init__(self):
        if self.k_weight.shape != self.v_weight.shape or self.k_weight.dim() != 2:
            raise ValueError(f"k and v weights must both be [kv_dim, hidden], got {tuple(self.k_weight.shape)} "
                             f"and {tuple(self.v_weight.shape)}")
        for name, lora in (("k", self.k_lora), ("v", self.v_lora)):
            if lora is not None and (lora.b.shape[0], lora.a.shape[1]) != tuple(self.k_weight.shape):
                raise ValueError(f"{name} LoRA delta {tuple(lora.b.shape)} x {tuple(lora.a.shape)} does not "
                                 f"match the weight {tuple(self.k_weight.shape)}")

    @classmethod
    def from_fused_qkv(cls, weight: torch.Tensor, bias: torch.Tensor | None, q_dim: int, kv_dim: int,
                       **lora) -> KVProjection:
        """From a fused qkv_proj weight [q_dim + 2 * kv_dim, hidden] (rows q | k | v)."""
        if weight.shape[0] != q_dim + 2 * kv_dim:
            raise ValueError(f"fused qkv weight has {weight.shape[0]} rows, expected {q_dim} + 2 x {kv_dim}")
        k, v = weight[q_dim : q_dim + kv_dim], weight[q_dim + kv_dim :]
        kb = vb = None
        if bias is not None:
            kb, vb = bias[q_dim : q_dim + kv_dim], bias[q_dim + kv_dim :]
        return cls(k, v, kb, vb, **lora)

    @property
    def kv_dim(self) -> int:
        return self.k_weight.shape[0]

    def merged(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(W [2 * kv_dim, hidden], b [2 * kv_dim]) of [k | v] in float64, LoRA deltas merged."""
        ws, bs = [], []
        for w, b, lora in ((self.k_weight, self.k_bias, self.k_lora), (self.v_weight, self.v_bias, self.v_lora)):
            w = w.detach().double().cpu()
            ws.append(w if lora is None else w + lora.dense().cpu())
            bs.append(torch.zeros(w.shape[0], dtype=torch.float64) if b is None else b.detach().double().cpu())
        return torch.cat(ws), torch.cat(bs)

    def project(self, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(k, v) [T, kv_dim] of h [T, hidden] (differentiable in h; LoRA applied unmerged)."""
        out = []
        for w, b, lora in ((self.k_weight, self.k_bias, self.k_lora), (self.v_weight, self.v_bias, self.v_lora)):
            x = h.to(w.dtype)
            y = torch.nn.functional.linear(x, w, b)
            if lora is not None:
                y = y + lora.scaling * ((x @ lora.a.T.to(x.dtype)) @ lora.b.T.to(x.dtype))
            out.append(y)
        return out[0], out[1]


@dataclass
class ConsumerProjections:
    """What a decoder needs of its consumer model, as tensors (no model object)."""

    theta: float  # the consumer's RoPE base
    kv_heads: int
    head_dim: int
    layers: dict[int, KVProjection] = field(default_factory=dict)  # at least the patch layers

    def __post_init__(self):
        if self.theta <= 0 or self.kv_heads <= 0 or self.head_dim <= 0:
            raise ValueError(f"theta, kv_heads and head_dim must be > 0, got {self.theta}, {self.kv_heads}, "
                             f"{self.head_dim}")
        for layer, p in self.layers.items():
            if p.kv_dim != self.kv_heads * self.head_dim:
                raise ValueError(f"layer {layer}: projection has kv_dim {p.kv_dim}, expected "
                                 f"{self.kv_heads} x {self.head_dim}")

    def project(self, layer: int, h: torch.Tensor, start: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        """K (after this consumer's RoPE) and V [T, H_kv, D] of one layer from its normalized input."""
        if layer not in self.layers:
            raise KeyError(f"no consumer projection given for layer {layer} (have {sorted(self.layers)})")
        k, v = self.layers[layer].project(h)
        shape = (h.shape[0], self.kv_heads, self.head_dim)
        return rope.rotate(k.view(shape), self.theta, start), v.view(shape)
