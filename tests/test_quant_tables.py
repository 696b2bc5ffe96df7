"""The quantizer's shipped Gaussian tables are what the solver finds (it is too slow for import)."""

from __future__ import annotations

import numpy as np
import pytest

from sgl_scd.codec import quant


def _gauss_mse(step: float, bits: int, grid: np.ndarray, pdf: np.ndarray) -> float:
    """E[(z - Q(z))^2] for z ~ N(0,1) under the midrise uniform quantizer (numerical integral)."""
    half = 1 << (bits - 1)
    q = np.clip(np.floor(grid / step), -half, half - 1)
    return float(np.sum((grid - (q + 0.5) * step) ** 2 * pdf) * (grid[1] - grid[0]))


def _solve(bits: int, grid: np.ndarray, pdf: np.ndarray) -> tuple[float, float]:
    """(MSE-optimal step, its MSE) by golden-section search."""
    lo, hi = 1e-3, 4.0
    for _ in range(60):
        m1, m2 = lo + (hi - lo) * 0.382, lo + (hi - lo) * 0.618
        if _gauss_mse(m1, bits, grid, pdf) < _gauss_mse(m2, bits, grid, pdf):
            hi = m2
        else:
            lo = m1
    step = (lo + hi) / 2
    return step, _gauss_mse(step, bits, grid, pdf)


@pytest.mark.slow
def test_shipped_tables_match_the_solver():
    grid = np.linspace(-9, 9, 400_001)
    pdf = np.exp(-grid**2 / 2) / np.sqrt(2 * np.pi)
    assert quant.GAUSS_MSE[0] == 1.0  # 0 bits: the whole unit variance is error
    for b in range(1, quant.MAX_BITS + 1):
        step, mse = _solve(b, grid, pdf)
        # The MSE is flat at its minimum: summation-order noise e in it (the CPU's SIMD width) moves
        # the argmin by ~sqrt(e), so the step is checked to 1e-7 (seen: 2e-9 across machines) and
        # the MSE, which that noise moves only to second order, to 1e-9.
        assert step == pytest.approx(quant.GAUSS_STEP[b], rel=1e-7), b
        assert mse == pytest.approx(quant.GAUSS_MSE[b], rel=1e-9), b
    # closed form at 1 bit: levels at +-E|z| = +-sqrt(2/pi), so step 2*sqrt(2/pi) and MSE 1 - 2/pi
    assert quant.GAUSS_STEP[1] == pytest.approx(2 * np.sqrt(2 / np.pi), rel=1e-6)
    assert quant.GAUSS_MSE[1] == pytest.approx(1 - 2 / np.pi, rel=1e-6)
