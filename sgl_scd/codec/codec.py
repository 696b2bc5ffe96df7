"""Producer-side encoder and consumer-side decoder of SCD codes.

A *slot* is one (layer, kind) stream: kind "k" (RoPE-free keys, Reuse), "v" (values, Reuse)
or "h" (the normalized attention input, Patch). Reuse layers ship k and v slots; patch layers
ship one h slot and the consumer recomputes that layer's K/V with its own projections.

Encoder (per slot, depends on the producer only, so one published code serves every adapter
calibrated against it): x [T, d] -> z = (x - mean) @ basis / std   [T, r], whitened PCA code,
then quantized with static Gaussian steps (quant.py). Components that get 0 bits are dropped,
so the rank of each slot falls out of the bit allocation.

Decoder (per consumer): z -> x_hat [T, d] by a Translator (affine map + optional residual MLP),
then keys are re-rotated with the consumer's RoPE base; h slots go through the consumer's own
k_proj / v_proj (given as tensors, states.ConsumerProjections: LoRA deltas, biases) and RoPE. A reuse translator may read
other slots' codes of the same token too (context_inputs: its layer's K and V, the nearest
patch layer's h): they are on the wire anyway, so context costs rebuild compute, not bytes.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from sgl_scd.codec import quant, rope
from sgl_scd.codec.states import ConsumerProjections, ProducerStates

KINDS = ("k", "v", "h")


@dataclass(frozen=True, order=True)
class Slot:
    layer: int
    kind: str

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"slot kind must be one of {KINDS}, got {self.kind!r}")

    @property
    def name(self) -> str:
        return f"L{self.layer:02d}.{self.kind}"

    @classmethod
    def parse(cls, name: str) -> Slot:
        layer, kind = name.split(".")
        return cls(int(layer[1:]), kind)


def plan_slots(num_layers: int, patch_layers) -> list[Slot]:
    patch = set(patch_layers)
    bad = [p for p in patch if not 0 <= p < num_layers]
    if bad:
        raise ValueError(f"patch layers {bad} out of range [0, {num_layers})")
    slots = []
    for layer in range(num_layers):
        slots += [Slot(layer, "h")] if layer in patch else [Slot(layer, "k"), Slot(layer, "v")]
    return slots


def slot_input(states: ProducerStates, slot: Slot, k_derot: torch.Tensor | None = None) -> torch.Tensor:
    """The [T, d] observation a slot encodes from a producer's states."""
    if slot.kind == "k":
        k = states.k_derotated() if k_derot is None else k_derot
        return k[slot.layer].reshape(k.shape[1], -1)  # [T, H*D]
    if slot.kind == "v":
        return states.v[slot.layer].reshape(states.v.shape[1], -1)
    if slot.layer not in states.h:
        raise ValueError(f"slot {slot.name} needs the producer's normalized input of layer {slot.layer} "
                         f"(states carry layers {sorted(states.h)})")
    return states.h[slot.layer]


@dataclass
class SlotEncoder:
    mean: torch.Tensor  # [d]
    basis: torch.Tensor  # [d, r] (only components with > 0 bits)
    std: torch.Tensor  # [r]
    widths: torch.Tensor  # [r] int, 1..8

    @property
    def rank(self) -> int:
        return self.basis.shape[1]

    @property
    def bits_per_token(self) -> int:
        return int(self.widths.sum())

    def whiten(self, x: torch.Tensor) -> torch.Tensor:  # [T, d] -> [T, r]
        return ((x.float() - self.mean) @ self.basis) / self.std

    def unwhiten(self, z: torch.Tensor) -> torch.Tensor:  # [T, r] -> [T, d]
        """whiten's least-squares inverse: the least-norm x (about the mean) with whiten(x) == z
        (exact when every component is kept; basis.T when the basis is orthonormal)."""
        return (z * self.std) @ torch.linalg.pinv(self.basis) + self.mean

    def encode(self, x: torch.Tensor) -> torch.Tensor:  # [T, d] -> uint8 [T, r]
        return quant.quantize(self.whiten(x), self.widths)

    def dequantize(self, q: torch.Tensor) -> torch.Tensor:  # uint8 [T, r] -> [T, r]
        return quant.dequantize(q, self.widths)


