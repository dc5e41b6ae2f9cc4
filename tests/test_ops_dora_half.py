"""DoRA's fused kernels on a bf16 / fp16 base (`ops.dora_forward` / `ops.dora_backward`: kernels/cpu/lora_half.c
with a column scale, col_scale.c, rank_rows.c's affine) against a float64 reference of the values the tensors
hold: every ISA (the `half_isa` fixture), odd sizes (1, 7, 33, 257), the decode path (few tokens), strided x,
lead dims, fan_in_fan_out, with and without bias, zero sizes, the plans, and bad input.

    z  = round_h(x·Wᵀ) + s·(x·Aᵀ)·Bᵀ          y = round_h(b + c ⊙ z)
    g' = g ⊙ c,  v = g'·B,  dB = s·g'ᵀ·u,  dA = s·vᵀ·x,  dx = round_h(round_h(round_h(g')·W) + s·v·A),
    dc = Σ_i g ⊙ z

Bounds (tests/tolerances.py): fp32 sums as `bound`, each rounding to the half dtype as `bound_rounded`, the
column scale's own fp32 products as one more term of the sum (k_eff + 1)."""
from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from lorafuse import _C, ops  # noqa: E402
from test_ops_lora_half import DT, as_torch, f64, on_tile, rand  # noqa: E402
from tolerances import DAZ, U_HALF, assert_within_bound, bound, bound_rounded  # noqa: E402


