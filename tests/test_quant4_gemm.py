"""The 4-bit GEMM (`_C.q4gemm`, `quant.matmul_4bit`): c = a · op(W), op(W) = Wᵀ or W, with W's NF4 / FP4
codes dequantized inside the GEMM's packing. Checked against a float64 reference on the dequantized W
(`quant.dequantize`, itself bit-identical to bitsandbytes: tests/test_quant4.py) within tolerances'
bounds, and bit for bit against `hgemm` on that dequantized W (the same packed values through the same
loop nest, so any difference is a packing bug): every ISA level (`half_isa`: generic … amx_bf16), block
sizes 32 / 64 / 128 / 4096, nested scales on and off, both directions, W as the second (B) or the first
(A, `w_first`) operand, odd shapes (1, 7, 33, 257; blocks
straddling rows, a short last block), K around the AMX step and over several K blocks, zero sizes,
transposed and strided a, alpha / bias / beta, threads, the tile the path names, bitsandbytes' own
Params4bit, and corrupt quant states refused before any compute."""
from __future__ import annotations

import functools

import numpy as np
import pytest

torch = pytest.importorskip("torch")

import lorafuse  # noqa: E402
from lorafuse import _C, quant  # noqa: E402
from tolerances import BF16_TILES, assert_within_bound, bound_of_path  # noqa: E402

TDT = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@functools.lru_cache(maxsize=None)
def stored(shape: tuple, quant_type: str = "nf4", block: int = 64, nested: bool = True):
    """(data, quant_state) of a random W of `shape` (rows, cols), quantized as bnb does"""
    g = torch.Generator().manual_seed(hash((shape, quant_type, block, nested)) % 2**31)
    return quant.quantize_weight(torch.randn(shape, generator=g) * 0.5, quant_type, block_size=block,
                                 double_quant=nested)


def fields(state) -> dict:
    """the nested keyword arguments of q4gemm for a quant state ({} when not nested)"""
    if not state.nested:
        return {}
    return dict(nested_absmax=state.state2.absmax, nested_code=state.state2.code, offset=float(state.offset))


def operand(rng, shape, dt: torch.dtype, how: str = "row") -> torch.Tensor:
    """Random a of dtype dt stored `how`: row-major, a transposed view ("col"), or every other column of a
    wider buffer ("strided")"""
    t = torch.from_numpy(rng.standard_normal(shape, dtype=np.float32)).to(dt)
    if how == "col":
        return t.t().contiguous().t()
    if how == "strided":
        buf = torch.zeros(shape[0], 2 * shape[1] + 1, dtype=dt)
        buf[:, 1::2][:, : shape[1]] = t
        return buf[:, 1::2][:, : shape[1]]
    return t


def f64(t) -> np.ndarray:
    return t.double().numpy() if isinstance(t, torch.Tensor) else np.asarray(t, np.float64)


