"""The GEMM core on half-precision operands (`ops.hgemm`): bf16 / fp16 / fp32 a and b in every
combination, against a float64 reference of the values they hold, on every ISA (the `half_isa` fixture;
avx512_bf16 runs two bf16 operands on the vdpbf16ps tile, amx_bf16 on AMX tiles, the others widen while
packing): layouts
(row-major, transposed views, general strides), odd sizes around the tiles (1, 7, 33, 257), odd K
over several K blocks, zero sizes, bias, beta = 1 into out, alpha, NaN / Inf, fp16 subnormals, bf16
denormals (which vdpbf16ps and tdpbf16ps read as 0: tolerances.bound_dpbf16), threads, and bad input;
on amx_bf16 also K around its 32-k step, whole and edge 32×32 blocks with bias and beta = 1."""
from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")

import lorafuse  # noqa: E402
from lorafuse import _C, ops  # noqa: E402
from tolerances import assert_within_bound, bound, bound_dpbf16  # noqa: E402

DT = {"bf16": torch.bfloat16, "f16": torch.float16, "f32": torch.float32}


def tensor(rng, shape, dt: str, how: str = "row") -> "torch.Tensor":
    """Random values of dtype dt, shape (rows, cols), stored `how`: row-major, column-major (the
    transpose of a row-major tensor: a transposed view) or every other column of a wider buffer."""
    rows, cols = shape
    t = torch.from_numpy(rng.standard_normal((rows, cols), dtype=np.float32)).to(DT[dt])
    if how == "col":
        return t.t().contiguous().t()
    if how == "strided":
        buf = torch.zeros(rows, 2 * cols + 1, dtype=DT[dt])
        buf[:, 1::2][:, :cols] = t
        return buf[:, 1::2][:, :cols]
    assert how == "row"
    return t


def f64(t) -> np.ndarray:
    return t.double().numpy() if isinstance(t, torch.Tensor) else np.asarray(t, np.float64)


NATIVE = {"avx512_bf16": "bf16_pairs", "amx_bf16": "amx_bf16"}  # the ISA's bf16 tile, by hgemm_path


def native(a, b, alpha=1.0) -> bool:
    return _C.hgemm_path(a, b, alpha)[0] in NATIVE.values()


def check(a, b, alpha=1.0, bias=None, out=None, beta=0.0, what=""):
    before = None if out is None else f64(out).copy()
    c = ops.hgemm(a, b, alpha, bias, out, beta)
    A, B = f64(a), f64(b)
    ref, mag = alpha * (A @ B), abs(alpha) * (np.abs(A) @ np.abs(B))
    if bias is not None:
        ref, mag = ref + f64(bias), mag + np.abs(f64(bias))
    if beta == 1.0:
        ref, mag = ref + before, mag + np.abs(before)
    K = A.shape[1]
    lim = (bound_dpbf16(mag, K, np.abs(A).sum(1), np.abs(B).sum(0)) if native(a, b, alpha) else bound(mag, K))
    assert_within_bound(np.asarray(c), ref, lim, f"hgemm {what} {tuple(A.shape)}x{tuple(B.shape)}")
    return c


@pytest.mark.parametrize("da", ["bf16", "f16", "f32"])
@pytest.mark.parametrize("db", ["bf16", "f16", "f32"])
def test_dtypes_and_layouts(half_isa, da, db):
    rng = np.random.default_rng(0)
    for how_a in ("row", "col", "strided"):
        for how_b in ("row", "col", "strided"):
            a, b = tensor(rng, (37, 45), da, how_a), tensor(rng, (45, 53), db, how_b)
            check(a, b, bias=torch.randn(53), what=f"{da}/{how_a} x {db}/{how_b}")


def test_path_names_the_tile(half_isa):
    a, b = torch.ones(4, 4, dtype=torch.bfloat16), torch.ones(4, 4, dtype=torch.bfloat16)
    assert _C.hgemm_path(a, b) == (NATIVE.get(half_isa, "widened"), "bfloat16", "bfloat16", "a_rows")
    assert _C.hgemm_path(a, b, 0.5)[0] == "widened"  # the pair tile multiplies the bits as they are
    assert _C.hgemm_path(a, b.half())[0] == "widened"
    assert _C.hgemm_path(a.float(), b)[0] == "widened"


