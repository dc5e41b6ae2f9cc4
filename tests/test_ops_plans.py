"""The kernels' plans (kernels/cpu/lora.c `lf_plan_forward`, `lf_plan_backward`), observed through
`_C.last_forward_plan()` / `_C.last_backward_plan()`: each path is reached by the operands meant for
it, on every ISA, and gives the float64 reference's result there — so a retune that moves a shape
off its path fails here, not silently."""
from __future__ import annotations

import numpy as np
import pytest

import lorafuse
from lorafuse import _C, ops
from reference import backward, forward, rand
from tolerances import assert_within

# name: (n, k, m, r, dropout p, need_u, the plan expected)
CASES = {
    "decode": (5, 64, 48, 4, 0.0, True, ("rowdots", "decode")),
    "decode with dropout": (5, 64, 48, 4, 0.3, True, ("skinny", "decode")),  # x̃ regenerated as x streams
    "tokens": (200, 96, 80, 8, 0.0, True, ("skinny", "augmented")),
    "tokens with dropout": (200, 96, 80, 8, 0.2, True, ("skinny", "augmented")),
    "dropout, rank above the skinny kernels": (200, 96, 80, 100, 0.2, True, ("gemm", "augmented")),
    "rank above the skinny kernels": (200, 96, 80, 100, 0.0, True, ("gemm", "augmented")),
    "a few tokens, W of 4 MiB": (20, 1024, 1024, 8, 0.0, True, ("skinny", "few_tokens")),
    "inference, few outputs": (512, 896, 128, 16, 0.0, False, ("none", "merged")),
}


@pytest.fixture
def two_threads():
    before = lorafuse.get_num_threads()
    lorafuse.set_num_threads(2)  # the merged path's cost model counts the GEMM's row blocks
    yield
    lorafuse.set_num_threads(before)


@pytest.mark.parametrize("case", CASES)
def test_each_path_is_taken_and_exact(isa, two_threads, case):
    n, k, m, r, p, need_u, plan = CASES[case]
    if plan[1] == "few_tokens" and isa == "generic":
        plan = (plan[0], "augmented")  # W read in place needs a direct micro-kernel (AVX2, AVX-512)
    rng = np.random.default_rng(n + k + m + r)
    x, W, A, B, b = rand(rng, n, k), rand(rng, m, k), rand(rng, r, k), rand(rng, m, r), rand(rng, m)
    y, u = ops.lora_forward(x, W, A, B, 0.75, b, dropout_p=p, seed=11, need_u=need_u)
    assert _C.last_forward_plan() == plan
    mask = ops.dropout_mask(n, k, p, 11).astype(np.float64) if p else None
    ry, ru, my, mu = forward(x, W, A, B, 0.75, b, mask)
    assert_within(y, ry, my, 2 * k + r + 4, "y")
    if need_u:
        assert_within(u, ru, mu, k, "u")
    else:
        assert u is None


# name: (dropout p, need_dx, x column-major, g column-major, the plan expected); n, k, m, r = 200, 96, 80, 8
BACKWARD_CASES = {
    "training": (0.0, True, False, False, ("skinny", "skinny", "augmented")),
    "training with dropout": (0.2, True, False, False, ("skinny", "skinny", "masked")),
    "first layer (no dx)": (0.0, False, False, False, ("skinny", "skinny", "none")),
    "x column-major": (0.0, True, True, False, ("skinny", "gemm", "augmented")),
    "g column-major": (0.0, True, False, True, ("gemm", "skinny", "augmented")),
}


def check_backward(got, g, x, W, A, B, scale, p, need_dx):
    """dx, dA, dB (seed 5's mask when p > 0) against the float64 reference; dx None without need_dx."""
    (n, k), m, r = x.shape, W.shape[0], A.shape[0]
    mask = ops.dropout_mask(n, k, p, 5).astype(np.float64) if p else None
    (rdx, rdA, rdB), (mdx, mdA, mdB) = backward(g, x, W, A, B, scale, mask=mask)
    assert_within(got[1], rdA, mdA, m + n + 6, "dA")
    assert_within(got[2], rdB, mdB, k + n + 6, "dB")
    if need_dx:
        assert_within(got[0], rdx, mdx, 2 * m + r + 6, "dx")
    else:
        assert got[0] is None


