"""lora_backward against the float64 reference and by finite differences; merge/unmerge."""
from __future__ import annotations

import numpy as np
import pytest

from lorafuse import _C, ops
from reference import backward, rand
from tolerances import assert_within


def check_backward(rng, n, k, m, r, *, scale=0.6, p=0.0, seed=0, fifo=False):
    x, W, A, B, g = rand(rng, n, k), rand(rng, m, k), rand(rng, r, k), rand(rng, m, r), rand(rng, n, m)
    mask = ops.dropout_mask(n, k, p, seed) if p > 0 else None
    _, u = ops.lora_forward(x, np.ascontiguousarray(W.T) if fifo else W, A, B, scale,
                            dropout_p=p, seed=seed, fan_in_fan_out=fifo)
    dx, dA, dB = ops.lora_backward(g, x, u, np.ascontiguousarray(W.T) if fifo else W, A, B, scale,
                                   dropout_p=p, seed=seed, fan_in_fan_out=fifo)
    (rdx, rdA, rdB), (mdx, mdA, mdB) = backward(g, x, W, A, B, scale, mask=mask)
    assert_within(dx, rdx, mdx, 2 * m + r + 6, "dx")
    assert_within(dA, rdA, mdA, m + n + 6, "dA")
    assert_within(dB, rdB, mdB, k + n + 6, "dB")


@pytest.mark.parametrize("axis", ["n", "k", "m"])
@pytest.mark.parametrize("d", [1, 3, 7, 17, 33, 64, 129, 257, 1000])
def test_odd_shapes_each_axis(isa, axis, d):
    dims = {"n": 21, "k": 19, "m": 27}
    dims[axis] = d
    check_backward(np.random.default_rng(d), dims["n"], dims["k"], dims["m"], 4)


@pytest.mark.parametrize("r", [1, 2, 4, 8, 16, 64])
def test_ranks(isa, r):
    check_backward(np.random.default_rng(r), 70, 66, 90, r)


@pytest.mark.parametrize("p", [0.1, 0.5])
def test_dropout_mask_regenerated_in_backward(isa, p):
    check_backward(np.random.default_rng(11), 45, 38, 52, 5, p=p, seed=99)


def test_fan_in_fan_out(isa):
    check_backward(np.random.default_rng(12), 40, 24, 36, 3, fifo=True)


@pytest.mark.parametrize("n", [1, 3, 4, 5, 6, 8, 9])
@pytest.mark.parametrize("p", [0.0, 0.3])
def test_few_tokens_stream_w_for_dx(isa, n, p):
    """≤ 8 tokens with W's rows contiguous: dx's g·W streams W once (lf_rows_axpy, AVX2 and up: dx 'masked' even
    without dropout; AVX2's kernels for 4–6 tokens of an fp32 W are their own), odd k past the vectors and the
    column strips; W transposed (fan_in_fan_out) and 9 tokens take the GEMMs."""
    streamed = n <= 8 and _C.get_isa() != "generic"
    for k, fifo in ((301, False), (45, True)):
        check_backward(np.random.default_rng(n), n, k, 70, 4, p=p, seed=3, fifo=fifo)
        dx_path = "masked" if p > 0 or (streamed and not fifo) else "augmented"
        assert _C.last_backward_plan()[2] == dx_path, (k, fifo)


def test_need_dx_false_skips_dx():
    rng = np.random.default_rng(13)
    x, W, A, B, g = rand(rng, 5, 6), rand(rng, 7, 6), rand(rng, 2, 6), rand(rng, 7, 2), rand(rng, 5, 7)
    _, u = ops.lora_forward(x, W, A, B, 1.0)
    dx, dA, dB = ops.lora_backward(g, x, u, W, A, B, 1.0, need_dx=False)
    assert dx is None and dA.shape == (2, 6) and dB.shape == (7, 2)


def test_batch_dims():
    rng = np.random.default_rng(14)
    x, W, A, B, g = rand(rng, 2, 3, 10), rand(rng, 8, 10), rand(rng, 4, 10), rand(rng, 8, 4), rand(rng, 2, 3, 8)
    _, u = ops.lora_forward(x, W, A, B, 1.0)
    dx, dA, dB = ops.lora_backward(g, x, u, W, A, B, 1.0)
    assert dx.shape == x.shape
    (rdx, rdA, rdB), (mdx, mdA, mdB) = backward(g.reshape(6, 8), x.reshape(6, 10), W, A, B, 1.0)
    assert_within(dx.reshape(6, 10), rdx, mdx, 2 * 8 + 10, "dx")
    assert_within(dA, rdA, mdA, 8 + 6 + 6, "dA")


