"""Rotary position embedding (Llama / NeoX "rotate half" layout) and its exact inverse.

Keys are stored after RoPE. Translating keys between two models with different RoPE bases
(e.g. 1e5 vs 1e6) means: de-rotate with the producer's base, translate, re-rotate with the
consumer's. Rotation by an angle is orthogonal, so derotate(rotate(x)) == x up to rounding.
"""

from __future__ import annotations

from functools import lru_cache

import torch


def rope_theta(config) -> float:
    params = getattr(config, "rope_parameters", None) or {}
    if params.get("rope_type", "default") != "default":
        raise ValueError(f"only default RoPE is supported, got rope_type={params.get('rope_type')!r}")
    theta = params.get("rope_theta", getattr(config, "rope_theta", None))
    if theta is None:
        raise ValueError("config has no rope_theta")
    return float(theta)


def cos_sin(theta: float, head_dim: int, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin of shape [T, head_dim] for integer positions [T] (fp32)."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
    freqs = positions.to(torch.float32)[:, None] * inv_freq[None, :]  # [T, D/2]
    emb = torch.cat((freqs, freqs), dim=-1)  # [T, D]
    return emb.cos(), emb.sin()


@lru_cache(maxsize=64)
def _tables(theta: float, head_dim: int, start: int, t: int, device: torch.device
            ) -> tuple[torch.Tensor, torch.Tensor]:
    """[T, 1, D] fp32 cos/sin for positions start..start+t-1 on a device, cached: a rebuild
    rotates every layer at the same positions. Built outside inference mode, so tables first made
    while serving can still be used by a distillation's autograd later in the same process."""
    with torch.inference_mode(False):
        cos, sin = cos_sin(theta, head_dim, torch.arange(start, start + t))
    return cos[:, None, :].to(device), sin[:, None, :].to(device)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def tables_at(theta: float, head_dim: int, positions: torch.Tensor, device) -> tuple[torch.Tensor, torch.Tensor]:
    """[T, 1, D] fp32 cos/sin at arbitrary positions [T] (several requests' runs side by side), for
    rotate(tables=...): built once per batch, used by every layer."""
    cos, sin = cos_sin(float(theta), head_dim, positions.cpu())
    return cos[:, None, :].to(device), sin[:, None, :].to(device)


def rotate(x: torch.Tensor, theta: float, start: int = 0, tables: tuple[torch.Tensor, torch.Tensor] | None = None
           ) -> torch.Tensor:
    """Apply RoPE to x [..., T, H, D] at positions start..start+T-1, or at the positions whose
    tables_at() are given."""
    cos, sin = tables or _tables(float(theta), x.shape[-1], int(start), x.shape[-3], x.device)  # [T, 1, D]
    return (x.float() * cos + _rotate_half(x.float()) * sin).to(x.dtype)


def derotate(x: torch.Tensor, theta: float, start: int = 0) -> torch.Tensor:
    """Inverse of rotate(): rotation by the negative angle."""
    cos, sin = _tables(float(theta), x.shape[-1], int(start), x.shape[-3], x.device)
    return (x.float() * cos - _rotate_half(x.float()) * sin).to(x.dtype)
