"""The metric a patch code is fitted in: the K/V its normalized input turns into.

The consumer sees a patch layer's normalized input h only through that layer's k_proj and
v_proj. An error in h counts only as far as it moves K and V, and bits spent on directions the
projections ignore are wasted. kv_metric() returns A = [W_k^T | W_v^T] [d, 2 * H_kv * D] from the
producer's own projections; an adapter moves them little, and the encoder must not depend on
the consumer. PCA of (h - mean) @ A then ranks directions by the K/V variance they carry, so
water-filling spends the bits where the K/V error would be (fit_slot_encoder(..., metric=A)).

Measured (docs/codec.md): with the consumer's own h sent through 4-bit codes of 8 patch layers,
first-answer-token KL 0.020 for plain PCA of h vs 0.006 in this metric, at the same bytes. The
distilled adapter did not get better with it (its error is the predictor's), so it is an option,
not the default.
"""

from __future__ import annotations

import torch

from sgl_scd.hf import runtime

METRICS = ("kv", "hidden")


def kv_metric(model, layer: int) -> torch.Tensor:
    """[d, 2 * H_kv * D]: the k_proj and v_proj weights of one layer, stacked."""
    attn = runtime.attention(model, layer)
    return torch.cat([attn.k_proj.weight.detach().float().T, attn.v_proj.weight.detach().float().T], 1)
