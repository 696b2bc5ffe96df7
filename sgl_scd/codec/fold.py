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
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from sgl_scd import rope
from sgl_scd.codec.codec import ConsumerDecoder, ProducerEncoder, Slot, Translator


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
    """Rebuilds one consumer's K/V [L, T, H_kv, D] from integer slot codes (inference only)."""

    def __init__(self, decoder: ConsumerDecoder, encoder: ProducerEncoder, consumer_model: nn.Module):
        self.theta, self.kv_heads, self.head_dim = decoder.theta, decoder.kv_heads, decoder.head_dim
        kv_dim = self.kv_heads * self.head_dim
        own = encoder.levels()
        levels = {s: tuple(torch.cat([own[i][j] for i in ins]) for j in (0, 1)) for s, ins in decoder.inputs.items()}
        self.plan: list[list[_Step]] = []
        for layer in range(decoder.num_layers):
            h = Slot(layer, "h")
            if h in levels:
                attn = consumer_model.model.layers[layer].self_attn
                pw_k, pb_k = _linear(attn.k_proj.weight, attn.k_proj.bias, kv_dim)
                pw_v, pb_v = _linear(attn.v_proj.weight, attn.v_proj.bias, kv_dim)
                parts = [(h, slice(0, 2 * kv_dim),
                          _fold(decoder.translator(h), levels[h], torch.cat([pw_k, pw_v]), torch.cat([pb_k, pb_v])))]
            else:
                k, v = Slot(layer, "k"), Slot(layer, "v")
                parts = [(k, slice(0, kv_dim), _fold(decoder.translator(k), levels[k])),
                         (v, slice(kv_dim, 2 * kv_dim), _fold(decoder.translator(v), levels[v]))]
            self.plan.append(self._merge(decoder.inputs, parts))

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

    @staticmethod
    def _codes(inputs: tuple[Slot, ...], codes: dict[Slot, torch.Tensor]) -> torch.Tensor:
        return codes[inputs[0]].float() if len(inputs) == 1 else torch.cat([codes[i] for i in inputs], 1).float()

    @torch.inference_mode()
    def rebuild(self, codes: dict[Slot, torch.Tensor], start: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        """Consumer K (after its RoPE) and V, [L, T, H_kv, D], from integer codes {slot: [T, r]}."""
        t = next(iter(codes.values())).shape[0]
        kv_dim = self.kv_heads * self.head_dim
        kv = torch.empty(len(self.plan), t, 2 * kv_dim)  # [k_nope | v] per layer
        for layer, steps in enumerate(self.plan):
            for st in steps:
                q = self._codes(st.inputs, codes)
                whole = st.a.shape[1] == 2 * kv_dim
                y = torch.addmm(st.c, q, st.a, out=kv[layer]) if whole else torch.addmm(st.c, q, st.a)
                for m in st.mlps:
                    y[:, m.cols].addmm_(nn.functional.gelu(torch.addmm(m.u, q, m.up)), m.down)
                if not whole:
                    kv[layer, :, st.cols] = y
        shape = (len(self.plan), t, self.kv_heads, self.head_dim)
        return rope.rotate(kv[..., :kv_dim].view(shape), self.theta, start), kv[..., kv_dim:].view(shape)