@pytest.mark.parametrize("case", BACKWARD_CASES)
def test_each_backward_path_is_taken_and_exact(isa, case):
    p, need_dx, x_cols, g_cols, plan = BACKWARD_CASES[case]
    n, k, m, r, scale = 200, 96, 80, 8, 0.6
    rng = np.random.default_rng(len(case))
    x, W, A, B, g = rand(rng, n, k), rand(rng, m, k), rand(rng, r, k), rand(rng, m, r), rand(rng, n, m)
    x_in, g_in = np.asfortranarray(x) if x_cols else x, np.asfortranarray(g) if g_cols else g
    _, u = ops.lora_forward(x_in, W, A, B, scale, dropout_p=p, seed=5)
    dx, dA, dB = ops.lora_backward(g_in, x_in, u, W, A, B, scale, dropout_p=p, seed=5, need_dx=need_dx)
    assert _C.last_backward_plan() == plan
    check_backward((dx, dA, dB), g, x, W, A, B, scale, p, need_dx)


def test_rank_above_the_skinny_kernels_takes_the_gemms():
    n, k, m, r = 64, 48, 40, 100
    rng = np.random.default_rng(9)
    x, W, A, B, g = rand(rng, n, k), rand(rng, m, k), rand(rng, r, k), rand(rng, m, r), rand(rng, n, m)
    _, u = ops.lora_forward(x, W, A, B, 0.5)
    dx, dA, dB = ops.lora_backward(g, x, u, W, A, B, 0.5)
    assert _C.last_backward_plan() == ("gemm", "gemm", "augmented")
    (rdx, rdA, rdB), (mdx, mdA, mdB) = backward(g, x, W, A, B, 0.5)
    assert_within(dx, rdx, mdx, 2 * m + r + 6, "dx")
    assert_within(dA, rdA, mdA, m + n + 6, "dA")


# ---- forced plans: every path on every ISA, whatever the kernels would choose

U_PATHS = ("rowdots", "skinny", "gemm")
Y_PATHS = ("decode", "few_tokens", "augmented", "split")
FORWARD_PLANS = [("none", "merged")] + [(u, y) for u in U_PATHS for y in Y_PATHS]


def _forward_fits(plan, n, p, need_u):
    """The preconditions of lf_forward_plan_unfit (kernels/cpu/lora.c) for C-contiguous operands, r ≤ 64."""
    u, y = plan
    if y == "merged":
        return not need_u and p == 0.0
    return (u != "rowdots" or (p == 0.0 and n <= 8)) and (y != "decode" or n <= 8)


@pytest.mark.parametrize("plan", FORWARD_PLANS, ids="-".join)
@pytest.mark.parametrize("n, p, need_u", [(1, 0.0, True), (7, 0.25, True), (33, 0.0, True), (33, 0.0, False),
                                          (257, 0.1, True)])
def test_every_forward_plan_is_exact_where_it_fits(isa, plan, n, p, need_u):
    k, m, r = 37, 29, 5
    rng = np.random.default_rng(n + len(plan[0]) + len(plan[1]))
    x, W, A, B, b = rand(rng, n, k), rand(rng, m, k), rand(rng, r, k), rand(rng, m, r), rand(rng, m)
    if not _forward_fits(plan, n, p, need_u):
        with pytest.raises(ValueError, match="cannot run these operands"):
            ops.lora_forward(x, W, A, B, 0.5, b, dropout_p=p, seed=3, need_u=need_u, plan=plan)
        return
    y, u = ops.lora_forward(x, W, A, B, 0.5, b, dropout_p=p, seed=3, need_u=need_u, plan=plan)
    assert _C.last_forward_plan() == plan
    mask = ops.dropout_mask(n, k, p, 3).astype(np.float64) if p else None
    ry, ru, my, mu = forward(x, W, A, B, 0.5, b, mask)
    assert_within(y, ry, my, 2 * k + r + 4, "y")
    if need_u:
        assert_within(u, ru, mu, k, "u")


