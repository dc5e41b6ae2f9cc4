"""The fused LoRA forward and adapter-only backward on a bf16 / fp16 base (`ops.lora_forward` /
`ops.lora_backward` with half-precision x, W, g: kernels/cpu/lora_half.c) against a float64 reference of
the values the tensors hold: every ISA (the `half_isa` fixture: avx512_bf16 and amx_bf16 run x·Wᵀ and g·W
of a bf16 base on their bf16 tiles), fp32 adapters (PEFT's default) and adapters of the base's dtype,
odd sizes (1, 7, 33, 257), dropout, strided and transposed views, fan_in_fan_out, zero sizes, the plans
(chosen and forced), NaN / Inf, and bad input. Bounds: tests/tolerances.py (fp32 sums, then one rounding
to the output dtype)."""
from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from lorafuse import _C, ops  # noqa: E402
from tolerances import DAZ, assert_within_bound, bound, bound_rounded  # noqa: E402

DT = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
SEED = 1234


def rand(gen: torch.Generator, shape: tuple, dtype: str) -> "torch.Tensor":
    return torch.randn(*shape, generator=gen).to(DT[dtype])


def f64(t) -> np.ndarray:
    return torch.as_tensor(t).double().numpy()


def as_torch(a: np.ndarray, dtype: str) -> "torch.Tensor":
    """A kernel result (NumPy; bfloat16 comes as uint16 bits) as a tensor of `dtype`."""
    t = torch.from_numpy(np.ascontiguousarray(a))
    return t.view(torch.bfloat16) if dtype == "bfloat16" else t


def on_tile(base: str) -> bool:
    """x·Wᵀ and g·W of this base run a bf16 tile on the ISA in use (tolerances: DAZ / FTZ)."""
    return base == "bfloat16" and _C.get_isa() in ("avx512_bf16", "amx_bf16")


class Case:
    """One layer's operands (torch tensors), the kernels' results and the float64 reference."""

    def __init__(self, n: int, k: int, m: int, r: int, base: str, adapters: str, p: float = 0.0, *,
                 fifo: bool = False, x_strided: bool = False, x_pad: int = 0, lead: tuple = ()) -> None:
        """x_strided: x's columns 2 apart; x_pad: its rows k + x_pad apart (columns contiguous)."""
        gen = torch.Generator().manual_seed(n * 1000003 + k * 1009 + m * 17 + r)
        self.n, self.k, self.m, self.r = n, k, m, r
        self.base, self.adapters, self.p, self.fifo = base, adapters, p, fifo
        xs = rand(gen, (*lead, n, 2 * k if x_strided else k + x_pad), base)
        self.x = xs[..., ::2] if x_strided else xs[..., :k]
        self.W = rand(gen, (k, m) if fifo else (m, k), base)
        self.A, self.B = rand(gen, (r, k), adapters) * 0.5, rand(gen, (m, r), adapters) * 0.5
        self.bias, self.g, self.s = rand(gen, (m,), base), rand(gen, (*lead, n, m), base), 0.75

    def forward(self, plan=None):
        return ops.lora_forward(self.x, self.W, self.A, self.B, self.s, self.bias, dropout_p=self.p, seed=SEED,
                                fan_in_fan_out=self.fifo, plan=plan)

    def backward(self, u, plan=None, need_dx=True):
        return ops.lora_backward(self.g, self.x, u, self.W, self.A, self.B, self.s, need_dx=need_dx,
                                 dropout_p=self.p, seed=SEED, fan_in_fan_out=self.fifo, plan=plan)

    def check(self, fplan=None, bplan=None) -> None:
        """Forward and backward against float64, each element within its bound."""
        y, u = self.forward(fplan)
        dx, dA, dB = self.backward(u, bplan)
        n, k, m, r, s = int(np.prod(self.x.shape[:-1])), self.k, self.m, self.r, self.s
        X, G = f64(self.x).reshape(n, k), f64(self.g).reshape(n, m)
        W = f64(self.W).T if self.fifo else f64(self.W)
        A, B, b = f64(self.A), f64(self.B), f64(self.bias)
        mask = ops.dropout_mask(n, k, self.p, SEED).astype(np.float64) if self.p else np.ones((n, k))
        Xd = X * mask
        U, V = Xd @ A.T, G @ B
        aX, aXd, aW, aA, aB, aG = (np.abs(t) for t in (X, Xd, W, A, B, G))
        assert u.dtype == np.float32 and u.shape == (*self.x.shape[:-1], r)
        assert_within_bound(u.reshape(n, r), U, bound(aXd @ aA.T, k), "u")
        # y: x·Wᵀ + b + s·u·Bᵀ with u's own error carried (|x̃||A|ᵀ|B|ᵀ), then one rounding
        ref = X @ W.T + b + s * U @ B.T
        lim = bound(aX @ aW.T + np.abs(b) + s * (aXd @ aA.T) @ aB.T, k + r + 2)
        if on_tile(self.base):
            lim = lim + DAZ * (aX.sum(1)[:, None] + aW.sum(1)[None, :] + k)
        got = as_torch(y, self.base)
        assert got.dtype == DT[self.base] and got.shape == (*self.x.shape[:-1], m)
        assert_within_bound(f64(got).reshape(n, m), ref, bound_rounded(lim, ref, self.base), "y")
        # dB = s·gᵀ·u, dA = s·vᵀ·x̃ (v = g·B), in the adapters' dtype
        for name, got, ref, mag, keff, shape in (
                ("dB", dB, s * G.T @ U, s * aG.T @ (aXd @ aA.T), n + k, (m, r)),
                ("dA", dA, s * V.T @ Xd, s * (aG @ aB).T @ aXd, n + m, (r, k))):
            got = as_torch(got, self.adapters)
            assert got.dtype == DT[self.adapters] and got.shape == shape, name
            lim = bound(mag, keff)
            if self.adapters != "float32":
                lim = bound_rounded(lim, ref, self.adapters)
            assert_within_bound(f64(got), ref, lim, name)
        # dx = g·W + s·(v·A) ⊙ mask, in the base's dtype
        ref = G @ W + s * (V @ A) * mask
        lim = bound(aG @ aW + s * ((aG @ aB) @ aA) * mask, 2 * m + r + 2)
        if on_tile(self.base):
            lim = lim + DAZ * (aG.sum(1)[:, None] + aW.sum(0)[None, :] + m)
        got = as_torch(dx, self.base)
        assert got.dtype == DT[self.base] and got.shape == self.x.shape
        assert_within_bound(f64(got).reshape(n, k), ref, bound_rounded(lim, ref, self.base), "dx")