def test_w_rows_window(half_isa):
    """The transposed orientation only where tunables.c puts it (avx512_bf16: 16-256 rows of a, K even, b = Wᵀ
    column-contiguous with K·N ≥ 2^21, two plain bf16 operands at alpha 1); everywhere else 'a_rows'."""
    x = torch.zeros(64, 2051, dtype=torch.bfloat16)
    w = torch.zeros(1030, 2051, dtype=torch.bfloat16)  # W (N, K); b = W.t()
    on = half_isa == "avx512_bf16"

    def orientation(a, b, alpha=1.0):
        return _C.hgemm_path(a, b, alpha)[3]

    assert orientation(x[:, :2050], w[:, :2050].t()) == ("w_rows" if on else "a_rows")
    assert orientation(x[:, :2050], w[:1022, :2050].t()) == "a_rows"  # K·N = 2095100 < 2^21
    assert orientation(x, w.t()) == "a_rows"  # K odd: the last pair would read past a row of W
    assert orientation(x[:, :2050], w[:, :2050].t(), 0.5) == "a_rows"  # widened
    assert orientation(x[:, :2050], w[:, :2050].t().contiguous()) == "a_rows"  # b row-major: W's pairs not adjacent
    assert orientation(x[:, :2050].half(), w[:, :2050].t().half()) == "a_rows"


@pytest.mark.parametrize("d", [1, 7, 33, 257])
@pytest.mark.parametrize("axis", ["M", "K", "N"])
@pytest.mark.parametrize("dts", [("bf16", "bf16"), ("f16", "bf16")])
def test_sizes_each_axis(half_isa, d, axis, dts):
    dims = {"M": 29, "K": 35, "N": 41}
    dims[axis] = d
    rng = np.random.default_rng(d)
    a = tensor(rng, (dims["M"], dims["K"]), dts[0])
    b = tensor(rng, (dims["K"], dims["N"]), dts[1], "col")
    check(a, b, what=f"{dts} {axis}={d}")


def test_odd_k_over_several_blocks_and_threads(half_isa):
    """K odd beyond one K block (the last pair half padding), N beyond one NC panel on some ISAs,
    bias; the same result, bit for bit, on 1 and 3 threads."""
    rng = np.random.default_rng(1)
    a, b = tensor(rng, (130, 2101), "bf16"), tensor(rng, (2101, 3100), "bf16", "col")
    bias = torch.randn(3100)
    before = lorafuse.get_num_threads()
    try:
        lorafuse.set_num_threads(1)
        c1 = check(a, b, bias=bias, what="odd K")
        lorafuse.set_num_threads(3)
        c3 = ops.hgemm(a, b, bias=bias)
    finally:
        lorafuse.set_num_threads(before)
    assert np.array_equal(c1, c3)
    check(tensor(rng, (61, 777), "bf16", "strided"), tensor(rng, (777, 45), "f16"), what="strided x fp16")


@pytest.mark.parametrize("N", [1, 33, 100])
def test_few_rows_same_bits_as_many(half_isa, N):
    """A few rows of a (one row block a thread: on avx512_bf16 W's K-pairs are packed sliver by sliver,
    each just before its tile; up to 256 rows in one A block there) give the bits the same rows give
    inside many (the whole panel packed first, 192-row blocks): K over two K blocks, odd, N partial
    slivers, row tails of 4, 8 and 12 (the tile's 4-, 8- and 12-row loops); and within the float64 bound."""
    rng = np.random.default_rng(5)
    a, b = tensor(rng, (600, 2101), "bf16"), tensor(rng, (2101, N), "bf16", "col")  # > mc rows a thread
    bias = torch.randn(N)
    many = ops.hgemm(a, b, bias=bias)
    for rows in (1, 12, 20, 28, 256):
        few = check(a[:rows], b, bias=bias, what=f"{rows} rows")
        assert np.array_equal(few, many[:rows]), f"{rows} rows differ from the same rows among 600"