class ProducerEncoder:
    """Turns a producer prefill capture into quantized per-slot codes."""

    def __init__(self, slots: dict[Slot, SlotEncoder], theta: float):
        self.slots = dict(sorted(slots.items()))
        self.theta = theta

    @property
    def needs_hidden(self) -> bool:
        return any(s.kind == "h" for s in self.slots)

    @property
    def patch_layers(self) -> list[int]:
        return sorted(s.layer for s in self.slots if s.kind == "h")

    def bits_per_token(self) -> int:
        return sum(e.bits_per_token for e in self.slots.values())

    def encode(self, states: ProducerStates) -> dict[Slot, torch.Tensor]:
        """Codes {slot: uint8 [T, r]} for every token of the states (CPU)."""
        if states.theta != self.theta:
            raise ValueError(f"states were rotated with RoPE base {states.theta}, the encoder expects {self.theta}")
        k_derot = states.k_derotated()
        return {s: e.encode(slot_input(states, s, k_derot).cpu()) for s, e in self.slots.items()}

    def dequantize(self, codes: dict[Slot, torch.Tensor]) -> dict[Slot, torch.Tensor]:
        """Whitened codes {slot: [T, r]}; one vectorized op when every slot is present."""
        if set(codes) != set(self.slots):
            return {s: self.slots[s].dequantize(q) for s, q in codes.items()}
        flat = torch.cat([codes[s] for s in self.slots], 1).float()  # [T, C]
        scale, offset = self._levels()
        return self.split(flat * scale + offset)  # (q - 2^(b-1) + 0.5) * step

    def split(self, flat: torch.Tensor) -> dict[Slot, torch.Tensor]:
        """Per-slot views of [..., C] columns laid out in slot order (the wire's token layout)."""
        out, off = {}, 0
        for s, e in self.slots.items():
            out[s] = flat[..., off : off + e.rank]
            off += e.rank
        return out

    def _levels(self) -> tuple[torch.Tensor, torch.Tensor]:
        if not hasattr(self, "_level_cache"):
            w = torch.cat([e.widths for e in self.slots.values()]).long()
            step = torch.tensor([quant.GAUSS_STEP[int(b)] for b in w], dtype=torch.float32)
            half = torch.pow(2.0, (w - 1).float())
            self._level_cache = (step, (0.5 - half) * step)
        return self._level_cache

    def levels(self) -> dict[Slot, tuple[torch.Tensor, torch.Tensor]]:
        """Per slot (scale [r], offset [r]) with dequantize(q) == q * scale + offset."""
        scale, offset = (self.split(x) for x in self._levels())
        return {s: (scale[s], offset[s]) for s in self.slots}

    def widths_array(self) -> np.ndarray:
        """Widths of all components in slot order: the layout of one token's codes on the wire
        (read-only, computed once: the wire asks for it per page)."""
        if not hasattr(self, "_widths_cache"):
            self._widths_cache = np.concatenate([e.widths.numpy() for e in self.slots.values()]).astype(np.int64)
            self._widths_cache.flags.writeable = False
        return self._widths_cache

    def state_dict(self) -> dict[str, torch.Tensor]:
        out = {}
        for s, e in self.slots.items():
            for field in ("mean", "basis", "std", "widths"):
                out[f"enc.{s.name}.{field}"] = getattr(e, field).contiguous()
        return out

    @classmethod
    def from_state_dict(cls, sd: dict[str, torch.Tensor], theta: float) -> ProducerEncoder:
        names = sorted({k.split(".", 1)[1].rsplit(".", 1)[0] for k in sd if k.startswith("enc.")})
        slots = {Slot.parse(n): SlotEncoder(*(sd[f"enc.{n}.{f}"] for f in ("mean", "basis", "std", "widths")))
                 for n in names}
        return cls(slots, theta)


def fit_slot_encoder(x: torch.Tensor, budget_bits: int) -> SlotEncoder:
    """PCA of producer observations x [N, d], with budget_bits per token spread by water-filling."""
    from sgl_scd.codec.factor import pca

    p = pca(x.float())
    widths = quant.allocate_bits(p.var, budget_bits)
    keep = widths > 0
    mean = x.double().mean(0).float()  # what pca() centres on
    return SlotEncoder(mean, p.basis[:, keep].contiguous(), p.var[keep].clamp_min(1e-12).sqrt(),
                       widths[keep].to(torch.int32))


class Translator(nn.Module):
    """z [T, r] -> x [T, d]: affine map plus an optional residual MLP (its output layer starts at 0,
    so a closed-form affine start is preserved exactly).

    For distillation the affine weight can be frozen at its closed-form start and corrected by a
    trainable low-rank delta B @ A (start_low_rank); merge_low_rank folds it back, so saved
    adapters always hold the plain form."""

    def __init__(self, r: int, d: int, hidden: int = 0):
        super().__init__()
        self.lin = nn.Linear(r, d)
        self.hidden = hidden
        self.delta_a = self.delta_b = None
        if hidden:
            self.up = nn.Linear(r, hidden)
            self.down = nn.Linear(hidden, d)
            nn.init.zeros_(self.down.weight)
            nn.init.zeros_(self.down.bias)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        y = self.lin(z)
        if self.delta_a is not None:
            y = y + (z @ self.delta_a.T) @ self.delta_b.T
        if self.hidden:
            y = y + self.down(nn.functional.gelu(self.up(z)))
        return y

    def start_low_rank(self, rank: int, generator: torch.Generator | None = None) -> None:
        """Freeze the affine weight; train a rank-`rank` correction (starting at 0) and the bias."""
        d, r = self.lin.weight.shape
        self.lin.weight.requires_grad_(False)
        a = torch.randn(rank, r, generator=generator) / r ** 0.5
        self.delta_a = nn.Parameter(a)
        self.delta_b = nn.Parameter(torch.zeros(d, rank))

    def merge_low_rank(self) -> None:
        if self.delta_a is None:
            return
        with torch.no_grad():
            self.lin.weight += self.delta_b @ self.delta_a
        self.delta_a = self.delta_b = None
        self.lin.weight.requires_grad_(True)

    def set_affine(self, w: torch.Tensor, b: torch.Tensor) -> None:  # w [r, d], b [d]
        with torch.no_grad():
            self.lin.weight.copy_(w.T)
            self.lin.bias.copy_(b)