def check(a, data, state, transpose: bool, wdtype: str = "bfloat16", alpha: float = 1.0, bias=None, out=None,
          beta: float = 0.0, what: str = "", w_first: bool = False) -> np.ndarray:
    """q4gemm (c = a·op(W), or op(W)·a with w_first) against the float64 reference (bound of its path)
    and, bit for bit, against hgemm on the dequantized W; returns c"""
    before = None if out is None else np.array(out, copy=True)
    shape = tuple(state.shape)
    c = np.asarray(_C.q4gemm(a, data, state.absmax, shape, state.blocksize, state.quant_type, transpose, alpha,
                             bias, out, beta, wdtype, w_first=w_first, **fields(state)))
    D = quant.dequantize(data, state, dtype=TDT[wdtype])
    opW = D.t() if transpose else D
    first, second = (opW, a) if w_first else (a, opW)  # the GEMM's operands, in order
    A64, B64 = f64(first), f64(second)
    ref, mag = alpha * (A64 @ B64), abs(alpha) * (np.abs(A64) @ np.abs(B64))
    if bias is not None:
        ref, mag = ref + f64(bias), mag + np.abs(f64(bias))
    if beta == 1.0:
        ref, mag = ref + before, mag + np.abs(before)
    path = _C.q4gemm_path(a, wdtype, alpha)[0]
    assert path == _C.hgemm_path(first, second, alpha)[0]
    assert_within_bound(c, ref, bound_of_path(path, A64, B64, mag), f"q4gemm {what} {path} {A64.shape}x{B64.shape}")
    twin = np.asarray(_C.hgemm(first, second, alpha, bias, None if before is None else before.copy(), beta))
    assert np.array_equal(c, twin, equal_nan=True), f"q4gemm {what}: not hgemm's bits on the dequantized W"
    return c


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("transpose", [True, False], ids=["xWt", "gW"])
def test_blocks_nested_dtypes_every_isa(half_isa, quant_type, transpose):
    """Block sizes 32 … 4096 (4096: a short last block over rows), nested on / off, on odd shapes (W of
    33×257 and 7×100: blocks straddling rows), bf16 a with bf16 W (the bf16 tile where the ISA has one)
    and fp32 a with fp32 W (widened)."""
    rng = np.random.default_rng(1)
    for block in (32, 64, 128, 4096):
        for nested in (False, True):
            for rows, cols, M in ((33, 257, 7), (7, 100, 33)):
                data, state = stored((rows, cols), quant_type, block, nested)
                K = cols if transpose else rows
                for adt, wdt in ((torch.bfloat16, "bfloat16"), (torch.float32, "float32")):
                    check(operand(rng, (M, K), adt), data, state, transpose, wdt,
                          what=f"{quant_type} B={block} nested={nested} {adt} W {wdt}")


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("transpose", [True, False], ids=["Wt", "W"])
def test_w_first_packs_the_weight_as_a(half_isa, quant_type, transpose):
    """c = op(W)·a: the 4-bit weight as the GEMM's first operand (its A side: pack_a_pairs / pack_a_amx on
    the bf16 tiles, packed runs or element by element widened), alpha scaling W, K past a 512-k chunk
    and (avx512_bf16) a K block."""
    rng = np.random.default_rng(9)
    for rows, cols in ((33, 257), (7, 100), (45, 1101)):
        data, state = stored((rows, cols), quant_type, 64, True)
        K = rows if transpose else cols
        for adt, wdt in ((torch.bfloat16, "bfloat16"), (torch.float32, "float32"), (torch.float16, "bfloat16")):
            for how in ("row", "col"):
                a = operand(rng, (K, 19), adt, how)
                check(a, data, state, transpose, wdt, bias=torch.randn(19), w_first=True, what=f"w_first {adt} {how}")
            check(a, data, state, transpose, wdt, alpha=-0.5, w_first=True, what=f"w_first alpha {adt}")


@pytest.mark.parametrize("d", [1, 7, 33, 257])
@pytest.mark.parametrize("axis", ["M", "K", "N"])
@pytest.mark.parametrize("transpose", [True, False], ids=["xWt", "gW"])
def test_sizes_each_axis(half_isa, d, axis, transpose):
    dims = {"M": 29, "K": 35, "N": 41}
    dims[axis] = d
    shape = (dims["N"], dims["K"]) if transpose else (dims["K"], dims["N"])
    data, state = stored(shape, "nf4", 64, True)
    a = operand(np.random.default_rng(d), (dims["M"], dims["K"]), torch.bfloat16)
    check(a, data, state, transpose, what=f"{axis}={d}")


@pytest.mark.parametrize("adt", ["float32", "bfloat16", "float16"])
@pytest.mark.parametrize("wdt", ["float32", "bfloat16", "float16"])
def test_every_dtype_pair_and_layout_of_a(half_isa, adt, wdt):
    rng = np.random.default_rng(2)
    for transpose in (True, False):
        data, state = stored((45, 37) if transpose else (37, 45), "fp4", 32, True)
        for how in ("row", "col", "strided"):
            check(operand(rng, (23, 37), TDT[adt], how), data, state, transpose, wdt, bias=torch.randn(45),
                  what=f"a {adt}/{how} W {wdt}")