class DoraCase:
    """One DoRA layer's operands on a half base (fp32 adapters and column scale), its kernel results and
    their float64 references."""

    def __init__(self, n: int, k: int, m: int, r: int, base: str, *, bias: bool = True, fifo: bool = False,
                 x_strided: bool = False, lead: tuple = ()) -> None:
        gen = torch.Generator().manual_seed(n * 7919 + k * 131 + m * 7 + r)
        self.n, self.k, self.m, self.r, self.base, self.fifo, self.s = n, k, m, r, base, fifo, 0.75
        xs = rand(gen, (*lead, n, 2 * k if x_strided else k), base)
        self.x = xs[..., ::2] if x_strided else xs
        self.W = rand(gen, (k, m) if fifo else (m, k), base)
        self.A, self.B = torch.randn(r, k, generator=gen) * 0.5, torch.randn(m, r, generator=gen) * 0.5
        self.c = torch.rand(m, generator=gen) + 0.5
        self.bias = rand(gen, (m,), base) if bias else None
        self.g = rand(gen, (*lead, n, m), base)

    def forward(self, need_z: bool = True, plan=None):
        return ops.dora_forward(self.x, self.W, self.A, self.B, self.s, self.c, self.bias, fan_in_fan_out=self.fifo,
                                need_z=need_z, plan=plan)

    def backward(self, u, z, need_dx: bool = True, need_dc: bool = True, plan=None):
        return ops.dora_backward(self.g, self.x, u, z, self.W, self.A, self.B, self.s, self.c, need_dx=need_dx,
                                 need_dc=need_dc, fan_in_fan_out=self.fifo, plan=plan)

    def check(self, fplan=None, bplan=None) -> None:
        """Forward and backward against float64, every element within its bound; y without z kept is the
        same y bit for bit, and dx, dc skipped leave dA, dB as they were."""
        n, k, m, r, s, base = int(np.prod(self.x.shape[:-1])), self.k, self.m, self.r, self.s, self.base
        y, u, z = self.forward(plan=fplan)
        y_only, no_u, no_z = self.forward(need_z=False, plan=fplan)
        assert no_u is None and no_z is None and np.array_equal(y_only, y)
        X, G = f64(self.x).reshape(n, k), f64(self.g).reshape(n, m)
        W = f64(self.W).T if self.fifo else f64(self.W)
        A, B, c = f64(self.A), f64(self.B), f64(self.c)
        b = f64(self.bias) if self.bias is not None else np.zeros(m)
        aX, aW, aA, aB, aG, ac = (np.abs(t) for t in (X, W, A, B, G, c))
        daz = (lambda a_rows, b_cols, kk: DAZ * (a_rows[:, None] + b_cols[None, :] + kk)) if on_tile(base) else (
            lambda *_: 0.0)
        U = X @ A.T
        assert u.dtype == np.float32 and u.shape == (*self.x.shape[:-1], r)
        assert_within_bound(np.asarray(u, np.float64).reshape(n, r), U, bound(aX @ aA.T, k), "u")
        # z = round_h(x·Wᵀ) + s·u·Bᵀ, float32: the base product's fp32 sum rounded alone, the rank-r term after
        P = X @ W.T
        lim_p = bound_rounded(bound(aX @ aW.T, k) + daz(aX.sum(1), aW.sum(1), k), P, base)
        Z = P + s * U @ B.T
        lim_z = lim_p + bound(s * (aX @ aA.T) @ aB.T + np.abs(P) + lim_p, k + r + 2)
        assert z.dtype == np.float32 and z.shape == (*self.x.shape[:-1], m)
        z64 = np.asarray(z, np.float64).reshape(n, m)
        assert_within_bound(z64, Z, lim_z, "z")
        # y = round_h(b + c ⊙ z)
        Y = b + c * Z
        got = as_torch(y, base)
        assert got.dtype == DT[base] and got.shape == (*self.x.shape[:-1], m)
        lim_y = bound_rounded(ac * lim_z + bound(np.abs(b) + ac * np.abs(z64), 2), Y, base)
        assert_within_bound(f64(got).reshape(n, m), Y, lim_y, "y")

        dx, dA, dB, dc = self.backward(u, z, plan=bplan)
        Gs = G * c                                       # g' = g ⊙ c
        aGs = np.abs(Gs)
        V = Gs @ B
        # dB = s·g'ᵀ·u, dA = s·vᵀ·x (float32; c folded into B's rows and dB's rows: one product more)
        for name, got, ref, mag, keff, shape in (
                ("dB", dB, s * Gs.T @ U, s * aGs.T @ (aX @ aA.T), n + k + 1, (m, r)),
                ("dA", dA, s * V.T @ X, s * (aGs @ aB).T @ aX, n + m + 1, (r, k))):
            assert got.dtype == np.float32 and got.shape == shape, name
            assert_within_bound(np.asarray(got, np.float64), ref, bound(mag, keff), name)
        # dc = Σ_i g ⊙ z on the kernels' own z
        assert dc.dtype == np.float32 and dc.shape == (m,)
        assert_within_bound(np.asarray(dc, np.float64), (G * z64).sum(0), bound((aG * np.abs(z64)).sum(0), n), "dc")
        # dx = round_h(round_h(round_h(g')·W) + s·v·A): g' rounded to the half dtype (after its fp32 product),
        # its product with W summed in fp32 and rounded, the rank-r term added, the sum rounded
        err_gh = (U_HALF[base] + 2.0 ** -23) * aGs @ aW          # |round_h(g') − g'|·|W|
        P2 = Gs @ W
        lim_p2 = bound_rounded(err_gh + bound(aGs @ aW, m + 1) + daz(aGs.sum(1), aW.sum(0), m), P2, base)
        ref = P2 + s * V @ A
        lim_dx = bound_rounded(lim_p2 + bound(np.abs(P2) + lim_p2 + s * (aGs @ aB) @ aA, m + r + 3), ref, base)
        got = as_torch(dx, base)
        assert got.dtype == DT[base] and got.shape == self.x.shape
        assert_within_bound(f64(got).reshape(n, k), ref, lim_dx, "dx")
        # what is not asked for is not formed, and the rest is unchanged
        no_dx, dA2, dB2, no_dc = self.backward(u, None, need_dx=False, need_dc=False,
                                               plan=None if bplan is None else (*bplan[:2], "none"))
        assert no_dx is None and no_dc is None
        assert np.array_equal(dA2, dA) and np.array_equal(dB2, dB)


SHAPES = [(1, 7, 33, 1), (7, 33, 1, 5), (8, 65, 70, 3), (33, 257, 65, 16), (257, 33, 40, 8)]