class ConsumerDecoder(nn.Module):
    """Rebuilds a consumer's K/V [L, T, H_kv, D] from dequantized slot codes.

    Each slot's translator reads the codes of inputs[slot] concatenated (by default the slot's
    own; context_inputs() adds other slots' codes, which are on the wire anyway)."""

    def __init__(self, slot_dims: dict[Slot, tuple[int, int]], hidden: dict[str, int], theta: float,
                 kv_heads: int, head_dim: int, inputs: dict[Slot, tuple[Slot, ...]] | None = None):
        super().__init__()
        self.slots = sorted(slot_dims)
        self.inputs = {s: tuple((inputs or {}).get(s, (s,))) for s in self.slots}
        missing = sorted({i.name for ins in self.inputs.values() for i in ins if i not in slot_dims})
        if missing:
            raise ValueError(f"decoder inputs name slots the codec does not send: {missing}")
        self.theta = theta
        self.kv_heads, self.head_dim = kv_heads, head_dim
        self.translators = nn.ModuleDict(
            {s.name.replace(".", "_"): Translator(sum(slot_dims[i][0] for i in self.inputs[s]), d,
                                                  hidden.get(s.kind, 0))
             for s, (_r, d) in sorted(slot_dims.items())}
        )

    def translator(self, slot: Slot) -> Translator:
        return self.translators[slot.name.replace(".", "_")]

    def translator_input(self, slot: Slot, z: dict[Slot, torch.Tensor]) -> torch.Tensor:
        ins = self.inputs[slot]
        return z[ins[0]] if len(ins) == 1 else torch.cat([z[i] for i in ins], -1)

    @property
    def num_layers(self) -> int:
        return max(s.layer for s in self.slots) + 1

    def rebuild(self, proj: ConsumerProjections, z: dict[Slot, torch.Tensor], start: int = 0
                ) -> tuple[torch.Tensor, torch.Tensor]:
        """Consumer K (after its RoPE) and V, [L, T, H_kv, D], from whitened codes {slot: [T, r]}
        of tokens at positions start..; proj: the consumer's projections at the patch layers.

        Differentiable in the translators' parameters (used by distillation); serving uses the
        folded form (fold.FoldedDecoder).
        """
        t = next(iter(z.values())).shape[0]
        shape = (t, self.kv_heads, self.head_dim)
        ks, vs = [], []
        for layer in range(self.num_layers):
            h = Slot(layer, "h")
            if h in z:
                h_in = self.translator(h)(self.translator_input(h, z))
                k, v = proj.project(layer, h_in, start)
            else:
                ks_, vs_ = Slot(layer, "k"), Slot(layer, "v")
                k_nope = self.translator(ks_)(self.translator_input(ks_, z)).view(shape)
                k = rope.rotate(k_nope, self.theta, start)
                v = self.translator(vs_)(self.translator_input(vs_, z)).view(shape)
            ks.append(k)
            vs.append(v)
        return torch.stack(ks), torch.stack(vs)


CONTEXTS = ("own", "kv", "kv+h")


def _nearest(layers: list[int], to: int) -> int:
    return min(layers, key=lambda p: (abs(p - to), p))  # a tie goes to the lower layer


def parse_context(context: str) -> str:
    """context if it is one of CONTEXTS; ValueError naming it otherwise."""
    if context not in CONTEXTS:
        raise ValueError(f"decoder context must be one of {CONTEXTS}, got {context!r}")
    return context


def context_inputs(slots, context: str) -> dict[Slot, tuple[Slot, ...]]:
    """Which codes each slot's translator reads: "own" its slot's alone; "kv" a reuse slot reads
    its layer's K and V codes (both come from the same hidden state); "kv+h" those plus the code
    of the nearest patch layer's normalized input (a full view of the producer's hidden state
    nearby). Patch slots read their own code. (Wider views were measured and dropped:
    docs/codec.md.)"""
    parse_context(context)
    slots = sorted(slots)
    patch = [s.layer for s in slots if s.kind == "h"]
    out = {}
    for s in slots:
        if s.kind == "h" or context == "own":
            out[s] = (s,)
        else:
            ins = (Slot(s.layer, "k"), Slot(s.layer, "v"))
            out[s] = ins + (Slot(_nearest(patch, s.layer), "h"),) if context == "kv+h" and patch else ins
    return out