def test_odd_k_over_several_k_blocks_and_threads(half_isa):
    """K odd and beyond every ISA's K block (several 512-k dequantization chunks), N beyond one column
    panel on the AMX level; the same bits on 1 and 3 threads."""
    rng = np.random.default_rng(3)
    a, bias = operand(rng, (70, 2101), torch.bfloat16), torch.randn(300)
    before = lorafuse.get_num_threads()
    for transpose in (True, False):
        data, state = stored((300, 2101) if transpose else (2101, 300), "nf4", 128, True)
        try:
            lorafuse.set_num_threads(1)
            one = check(a, data, state, transpose, bias=bias, what="odd K")
            lorafuse.set_num_threads(3)
            three = _C.q4gemm(a, data, state.absmax, tuple(state.shape), 128, "nf4", transpose, bias=bias,
                              **fields(state))
        finally:
            lorafuse.set_num_threads(before)
        assert np.array_equal(one, np.asarray(three))


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
def test_w_rows_in_place_on_a_4bit_w(half_isa, quant_type):
    """16-256 rows of a times a 4-bit Wᵀ of ≥ 2M elements run transposed on avx512_bf16 (gemm.c w_rows_block_run:
    each block of W's rows dequantized into rows the pair tile reads in place, never transposed): within the
    bound, hgemm's bits on the dequantized W, and the bits the same rows give among 300 (x's rows packed, W's
    slivers transposed) — K over two K blocks and 4-bit blocks across W's rows (K = 2050), a 4-row W tail."""
    data, state = stored((1030, 2050), quant_type)
    rng = np.random.default_rng(4)
    a, bias = operand(rng, (300, 2050), torch.bfloat16), torch.randn(1030)
    many = check(a, data, state, True, bias=bias, what="300 rows")
    for rows in (16, 40, 256):
        assert _C.hgemm_path(a[:rows], torch.zeros(2050, 1030, dtype=torch.bfloat16).t().contiguous().t())[3] == (
            "w_rows" if half_isa == "avx512_bf16" else "a_rows")
        few = check(a[:rows], data, state, True, bias=bias, what=f"{rows} rows")
        assert np.array_equal(few, many[:rows]), f"{rows} rows differ from the same rows among 300"


@pytest.fixture
def amx():
    """The amx_bf16 level forced for one test (skipped where the CPU or the OS lacks it)."""
    from conftest import _forced_isa

    yield from _forced_isa("amx_bf16")


@pytest.mark.parametrize("K", [1, 2, 31, 32, 33, 511, 512, 513, 4097])
def test_amx_k_around_the_tile_step(amx, K):
    """K padded to AMX's 32-k step, the 512-k dequantization chunks, two K blocks (4097); 33 × 40: one
    whole 32×32 block of C and three edge ones."""
    rng = np.random.default_rng(K)
    for transpose in (True, False):
        data, state = stored((40, K) if transpose else (K, 40), "nf4", 64, True)
        a = operand(rng, (33, K), torch.bfloat16)
        assert _C.q4gemm_path(a)[0] == "amx_bf16"
        check(a, data, state, transpose, bias=torch.randn(40), what=f"amx K={K}")
        check(a, data, state, transpose, out=rng.standard_normal((33, 40), dtype=np.float32), beta=1.0,
              what=f"amx beta=1 K={K}")


@pytest.mark.parametrize("shape", [(0, 5, 7), (5, 0, 7), (5, 7, 0), (0, 0, 0)])
@pytest.mark.parametrize("transpose", [True, False], ids=["xWt", "gW"])
def test_zero_sizes(half_isa, shape, transpose):
    M, K, N = shape
    data, state = stored((N, K) if transpose else (K, N), "nf4", 64, False)
    a = torch.zeros(M, K, dtype=torch.bfloat16)
    c = np.asarray(_C.q4gemm(a, data, state.absmax, tuple(state.shape), 64, "nf4", transpose))
    assert c.shape == (M, N) and c.dtype == np.float32 and not c.any()
    bias = torch.arange(N, dtype=torch.float32)
    c = np.asarray(_C.q4gemm(a, data, state.absmax, tuple(state.shape), 64, "nf4", transpose, bias=bias))
    assert np.array_equal(c, np.broadcast_to(bias.numpy(), (M, N)))