class HandleCase(Case):
    """A `Case` whose W the kernels get as a quantized weight's handle, ``self.handle`` (set by the subclass,
    tests/test_ops_lora_q4.py and _q8.py, with ``self.W`` the values it stands for)."""

    def forward(self, plan=None):
        return ops.lora_forward(self.x, self.handle, self.A, self.B, self.s, self.bias, dropout_p=self.p, seed=SEED,
                                plan=plan)

    def backward(self, u, plan=None, need_dx=True):
        return ops.lora_backward(self.g, self.x, u, self.handle, self.A, self.B, self.s, need_dx=need_dx,
                                 dropout_p=self.p, seed=SEED, plan=plan)


def check_mixed(c: HandleCase) -> None:
    """x and g float32 on a half W (c.handle: the W tensor or a quantized weight's handle; 'mixed'): y =
    round(round(x)·Wᵀ + b) + s·(x̃·Aᵀ)·Bᵀ and dx = round(round(g)·W) + s·drop'((g·B)·A) in float32 — the base
    as a half result rounded once (its inputs x, g rounded first), the LoRA terms as fp32 sums —, dA and dB
    from the fp32 x and g."""
    n, k, m, r, base, p = c.n, c.k, c.m, c.r, c.base, c.p
    x, g = c.x.float(), c.g.float()
    bias = c.bias  # in the base's dtype (bitsandbytes adds it in its compute dtype)
    y, u = ops.lora_forward(x, c.handle, c.A, c.B, c.s, bias, dropout_p=p, seed=SEED)
    dx, dA, dB = ops.lora_backward(g, x, u, c.handle, c.A, c.B, c.s, dropout_p=p, seed=SEED)
    assert y.dtype == dx.dtype == dA.dtype == dB.dtype == np.float32
    X, G = x.double().numpy(), g.double().numpy()
    Xh, Gh = x.to(c.x.dtype).double().numpy(), g.to(c.x.dtype).double().numpy()
    W, A, B, b = (t.double().numpy() for t in (c.W, c.A, c.B, bias))
    mask = ops.dropout_mask(n, k, p, SEED).astype(np.float64) if p else np.ones((n, k))
    Xd = X * mask
    U, V = Xd @ A.T, G @ B
    aXh, aW, aA, aB, aXd, aG, aGh = (np.abs(t) for t in (Xh, W, A, B, Xd, G, Gh))
    tile = base == "bfloat16" and _C.get_isa() in ("avx512_bf16", "amx_bf16")
    daz = DAZ * (aXh.sum(1)[:, None] + aW.sum(1)[None, :] + k) if tile else 0.0
    base_y = Xh @ W.T + b
    lim = (bound_rounded(bound(aXh @ aW.T + np.abs(b), k + 2) + daz, base_y, base)
           + bound(c.s * (aXd @ aA.T) @ aB.T, k + r + 2))
    assert_within_bound(np.asarray(y, np.float64), base_y + c.s * U @ B.T, lim, "y")
    daz = DAZ * (aGh.sum(1)[:, None] + aW.sum(0)[None, :] + m) if tile else 0.0
    base_dx = Gh @ W
    lim = (bound_rounded(bound(aGh @ aW, m + 2) + daz, base_dx, base)
           + bound(c.s * ((aG @ aB) @ aA) * mask, m + r + 2))
    assert_within_bound(np.asarray(dx, np.float64), base_dx + c.s * (V @ A) * mask, lim, "dx")
    assert_within_bound(np.asarray(dB, np.float64), c.s * G.T @ U, bound(c.s * aG.T @ (aXd @ aA.T), n + k), "dB")
    assert_within_bound(np.asarray(dA, np.float64), c.s * V.T @ Xd, bound(c.s * (aG @ aB).T @ aXd, n + m), "dA")


