"""The GEMM core on its own (`ops.sgemm`) against float64, on every operand layout the packing
distinguishes — row-major, column-major (a transposed view), strided, negative strides — and
sizes around the 16×16 register-transpose blocks and the tiles (1, 15, 16, 17, 33, 257), with
alpha and bias, on every ISA."""
from __future__ import annotations

import numpy as np
import pytest

from lorafuse import ops
from reference import f64, forward, rand
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
    if how == "wide":  # rows of a wider row-major buffer: row stride K + 24, columns contiguous
        buf = np.zeros((a.shape[0], a.shape[1] + 24), np.float32)
        buf[:, : a.shape[1]] = a
        return buf[:, : a.shape[1]]
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


def test_few_rows_several_blocks_and_column_views(isa):
    """Few rows of a (dx = g·W for a few tokens): several K blocks and NC panels, column edges, a
    negative row stride, and b a column block of a wider matrix."""
    check(np.random.default_rng(3), 40, 1100, 2100, "row", "row", with_bias=True)
    check(np.random.default_rng(4), 64, 777, 333, "row", "reversed")
    rng = np.random.default_rng(5)
    a, wide = rand(rng, 9, 300), rand(rng, 300, 900)
    b = wide[:, 100:171]  # row stride 900, 71 columns: the last sliver's loads are masked
    c = ops.sgemm(a, b)
    assert_within(c, f64(a) @ f64(b), np.abs(f64(a)) @ np.abs(f64(b)), 300, "column block of b")


@pytest.mark.parametrize("threads", [1, 2, 3])
@pytest.mark.parametrize("M", [1, 5, 6, 7, 13, 121])
def test_pair_tile_reads_a_in_place(isa, threads, M):
    """More than 320 columns of C a thread, or A's rows 4 KiB apart (K = 1024: twelve such rows
    share an L1 set) and more than one 32-wide sliver: a plain row-major A is then read in place
    by the AVX-512 pair tile (6 rows × two slivers). Its edges: M not a multiple of 6 (and of
    MC = 120), a last pair holding one sliver (352 = 11 × 32; 100) or a partial one (341 columns a
    thread), K = 1024 over several K blocks, A a row view of a wider buffer (row stride K + 24:
    1024 at K = 1000, the 4 KiB rule with a stride other than K), a reversed A, a column-strided
    one (packed), bias; 3 threads cut C into blocks of other widths (and rows, where M is large)."""
    import lorafuse

    before = lorafuse.get_num_threads()
    lorafuse.set_num_threads(threads)
    try:
        rng = np.random.default_rng(M)
        for K, N in [(1024, 352 * threads), (45, 341 * threads), (1100, 700), (1024, 100 * threads),
                     (1000, 100 * threads)]:
            for how_a in ("row", "wide", "reversed", "strided"):
                check(rng, M, K, N, how_a, "col", alpha=0.5 if how_a == "row" else 1.0, with_bias=True)
        check(rng, M, 777, 1000, "row", "row")
    finally:
        lorafuse.set_num_threads(before)


@pytest.mark.parametrize("which", ["a", "b"])
def test_broadcast_rows_are_read_as_rows(isa, which):
    """A row stride of 0 (np.broadcast_to): every row the same memory, read in place like any
    other stride — a regression test: the in-place tile once took lda = 0 to mean "packed" and
    read x broadcast over 40 rows past its single row (NaN or garbage)."""
    rng = np.random.default_rng(6)
    M, K, N = 40, 64, 48 if which == "b" else 700  # 700: the pair tile reads a broadcast row too
    a = np.broadcast_to(rand(rng, K), (M, K)) if which == "a" else rand(rng, M, K)
    b = np.broadcast_to(rand(rng, N), (K, N)) if which == "b" else rand(rng, K, N)
    c = ops.sgemm(a, b)
    assert_within(c, f64(a) @ f64(b), np.abs(f64(a)) @ np.abs(f64(b)), K, f"broadcast {which}")
    if which == "a":  # the same through the LoRA forward (x is the A-operand of y = x·Wᵀ)
        W, A, B = rand(rng, N, K), rand(rng, 4, K), rand(rng, N, 4)
        y, _ = ops.lora_forward(a, W, A, B, 0.5)
        ry, _, my, _ = forward(np.ascontiguousarray(a), W, A, B, 0.5)
        assert_within(y, ry, my, 2 * K + 8, "lora_forward, broadcast x")
