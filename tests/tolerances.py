"""One table of tolerances, derived from fp32 accumulation length.

For a dot product of length K accumulated in fp32 (any order, FMA or not), the classical bound
is |fl(Σ aᵢbᵢ) − Σ aᵢbᵢ| ≤ γ_K · Σ|aᵢ||bᵢ| with γ_K = K·u/(1 − K·u), u = 2⁻²⁴.
So each kernel output is checked element-wise against a float64 reference with
    |got − ref| ≤ FACTOR · (K_eff + 2) · u · mag
where mag is the same expression evaluated on absolute values (|x|·|W|ᵀ + …) and K_eff the
longest accumulation feeding that output (k + r for y, m + r for dx, n for dA/dB). FACTOR = 1
is the rigorous worst case; it never needs loosening, because the bound is not statistical.
"""
from __future__ import annotations

import numpy as np

U32 = 2.0 ** -24
FACTOR = 1.0


def bound(mag: np.ndarray, k_eff: int) -> np.ndarray:
    """Element-wise error bound for an fp32 result whose |terms| sum to mag."""
    return FACTOR * (k_eff + 2) * U32 * mag + 1e-30


def assert_within(got: np.ndarray, ref: np.ndarray, mag: np.ndarray, k_eff: int, what: str) -> None:
    """got (fp32) vs ref (fp64): every element within the accumulation bound."""
    assert got.shape == ref.shape, f"{what}: shape {got.shape} != {ref.shape}"
    err = np.abs(got.astype(np.float64) - ref)
    lim = bound(mag, k_eff)
    bad = err > lim
    assert not bad.any(), (f"{what}: {int(bad.sum())} of {bad.size} elements off; worst "
                           f"err {err[bad].max():.3g} vs bound {lim[bad].min():.3g}")
