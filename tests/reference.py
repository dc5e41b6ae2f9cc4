"""Plain NumPy float64 references for the LoRA kernels (the math of DESIGN.md §1), and the
magnitude terms the fp32 error bound needs (tolerances.py)."""
from __future__ import annotations

import numpy as np


def f64(a: np.ndarray) -> np.ndarray:
    return np.asarray(a, dtype=np.float64)


def forward(x, W, A, B, s, bias=None, mask=None):
    """y = x·Wᵀ + b + s·(x̃·Aᵀ)·Bᵀ and u = x̃·Aᵀ, x̃ = x·mask (mask includes 1/(1-p)).
    Returns (y, u, mag_y, mag_u) in float64; x is (n, k)."""
    x, W, A, B = f64(x), f64(W), f64(A), f64(B)
    xd = x if mask is None else x * mask
    u = xd @ A.T
    y = x @ W.T + s * u @ B.T
    mag_u = np.abs(xd) @ np.abs(A).T
    mag_y = np.abs(x) @ np.abs(W).T + abs(s) * mag_u @ np.abs(B).T
    if bias is not None:
        y = y + f64(bias)
        mag_y = mag_y + np.abs(f64(bias))
    return y, u, mag_y, mag_u


def backward(g, x, W, A, B, s, mask=None):
    """(dx, dA, dB) and their magnitudes for L = Σ g⊙y; x (n,k), g (n,m)."""
    g, x, W, A, B = f64(g), f64(x), f64(W), f64(A), f64(B)
    xd = x if mask is None else x * mask
    v = g @ B
    mag_v = np.abs(g) @ np.abs(B)
    dB = s * g.T @ (xd @ A.T)
    dA = s * v.T @ xd
    dxa = s * v @ A
    if mask is not None:
        dxa = dxa * mask
    dx = g @ W + dxa
    mags = (np.abs(g) @ np.abs(W) + abs(s) * mag_v @ np.abs(A),
            abs(s) * mag_v.T @ np.abs(xd),
            abs(s) * np.abs(g).T @ (np.abs(xd) @ np.abs(A).T))
    return (dx, dA, dB), mags


def rand(rng: np.random.Generator, *shape: int) -> np.ndarray:
    return rng.standard_normal(shape, dtype=np.float32)