@pytest.mark.parametrize("threads", [1, 2])
def test_w_rows_in_place_same_bits_as_x_rows(half_isa, threads):
    """16-256 rows of x times a Wᵀ of ≥ 2M elements run transposed on avx512_bf16 (Cᵀ = W·xᵀ, W's rows read in
    place by the 6×64 pair tile, C stored transposed): the same bits as those rows among 600 (the x-rows
    orientation), and within the float64 bound — over two K blocks (C accumulated), W's 1030 rows (a 4-row
    tail tile), one-sliver tiles (17, 30 rows) and partial ones (40, 100), bias, beta = 1, a strided x, and
    the window's edges (15 and 257 rows: the x-rows orientation itself)."""
    before = lorafuse.get_num_threads()
    lorafuse.set_num_threads(threads)
    try:
        rng = np.random.default_rng(11)
        K, N = 2050, 1030
        a, b = tensor(rng, (600, K), "bf16"), tensor(rng, (K, N), "bf16", "col")  # b = Wᵀ: W's rows contiguous
        bias = torch.randn(N)
        many = ops.hgemm(a, b, bias=bias)
        for rows in (15, 16, 17, 30, 40, 64, 100, 256, 257):
            transposed = half_isa == "avx512_bf16" and 16 <= rows <= 256
            assert _C.hgemm_path(a[:rows], b)[3] == ("w_rows" if transposed else "a_rows"), f"{rows} rows"
            few = check(a[:rows], b, bias=bias, what=f"{rows} rows")
            assert np.array_equal(few, many[:rows]), f"{rows} rows differ from the same rows among 600"
        wide = torch.zeros(64, K + 6, dtype=torch.bfloat16)
        wide[:, 3:K + 3] = a[:64]
        assert np.array_equal(ops.hgemm(wide[:, 3:K + 3], b, bias=bias), many[:64]), "a strided x differs"
        out = rng.standard_normal((600, N), dtype=np.float32)
        added = check(a[:100], b, out=out[:100].copy(), beta=1.0, what="beta=1")
        assert np.array_equal(added, ops.hgemm(a, b, out=out, beta=1.0)[:100]), "beta=1 differs"
    finally:
        lorafuse.set_num_threads(before)


@pytest.mark.parametrize("K", [32, 66, 2050, 4097])
def test_a_pairs_by_transposes_same_bits_as_by_rows(half_isa, K):
    """A row-major bf16 a with even K — whole 12-row slivers packed by register transposes of its pairs on
    avx512_bf16, the 5-row tail sliver and odd K's last pair row by row — gives the bits the same values give
    column-major or strided (every sliver row by row), over one and three K blocks; within the float64 bound."""
    rng = np.random.default_rng(K)
    a, b = tensor(rng, (29, K), "bf16"), tensor(rng, (K, 40), "bf16", "col")
    c = check(a, b, what=f"row-major a, K={K}")
    for how in ("col", "strided"):
        other = tensor(rng, (29, K), "bf16", how)
        other.copy_(a)
        assert np.array_equal(ops.hgemm(other, b), c), f"{how} a differs from row-major a at K={K}"


@pytest.mark.parametrize("shape", [(0, 5, 7), (5, 0, 7), (5, 7, 0), (0, 0, 0)])
def test_zero_sizes(half_isa, shape):
    M, K, N = shape
    a, b = torch.zeros(M, K, dtype=torch.bfloat16), torch.zeros(K, N, dtype=torch.float16)
    c = ops.hgemm(a, b)
    assert c.shape == (M, N) and c.dtype == np.float32 and not c.any()
    bias = torch.arange(N, dtype=torch.float32)
    assert np.array_equal(ops.hgemm(a, b, bias=bias), np.broadcast_to(bias.numpy(), (M, N)))


def test_beta_one_adds_into_out_and_alpha(half_isa):
    rng = np.random.default_rng(2)
    a, b = tensor(rng, (45, 301), "bf16"), tensor(rng, (301, 70), "bf16", "col")
    out = rng.standard_normal((45, 70), dtype=np.float32)
    c = check(a, b, out=out, beta=1.0, what="beta=1")
    assert c is out or np.shares_memory(c, out)
    check(a, b, alpha=-0.75, bias=torch.randn(70), what="alpha")
    check(a, b.half(), alpha=0.5, what="alpha fp16")


