"""The forward's plan (kernels/cpu/lora.c `lf_plan_forward`), observed through `_C.last_forward_plan()`:
each path of u and y is reached by the shape meant for it, on every ISA, and gives the float64
reference's result there — so a retune that moves a shape off its path fails here, not silently."""
from __future__ import annotations

import numpy as np
import pytest

import lorafuse
from lorafuse import _C, ops
from reference import forward, rand
from tolerances import assert_within

# name: (n, k, m, r, dropout p, need_u, the plan expected)
CASES = {
    "decode": (5, 64, 48, 4, 0.0, True, ("rowdots", "decode")),
    "decode with dropout": (5, 64, 48, 4, 0.3, True, ("gemm", "decode")),
    "tokens": (200, 96, 80, 8, 0.0, True, ("skinny", "augmented")),
    "tokens with dropout": (200, 96, 80, 8, 0.2, True, ("gemm", "augmented")),
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
