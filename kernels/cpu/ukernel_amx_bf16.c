/* ukernel_amx_bf16.c — the bf16 micro-kernel of the amx_bf16 level: a 32×32 block of C in four
 * 16×16 fp32 AMX tiles, over bf16 operands, by tdpbf16ps (AMX-BF16).
 *
 * Tiles (palette 1, each 16 rows × 64 bytes; loaded once per thread and GEMM by tiles_begin):
 *   0..3  C: rows 16u..16u+15, columns 16v..16v+15 of the block, tile 2u + v (fp32)
 *   4, 5  A: rows 0..15 and 16..31, one K step of 32 k (16 rows × 32 bf16, row-major)
 *   6, 7  B: columns 0..15 and 16..31, one K step: 16 rows of K-pairs × 16 columns ("VNNI")
 * Packed operands (gemm_pack.c, dp->k_pairs == 2), 32-bit slots each a pair of bf16 (k = 2pp low,
 * 2pp+1 high), K zero-padded to a multiple of 32 (16 pairs; lf_k_slots):
 *   ap[(st·32 + i)·16 + t] = (a(i, 2pp), a(i, 2pp+1))    bp[pp·32 + j] = (b(2pp, j), b(2pp+1, j))
 * with pp = 16·st + t: per K step st, A is two 1 KiB row-major tiles (row stride 64 bytes) and B
 * one 2 KiB block whose 128-byte rows hold both B tiles side by side (row stride 128 bytes).
 * Per step, tdpbf16ps does for the 16×16 fp32 elements (m, n) of C tile 2u + v
 *   c(m, n) += Σ_t a(16u+m, 2pp) · b(2pp, 16v+n) + a(16u+m, 2pp+1) · b(2pp+1, 16v+n)
 * (Intel's pseudo-code: bf16 products exact in fp32, each addition rounded to nearest even, bf16
 * denormal inputs read as 0 and denormal results flushed to 0 — MXCSR is not consulted — the
 * vdpbf16ps class: tests/tolerances.py bound_dpbf16). 32·32·32·2 = 65536 flops a step.
 *   c[i][j] (+)= Σ_st ap·bp  (+ bias[j] when !accumulate)    (lf_ukernel_fn, internal.h; kc counts k)
 * A whole 32×32 block loads C (accumulate) or the bias (a row stride of 0: every row the same 64
 * bytes) into the C tiles and stores them to C; an edge block goes through a 32×32 scratch, and
 * only its mr×nr corner is added to C (column masks, rows stop at mr). The GEMM's loop for this tile
 * is amx_block below (lf_dispatch.block_loop): each block of C runs a whole K block (≤ 4096) at once.
 * Built with -mamx-tile -mamx-bf16 -mavx512f (setup.py SOURCE_FLAGS) on x86-64, elsewhere a zero
 * table; chosen (gemm.c dispatch_of) only on the amx_bf16 level, which cpuid, XCR0 and the OS's
 * permission must grant (dispatch.c). */
#include "internal.h"

#if defined(__x86_64__)
#include <immintrin.h>

enum { MR = 32, NR = 32 };

/* LDTILECFG's 64-byte operand, palette 1 */
typedef struct {
    uint8_t palette, start_row, reserved[14];
    uint16_t colsb[16];
    uint8_t rows[16];
} tilecfg;

/* this thread's tiles 0..7 as above: 16 rows of 64 bytes each */
static void tiles_begin(void) {
    tilecfg cfg = {.palette = 1};
    for (int t = 0; t < 8; t++) {
        cfg.colsb[t] = 64;
        cfg.rows[t] = 16;
    }
    /* not _tile_loadconfig: GCC 12's declares an 8-byte memory operand, so the stores of colsb and
     * rows were removed as dead (ldtilecfg then faults on palette 1 with 0-byte tiles) */
    __asm__ volatile("ldtilecfg %0" ::"m"(cfg));
}

static void tiles_end(void) { _tile_release(); }

/* c (row stride ldc) = acc (32×32, row stride NR) + base, base = c itself (accumulate), bias[j] or
 * 0, on rows i < mr and columns j < nr */