SHAPES = [(1, 7, 33, 1), (7, 33, 1, 5), (8, 65, 70, 3), (33, 257, 65, 16), (257, 33, 40, 8)]


@pytest.mark.parametrize("base", ["bfloat16", "float16"])
@pytest.mark.parametrize("same_adapters", [False, True], ids=["fp32_adapters", "base_dtype_adapters"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("p", [0.0, 0.25])
def test_matches_float64(half_isa, base, same_adapters, shape, p):
    Case(*shape, base, base if same_adapters else "float32", p).check()


@pytest.mark.parametrize("base", ["bfloat16", "float16"])
@pytest.mark.parametrize("layout", ["fifo", "x_strided", "lead_dims", "transposed_adapters"])
@pytest.mark.parametrize("n", [3, 33])
def test_layouts(half_isa, base, layout, n):
    c = Case(n, 70, 45, 6, base, "float32", 0.0 if layout == "x_strided" else 0.1, fifo=layout == "fifo",
             x_strided=layout == "x_strided", lead=(3,) if layout == "lead_dims" else ())
    if layout == "transposed_adapters":  # A and B as transposed views of column-major storage
        c.A, c.B = c.A.t().contiguous().t(), c.B.t().contiguous().t()
    c.check()


@pytest.mark.parametrize("base", ["bfloat16", "float16"])
@pytest.mark.parametrize("zero", ["n", "k", "m", "r"])
def test_zero_sizes(base, zero):
    dims = dict(n=5, k=6, m=7, r=3)
    dims[zero] = 0
    Case(dims["n"], dims["k"], dims["m"], dims["r"], base, "float32").check()


@pytest.mark.parametrize("n", [1, 8, 9, 24, 25, 32, 33])
def test_plans_chosen_and_forced(half_isa, n):
    """At most 8 tokens (tunables.c half_decode_max_n: 5 for a bf16 W on AMX, 24 for bf16 on the avx512_bf16
    pairs kernels, whose decode takes up to 32 in groups of 8): y 'decode' (W streamed in place); at most 8, dx
    'masked' (W's rows streamed, from AVX2 up; to 24 where the GEMM would widen W); more: bf16 on a bf16 tile
    'split' / 'masked', otherwise 'augmented'; every legal plan forced gives a result within the bounds."""
    for base in ("bfloat16", "float16"):
        c = Case(n, 40, 24, 4, base, "float32")
        _, u = c.forward()
        c.backward(u)
        tile = on_tile(base)
        decode_ok = 32 if tile and _C.get_isa() == "avx512_bf16" else 8  # lf_rowdots_half_ok
        decode_max = {"amx_bf16": 5, "avx512_bf16": 24}.get(_C.get_isa(), 8) if tile else 8  # half_decode_max_n
        assert _C.last_forward_plan() == ("skinny", "decode" if n <= decode_max else "split" if tile else "augmented")
        # lf_rows_axpy_streams: a half W from avx2 up, ≤ 24 tokens where the GEMM would widen it
        widens = _C.get_isa() in ("avx2", "avx512") or base == "float16"
        streamed = _C.get_isa() != "generic" and (n <= 8 or (n <= 24 and widens))
        assert _C.last_backward_plan() == ("skinny", "skinny", "masked" if tile or streamed else "augmented")
        for y_path in ("decode", "split", "augmented") if n <= decode_ok else ("split", "augmented"):
            for u_path, da_path, dx_path in (("skinny", "gemm", "masked"), ("gemm", "skinny", "augmented"),
                                             ("skinny", "skinny", "augmented"), ("gemm", "gemm", "masked")):
                c.check((u_path, y_path), (u_path, da_path, dx_path))
                assert _C.last_forward_plan() == (u_path, y_path)
                assert _C.last_backward_plan() == (u_path, da_path, dx_path)


@pytest.mark.parametrize("n", [9, 17, 32])
def test_decode_takes_groups_of_tokens_on_the_pairs_kernels(half_isa, n):
    """9–32 tokens on a dense bf16 W with the vdpbf16ps rows (avx512_bf16): y 'decode' runs each block of W's rows
    against every group of 8 tokens (the last group short), K over two of its K blocks with a tail past the
    32-wide vectors (a group's K block: 4096, rowdots_half.c X_BLOCK_BYTES), rows of W not a multiple of the
    16-row blocks, bias; elsewhere 'decode' is refused above 8."""
    c = Case(n, 4096 + 33, 37, 3, "bfloat16", "float32")
    if on_tile("bfloat16") and _C.get_isa() == "avx512_bf16":
        c.check(("skinny", "decode"))
        assert _C.last_forward_plan() == ("skinny", "decode")
    else:
        with pytest.raises(ValueError, match="'decode' needs at most 8 tokens"):
            c.forward(("skinny", "decode"))


@pytest.mark.parametrize("base", ["bfloat16", "float16"])
@pytest.mark.parametrize("n", [1, 8])
def test_decode_sums_over_k_blocks(half_isa, base, n):
    """'decode' of a dense W wider than its K block (at most 64 KiB of x: 32768 columns for 1 token of bf16
    pairs, rowdots_half.c X_BLOCK_BYTES): the blocks after the first add into c, the bias once."""
    c = Case(n, 32768 + 129, 19, 2, base, "float32")
    c.check(("skinny", "decode"))
    assert _C.last_forward_plan() == ("skinny", "decode")


@pytest.mark.parametrize("fplan, p, msg", [(("rowdots", "augmented"), 0.0, "by 'skinny' or 'gemm' only"),
                                           (("gemm", "decode"), 0.0, "'decode' needs at most 8 tokens"),
                                           (("gemm", "few_tokens"), 0.0, "'decode', 'split' or 'augmented' only"),
                                           (("none", "merged"), 0.0, "by 'skinny' or 'gemm' only")])
def test_forced_forward_plan_refused(fplan, p, msg):
    c = Case(33, 16, 8, 2, "bfloat16", "float32", p)
    with pytest.raises(ValueError, match=msg):
        c.forward(fplan)


def test_forced_skinny_u_needs_rows_of_x():
    c = Case(9, 16, 8, 2, "bfloat16", "float32")
    c.x = c.x.t().contiguous().t()  # column-major: not streamed by rows
    with pytest.raises(ValueError, match="'skinny' needs rows of x contiguous"):
        c.forward(("skinny", "augmented"))
    c.check(("gemm", "augmented"))


def test_forced_backward_plan_refused():
    c = Case(9, 16, 8, 2, "bfloat16", "float32", 0.2)
    _, u = c.forward()
    with pytest.raises(ValueError, match="needs rows of g contiguous"):
        ops.lora_backward(c.g.t().contiguous().t(), c.x, u, c.W, c.A, c.B, 1.0, dropout_p=0.2, seed=SEED,
                          plan=("skinny", "gemm", "masked"))  # g column-major: not streamed by rows
    with pytest.raises(ValueError, match="needs rows of x contiguous"):
        ops.lora_backward(c.g, c.x.t().contiguous().t(), u, c.W, c.A, c.B, 1.0, plan=("gemm", "skinny", "masked"))
    with pytest.raises(ValueError, match="takes no dropout"):
        c.backward(u, ("gemm", "gemm", "augmented"))
    with pytest.raises(ValueError, match="dx is not wanted"):
        c.backward(u, ("gemm", "gemm", "masked"), need_dx=False)


def test_no_dx_and_no_u():
    c = Case(9, 16, 8, 2, "bfloat16", "float32")
    y, u = ops.lora_forward(c.x, c.W, c.A, c.B, c.s, c.bias, need_u=False)
    assert u is None and as_torch(y, "bfloat16").shape == (9, 8)
    _, u = c.forward()
    dx, dA, dB = c.backward(u, need_dx=False)
    assert dx is None and dA.shape == (2, 16) and dB.shape == (8, 2)


@pytest.mark.parametrize("base", ["bfloat16", "float16"])
def test_nan_and_inf_propagate_as_in_torch(half_isa, base):
    """A NaN in x poisons its row of y (and of u); an inf in W gives ±inf or NaN where torch's float32
    math on the same values does."""
    c = Case(6, 20, 10, 3, base, "float32")
    c.x[2, 5] = float("nan")
    c.W[4, 7] = float("inf")
    y, u = c.forward()
    got = as_torch(y, base).float()
    x32, W32, A32, B32 = c.x.float(), c.W.float(), c.A.float(), c.B.float()
    want = x32 @ W32.t() + c.bias.float() + c.s * (x32 @ A32.t()) @ B32.t()
    assert torch.equal(torch.isnan(got), torch.isnan(want))
    assert torch.equal(torch.isinf(got), torch.isinf(want)) and torch.isinf(got).any()
    assert torch.isnan(torch.from_numpy(u)[2]).all() and not torch.isnan(torch.from_numpy(u)[[0, 1, 3, 4, 5]]).any()


def test_bad_dtypes_and_fp32_only_arguments():
    c = Case(4, 8, 6, 2, "bfloat16", "float32")
    with pytest.raises(TypeError, match="W must be bfloat16 with a bfloat16 base, got float32"):
        ops.lora_forward(c.x, c.W.float(), c.A, c.B, 1.0)
    with pytest.raises(TypeError, match="A and B must have one dtype"):
        ops.lora_forward(c.x, c.W, c.A, c.B.bfloat16(), 1.0)
    with pytest.raises(TypeError, match="A must be bfloat16 or float32 with a bfloat16 base, got float16"):
        ops.lora_forward(c.x, c.W, c.A.half(), c.B.half(), 1.0)
    with pytest.raises(TypeError, match="bias must be bfloat16 or float32"):
        ops.lora_forward(c.x, c.W, c.A, c.B, 1.0, c.bias.half())
    with pytest.raises(ValueError, match="out is not taken with a bfloat16 / float16 base"):
        ops.lora_forward(c.x, c.W, c.A, c.B, 1.0, out=np.zeros((4, 6), np.float32))
    with pytest.raises(ValueError, match="packed_w is not taken"):
        ops.lora_forward(c.x, c.W, c.A, c.B, 1.0, packed_w=ops.pack_weight(c.W.float().numpy()))
    with pytest.raises(ValueError, match="A must have shape"):
        ops.lora_forward(c.x, c.W, c.A[:, :5], c.B, 1.0)
    _, u = c.forward()
    with pytest.raises(TypeError, match="x must be bfloat16 with a bfloat16 base, got float16"):
        ops.lora_backward(c.g, c.x.half(), u, c.W, c.A, c.B, 1.0)
    with pytest.raises(TypeError, match="lora_backward: u .*bfloat16"):
        ops.lora_backward(c.g, c.x, torch.from_numpy(u).bfloat16(), c.W, c.A, c.B, 1.0)
    with pytest.raises(ValueError, match="dA_out is not taken"):
        ops.lora_backward(c.g, c.x, u, c.W, c.A, c.B, 1.0, dA_out=np.zeros((2, 8), np.float32))
    with pytest.raises(ValueError, match="g must have shape"):
        ops.lora_backward(c.g[:3], c.x, u, c.W, c.A, c.B, 1.0)


class DenseCase(HandleCase):
    """A `Case` whose W the kernels get as the half tensor itself, through `HandleCase`'s calls."""

    def __init__(self, *args, **kw) -> None:
        super().__init__(*args, **kw)
        self.handle = self.W


@pytest.mark.parametrize("base", ["bfloat16", "float16"])
@pytest.mark.parametrize("shape", [(1, 64, 33, 4), (8, 128, 40, 3), (33, 130, 70, 8), (257, 64, 65, 16)],
                         ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("p", [0.0, 0.25])
def test_float32_x_on_a_half_w_is_mixed(half_isa, base, shape, p):
    """A float32 x (g) with a bf16 / fp16 W and fp32 adapters: the mixed arithmetic (`check_mixed`), as DoRA on
    a half base computes its z (python/lorafuse/dora.py)."""
    check_mixed(DenseCase(*shape, base, "float32", p))