def test_alpha_bias_beta(half_isa):
    rng = np.random.default_rng(4)
    data, state = stored((70, 301), "nf4", 64, True)
    a = operand(rng, (45, 301), torch.bfloat16)
    out = rng.standard_normal((45, 70), dtype=np.float32)
    c = check(a, data, state, True, out=out, beta=1.0, what="beta=1")
    assert np.shares_memory(c, out)
    check(a, data, state, True, alpha=-0.75, bias=torch.randn(70), what="alpha")
    check(operand(rng, (45, 301), torch.float16), data, state, True, "float16", alpha=0.5, what="alpha fp16")


def test_path_names_the_tile(half_isa):
    a = torch.ones(4, 4, dtype=torch.bfloat16)
    native = {"avx512_bf16": "bf16_pairs", "amx_bf16": "amx_bf16"}.get(half_isa, "widened")
    assert _C.q4gemm_path(a) == (native, "bfloat16", "bfloat16")
    assert _C.q4gemm_path(a, "bfloat16", 0.5)[0] == "widened"  # the tiles multiply the bits as they are
    assert _C.q4gemm_path(a, "float16")[0] == "widened"
    assert _C.q4gemm_path(a.float(), "bfloat16") == ("widened", "float32", "bfloat16")
    assert native in BF16_TILES or native == "widened"


def test_matmul_4bit_wrapper():
    """quant.matmul_4bit: leading dimensions, a Linear4bit module or its weight, both directions, the
    default rounding dtype (x's when half, else quant_state.dtype), bias, out."""
    torch.manual_seed(5)
    lin = torch.nn.Linear(100, 37)
    layer = quant.Linear4bit.from_linear(lin, "nf4", block_size=64)
    x = torch.randn(2, 5, 100, dtype=torch.bfloat16)
    W16 = quant.dequantize(layer.weight, dtype=torch.bfloat16)
    y = quant.matmul_4bit(x, layer)
    assert y.shape == (2, 5, 37) and y.dtype == torch.float32
    assert np.array_equal(y.reshape(10, 37).numpy(), np.asarray(_C.hgemm(x.reshape(10, 100), W16.t())))
    g = torch.randn(3, 37)  # fp32: W rounded to quant_state.dtype (float32 here)
    W32 = quant.dequantize(layer.weight)
    dx = quant.matmul_4bit(g, layer.weight, transpose=False)
    assert np.array_equal(dx.numpy(), np.asarray(_C.hgemm(g, W32)))
    bias, out = torch.randn(37), torch.empty(2, 5, 37)
    y2 = quant.matmul_4bit(x, layer, bias=bias, out=out)
    assert y2.data_ptr() == out.data_ptr()
    want = torch.from_numpy(np.asarray(_C.hgemm(x.reshape(10, 100), W16.t(), bias=bias))).view(2, 5, 37)
    assert torch.equal(y2, want)
    with pytest.raises(ValueError, match=r"matmul_4bit: x must have shape \(\.\.\., 100\)"):
        quant.matmul_4bit(torch.randn(3, 37), layer)
    with pytest.raises(ValueError, match="matmul_4bit: no quant_state"):
        quant.matmul_4bit(x, torch.zeros(10, 1, dtype=torch.uint8))


def test_bitsandbytes_params4bit_as_it_is():
    """A bnb Params4bit (its own QuantState, nested) as the weight: the bits of hgemm on bnb's own
    dequantize_4bit of it."""
    pytest.importorskip("bitsandbytes", reason="bitsandbytes not installed")
    import bitsandbytes.functional as F

    torch.manual_seed(6)
    W = torch.randn(48, 128, dtype=torch.bfloat16)  # in_features a multiple of the block (bnb's C kernel)
    for quant_type in ("nf4", "fp4"):
        q, st = F.quantize_4bit(W, blocksize=64, compress_statistics=True, quant_type=quant_type)
        Wd = F.dequantize_4bit(q, st)
        x = torch.randn(9, 128, dtype=torch.bfloat16)
        y = quant.matmul_4bit(x, q, st)
        assert np.array_equal(y.numpy(), np.asarray(_C.hgemm(x, Wd.t()))), quant_type