BACKWARD_PLANS = [(vb, da, dx) for vb in ("skinny", "gemm") for da in ("skinny", "gemm")
                  for dx in ("none", "augmented", "masked")]


@pytest.mark.parametrize("plan", BACKWARD_PLANS, ids="-".join)
@pytest.mark.parametrize("n, p", [(1, 0.0), (33, 0.2), (257, 0.0)])
def test_every_backward_plan_is_exact_where_it_fits(isa, plan, n, p):
    k, m, r, scale = 37, 29, 5, 0.7
    need_dx = plan[2] != "none"
    rng = np.random.default_rng(n + 7)
    x, W, A, B, g = rand(rng, n, k), rand(rng, m, k), rand(rng, r, k), rand(rng, m, r), rand(rng, n, m)
    _, u = ops.lora_forward(x, W, A, B, scale, dropout_p=p, seed=5)
    if plan[2] == "augmented" and p > 0:
        with pytest.raises(ValueError, match="'augmented' takes no dropout"):
            ops.lora_backward(g, x, u, W, A, B, scale, dropout_p=p, seed=5, plan=plan)
        return
    dx, dA, dB = ops.lora_backward(g, x, u, W, A, B, scale, dropout_p=p, seed=5, need_dx=need_dx, plan=plan)
    assert _C.last_backward_plan() == plan
    check_backward((dx, dA, dB), g, x, W, A, B, scale, p, need_dx)


@pytest.mark.parametrize("plan, why", [
    (("skinny", "augmented"), "rows of x contiguous"),          # x column-major below
    (("none", "merged"), "does not form u"),                     # need_u
    (("gemm", "merged"), "goes with y 'merged'"),
    (("none", "augmented"), "goes with y 'merged'"),
])
def test_a_forced_forward_plan_that_does_not_fit_names_why(plan, why):
    rng = np.random.default_rng(2)
    x, W, A, B = np.asfortranarray(rand(rng, 40, 24)), rand(rng, 16, 24), rand(rng, 4, 24), rand(rng, 16, 4)
    with pytest.raises(ValueError, match=why):
        ops.lora_forward(x, W, A, B, 1.0, plan=plan)


@pytest.mark.parametrize("plan, err", [(("skinny",), TypeError), ("skinny,augmented", TypeError),
                                       (("skinny", 3), TypeError), (("fast", "augmented"), ValueError),
                                       (("skinny", "merged", "x"), TypeError)])
def test_a_malformed_plan_is_refused(plan, err):
    rng = np.random.default_rng(3)
    x, W, A, B = rand(rng, 8, 24), rand(rng, 16, 24), rand(rng, 4, 24), rand(rng, 16, 4)
    with pytest.raises(err, match="plan"):
        ops.lora_forward(x, W, A, B, 1.0, plan=plan)
    with pytest.raises(TypeError, match="plan"):
        ops.lora_backward(rand(rng, 8, 16), x, rand(rng, 8, 4), W, A, B, 1.0, plan=("gemm", "gemm"))


def test_backward_plan_refusals_name_why():
    rng = np.random.default_rng(4)
    n, k, m, r = 20, 24, 16, 4
    x, W, A, B, g = rand(rng, n, k), rand(rng, m, k), rand(rng, r, k), rand(rng, m, r), rand(rng, n, m)
    _, u = ops.lora_forward(x, W, A, B, 1.0)
    with pytest.raises(ValueError, match="dx is wanted"):
        ops.lora_backward(g, x, u, W, A, B, 1.0, plan=("skinny", "skinny", "none"))
    with pytest.raises(ValueError, match="dx is not wanted"):
        ops.lora_backward(g, x, u, W, A, B, 1.0, need_dx=False, plan=("skinny", "skinny", "augmented"))
    with pytest.raises(ValueError, match="rows of g and u contiguous"):
        ops.lora_backward(np.asfortranarray(g), x, u, W, A, B, 1.0, plan=("skinny", "gemm", "augmented"))
