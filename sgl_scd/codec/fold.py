"""The serving form of a consumer decoder: everything linear between the wire and K/V folded.

A ConsumerDecoder is the trainable form: dequantize -> translator -> (patch layers) the
consumer's k_proj / v_proj -> RoPE. Serving needs no gradients, so per slot the dequantization
(q * step + offset) and, at patch layers, the consumer's K/V projections are composed into the
translator's linear maps once, at load. Each layer's [k_nope | v] then comes from one step per
distinct decoder input (q: the concatenated integer codes a translator reads, ConsumerDecoder.inputs):

  patch layer:                       [k_nope | v] = q_h @ A + c (+ gelu(q_h @ U + u) @ B)
  reuse layer, K and V share inputs: [k_nope | v] = q @ [A_k | A_v] + [c_k | c_v] (+ MLPs)
  reuse layer, own codes:            k_nope = q_k @ A_k + c_k,  v = q_v @ A_v + c_v

so a patch layer costs r x 2*kv_dim + the MLP instead of r x hidden + hidden x 2*kv_dim, and
the codes are used as the integers the wire carries. Exact up to float rounding (composed in
float64); tests compare it with ConsumerDecoder.rebuild.

rebuild_layer() rebuilds one layer for any run of tokens at their absolute positions (the pages
after a prefix an engine already holds), optionally into caller-provided buffers; rebuild() is
the whole prompt, every layer. to(device, dtype) moves the folded maps (fp32 on CPU, bf16 on GPU).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from sgl_scd.codec import rope
from sgl_scd.codec.codec import ConsumerDecoder, ProducerEncoder, Slot, Translator
from sgl_scd.codec.states import ConsumerProjections


def _linear(w: torch.Tensor, b: torch.Tensor | None, out: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(W [out, in], b [out]) of a linear map in float64, a missing bias as zeros."""
    return w.detach().double(), (torch.zeros(out, dtype=torch.float64) if b is None else b.detach().double())