def good(**over) -> dict:
    data, state = stored((6, 40), "nf4", 32, True)
    kw = dict(a=torch.ones(3, 40, dtype=torch.bfloat16), data=data, absmax=state.absmax, shape=(6, 40), blocksize=32,
              quant_type="nf4", **fields(state))
    kw.update(over)
    return kw


@pytest.mark.parametrize("over, err, msg", [
    (dict(absmax=torch.zeros(3, dtype=torch.uint8)), ValueError, "absmax holds fewer codes than blocks"),
    (dict(nested_absmax=None, nested_code=None, absmax=torch.ones(7)), ValueError, "absmax holds fewer scales"),
    (dict(quant_type="nf5"), ValueError, "quant_type must be 'nf4' or 'fp4'"),
    (dict(shape=(7, 40)), ValueError, "data holds fewer than ceil"),
    (dict(shape=(-6, 40)), ValueError, "shape must hold sizes >= 0"),
    (dict(shape=(240,)), ValueError, r"a must have shape \(M, K\) with K = shape\[1\]"),
    (dict(blocksize=48), ValueError, "blocksize must be one of"),
    (dict(blocksize=16), ValueError, "blocksize must be one of"),
    (dict(nested_absmax=torch.ones(0)), ValueError, "nested_absmax holds fewer scales"),
    (dict(nested_code=torch.ones(255)), ValueError, "nested_code must hold 256 values"),
    (dict(nested_code=None), ValueError, "nested_absmax and nested_code come together"),
    (dict(nested_blocksize=0), ValueError, "nested_blocksize must be >= 1"),
    (dict(data=torch.zeros(120)), TypeError, "data must be uint8"),
    (dict(a=torch.ones(3, 40, dtype=torch.int64)), TypeError, "a must be float32, float16 or bfloat16"),
    (dict(a=torch.ones(3, 41, dtype=torch.bfloat16)), ValueError, r"a must have shape \(M, K\) with K = shape\[1\]"),
    (dict(a=torch.ones(6, dtype=torch.bfloat16)), ValueError, r"a must have shape \(M, K\)"),
    (dict(transpose_b=False), ValueError, r"a must have shape \(M, K\) with K = shape\[0\]"),
    (dict(w_first=True), ValueError, r"a must have shape \(K, N\) with K = shape\[0\] \(Wᵀ·a\)"),
    (dict(dtype="float64"), ValueError, "dtype must be 'float32', 'bfloat16' or 'float16'"),
    (dict(bias=torch.ones(5)), ValueError, r"bias must have shape \(N,\)"),
    (dict(beta=0.5), ValueError, "beta must be 0 or 1"),
    (dict(alpha="2"), TypeError, "alpha must be a real number"),
])
def test_corrupt_state_and_bad_arguments_refused_before_compute(over, err, msg):
    """Every inconsistency raises (naming the argument) before the kernel runs: out keeps its values."""
    kw = good(**over)
    kw = {k: v for k, v in kw.items() if v is not None}
    out = np.full((3, 6), 7.0, np.float32)
    with pytest.raises(err, match=f"q4gemm: {msg}"):
        _C.q4gemm(out=out, **kw)
    assert (out == 7.0).all()


def test_out_checks():
    kw = good()
    with pytest.raises(ValueError, match=r"q4gemm: out must have shape \(3, 6\)"):
        _C.q4gemm(out=np.zeros((3, 5), np.float32), **kw)
    with pytest.raises(ValueError, match="q4gemm: beta=1 adds into out: out is required"):
        _C.q4gemm(beta=1.0, **kw)
    buf = np.zeros(200, np.float32)
    with pytest.raises(ValueError, match="q4gemm: output out overlaps input a"):
        _C.q4gemm(**dict(kw, a=buf[:120].reshape(3, 40)), out=buf[100:118].reshape(3, 6))
    with pytest.raises(TypeError, match="q4gemm_path: a must be float32, float16 or bfloat16"):
        _C.q4gemm_path(torch.ones(2, 2, dtype=torch.int32))