def test_numpy_inputs(half_isa):
    rng = np.random.default_rng(3)
    a = rng.standard_normal((33, 40), dtype=np.float32).astype(np.float16)
    b = rng.standard_normal((40, 20), dtype=np.float32)
    check(a, b, what="numpy fp16 x fp32")
    check(a.T.copy().T, b.astype(np.float16)[:, ::-1], what="numpy fp16 views")


@pytest.mark.parametrize("dt", ["bf16", "f16"])
def test_nan_and_inf_propagate(half_isa, dt):
    rng = np.random.default_rng(4)
    a = torch.from_numpy(np.abs(rng.standard_normal((20, 37), dtype=np.float32)) + 0.5).to(DT[dt])
    b = torch.from_numpy(np.abs(rng.standard_normal((37, 40), dtype=np.float32)) + 0.5).to(DT[dt])
    a[3, 5] = float("nan")
    b[7, 11] = float("inf")
    c = ops.hgemm(a, b)
    assert np.isnan(c[3]).all()
    assert np.isposinf(np.delete(c[:, 11], 3)).all()
    rest = np.delete(np.delete(c, 3, axis=0), 11, axis=1)
    assert np.isfinite(rest).all()
    b[7, 11] = float("-inf")
    b[8, 11] = float("inf")  # inf - inf: NaN
    assert np.isnan(ops.hgemm(a, b)[:, 11]).all()


def test_fp16_subnormals_and_extremes_are_widened_exactly(half_isa):
    """fp16 subnormals (2⁻²⁴ … 2⁻¹⁵), the largest normal (65504), negative zero: exact in fp32."""
    vals = np.array([2.0 ** -24, 3 * 2.0 ** -24, 2.0 ** -15, -(2.0 ** -20), 65504.0, -0.0, 1.0, -2.5], np.float16)
    a = torch.from_numpy(vals.reshape(1, -1).copy())
    b = torch.eye(8, dtype=torch.float16)
    c = ops.hgemm(a, b)
    assert np.array_equal(c[0], vals.astype(np.float32))
    assert np.array_equal(ops.hgemm(a, b.bfloat16())[0], vals.astype(np.float32))


def test_bf16_denormals_within_the_dpbf16_bound(half_isa):
    """bf16 denormals (below 2⁻¹²⁶): exact when widened; vdpbf16ps reads them as 0 and flushes
    denormal partial sums — within tolerances.bound_dpbf16 either way."""
    rng = np.random.default_rng(5)
    a = tensor(rng, (24, 64), "bf16")
    b = tensor(rng, (64, 40), "bf16", "col")
    a[::2] *= 2.0 ** -130  # denormal rows
    b[:, ::3] *= 2.0 ** -127  # tiny columns: products and partial sums far below 2⁻¹²⁶
    c = check(a, b, what="denormals")
    if not native(a, b):  # widened: the products are exact, only the fp32 sums round
        assert (c[::2] != 0).any()


def test_bad_input():
    a, b = torch.ones(4, 5, dtype=torch.bfloat16), torch.ones(5, 6, dtype=torch.bfloat16)
    with pytest.raises(TypeError, match="hgemm: a must be float32, float16 or bfloat16.*int64"):
        ops.hgemm(torch.ones(4, 5, dtype=torch.int64), b)
    with pytest.raises(TypeError, match="hgemm: b must be float32, float16 or bfloat16.*float64"):
        ops.hgemm(a, np.ones((5, 6)))
    with pytest.raises(TypeError, match="hgemm: a must be a float32 / float16 numpy array"):
        ops.hgemm([[1.0]], b)
    with pytest.raises(ValueError, match=r"hgemm: b must have shape \(K, N\) with K = a.shape\[1\]"):
        ops.hgemm(a, torch.ones(4, 6, dtype=torch.bfloat16))
    with pytest.raises(ValueError, match=r"hgemm: a must have shape \(M, K\)"):
        ops.hgemm(torch.ones(5, dtype=torch.bfloat16), b)
    with pytest.raises(ValueError, match=r"hgemm: bias must have shape \(N,\)"):
        ops.hgemm(a, b, bias=torch.ones(5))
    with pytest.raises(TypeError, match="hgemm: bias .*bfloat16"):
        ops.hgemm(a, b, bias=torch.ones(6, dtype=torch.bfloat16))
    with pytest.raises(ValueError, match=r"hgemm: out must have shape \(4, 6\)"):
        ops.hgemm(a, b, out=np.zeros((4, 5), np.float32))
    with pytest.raises(TypeError, match="hgemm: out .*bfloat16"):
        ops.hgemm(a, b, out=torch.zeros(4, 6, dtype=torch.bfloat16))
    with pytest.raises(ValueError, match="hgemm: out must be C-contiguous"):
        ops.hgemm(a, b, out=np.zeros((6, 4), np.float32).T)
    with pytest.raises(ValueError, match="hgemm: beta must be 0 or 1"):
        ops.hgemm(a, b, out=np.zeros((4, 6), np.float32), beta=0.5)
    with pytest.raises(ValueError, match="hgemm: beta=1 adds into out: out is required"):
        ops.hgemm(a, b, beta=1.0)
    with pytest.raises(TypeError, match="hgemm: alpha must be a real number"):
        ops.hgemm(a, b, alpha="2")
    buf = np.zeros((6, 6), np.float32)
    with pytest.raises(ValueError, match="hgemm: output out overlaps input a in memory"):
        ops.hgemm(buf, torch.ones(6, 6, dtype=torch.bfloat16), out=buf)
    with pytest.raises(TypeError, match="hgemm: b .* cannot be read as a CPU array"):
        ops.hgemm(a, torch.ones(5, 6, dtype=torch.bfloat16).to_sparse())


