"""The serving form of a consumer decoder: everything linear between the wire and K/V folded.

A ConsumerDecoder is the trainable form: dequantize -> translator -> (patch layers) the
consumer's k_proj / v_proj -> RoPE. Serving needs no gradients, so per slot the dequantization
(q * step + offset) and, at patch layers, the consumer's K/V projections are composed into the
translator's linear maps once, at load:

  reuse layer:  k_nope = q_k @ A_k + c_k,  v = q_v @ A_v + c_v
  patch layer:  [k_nope | v] = q_h @ A + c + gelu(q_h @ U + u) @ B

(q_k etc. stand for the concatenated codes a translator reads, ConsumerDecoder.inputs)

so a patch layer costs r x 2*kv_dim + the MLP instead of r x hidden + hidden x 2*kv_dim, and
the codes are used as the integers the wire carries. Exact up to float rounding (composed in
float64); tests compare it with ConsumerDecoder.rebuild.
"""

from __future__ import annotations

import torch
from torch import nn

from sgl_scd import rope
from sgl_scd.codec.codec import ConsumerDecoder, ProducerEncoder, Slot


def _linear(w: torch.Tensor, b: torch.Tensor | None, out: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(W [out, in], b [out]) of a linear map in float64, a missing bias as zeros."""
    return w.detach().double(), (torch.zeros(out, dtype=torch.float64) if b is None else b.detach().double())


class FoldedDecoder:
    """Rebuilds one consumer's K/V [L, T, H_kv, D] from integer slot codes (inference only)."""

    def __init__(self, decoder: ConsumerDecoder, encoder: ProducerEncoder, consumer_model: nn.Module):
        self.theta, self.kv_heads, self.head_dim = decoder.theta, decoder.kv_heads, decoder.head_dim
        kv_dim = self.kv_heads * self.head_dim
        own = encoder.levels()
        levels = {s: tuple(torch.cat([own[i][j] for i in ins]) for j in (0, 1)) for s, ins in decoder.inputs.items()}
        self.inputs = decoder.inputs
        layers = consumer_model.model.layers
        self.plan: list[tuple] = []
        for layer in range(decoder.num_layers):
            h = Slot(layer, "h")
            if h in levels:
                attn = layers[layer].self_attn
                pw_k, pb_k = _linear(attn.k_proj.weight, attn.k_proj.bias, kv_dim)
                pw_v, pb_v = _linear(attn.v_proj.weight, attn.v_proj.bias, kv_dim)
                proj_w, proj_b = torch.cat([pw_k, pw_v]), torch.cat([pb_k, pb_v])  # [2kv, hidden]
                tr = decoder.translator(h)
                a, c = self._dequant_fold(tr.lin, levels[h], proj_w, proj_b)
                mlp = None
                if tr.hidden:
                    up, u = self._dequant_fold(tr.up, levels[h])
                    dw, db = _linear(tr.down.weight, tr.down.bias, tr.down.out_features)
                    b_mat = (proj_w @ dw).T.float().contiguous()  # [hidden_mlp, 2kv]
                    c = c + (proj_w @ db).float()
                    mlp = (up, u, b_mat)
                self.plan.append(("h", h, a, c, mlp))
            else:
                k, v = Slot(layer, "k"), Slot(layer, "v")
                self.plan.append(("kv", (k, v), self._dequant_fold(decoder.translator(k).lin, levels[k]),
                                  self._dequant_fold(decoder.translator(v).lin, levels[v])))

    def _codes(self, slot: Slot, codes: dict[Slot, torch.Tensor]) -> torch.Tensor:
        ins = self.inputs[slot]
        return codes[ins[0]].float() if len(ins) == 1 else torch.cat([codes[i] for i in ins], 1).float()

    @staticmethod
    def _dequant_fold(lin: nn.Linear, level: tuple[torch.Tensor, torch.Tensor], post_w=None, post_b=None
                      ) -> tuple[torch.Tensor, torch.Tensor]:
        """A [r, out], c [out] with post(lin(q * scale + offset)) == q @ A + c."""
        w, b = _linear(lin.weight, lin.bias, lin.out_features)  # [out, r]
        if post_w is not None:
            w, b = post_w @ w, post_w @ b + post_b
        scale, offset = (x.double() for x in level)
        return (w * scale).T.float().contiguous(), (w @ offset + b).float()

    @torch.inference_mode()
    def rebuild(self, codes: dict[Slot, torch.Tensor], start: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        """Consumer K (after its RoPE) and V, [L, T, H_kv, D], from integer codes {slot: [T, r]}."""
        t = next(iter(codes.values())).shape[0]
        kv_dim = self.kv_heads * self.head_dim
        k_nope = torch.empty(len(self.plan), t, kv_dim)
        v = torch.empty(len(self.plan), t, kv_dim)
        for layer, step in enumerate(self.plan):
            if step[0] == "h":
                _, slot, a, c, mlp = step
                q = self._codes(slot, codes)
                kv = torch.addmm(c, q, a)
                if mlp is not None:
                    up, u, b_mat = mlp
                    kv.addmm_(nn.functional.gelu(torch.addmm(u, q, up)), b_mat)
                k_nope[layer], v[layer] = kv[:, :kv_dim], kv[:, kv_dim:]
            else:
                _, (ks, vs), (ak, ck), (av, cv) = step
                qk = self._codes(ks, codes)
                qv = qk if self.inputs[vs] == self.inputs[ks] else self._codes(vs, codes)
                torch.addmm(ck, qk, ak, out=k_nope[layer])
                torch.addmm(cv, qv, av, out=v[layer])
        shape = (len(self.plan), t, self.kv_heads, self.head_dim)
        return rope.rotate(k_nope.view(shape), self.theta, start), v.view(shape)
