"""lora_forward against the float64 reference: odd shapes on every axis, every rank, bias or not,
batch dims, strided and transposed inputs, dropout, every ISA."""
from __future__ import annotations

import numpy as np
import pytest

import lorafuse
from lorafuse import ops
from reference import forward, rand
from tolerances import assert_within

DIMS = [1, 3, 7, 17, 33, 64, 129, 257, 1000]
RANKS = [1, 2, 4, 8, 16, 64]


def check_forward(rng, n, k, m, r, *, bias=True, scale=0.75, batch=None):
    x, W, A, B = rand(rng, n, k), rand(rng, m, k), rand(rng, r, k), rand(rng, m, r)
    b = rand(rng, m) if bias else None
    xin = x.reshape(*batch, k) if batch else x
    y, u = ops.lora_forward(xin, W, A, B, scale, b)
    assert y.dtype == np.float32 and u.dtype == np.float32
    assert y.shape == xin.shape[:-1] + (m,) and u.shape == xin.shape[:-1] + (r,)
    ry, ru, my, mu = forward(x, W, A, B, scale, b)
    assert_within(u.reshape(n, r), ru, mu, k, "u")
    assert_within(y.reshape(n, m), ry, my, 2 * k + r + 4, "y")


@pytest.mark.parametrize("axis", ["n", "k", "m"])
@pytest.mark.parametrize("d", DIMS)
def test_odd_shapes_each_axis(isa, axis, d):
    rng = np.random.default_rng(d)
    dims = {"n": 19, "k": 23, "m": 29}
    dims[axis] = d
    check_forward(rng, dims["n"], dims["k"], dims["m"], 8)


@pytest.mark.parametrize("r", RANKS)
@pytest.mark.parametrize("bias", [True, False])
def test_ranks_and_bias(isa, r, bias):
    check_forward(np.random.default_rng(r), 65, 96, 80, r, bias=bias)


def test_batch_dims_kept(isa):
    check_forward(np.random.default_rng(1), 2 * 3 * 5, 40, 24, 4, batch=(2, 3, 5))


def test_single_token_1d_input():
    rng = np.random.default_rng(2)
    x, W, A, B = rand(rng, 12), rand(rng, 9, 12), rand(rng, 2, 12), rand(rng, 9, 2)
    y, u = ops.lora_forward(x, W, A, B, 2.0)
    assert y.shape == (9,) and u.shape == (2,)
    ry, ru, my, mu = forward(x[None], W, A, B, 2.0)
    assert_within(y[None], ry, my, 2 * 12 + 2 + 4, "y")


