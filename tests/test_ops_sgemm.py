"""The GEMM core on its own (`ops.sgemm`) against float64, on every operand layout the packing
distinguishes — row-major, column-major (a transposed view), strided, negative strides — and
sizes around the 16×16 register-transpose blocks and the tiles (1, 15, 16, 17, 33, 257), with
alpha and bias, on every ISA."""
from __future__ import annotations

import numpy as np
import pytest

from lorafuse import ops
from reference import f64, rand
from tolerances import assert_within

SIZES = [1, 15, 16, 17, 33, 257]


def layout(a: np.ndarray, how: str) -> np.ndarray:
    """The same values as `a` (M, K), stored another way."""
    if how == "row":
        return a
    if how == "col":  # column-major: rows are strided, columns contiguous
        return np.asfortranarray(a)
    if how == "strided":  # every other element of a wider buffer
        buf = np.zeros((a.shape[0], 2 * a.shape[1] + 1), np.float32)
        buf[:, 1::2][:, : a.shape[1]] = a
        return buf[:, 1::2][:, : a.shape[1]]
    if how == "reversed":  # negative row stride
        return np.ascontiguousarray(a[::-1])[::-1]
    raise ValueError(how)


def check(rng, M, K, N, how_a, how_b, alpha=1.0, with_bias=False):
    a, b = rand(rng, M, K), rand(rng, K, N)
    bias = rand(rng, N) if with_bias else None
    c = ops.sgemm(layout(a, how_a), layout(b, how_b), alpha, bias)
    ref = alpha * (f64(a) @ f64(b))
    mag = abs(alpha) * (np.abs(f64(a)) @ np.abs(f64(b)))
    if bias is not None:
        ref, mag = ref + f64(bias), mag + np.abs(f64(bias))
    assert_within(c, ref, mag, K, f"sgemm {M}x{K}x{N} a={how_a} b={how_b}")


@pytest.mark.parametrize("how_a", ["row", "col", "strided", "reversed"])
@pytest.mark.parametrize("how_b", ["row", "col", "strided", "reversed"])
def test_layouts(isa, how_a, how_b):
    check(np.random.default_rng(0), 37, 45, 53, how_a, how_b, alpha=0.5, with_bias=True)


@pytest.mark.parametrize("d", SIZES)
@pytest.mark.parametrize("axis", ["M", "K", "N"])
@pytest.mark.parametrize("how", ["row", "col"])
def test_sizes_each_axis(isa, d, axis, how):
    dims = {"M": 29, "K": 35, "N": 41}
    dims[axis] = d
    check(np.random.default_rng(d), dims["M"], dims["K"], dims["N"], how, how)


def test_several_cache_blocks(isa):
    """K beyond one KC block, N beyond one NC panel on some ISAs, M beyond one MC block."""
    check(np.random.default_rng(1), 300, 1100, 2100, "row", "col", with_bias=True)
    check(np.random.default_rng(2), 300, 1100, 700, "row", "row")
