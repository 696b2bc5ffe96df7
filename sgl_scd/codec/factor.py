"""Closed-form pieces: PCA bases, ridge regression, and the paper's joint factorization."""

from __future__ import annotations

from dataclasses import dataclass

import torch


def ridge(x: torch.Tensor, y: torch.Tensor, lam: float = 1e-3) -> tuple[torch.Tensor, torch.Tensor]:
    """argmin_W,b |x W + b - y|^2 + lam * trace(x^T x)/d * |W|^2 ; x [N, a], y [N, c] -> W [a, c], b [c].

    The penalty is scaled by the mean feature energy so lam is unit-free.
    """
    x, y = x.double(), y.double()
    mx, my = x.mean(0), y.mean(0)
    xc, yc = x - mx, y - my
    gram = xc.T @ xc  # [a, a]
    reg = lam * gram.diagonal().mean().clamp_min(1e-12)
    w = torch.linalg.solve(gram + reg * torch.eye(gram.shape[0], dtype=gram.dtype), xc.T @ yc)
    b = my - mx @ w
    return w.float(), b.float()


@dataclass(frozen=True)
class PCA:
    mean: torch.Tensor  # [d]
    basis: torch.Tensor  # [d, r] orthonormal columns, by decreasing variance
    var: torch.Tensor  # [r] variance of each component

    def project(self, x: torch.Tensor) -> torch.Tensor:  # [N, d] -> [N, r]
        return (x - self.mean) @ self.basis


def pca(x: torch.Tensor, rank: int | None = None) -> PCA:
    """Principal components of x [N, d] (centred)."""
    x = x.double()
    mean = x.mean(0)
    cov = (x - mean).T @ (x - mean) / max(1, x.shape[0] - 1)  # [d, d]
    var, vec = torch.linalg.eigh(cov)
    order = var.argsort(descending=True)
    var, vec = var[order].clamp_min(0), vec[:, order]
    r = rank or x.shape[1]
    return PCA(mean.float(), vec[:, :r].float().contiguous(), var[:r].float())


@dataclass(frozen=True)
class JointFactorization:
    """Shared rank-r code of paired samples [A | B]: Z = (A - mean_a) enc ; B ~= Z dec_b + mean_b."""

    mean_a: torch.Tensor  # [da]
    mean_b: torch.Tensor  # [db]
    enc: torch.Tensor  # [da, r] producer encoder (ridge from A to the joint code)
    dec_a: torch.Tensor  # [r, da]
    dec_b: torch.Tensor  # [r, db]

    def encode(self, a: torch.Tensor) -> torch.Tensor:
        return (a - self.mean_a) @ self.enc

    def decode_b(self, z: torch.Tensor) -> torch.Tensor:
        return z @ self.dec_b + self.mean_b


def joint_factorization(a: torch.Tensor, b: torch.Tensor, rank: int, lam: float = 1e-4) -> JointFactorization:
    """Truncated SVD of the centred, per-model scaled concatenation [A/sa | B/sb] (a [N, da], b [N, db]).

    Scaling each side by its RMS keeps the model with larger activations from owning the code.
    The producer encoder is a ridge map from A to the code, since B is unknown at serving time.
    """
    if a.shape[0] != b.shape[0]:
        raise ValueError(f"paired samples differ in count: {a.shape[0]} vs {b.shape[0]}")
    a64, b64 = a.double(), b.double()
    ma, mb = a64.mean(0), b64.mean(0)
    ac, bc = a64 - ma, b64 - mb
    sa, sb = ac.pow(2).mean().sqrt().clamp_min(1e-12), bc.pow(2).mean().sqrt().clamp_min(1e-12)
    u, s, vh = torch.linalg.svd(torch.cat([ac / sa, bc / sb], 1), full_matrices=False)
    z = u[:, :rank] * s[:rank]  # [N, r]
    dec_a = vh[:rank, : a.shape[1]] * sa  # [r, da]
    dec_b = vh[:rank, a.shape[1]:] * sb  # [r, db]
    enc, _ = ridge(ac, z, lam)
    return JointFactorization(ma.float(), mb.float(), enc, dec_a.float(), dec_b.float())
