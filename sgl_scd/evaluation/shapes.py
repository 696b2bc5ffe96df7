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
    ProducerEncoder,
    SlotEncoder,
    context_inputs,
    plan_slots,
)
from sgl_scd.codec.fold import FoldedDecoder
from sgl_scd.codec.manifest import Adapter


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
        """The patch depths at a depth of `layers`, each on a layer of its own (the nearest free one
        on a collision); models of fewer than twice as many layers (smoke tests) keep every other."""
        depths = self.patch_depths if 2 * len(self.patch_depths) <= layers else self.patch_depths[::2][: layers // 2]
        out: list[int] = []
        for d in depths:
            want = min(layers - 1, round(d * layers))
            out.append(min((p for p in range(layers) if p not in out), key=lambda p: (abs(p - want), p)))
        return sorted(out)


# adapters/quick-ft on its encoder adapters/quick-encoder (make adapters-quick), read with
# CodecProfile.of: 0.238x raw bf16 KV on SmolLM2-135M, patch layers 18-24 and 27 of 30.
DEMO_PROFILE = CodecProfile(
    rank={"k": 0.8864, "v": 0.9631, "h": 1.0},
    widths={"k": {1: 0.1389, 2: 0.2001, 3: 0.2214, 4: 0.1907, 5: 0.1338, 6: 0.0694, 7: 0.0326, 8: 0.0131},
            "v": {1: 0.1421, 2: 0.2303, 3: 0.2466, 4: 0.2001, 5: 0.1241, 6: 0.047, 7: 0.0088, 8: 0.001},
            "h": {1: 0.0085, 2: 0.1682, 3: 0.2637, 4: 0.2266, 5: 0.1543, 6: 0.0946, 7: 0.0549, 8: 0.0293}},
    patch_depths=tuple(p / 30 for p in (18, 19, 20, 21, 22, 23, 24, 27)),
    hidden={"h": 256 / 576},
    context="kv+h",
    source="adapters/quick-ft (make adapters-quick)",
)


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
        basis = torch.randn(dim[s.kind], len(w), generator=g) * dim[s.kind] ** -0.5  # timing needs no PCA
        encs[s] = SlotEncoder(torch.zeros(dim[s.kind]), basis, torch.ones(len(w)), w)
    enc = ProducerEncoder(encs, shape.theta)
    hidden = {k: max(1, round(f * dim[k])) for k, f in profile.hidden.items()}
    fold = FoldedDecoder.random(enc, context_inputs(enc.slots, profile.context), hidden, theta_c,
                                shape.kv_heads, shape.head_dim, g)
    return enc, fold


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