def _dequant_fold(lin: nn.Linear, level: tuple[torch.Tensor, torch.Tensor], post_w=None, post_b=None
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """A [r, out], c [out] with post(lin(q * scale + offset)) == q @ A + c."""
    w, b = _linear(lin.weight, lin.bias, lin.out_features)  # [out, r]
    if post_w is not None:
        w, b = post_w @ w, post_w @ b + post_b
    scale, offset = (x.double() for x in level)
    return (w * scale).T.float().contiguous(), (w @ offset + b).float()


@dataclass
class _Mlp:
    up: torch.Tensor  # [r, m]
    u: torch.Tensor  # [m]
    down: torch.Tensor  # [m, n]
    cols: slice  # the step's output columns it adds to


@dataclass
class _Step:
    """One matmul (plus residual MLPs) from the codes of `inputs` to columns `cols` of a layer's
    [k_nope | v]."""
    inputs: tuple[Slot, ...]
    a: torch.Tensor  # [r, n]
    c: torch.Tensor  # [n]
    cols: slice
    mlps: list[_Mlp]


def _fold(tr: Translator, level, post_w=None, post_b=None) -> tuple[torch.Tensor, torch.Tensor, tuple | None]:
    """(A, c, (U, u, B) or None) of one translator, dequantization and post-projection folded in."""
    a, c = _dequant_fold(tr.lin, level, post_w, post_b)
    if not tr.hidden:
        return a, c, None
    up, u = _dequant_fold(tr.up, level)
    dw, db = _linear(tr.down.weight, tr.down.bias, tr.down.out_features)
    if post_w is not None:
        dw, db = post_w @ dw, post_w @ db
    return a, c + db.float(), (up, u, dw.T.float().contiguous())


class FoldedDecoder:
    """Rebuilds one consumer's K/V from integer slot codes (inference only)."""

    def __init__(self, decoder: ConsumerDecoder, encoder: ProducerEncoder, proj: ConsumerProjections):
        if (proj.theta, proj.kv_heads, proj.head_dim) != (decoder.theta, decoder.kv_heads, decoder.head_dim):
            raise ValueError(f"consumer projections (theta {proj.theta}, {proj.kv_heads} x {proj.head_dim}) do not "
                             f"match the decoder's (theta {decoder.theta}, {decoder.kv_heads} x {decoder.head_dim})")
        self.theta, self.kv_heads, self.head_dim = decoder.theta, decoder.kv_heads, decoder.head_dim
        self.device, self.dtype = torch.device("cpu"), torch.float32
        kv_dim = self.kv_heads * self.head_dim
        own = encoder.levels()
        levels = {s: tuple(torch.cat([own[i][j] for i in ins]) for j in (0, 1)) for s, ins in decoder.inputs.items()}
        self.plan: list[list[_Step]] = []
        for layer in range(decoder.num_layers):
            h = Slot(layer, "h")
            if h in levels:
                if layer not in proj.layers:
                    raise ValueError(f"patch layer {layer} needs the consumer's k/v projections")
                pw, pb = proj.layers[layer].merged()
                parts = [(h, slice(0, 2 * kv_dim), _fold(decoder.translator(h), levels[h], pw, pb))]
            else:
                k, v = Slot(layer, "k"), Slot(layer, "v")
                parts = [(k, slice(0, kv_dim), _fold(decoder.translator(k), levels[k])),
                         (v, slice(kv_dim, 2 * kv_dim), _fold(decoder.translator(v), levels[v]))]
            self.plan.append(self._merge(decoder.inputs, parts))

    @classmethod
    def random(cls, encoder: ProducerEncoder, inputs: dict[Slot, tuple[Slot, ...]], hidden: dict[str, int],
               theta: float, kv_heads: int, head_dim: int, generator: torch.Generator | None = None
               ) -> FoldedDecoder:
        """A decoder with the plan (steps, matmul and MLP shapes) that folding a decoder of these
        inputs and MLP widths gives, and random maps: a rebuild of real arithmetic for timing at
        model sizes nothing was calibrated for (folding a real one composes in float64)."""
        self = cls.__new__(cls)
        self.theta, self.kv_heads, self.head_dim = theta, kv_heads, head_dim
        self.device, self.dtype = torch.device("cpu"), torch.float32
        kv_dim = kv_heads * head_dim
        rank = {s: e.rank for s, e in encoder.slots.items()}

        def maps(slot: Slot, out: int):
            r = sum(rank[i] for i in inputs[slot])
            rnd = lambda *shape: torch.randn(*shape, generator=generator) * r ** -0.5
            m = hidden.get(slot.kind, 0)
            return rnd(r, out), torch.zeros(out), (rnd(r, m), torch.zeros(m), rnd(m, out)) if m else None

        self.plan = []
        for layer in range(1 + max(s.layer for s in encoder.slots)):
            h = Slot(layer, "h")
            if h in rank:
                parts = [(h, slice(0, 2 * kv_dim), maps(h, 2 * kv_dim))]
            else:
                k, v = Slot(layer, "k"), Slot(layer, "v")
                parts = [(k, slice(0, kv_dim), maps(k, kv_dim)), (v, slice(kv_dim, 2 * kv_dim), maps(v, kv_dim))]
            self.plan.append(cls._merge(inputs, parts))
        return self

    @property
    def num_layers(self) -> int:
        return len(self.plan)

    def to(self, device, dtype: torch.dtype | None = None) -> FoldedDecoder:
        """Move every folded map (in place; returns self)."""
        self.device, self.dtype = torch.device(device), dtype or self.dtype
        mv = lambda t: t.to(self.device, self.dtype)
        for steps in self.plan:
            for st in steps:
                st.a, st.c = mv(st.a), mv(st.c)
                for m in st.mlps:
                    m.up, m.u, m.down = mv(m.up), mv(m.u), mv(m.down)
        return self

    def rope_tables(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """RoPE tables of this consumer at positions [T], on its device (rebuild_layer(tables=...))."""
        return rope.tables_at(self.theta, self.head_dim, positions, self.device)

    def layer_inputs(self, layer: int) -> set[Slot]:
        """The slots whose codes rebuilding this layer reads."""
        return {i for st in self.plan[layer] for i in st.inputs}

    @staticmethod
    def _merge(inputs: dict[Slot, tuple[Slot, ...]], parts) -> list[_Step]:
        """Steps of a layer, translators that read the same codes stacked into one matmul."""
        steps: list[_Step] = []
        for slot, cols, (a, c, mlp) in parts:
            prev = steps[-1] if steps and steps[-1].inputs == inputs[slot] else None
            if prev is None:
                prev = _Step(inputs[slot], a, c, cols, [])
                steps.append(prev)
                at = 0
            else:
                at = prev.a.shape[1]
                prev.a, prev.c = torch.cat([prev.a, a], 1), torch.cat([prev.c, c])
                prev.cols = slice(prev.cols.start, cols.stop)
            if mlp is not None:
                prev.mlps.append(_Mlp(*mlp, slice(at, at + a.shape[1])))
        return steps

    def _codes(self, inputs: tuple[Slot, ...], codes: dict[Slot, torch.Tensor]) -> torch.Tensor:
        q = codes[inputs[0]] if len(inputs) == 1 else torch.cat([codes[i] for i in inputs], 1)
        return q.to(self.device, self.dtype)  # integer codes < 256: exact in bf16 too

    def _layer_into(self, layer: int, codes: dict[Slot, torch.Tensor], kv: torch.Tensor) -> None:
        """[k_nope | v] [T, 2 * kv_dim] of one layer into kv."""
        for st in self.plan[layer]:
            q = self._codes(st.inputs, codes)
            whole = st.a.shape[1] == kv.shape[1]
            y = torch.addmm(st.c, q, st.a, out=kv) if whole else torch.addmm(st.c, q, st.a)
            for m in st.mlps:
                y[:, m.cols].addmm_(nn.functional.gelu(torch.addmm(m.u, q, m.up)), m.down)
            if not whole:
                kv[:, st.cols] = y

    @torch.inference_mode()
    def rebuild_layer(self, layer: int, codes: dict[Slot, torch.Tensor], start: int = 0,
                      out: tuple[torch.Tensor, torch.Tensor] | None = None,
                      tables: tuple[torch.Tensor, torch.Tensor] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """K (after the consumer's RoPE) and V [T, H_kv, D] of one layer for T tokens at absolute
        positions start..start+T-1 (or at the positions of tables = rope_tables(positions): several
        requests' runs concatenated, rebuilt in one pass), from their integer codes {slot: [T, r]} (slots beyond
        layer_inputs(layer) are ignored). out: (k, v) buffers of that shape to write into (any
        dtype; an engine's KV pool slices)."""
        if not 0 <= layer < self.num_layers:
            raise ValueError(f"layer {layer} out of range [0, {self.num_layers})")
        t = next(iter(codes.values())).shape[0]
        kv_dim = self.kv_heads * self.head_dim
        kv = torch.empty(t, 2 * kv_dim, device=self.device, dtype=self.dtype)
        self._layer_into(layer, codes, kv)
        shape = (t, self.kv_heads, self.head_dim)
        k = rope.rotate(kv[:, :kv_dim].view(shape), self.theta, start, tables)
        v = kv[:, kv_dim:].view(shape)
        if out is None:
            return k, v
        out[0].copy_(k)
        out[1].copy_(v)
        return out

    @torch.inference_mode()
    def rebuild(self, codes: dict[Slot, torch.Tensor], start: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        """Consumer K (after its RoPE) and V, [L, T, H_kv, D], of every layer from integer codes
        {slot: [T, r]} of tokens at positions start.. (rebuild_layer over all layers, written in place)."""
        t = next(iter(codes.values())).shape[0]
        kv_dim = self.kv_heads * self.head_dim
        kv = torch.empty(self.num_layers, t, 2 * kv_dim, device=self.device, dtype=self.dtype)
        for layer in range(self.num_layers):
            self._layer_into(layer, codes, kv[layer])
        shape = (self.num_layers, t, self.kv_heads, self.head_dim)
        return rope.rotate(kv[..., :kv_dim].view(shape), self.theta, start), kv[..., kv_dim:].view(shape)
