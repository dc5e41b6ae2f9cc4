"""One table of tolerances, derived from fp32 accumulation length.

For a dot product of length K accumulated in fp32 (any order, FMA or not), the classical bound
is |fl(Σ aᵢbᵢ) − Σ aᵢbᵢ| ≤ γ_K · Σ|aᵢ||bᵢ| with γ_K = K·u/(1 − K·u), u = 2⁻²⁴.
So each kernel output is checked element-wise against a float64 reference with
    |got − ref| ≤ FACTOR · (K_eff + 2) · u · mag
where mag is the same expression evaluated on absolute values (|x|·|W|ᵀ + …) and K_eff the
longest accumulation feeding that output (k + r for y, m + r for dx, n for dA/dB). FACTOR = 1
is the rigorous worst case; it never needs loosening, because the bound is not statistical.
"""
from __future__ import annotations

import numpy as np

U32 = 2.0 ** -24
FACTOR = 1.0


def bound(mag: np.ndarray, k_eff: int) -> np.ndarray:
    """Element-wise error bound for an fp32 result whose |terms| sum to mag."""
    return FACTOR * (k_eff + 2) * U32 * mag + 1e-30


def assert_within(got: np.ndarray, ref: np.ndarray, mag: np.ndarray, k_eff: int, what: str) -> None:
    """got (fp32) vs ref (fp64): every element within the accumulation bound."""
    assert_within_bound(got, ref, bound(mag, k_eff), what)


# Half-precision GEMM (ops.hgemm). Inputs are compared as the bf16 / fp16 values they hold (the
# float64 reference reads the same rounded values), so only the kernel's own rounding counts:
#  * widened (bf16 / fp16 → fp32 while packing, exactly): the products of bf16·bf16, fp16·fp16 and
#    mixed pairs are exact in fp32 or rounded once like any fp32 product, summed by fp32 FMAs —
#    the bound() above with K_eff = K.
#  * vdpbf16ps (avx512_bf16, two bf16 operands): Intel's pseudo-code computes, per 32-bit lane,
#        acc += a₁·b₁;  acc += a₀·b₀      (fp32, round to nearest even, DAZ and FTZ)
#    — bf16 products are exact in fp32 (8-bit significands: a 16-bit product), and each addition
#    rounds once, so the γ_K bound holds as for fp32, plus what DAZ/FTZ lose: a term whose a or b
#    is a bf16 denormal (|·| < 2⁻¹²⁶) is read as 0, an error < 2⁻¹²⁶·(|a| + |b|); and each of the
#    K additions whose result is below 2⁻¹²⁶ is flushed to 0, an error < 2⁻¹²⁶ each. So
#        |got − ref| ≤ (K + 2)·u·Σ|a||b| + 2⁻¹²⁶ · Σ_k (|a_ik| + |b_kj| + 1).
#  * tdpbf16ps (amx_bf16, two bf16 operands): Intel's pseudo-code for an element of a C tile adds, per
#    K-pair, acc += a₀·b₀; acc += a₁·b₁ (the other order), fp32 with round to nearest even, input
#    denormals read as 0 and output denormals flushed, MXCSR not consulted: the same class of
#    rounding, so the same bound (the order of the additions does not enter it); the K padding
#    (zeros up to a multiple of 32) adds exact zeros. test_ops_hgemm's denormal test checks it.
DAZ = 2.0 ** -126


def bound_dpbf16(mag: np.ndarray, k_eff: int, a_abs_rowsum: np.ndarray, b_abs_colsum: np.ndarray) -> np.ndarray:
    """Element-wise bound for a vdpbf16ps product: bound(mag, k_eff) plus the DAZ/FTZ term."""
    return bound(mag, k_eff) + DAZ * (a_abs_rowsum[:, None] + b_abs_colsum[None, :] + k_eff)


# 4-bit operands (_C.q4gemm, quant.matmul_4bit): W's elements enter the GEMM as code·absmax (one fp32
# product) rounded once to W's dtype — the very values quant.dequantize gives (bit-identical to bnb's
# dequantize_4bit: tests/test_quant4.py), which packing produces before it widens or pairs them — so
# against a float64 reference on those values only the GEMM's own rounding counts and the bounds above
# hold unchanged: bound() on the widened path, bound_dpbf16() on the bf16 tiles (a dequantized bf16
# element is a bf16 denormal only where |code·absmax| < 2⁻¹²⁶; the DAZ term covers it like any other).
# The 4-bit quantization error itself is W's, not the kernel's: test_quant4 bounds it per block.
BF16_TILES = ("bf16_pairs", "amx_bf16")  # _C.hgemm_path / q4gemm_path names of the vdpbf16ps / AMX tiles


def bound_of_path(path: str, A: np.ndarray, B: np.ndarray, mag: np.ndarray) -> np.ndarray:
    """The bound for c = A (M, K) · B (K, N) (float64 values of the operands) run on `path`:
    bound_dpbf16 on a bf16 tile, else bound; mag = |A|·|B| (+ whatever else the result sums)."""
    K = A.shape[1]
    if path in BF16_TILES:
        return bound_dpbf16(mag, K, np.abs(A).sum(1), np.abs(B).sum(0))
    return bound(mag, K)


def assert_within_bound(got: np.ndarray, ref: np.ndarray, lim: np.ndarray, what: str) -> None:
    """got (fp32) vs ref (fp64) against an element-wise bound lim."""
    assert got.shape == ref.shape, f"{what}: shape {got.shape} != {ref.shape}"
    err = np.abs(got.astype(np.float64) - ref)
    bad = err > lim
    assert not bad.any(), (f"{what}: {int(bad.sum())} of {bad.size} elements off; worst "
                           f"err {err[bad].max():.3g} vs bound {lim[bad].min():.3g}")


# Half-precision outputs (the LoRA kernels on a bf16 / fp16 base: y, dx, and dA, dB with half
# adapters). The fp32 sum s is bounded as above; the result is s rounded once to the output dtype,
# to nearest even: |round(s) − s| ≤ u_h·|s| for a normal result (u_h = 2⁻⁸ for bf16's 8-bit
# significand, 2⁻¹¹ for fp16's 11-bit one: half a unit in the last place), and ≤ half the subnormal
# spacing below the normal range (2⁻¹³⁴ for bf16, 2⁻²⁵ for fp16). With |s| ≤ |ref| + lim32:
#     |got − ref| ≤ lim32 + u_h·(|ref| + lim32) + sub_h
# PEFT's own half path rounds x·Wᵀ + b to the base dtype before adding the LoRA term and rounds the
# sum again: two roundings, so its distance from the float64 value can be twice this.
U_HALF = {"bfloat16": 2.0 ** -8, "float16": 2.0 ** -11}
SUB_HALF = {"bfloat16": 2.0 ** -134, "float16": 2.0 ** -25}


def bound_rounded(lim32: np.ndarray, ref: np.ndarray, dtype: str) -> np.ndarray:
    """Bound of a half-precision result rounded once from an fp32 sum within lim32 of ref."""
    return lim32 + U_HALF[dtype] * (np.abs(ref) + lim32) + SUB_HALF[dtype]