static void add_edge(const float *acc, float *c, int64_t ldc, int64_t mr, int64_t nr, int accumulate,
                     const float *bias) {
    for (int v = 0; v < 2; v++) {
        const int64_t w = nr - 16 * v; /* columns of this half */
        if (w <= 0) break;
        const __mmask16 m = w >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << w) - 1u);
        const __m512 b = !accumulate && bias ? _mm512_maskz_loadu_ps(m, bias + 16 * v) : _mm512_setzero_ps();
        for (int64_t i = 0; i < mr; i++) {
            float *ci = c + i * ldc + 16 * v;
            const __m512 base = accumulate ? _mm512_maskz_loadu_ps(m, ci) : b;
            _mm512_mask_storeu_ps(ci, m, _mm512_add_ps(base, _mm512_load_ps(acc + i * NR + 16 * v)));
        }
    }
}

static void ukernel_amx_bf16(int64_t kc, const float *app, const float *bpp, float *c, int64_t ldc, int64_t mr,
                             int64_t nr, int accumulate, const float *bias) {
    const uint32_t *ap = (const uint32_t *)app; /* the packed slots: 32-bit pairs, not floats */
    const uint32_t *bp = (const uint32_t *)bpp;
    const int64_t nst = (kc + 31) / 32, cs = ldc * (int64_t)sizeof(float);
    const int whole = mr == MR && nr == NR;
    if (whole && accumulate) {
        _tile_loadd(0, c, cs);
        _tile_loadd(1, c + 16, cs);
        _tile_loadd(2, c + 16 * ldc, cs);
        _tile_loadd(3, c + 16 * ldc + 16, cs);
    } else if (whole && bias) {
        _tile_loadd(0, bias, 0);
        _tile_loadd(1, bias + 16, 0);
        _tile_loadd(2, bias, 0);
        _tile_loadd(3, bias + 16, 0);
    } else {
        _tile_zero(0);
        _tile_zero(1);
        _tile_zero(2);
        _tile_zero(3);
    }
    /* The block right of this one (the next call of amx_block's jr loop) is fetched meanwhile: its 32
     * rows of C (128 bytes each, ldc apart: out of the hardware prefetcher's reach) would otherwise be
     * waited for by that call's tile loads and stores. Spread over the steps, a few rows each.
     * (An address past C is harmless: prefetches do not fault; uintptr_t, as it is no pointer.) */
    const uintptr_t next = (uintptr_t)(c + NR);
    const int64_t rows_per_step = (MR + nst - 1) / nst;
    /* C tile 2u + v += A tile u · B tile v, per K step st < nst */
    for (int64_t st = 0; st < nst; st++) {
        const uint32_t *a = ap + st * MR * 16, *b = bp + st * 16 * NR;
        for (int64_t r = st * rows_per_step; r < (st + 1) * rows_per_step && r < MR; r++) {
            _mm_prefetch((const char *)(next + (uintptr_t)(r * cs)), _MM_HINT_T1);
            _mm_prefetch((const char *)(next + (uintptr_t)(r * cs) + 64), _MM_HINT_T1);
        }
        _tile_loadd(4, a, 64);
        _tile_loadd(6, b, NR * 4);
        _tile_loadd(5, a + 16 * 16, 64);
        _tile_loadd(7, b + 16, NR * 4);
        _tile_dpbf16ps(0, 4, 6);
        _tile_dpbf16ps(1, 4, 7);
        _tile_dpbf16ps(2, 5, 6);
        _tile_dpbf16ps(3, 5, 7);
    }
    if (whole) {
        _tile_stored(0, c, cs);
        _tile_stored(1, c + 16, cs);
        _tile_stored(2, c + 16 * ldc, cs);
        _tile_stored(3, c + 16 * ldc + 16, cs);
        return;
    }
    _Alignas(64) float acc[MR * NR];
    _tile_stored(0, acc, NR * 4);
    _tile_stored(1, acc + 16, NR * 4);
    _tile_stored(2, acc + 16 * NR, NR * 4);
    _tile_stored(3, acc + 16 * NR + 16, NR * 4);
    add_edge(acc, c, ldc, mr, nr, accumulate, bias);
}