@pytest.mark.parametrize("base", ["bfloat16", "float16"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no_bias"])
def test_matches_float64(half_isa, base, shape, bias):
    DoraCase(*shape, base, bias=bias).check()


@pytest.mark.parametrize("base", ["bfloat16", "float16"])
@pytest.mark.parametrize("layout", ["fifo", "x_strided", "lead_dims"])
@pytest.mark.parametrize("n", [3, 33])
def test_layouts(half_isa, base, layout, n):
    DoraCase(n, 40, 33, 4, base, fifo=layout == "fifo", x_strided=layout == "x_strided",
             lead=(2,) if layout == "lead_dims" else ()).check()


@pytest.mark.parametrize("zero", ["n", "k", "m", "r"])
def test_zero_sizes(zero):
    dims = {"n": 5, "k": 6, "m": 7, "r": 2}
    dims[zero] = 0
    c = DoraCase(dims["n"], dims["k"], dims["m"], dims["r"], "bfloat16")
    y, u, z = c.forward()
    dx, dA, dB, dc = c.backward(u, z)
    assert y.shape == (dims["n"], dims["m"]) and z.shape == y.shape and dx.shape == (dims["n"], dims["k"])
    assert dA.shape == (dims["r"], dims["k"]) and dB.shape == (dims["m"], dims["r"]) and dc.shape == (dims["m"],)
    if zero == "n":  # nothing summed: dc and the adapter gradients are zeros
        assert not dc.any() and not dA.any() and not dB.any()


@pytest.mark.parametrize("n", [1, 8, 33])
def test_plans_chosen_and_forced(half_isa, n):
    """The base product runs alone ('decode' for a few tokens, else 'split') and dx 'masked'; forcing 'split'
    or 'gemm' paths gives results within the same bounds."""
    c = DoraCase(n, 64, 48, 4, "bfloat16")
    c.check()
    _, u, z = c.forward()
    assert _C.last_forward_plan()[1] in ("decode", "split")
    c.backward(u, z)
    assert _C.last_backward_plan()[2] == "masked"
    c.check(fplan=("gemm", "split"), bplan=("gemm", "gemm", "masked"))
    assert _C.last_forward_plan() == ("gemm", "split")


def test_augmented_plans_refused():
    """'augmented' sums the rank-r term inside the base GEMM: DoRA rounds the base product alone."""
    c = DoraCase(9, 16, 12, 2, "float16")
    with pytest.raises(ValueError, match="DoRA's base product is rounded alone"):
        c.forward(plan=("skinny", "augmented"))
    _, u, z = c.forward()
    with pytest.raises(ValueError, match="DoRA's base product is rounded alone"):
        c.backward(u, z, plan=("skinny", "skinny", "augmented"))


def test_bad_input_named():
    c = DoraCase(4, 8, 6, 2, "bfloat16")
    _, u, z = c.forward()
    with pytest.raises(TypeError, match="dora_forward: x must be bfloat16 or float16, got float32"):
        ops.dora_forward(c.x.float(), c.W, c.A, c.B, 1.0, c.c)
    with pytest.raises(TypeError, match="A and B must be float32"):
        ops.dora_forward(c.x, c.W, c.A.bfloat16(), c.B.bfloat16(), 1.0, c.c)
    with pytest.raises(TypeError, match="W must be bfloat16"):
        ops.dora_forward(c.x, c.W.half(), c.A, c.B, 1.0, c.c)
    with pytest.raises(ValueError, match="col_scale"):
        ops.dora_forward(c.x, c.W, c.A, c.B, 1.0, c.c[:-1])
    with pytest.raises(ValueError, match="col_scale"):
        ops.dora_forward(c.x, c.W, c.A, c.B, 1.0, c.c.view(2, 3))
    with pytest.raises(TypeError, match="dora_backward: g must be bfloat16 or float16, got float32"):
        ops.dora_backward(c.g.float(), c.x, u, z, c.W, c.A, c.B, 1.0, c.c)
    with pytest.raises(ValueError, match="z must have g's shape"):
        ops.dora_backward(c.g, c.x, u, z[:-1], c.W, c.A, c.B, 1.0, c.c)
    with pytest.raises(TypeError):
        ops.dora_backward(c.g, c.x, u, None, c.W, c.A, c.B, 1.0, c.c)  # dc wanted: z is read
    with pytest.raises(ValueError, match="u"):
        ops.dora_backward(c.g, c.x, u[:-1], z, c.W, c.A, c.B, 1.0, c.c)


def test_col_scale_strided_and_nan_propagate():
    """A strided col_scale reads as its values; a NaN in x reaches y's row, in g dx's and dc."""
    c = DoraCase(5, 16, 12, 2, "bfloat16")
    want = c.forward()[0]
    wide = torch.stack([c.c, torch.zeros_like(c.c)], 1)[:, 0]
    assert not wide.is_contiguous()
    got = ops.dora_forward(c.x, c.W, c.A, c.B, c.s, wide, c.bias)[0]
    assert np.array_equal(got, want)
    c.x = c.x.clone()
    c.x[2, 3] = float("nan")
    y, u, z = c.forward()
    y = as_torch(y, "bfloat16")
    assert torch.isnan(y[2]).all() and not torch.isnan(y[[0, 1, 3, 4]]).any()
    c.x[2, 3] = 0.0
    _, u, z = c.forward()
    c.g = c.g.clone()
    c.g[1, 4] = float("inf")
    dx, _, _, dc = c.backward(u, z)
    assert not np.isfinite(as_torch(dx, "bfloat16")[1].float().numpy()).all()
    assert not np.isfinite(dc[4])


def test_base_products_rounded_alone(half_isa):
    """PEFT's base layer rounds x·Wᵀ (and, backward, g' before g'·W) to bf16 before DoRA's fp32 terms: values
    whose fp32 sums differ from the rounded ones only there. Forward: x·W_j = 1 + 2⁻¹⁰ rounds to 1, so z_j =
    1 + s·u·B_j exactly. Backward: g' = (1 + 2⁻¹⁰, 1) rounds to (1, 1), so with W's column (1, −1) and B = 0
    dx = round(g')·W = 0 exactly (2⁻¹⁰ without the rounding)."""
    bf = torch.bfloat16
    x = torch.tensor([[1.0, 2.0 ** -10]], dtype=bf)
    W = torch.tensor([[1.0, 1.0]], dtype=bf)
    A, B, c = torch.tensor([[1.0, 0.0]]), torch.tensor([[2.0 ** -5]]), torch.tensor([1.0])
    _, u, z = ops.dora_forward(x, W, A, B, 1.0, c)
    assert float(z[0, 0]) == 1.0 + 2.0 ** -5
    W2 = torch.tensor([[1.0], [-1.0]], dtype=bf)               # (m, k) = (2, 1)
    x2, g = torch.tensor([[1.0]], dtype=bf), torch.tensor([[1.0, 1.0]], dtype=bf)
    A2, B2, c2 = torch.tensor([[1.0]]), torch.zeros(2, 1), torch.tensor([1.0 + 2.0 ** -10, 1.0])
    _, u2, z2 = ops.dora_forward(x2, W2, A2, B2, 1.0, c2)
    dx = ops.dora_backward(g, x2, u2, z2, W2, A2, B2, 1.0, c2)[0]
    assert float(as_torch(dx, "bfloat16")[0, 0]) == 0.0
    # and g'·W = 1 + 2⁻⁹ rounds to 1 before s·v·A = −1 + 2⁻⁴ is added: dx = 2⁻⁴ (2⁻⁴ + 2⁻⁹ without)
    W3, B3, c3 = torch.tensor([[1.0], [2.0 ** -9]], dtype=bf), torch.tensor([[-0.9375], [0.0]]), torch.ones(2)
    _, u3, z3 = ops.dora_forward(x2, W3, A2, B3, 1.0, c3)
    dx = ops.dora_backward(g, x2, u3, z3, W3, A2, B3, 1.0, c3)[0]
    assert float(as_torch(dx, "bfloat16")[0, 0]) == 2.0 ** -4