@pytest.mark.parametrize("n,k,m,r", [(0, 5, 7, 2), (4, 0, 7, 2), (4, 5, 0, 2), (4, 5, 7, 0)])
def test_zero_size_dims(n, k, m, r):
    rng = np.random.default_rng(15)
    x, W, A, B, g = rand(rng, n, k), rand(rng, m, k), rand(rng, r, k), rand(rng, m, r), rand(rng, n, m)
    _, u = ops.lora_forward(x, W, A, B, 1.0)
    dx, dA, dB = ops.lora_backward(g, x, u, W, A, B, 1.0)
    (rdx, rdA, rdB), _ = backward(g, x, W, A, B, 1.0)
    for got, ref in ((dx, rdx), (dA, rdA), (dB, rdB)):
        assert got.shape == ref.shape
        np.testing.assert_allclose(got, ref, atol=1e-5)


def test_finite_differences_of_the_kernel_forward():
    """L = Σ g⊙y is linear in x, A and B, so a central difference with a unit step gives the
    exact directional derivative: <dθ, E> must equal (L(θ+E) − L(θ−E)) / 2 up to fp32 rounding."""
    rng = np.random.default_rng(16)
    n, k, m, r, s = 9, 13, 11, 3, 0.7
    x, W, A, B, g = rand(rng, n, k), rand(rng, m, k), rand(rng, r, k), rand(rng, m, r), rand(rng, n, m)
    _, u = ops.lora_forward(x, W, A, B, s)
    dx, dA, dB = ops.lora_backward(g, x, u, W, A, B, s)

    def loss(x_, A_, B_):
        y, _ = ops.lora_forward(x_, W, A_, B_, s)
        return float((g.astype(np.float64) * y).sum())

    for name, grad, perturb in (
        ("x", dx, lambda E, sg: loss(x + sg * E, A, B)),
        ("A", dA, lambda E, sg: loss(x, A + sg * E, B)),
        ("B", dB, lambda E, sg: loss(x, A, B + sg * E)),
    ):
        E = rand(rng, *grad.shape) * np.float32(1e-2)
        fd = (perturb(E, 1) - perturb(E, -1)) / 2
        an = float((grad.astype(np.float64) * E).sum())
        assert abs(fd - an) <= 1e-3 * (abs(an) + 1e-2), (name, fd, an)


@pytest.mark.parametrize("fifo", [False, True])
def test_merge_then_unmerge_restores_W(isa, fifo):
    rng = np.random.default_rng(17)
    m, k, r, s = 129, 257, 16, 0.5
    W0, A, B = rand(rng, m, k), rand(rng, r, k), rand(rng, m, r)
    W = np.ascontiguousarray(W0.T) if fifo else W0.copy()
    ops.merge(W, A, B, s, fan_in_fan_out=fifo)
    expect = W0.astype(np.float64) + s * B.astype(np.float64) @ A
    mag = np.abs(W0) + abs(s) * np.abs(B) @ np.abs(A)
    assert_within(W.T if fifo else W, expect, mag, r + 2, "merged W")
    ops.unmerge(W, A, B, s, fan_in_fan_out=fifo)
    assert_within(W.T if fifo else W, W0.astype(np.float64), 2 * mag, r + 2, "unmerged W")


@pytest.mark.parametrize("p", [0.0, 0.2])
@pytest.mark.parametrize("r", [1, 16, 17, 64, 65])
def test_threaded_skinny_and_gemm_paths(isa, r, p):
    """Big enough to run on every thread: the streaming rank-r kernels (r ≤ 64: u, v, dB split
    by rows, dA split by columns, x̃ regenerated while streamed; the dropout part of dx) and the
    GEMM fallback (r > 64) must agree with the reference."""
    import lorafuse

    before = lorafuse.get_num_threads()
    lorafuse.set_num_threads(2)
    try:
        check_backward(np.random.default_rng(r), 300, 700, 500, r, p=p, seed=5)
    finally:
        lorafuse.set_num_threads(before)