@pytest.fixture
def amx():
    """The amx_bf16 level forced for one test (skipped where the CPU or the OS lacks it)."""
    from conftest import _forced_isa

    yield from _forced_isa("amx_bf16")


@pytest.mark.parametrize("K", [1, 2, 31, 32, 33, 63, 64, 65, 511, 512, 513, 1025, 4097, 9000])
def test_amx_k_around_the_tile_step(amx, K):
    """K padded to the 32-k step (zero pairs) and cut into equal K blocks of at most 4096 (4097: two,
    the second accumulating; 9000: three, the last shorter); 33 × 40 is one whole 32×32 block and
    three edge ones."""
    rng = np.random.default_rng(K)
    a, b = tensor(rng, (33, K), "bf16"), tensor(rng, (K, 40), "bf16", "col")
    assert _C.hgemm_path(a, b)[0] == "amx_bf16"
    check(a, b, bias=torch.randn(40), what=f"amx K={K}")
    check(a, b, out=rng.standard_normal((33, 40), dtype=np.float32), beta=1.0, what=f"amx beta=1 K={K}")


@pytest.mark.parametrize("how", ["row", "col", "strided"])
def test_amx_whole_blocks_layouts_bias_beta_threads(amx, how):
    """Whole 32×32 blocks only (C loaded into and stored from the tiles, the bias by a 0 row stride)
    and with edges, every layout of both operands; 1 and 2 threads give the same bits."""
    rng = np.random.default_rng(7)
    before = lorafuse.get_num_threads()
    try:
        for M, K, N in ((64, 96, 64), (257, 777, 129), (1057, 40, 161)):  # the last: 2 mc × 2 nc blocks
            a, b = tensor(rng, (M, K), "bf16", how), tensor(rng, (K, N), "bf16", how)
            bias = torch.randn(N)
            lorafuse.set_num_threads(1)
            c1 = check(a, b, bias=bias, what=f"amx {how} {M}x{K}x{N}")
            check(a, b, out=c1.copy(), beta=1.0, what=f"amx {how} beta=1")
            lorafuse.set_num_threads(2)
            assert np.array_equal(c1, ops.hgemm(a, b, bias=bias))
    finally:
        lorafuse.set_num_threads(before)


def test_amx_nan_inf_in_padding_stay_out(amx):
    """Inf / NaN next to the zero padding (last row, last column, last k of a 32-k step) reach
    exactly their own row or column: padded zeros never meet them."""
    rng = np.random.default_rng(8)
    a, b = tensor(rng, (33, 33), "bf16"), tensor(rng, (33, 33), "bf16")
    a[32, 32] = float("inf")
    b[32, 0] = 1.0
    b[31, 32] = float("nan")
    c = ops.hgemm(a, b)
    assert np.isnan(c[:, 32]).all()
    assert np.isposinf(c[32, 0])
    assert np.isfinite(np.delete(np.delete(c, 32, axis=1), 32, axis=0)).all()