static int64_t min64(int64_t x, int64_t y) { return x < y ? x : y; }

/* One thread's block C[m0:m1, n0:n1] (+)= A[m0:m1, :]·B[:, n0:n1] (lf_gemm_block), loops outermost
 * first ("brgemm" order: a C block stays in its tiles over a whole K block, read and written once):
 *   pc: K blocks, K cut into ceil(K/kc) equal ones (multiples of 32): C (+)= A[:, pc:pc+kcb]·B[pc:pc+kcb, :]
 *   ic: mc rows of A packed for the K block (pack_a_amx), once per (pc, ic)
 *   jc: nc columns of B packed for the K block (pack_b_pairs): the panel, nc·kcb·2 bytes, in L2
 *   ir: a 32-row sliver of A (32·kcb·2 bytes: from L3 on jr = 0, from L2 after)
 *   jr: a 32-column sliver of the panel: C[ir:ir+32, jr:jr+32] (+)= sliver·sliver, the tile over kcb
 * The first K block writes C (beta·C + bias), later ones accumulate. */
static int amx_block(const lf_gemm_block *g) {
    const lf_dispatch *dp = g->dp;
    const lf_blocking *bk = dp->blk;
    const int64_t K = g->K, nkb = (K + bk->kc - 1) / bk->kc;
    const int64_t kcu = ((K + nkb - 1) / nkb + 31) / 32 * 32; /* every K block's k but the last one's */
    const int64_t ksmax = lf_k_slots(dp, min64(kcu, K));
    const int64_t mcmax = lf_block_slivers(bk->mc, g->m1 - g->m0, MR);
    const int64_t ncmax = lf_block_slivers(bk->nc, g->n1 - g->n0, NR);
    float *apack = lf_pool_scratch(g->pool, g->tid, 0, (size_t)(mcmax * ksmax) * sizeof(float));
    float *bpack = lf_pool_scratch(g->pool, g->tid, 1, (size_t)(ncmax * ksmax) * sizeof(float));
    if (!apack || !bpack) return LF_ENOMEM;
    for (int64_t pc = 0; pc < K; pc += kcu) {
        const int64_t kc = min64(kcu, K - pc), ks = lf_k_slots(dp, kc);
        const int accumulate = pc > 0 || g->beta != 0.0f;
        const float *bias = accumulate ? NULL : g->bias;
        for (int64_t ic = g->m0; ic < g->m1; ic += bk->mc) {
            const int64_t mc = min64(bk->mc, g->m1 - ic);
            for (int64_t ir = 0; ir < mc; ir += MR)
                lf_pack_a_sliver(dp, g->a, ic + ir, min64(MR, mc - ir), 0, pc, kc, MR, apack + ir * ks);
            for (int64_t jc = g->n0; jc < g->n1; jc += bk->nc) {
                if (lf_interrupt_pending()) return LF_EINTR; /* every mc×kc×nc block: ~1 ms */
                const int64_t nc = min64(bk->nc, g->n1 - jc);
                lf_pack_b_panel(dp, g->b, jc, nc, pc, kc, NR, bpack);
                for (int64_t ir = 0; ir < mc; ir += MR)
                    for (int64_t jr = 0; jr < nc; jr += NR)
                        ukernel_amx_bf16(kc, apack + ir * ks, bpack + jr * ks, g->c + (ic + ir) * g->ldc + jc + jr,
                                         g->ldc, min64(MR, mc - ir), min64(NR, nc - jr), accumulate,
                                         bias ? bias + jc + jr : NULL);
            }
        }
    }
    return LF_OK;
}

const lf_dispatch lf_dispatch_amx_bf16 = {
    .isa = LF_ISA_AMX_BF16, .mr = MR, .nr = NR, .blk = &lf_tunables_amx_bf16.pairs,
    .ukernel = ukernel_amx_bf16, .widen = lf_widen_avx512, .k_pairs = 2,
    .transpose = lf_transpose16_avx512, .tb = 16, /* B's K-pairs of a column-contiguous b */
    .thread_begin = tiles_begin, .thread_end = tiles_end, .block_loop = amx_block,
};
#else
const lf_dispatch lf_dispatch_amx_bf16 = {0};
#endif