@pytest.mark.parametrize("n,k,m,r", [(0, 5, 7, 2), (4, 0, 7, 2), (4, 5, 0, 2), (4, 5, 7, 0), (0, 0, 0, 0)])
def test_zero_size_dims(n, k, m, r):
    rng = np.random.default_rng(3)
    x, W, A, B, b = rand(rng, n, k), rand(rng, m, k), rand(rng, r, k), rand(rng, m, r), rand(rng, m)
    y, u = ops.lora_forward(x, W, A, B, 1.5, b)
    ry, ru, _, _ = forward(x, W, A, B, 1.5, b)
    assert y.shape == (n, m) and u.shape == (n, r)
    np.testing.assert_allclose(y, ry, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(u, ru, rtol=1e-5, atol=1e-5)


def test_strided_negative_and_transposed_views(isa):
    """Views are read in place through their strides — never the wrong memory."""
    rng = np.random.default_rng(4)
    n, k, m, r = 37, 45, 51, 5
    xbig = rand(rng, 2 * n, 3 * k)
    x = xbig[::-2, 1::3]                   # negative row stride, column stride 3
    Wt = rand(rng, k, m)
    W = Wt.T                               # transposed view (column-major)
    A = np.asfortranarray(rand(rng, r, k))
    B = rand(rng, m, 2 * r)[:, ::2]
    b = rand(rng, 2 * m)[::2]              # strided bias
    y, u = ops.lora_forward(x, W, A, B, 0.3, b)
    ry, ru, my, mu = forward(np.ascontiguousarray(x), W, A, B, 0.3, b)
    assert_within(y, ry, my, 2 * k + r + 4, "y")
    assert_within(u, ru, mu, k, "u")


def test_fan_in_fan_out_reads_transposed_weight(isa):
    rng = np.random.default_rng(5)
    n, k, m, r = 33, 40, 24, 4
    x, Wkm, A, B = rand(rng, n, k), rand(rng, k, m), rand(rng, r, k), rand(rng, m, r)
    y, _ = ops.lora_forward(x, Wkm, A, B, 1.0, fan_in_fan_out=True)
    ry, _, my, _ = forward(x, Wkm.T, A, B, 1.0)
    assert_within(y, ry, my, 2 * k + r + 4, "y")


def test_out_buffers_are_filled_and_returned(isa):
    rng = np.random.default_rng(6)
    x, W, A, B = rand(rng, 8, 16), rand(rng, 12, 16), rand(rng, 3, 16), rand(rng, 12, 3)
    out = np.full((8, 12), np.nan, np.float32)
    u_out = np.full((8, 3), np.nan, np.float32)
    y, u = ops.lora_forward(x, W, A, B, 1.0, out=out, u_out=u_out)
    assert y is out and u is u_out
    ry, ru, my, mu = forward(x, W, A, B, 1.0)
    assert_within(out, ry, my, 2 * 16 + 3 + 4, "out")


def test_nan_propagates_like_numpy():
    rng = np.random.default_rng(7)
    x, W, A, B = rand(rng, 4, 6), rand(rng, 5, 6), rand(rng, 2, 6), rand(rng, 5, 2)
    x[1, 2] = np.nan
    y, u = ops.lora_forward(x, W, A, B, 1.0)
    expect = np.isnan(x @ W.T + (x @ A.T) @ B.T)
    np.testing.assert_array_equal(np.isnan(y), expect)


@pytest.mark.parametrize("p", [0.1, 0.5, 0.9])
def test_dropout_only_on_the_adapter_branch(isa, p):
    rng = np.random.default_rng(8)
    n, k, m, r = 31, 47, 29, 6
    x, W, A, B = rand(rng, n, k), rand(rng, m, k), rand(rng, r, k), rand(rng, m, r)
    mask = ops.dropout_mask(n, k, p, seed=1234)
    y, u = ops.lora_forward(x, W, A, B, 0.5, dropout_p=p, seed=1234)
    ry, ru, my, mu = forward(x, W, A, B, 0.5, mask=mask)
    assert_within(u, ru, mu, k + 2, "u")
    assert_within(y, ry, my, 2 * k + r + 6, "y")


def test_dropout_mask_statistics_and_determinism():
    m1 = ops.dropout_mask(300, 200, 0.3, seed=7)
    m2 = ops.dropout_mask(300, 200, 0.3, seed=7)
    m3 = ops.dropout_mask(300, 200, 0.3, seed=8)
    np.testing.assert_array_equal(m1, m2)
    assert (m1 != m3).any()
    kept = m1 > 0
    assert set(np.unique(m1)) <= {0.0, np.float32(1 / 0.7)}
    assert abs(kept.mean() - 0.7) < 0.01  # 60k Bernoulli draws: sd ≈ 0.002


def test_matches_numpy_on_one_thread_and_two():
    rng = np.random.default_rng(9)
    x, W, A, B = rand(rng, 300, 200), rand(rng, 100, 200), rand(rng, 8, 200), rand(rng, 100, 8)
    before = lorafuse.get_num_threads()
    try:
        lorafuse.set_num_threads(1)
        y1, _ = ops.lora_forward(x, W, A, B, 1.0)
        lorafuse.set_num_threads(2)
        y2, _ = ops.lora_forward(x, W, A, B, 1.0)
    finally:
        lorafuse.set_num_threads(before)
    # each output element is reduced in the same order whatever the thread split
    np.testing.assert_array_equal(y1, y2)


@pytest.mark.parametrize("n", [1, 5, 8, 9])
def test_decode_rows_read_W_in_place(isa, n):
    """n ≤ 8 takes the dot-product path (W streamed in place, two rows at a time, tails of k
    not a multiple of the vector width, odd m); n = 9 the packed GEMM. Both on 2 threads."""
    before = lorafuse.get_num_threads()
    lorafuse.set_num_threads(2)
    try:
        check_forward(np.random.default_rng(n), n, 1000, 701, 16)
        check_forward(np.random.default_rng(n), n, 7, 3, 1, bias=False)
    finally:
        lorafuse.set_num_threads(before)


@pytest.mark.parametrize("n", [1, 6])
def test_decode_rows_with_dropout_and_transposed_adapter(isa, n):
    """The decode path with the dropped u (a GEMM) and with A given as a transposed view
    (u through the streaming rank-r kernel instead of the dot products)."""
    rng = np.random.default_rng(40 + n)
    k, m, r, p = 45, 37, 5, 0.3
    x, W, A, B, b = rand(rng, n, k), rand(rng, m, k), rand(rng, r, k), rand(rng, m, r), rand(rng, m)
    mask = ops.dropout_mask(n, k, p, seed=99)
    y, u = ops.lora_forward(x, W, A, B, 0.5, b, dropout_p=p, seed=99)
    ry, ru, my, mu = forward(x, W, A, B, 0.5, b, mask=mask)
    assert_within(u, ru, mu, k + 2, "u")
    assert_within(y, ry, my, 2 * k + r + 6, "y")
    At = np.asfortranarray(A)  # same values, column-major: A.cs != 1
    y, u = ops.lora_forward(x, W, At, B, 0.5, b)
    ry, ru, my, mu = forward(x, W, A, B, 0.5, b)
    assert_within(y, ry, my, 2 * k + r + 4, "y")


@pytest.mark.parametrize("n,k,m,r", [
    (300, 40, 24, 5),     # many tokens, few outputs: W + s·B·A merged while W is packed
    (257, 33, 17, 64),    # the largest rank merged, edges on every axis
    (300, 40, 24, 65),    # rank beyond the merged path's limit: augmented GEMM
    (20, 300, 300, 8),    # few tokens: augmented GEMM
    (5, 64, 48, 4),       # decode dot products
])
@pytest.mark.parametrize("threads", [1, 2])
def test_inference_forward_without_u(isa, n, k, m, r, threads):
    """need_u=False gives (y, None) with y within the same bound, whichever path it takes."""
    rng = np.random.default_rng(n + k + m + r)
    x, W, A, B, b = rand(rng, n, k), rand(rng, m, k), rand(rng, r, k), rand(rng, m, r), rand(rng, m)
    before = lorafuse.get_num_threads()
    lorafuse.set_num_threads(threads)
    try:
        y, u = ops.lora_forward(x, W, A, B, 0.7, b, need_u=False)
        y_fifo, _ = ops.lora_forward(x, np.ascontiguousarray(W.T), A, B, 0.7, None, fan_in_fan_out=True,
                                     need_u=False)
    finally:
        lorafuse.set_num_threads(before)
    assert u is None
    ry, _, my, _ = forward(x, W, A, B, 0.7, b)
    assert_within(y, ry, my, 2 * k + r + 4, "y")
    ry, _, my, _ = forward(x, W, A, B, 0.7)
    assert_within(y_fifo, ry, my, 2 * k + r + 4, "y (fan_in_fan_out)")


def test_inference_forward_refuses_u_out():
    rng = np.random.default_rng(11)
    x, W, A, B = rand(rng, 4, 6), rand(rng, 5, 6), rand(rng, 2, 6), rand(rng, 5, 2)
    with pytest.raises(ValueError, match="u_out given with need_u=False"):
        ops.lora_forward(x, W, A, B, 1.0, u_out=np.empty((4, 2), np.float32), need_u=False)


@pytest.mark.parametrize("n", [9, 17, 24, 31, 32, 33, 48, 64, 65])
@pytest.mark.parametrize("case", ["bias", "no bias, strided x", "dropout", "W row stride"])
def test_few_tokens_with_a_large_weight(isa, n, case):
    """9–65 tokens and W ≥ 4 MB: y is computed as (W·xᵀ)ᵀ with W read in place (lora.c few_tokens)
    on AVX-512 for 17–32 tokens, on AVX2 for 9–64 (16-token slivers, the last partial); the other
    sizes (9–16 and 33–65 on AVX-512, 65 on AVX2) take the other paths — all against the reference."""
    rng = np.random.default_rng(n)
    k, m, r = 1031, 1029, 8
    x, A, B, b = rand(rng, n, k), rand(rng, r, k), rand(rng, m, r), rand(rng, m)
    W = rand(rng, m, k + 3)[:, :k] if case == "W row stride" else rand(rng, m, k)
    if case == "no bias, strided x":
        x = rand(rng, n, 2 * k)[:, ::2]
        b = None
    p = 0.2 if case == "dropout" else 0.0
    mask = ops.dropout_mask(n, k, p, seed=3) if p else None
    y, u = ops.lora_forward(x, W, A, B, 0.75, b, dropout_p=p, seed=3)
    ry, ru, my, mu = forward(np.ascontiguousarray(x), W, A, B, 0.75, b, mask=mask)
    assert_within(u, ru, mu, k + 2, "u")
    assert_within(y, ry, my, 2 * k + r + 6, "y")
