"""Model shapes and SCD codecs of real sizes with random weights, for timing (scripts/bench_gpu.py).

Models cannot be downloaded here, and timing needs only the arithmetic: a transformers Llama of a
real shape with random weights does a real model's prefill work, and a codec whose slots have the
demo code set's ranks and bits per dimension (scaled to the shape) does a real rebuild's work.

  SHAPES                        SmolLM2-135M, Llama-3.1-8B, Qwen2.5-7B (GQA 7, qkv biases)
  CodecProfile.of(adapter)      ranks / bits per dimension, patch-layer depths and decoder form of
                                a calibrated adapter; DEMO_PROFILE is adapters/quick-ft's
  synthetic_codec(shape, prof)  (ProducerEncoder, FoldedDecoder) of that profile at a shape
  random_model(shape, ...)      a transformers LlamaForCausalLM of the shape, random weights
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from sgl_scd.codec.codec import (
    ConsumerDecoder,
    ProducerEncoder,
    SlotEncoder,
    context_inputs,
    plan_slots,
)
from sgl_scd.codec.fold import FoldedDecoder
from sgl_scd.codec.manifest import Adapter
from sgl_scd.codec.states import ConsumerProjections, KVProjection


@dataclass(frozen=True)
class Shape:
    name: str
    layers: int
    hidden: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int
    vocab: int
    theta: float
    qkv_bias: bool = False

    @property
    def kv_dim(self) -> int:
        return self.kv_heads * self.head_dim

    @property
    def params(self) -> int:
        """Weights, embeddings and (untied) LM head included."""
        attn = self.hidden * (self.heads * self.head_dim) * 2 + self.hidden * self.kv_dim * 2
        mlp = 3 * self.hidden * self.intermediate
        return self.layers * (attn + mlp + 2 * self.hidden) + 2 * self.vocab * self.hidden

    def raw_kv_bytes_per_token(self) -> int:
        return 2 * self.layers * self.kv_dim * 2  # bf16 K and V of every layer

    def prefill_flops(self, tokens: int, batch: int = 1) -> float:
        """Dense matmul FLOPs of a prefill of `tokens` per sequence (causal attention halved; LM head
        on the last token only)."""
        per_token = 2 * (self.params - 2 * self.vocab * self.hidden)
        attn = 2 * 2 * self.layers * self.heads * self.head_dim * tokens * tokens / 2
        return batch * (per_token * tokens + attn + 2 * self.vocab * self.hidden)


SHAPES = {s.name: s for s in (
    Shape("smollm2-135m", 30, 576, 9, 3, 64, 1536, 49152, 1e5),
    Shape("llama-3.1-8b", 32, 4096, 32, 8, 128, 14336, 128256, 5e5),
    Shape("qwen2.5-7b", 28, 3584, 28, 4, 128, 18944, 152064, 1e6, qkv_bias=True),
)}


@dataclass(frozen=True)
class CodecProfile:
    """What a code set looks like per dimension, independent of the model's size.

    rank: components kept per input dimension, by slot kind; widths: the share of those components
    at each bit width, by kind; patch_depths: the patch layers as fractions of the depth;
    hidden: the decoder's residual-MLP width per input dimension, by kind; context: which codes a
    translator reads (codec.context_inputs)."""

    rank: dict[str, float]
    widths: dict[str, dict[int, float]]
    patch_depths: tuple[float, ...]
    hidden: dict[str, float] = field(default_factory=dict)
    context: str = "own"
    source: str = ""

    @classmethod
    def of(cls, adapter: Adapter) -> CodecProfile:
        enc, ident = adapter.encoder, adapter.manifest.consumer
        dims = {"k": ident.kv_heads * ident.head_dim, "v": ident.kv_heads * ident.head_dim, "h": ident.hidden_size}
        rank, widths = {}, {}
        for kind in ("k", "v", "h"):
            slots = [e for s, e in enc.codec.slots.items() if s.kind == kind]
            if not slots:
                continue
            rank[kind] = float(np.mean([e.rank / dims[kind] for e in slots]))
            w = torch.cat([e.widths for e in slots]).long()
            widths[kind] = {int(b): float((w == b).float().mean()) for b in w.unique()}
        depths = tuple(p / ident.num_layers for p in enc.manifest.h_layers)
        hidden = {k: v / dims[k] for k, v in adapter.manifest.decoder_hidden.items() if v and k in dims}
        return cls(rank, widths, depths, hidden, adapter.manifest.decoder_context, str(adapter.path))

    def slot_widths(self, kind: str, dim: int) -> torch.Tensor:
        """Widths [r] for a slot of input dimension dim, widest first (PCA order)."""
        r = max(1, round(self.rank[kind] * dim))
        counts = {b: round(f * r) for b, f in self.widths[kind].items()}
        widest = max(counts)
        counts[widest] += r - sum(counts.values())  # rounding leftovers go to the widest group
        return torch.tensor([b for b in sorted(counts, reverse=True) for _ in range(max(counts[b], 0))],
                            dtype=torch.int32)

    def patch_layers(self, layers: int) -> list[int]:
        return sorted({min(layers - 1, round(d * layers)) for d in self.patch_depths})


# adapters/quick-ft on its encoder adapters/quick-encoder (make adapters-quick), read with
# CodecProfile.of: 0.238x raw bf16 KV on SmolLM2-135M.
DEMO_PROFILE = CodecProfile(
    rank={"k": 0.0, "v": 0.0, "h": 0.0},
    widths={"k": {1: 1.0}, "v": {1: 1.0}, "h": {1: 1.0}},
    patch_depths=(),
    source="adapters/quick-ft",
)


def _orthonormal(d: int, r: int, g: torch.Generator) -> torch.Tensor:
    q, _ = torch.linalg.qr(torch.randn(d, r, generator=g))
    return q.contiguous()


def synthetic_codec(shape: Shape, profile: CodecProfile, consumer_theta: float | None = None, seed: int = 0
                    ) -> tuple[ProducerEncoder, FoldedDecoder]:
    """An encoder and a consumer's folded decoder of the profile at this shape, random weights
    (the consumer's RoPE base defaults to the shape's)."""
    g = torch.Generator().manual_seed(seed)
    theta_c = consumer_theta or shape.theta
    slots = plan_slots(shape.layers, profile.patch_layers(shape.layers))
    dim = {"k": shape.kv_dim, "v": shape.kv_dim, "h": shape.hidden}
    encs = {}
    for s in slots:
        w = profile.slot_widths(s.kind, dim[s.kind])
        encs[s] = SlotEncoder(torch.zeros(dim[s.kind]), _orthonormal(dim[s.kind], len(w), g),
                              torch.ones(len(w)), w)
    enc = ProducerEncoder(encs, shape.theta)
    dims = {s: (e.rank, dim[s.kind]) for s, e in enc.slots.items()}
    hidden = {k: max(1, round(f * dim[k])) for k, f in profile.hidden.items()}
    dec = ConsumerDecoder(dims, hidden, theta_c, shape.kv_heads, shape.head_dim,
                          context_inputs(enc.slots, profile.context))
    with torch.no_grad():
        for p in dec.parameters():
            p.normal_(0, 0.02, generator=g)
    scale = shape.hidden ** -0.5
    proj = ConsumerProjections(theta_c, shape.kv_heads, shape.head_dim, {
        layer: KVProjection(torch.randn(shape.kv_dim, shape.hidden, generator=g) * scale,
                            torch.randn(shape.kv_dim, shape.hidden, generator=g) * scale,
                            torch.zeros(shape.kv_dim) if shape.qkv_bias else None,
                            torch.zeros(shape.kv_dim) if shape.qkv_bias else None)
        for layer in enc.patch_layers})
    return enc, FoldedDecoder(dec, enc, proj)


def random_model(shape: Shape, device, dtype: torch.dtype):
    """A transformers LlamaForCausalLM of the shape with random weights, in eval mode on device."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=shape.vocab, hidden_size=shape.hidden, intermediate_size=shape.intermediate,
                         num_hidden_layers=shape.layers, num_attention_heads=shape.heads,
                         num_key_value_heads=shape.kv_heads, head_dim=shape.head_dim, attention_bias=shape.qkv_bias,
                         max_position_embeddings=1 << 17, rope_parameters={"rope_type": "default",
                                                                          "rope_theta": shape.theta},
                         tie_word_embeddings=False)
    config._attn_implementation = "sdpa"
    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = LlamaForCausalLM(config)
    finally:
        torch.set_default_dtype(default)
    return model.eval()
