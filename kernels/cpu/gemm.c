/* gemm.c — the packed GEMM core (Goto/BLIS loop order) that every LoRA kernel runs on.
 *
 *   C (M,N) = beta·C + a (M,K) · b (K,N)  (+ bias[j] when beta == 0)
 *
 * Loops, outermost first (BLIS names):
 *   jc: NC columns of C   — pack b[pc:pc+KC, jc:jc+NC] into NR-wide k-major slivers (L3)
 *   pc: KC of K           — a K block; the first one writes C, later ones accumulate
 *   ic: MC rows of C      — pack a[ic:ic+MC, pc:pc+KC] into MR-tall k-major slivers (L2)
 *   jb: NB columns of C   — a KC×NB sub-block of the panel (L2, beside the A block; nb 0: NB = NR)
 *   ir, jr                — the ISA micro-kernel on one MR×NR tile (registers); MR rows of A stay in L1
 *                           while their tiles run over the NB columns
 * Operands are read through lf_operand, so packing (gemm_pack.c) also concatenates two K segments
 * ("augmented K": [x | s·u]·[W | B]ᵀ in one GEMM), applies a per-segment scale, applies the
 * dropout mask, and adds a rank-r term to b (W + s·B·A for the inference forward) — none of
 * these need a pass of their own over memory. Row-major sources are packed by register
 * transposes (transpose.c); a plain row-major A is read in place, unpacked, when a thread has
 * few columns, by a 6-row tile over two slivers at once when it has many (how_a_is_read).
 *
 * bf16 x of 16–256 rows times a large bf16 Wᵀ runs transposed, Cᵀ = W·xᵀ (w_rows_in_place, its own loop
 * w_rows_block_run): W's rows are read in place by the bf16 pair tile (a 4-/8-bit W's rows dequantized block
 * by block into a scratch first) — never transposed into slivers, which stalled on W's loads from DRAM —
 * while x, a small operand, is packed once for all of K; each block of Cᵀ accumulates in a scratch and is
 * transposed into C once.
 *
 * Threads: C is cut into a tm×tn grid of blocks (tm·tn = threads), each thread runs the whole
 * loop nest on its block with its own packing buffers. The larger of M and N is split first,
 * because splitting M repeats the packing of b (K·N) and splitting N repeats that of a (M·K).
 */
#include <stdatomic.h>
#include <stdlib.h>
#include <string.h>

#include "internal.h"
#include "lorafuse/dropout_hash.h"
#include "lorafuse/quant.h"
#include "quant4_internal.h"

lf_operand lf_operand_plain(lf_view v, float scale) {
    lf_operand o;
    memset(&o, 0, sizeof o);
    o.seg[0].v = v;
    o.seg[0].scale = scale;
    o.nseg = 1;
    o.k_split = INT64_MAX;
    return o;
}

/* The kept panel of b at K block pc (length kc), columns from jc, when b was packed in advance
 * for this tile and the block lies wholly in the packed rows; else NULL (pack it now). Block
 * starts agree with lf_gemm's: both step K by dp->blk->kc from 0. */
static const float *cached_panel(const lf_packed_b *pk, const lf_dispatch *dp, int64_t jc, int64_t pc,
                                 int64_t kc) {
    if (!pk || pk->dp != dp || pc + kc > pk->K) return NULL;
    return pk->data + pc * pk->nsl * dp->nr + jc / dp->nr * dp->nr * kc;
}

typedef struct {
    lf_pool *pool;
    const lf_dispatch *dp;
    int64_t M, N, K;
    const lf_operand *a, *b;
    float beta;
    const float *bias;
    float *c;
    int64_t ldc;
    int w_rows; /* the transposed orientation (w_rows_in_place): a = W, b = xᵀ, C written by w_rows_block_run */
    int tm, tn;
    int64_t mchunk, nchunk;
    atomic_int failed;    /* 0, or the LF_E* status of a thread that could not do its block */
    atomic_int cancelled; /* set by a thread that saw lf_interrupt_pending() */
} gemm_job;

static int64_t min64(int64_t x, int64_t y) { return x < y ? x : y; }

static const lf_dispatch *dispatch_for(int64_t N);

/* How a K block of A is read (tunables: direct_a_max_cols, a_same_set_stride):
 *   A_PACKED        packed into MR-tall slivers (pack_a);
 *   A_IN_PLACE      read in place by the MR×NR tile, when a thread has few columns of C: packing
 *                   A would be amortised over few of them, while the tile reads a plain row-major
 *                   A just as well from its rows;
 *   A_IN_PLACE_PAIR read in place by the pair tile (pair_mr rows × two slivers), when a thread has
 *                   more columns (packing A is the cost this saves) or A's rows are a multiple of
 *                   4 KiB apart, where the MR×NR tile's rows fall in one L1 set and evict each
 *                   other on every k step. With one sliver of columns (the few-token forward: W,
 *                   streamed from DRAM, is A) the MR×NR tile stays ahead. */
typedef enum { A_PACKED, A_IN_PLACE, A_IN_PLACE_PAIR } a_read;

/* A_IN_PLACE* if the K block [pc, pc + kc) of A lies in a plain row-major segment 0 (x or g: no
 * scale, no dropout; any row stride, 0 for a broadcast row included) and the ISA has the tile */
static a_read how_a_is_read(const lf_dispatch *dp, const lf_operand *a, int64_t ncols, int64_t pc, int64_t kc) {
    const lf_segment *s = &a->seg[0];
    if (pc + kc > a->k_split || s->v.cs != 1 || s->scale != 1.0f || s->drop_threshold || !lf_seg_f32(s))
        return A_PACKED; /* a half or quantized A is widened (or paired) by packing, never read by the fp32 tiles */
    const lf_tunables *tu = lf_tune();
    const int rows_in_one_set = tu->a_same_set_stride && s->v.rs % tu->a_same_set_stride == 0 && ncols > dp->nr;
    if (dp->ukernel_pair && (ncols > tu->direct_a_max_cols || rows_in_one_set)) return A_IN_PLACE_PAIR;
    return dp->ukernel_direct && ncols <= tu->direct_a_max_cols ? A_IN_PLACE : A_PACKED;
}

int lf_gemm_reads_a_in_place(int64_t N) {
    const lf_dispatch *dp = dispatch_for(N);
    return dp->ukernel_direct && 2 * N <= lf_tune()->direct_max_half_slivers * (int64_t)dp->nr;
}


static void gemm_block_run(gemm_job *job, int tid);
static void w_rows_block_run(gemm_job *job, int tid);

/* one thread's block of C, between the ISA's per-thread set-up and release (AMX tile state) */
static void gemm_block(void *ctxp, int tid, int nt) {
    gemm_job *job = ctxp;
    if (nt != job->tm * job->tn) { /* the pool ran another grid than planned: say so, never skip blocks */
        atomic_store(&job->failed, LF_EINTERNAL);
        return;
    }
    if (job->dp->thread_begin) job->dp->thread_begin();
    if (job->dp->block_loop) {
        const int64_t ti = tid / job->tn, tj = tid % job->tn;
        const lf_gemm_block blk = {.pool = job->pool, .tid = tid, .dp = job->dp,
                                   .m0 = ti * job->mchunk, .m1 = min64(job->M, (ti + 1) * job->mchunk),
                                   .n0 = tj * job->nchunk, .n1 = min64(job->N, (tj + 1) * job->nchunk),
                                   .K = job->K, .a = job->a, .b = job->b, .beta = job->beta, .bias = job->bias,
                                   .c = job->c, .ldc = job->ldc};
        const int st = blk.m0 < blk.m1 && blk.n0 < blk.n1 ? job->dp->block_loop(&blk) : LF_OK;
        if (st == LF_EINTR) atomic_store(&job->cancelled, 1);
        else if (st) atomic_store(&job->failed, st);
    } else if (job->w_rows) {
        w_rows_block_run(job, tid);
    } else {
        gemm_block_run(job, tid);
    }
    if (job->dp->thread_end) job->dp->thread_end();
}

/* 1 if a thread packs B's panel sliver by sliver, each right before the tile runs over it (in L1/L2 then),
 * instead of the whole panel first (nc·kc pairs: spilled to L3 and read back): on the bf16 pair tile, for a
 * column-contiguous 16-bit b (Wᵀ, packed by register transposes) and a thread whose rows are one row block of
 * mc rows (block_rows), so each sliver is used once — the few-token forward, where packing W is most of the
 * time, and 256-token ones, where an 8 MB panel of it went to L3 and back. Zen 4, 2
 * threads, interleaved medians, 4096 × 4096: 12 tokens 3.9 → 2.9 ms, 24: 4.9 → 3.9, 64: 8.4 → 7.5; 24 × 4096
 * × 14336: 14.7 → 12.9 (torch 2.1, 2.9, 5.8, 10.3). Software prefetch of the next sliver's columns, issued
 * before the tile, made it slower. */
static int sliver_packing(const lf_dispatch *dp, const lf_operand *b, int64_t rows, int64_t mc) {
    const lf_segment *s = &b->seg[0];
    return dp->k_pairs == 1 && rows <= mc && b->nseg == 1 && s->v.rs == 1 && s->h && !s->qw;
}

/* The rows of a thread's A blocks (its mc): all of its rows at once on the bf16 pair tile when they are at most
 * tunables' pairs_one_block_rows, else the tile's blocking. K is cut the same either way, so a row's sums never
 * depend on how many rows its thread has. */
static int64_t block_rows(const lf_dispatch *dp, int64_t rows) {
    return dp->k_pairs == 1 && rows <= lf_tune()->pairs_one_block_rows ? rows : dp->blk->mc;
}

static void gemm_block_run(gemm_job *job, int tid) {
    const lf_dispatch *dp = job->dp;
    const int MR = dp->mr, NR = dp->nr;
    const int64_t ti = tid / job->tn, tj = tid % job->tn;
    const int64_t m0 = ti * job->mchunk, m1 = min64(job->M, m0 + job->mchunk);
    const int64_t n0 = tj * job->nchunk, n1 = min64(job->N, n0 + job->nchunk);
    if (m0 >= m1 || n0 >= n1) return;
    const int64_t MC = block_rows(dp, m1 - m0);
    const int64_t K = job->K;
    const lf_segment *a0 = &job->a->seg[0];
    const int64_t kcmax = min64(dp->blk->kc, K);
    const int64_t ncmax = lf_block_slivers(dp->blk->nc, n1 - n0, NR);
    const int64_t mcmax = lf_block_slivers(MC, m1 - m0, MR);
    const int64_t ksmax = lf_k_slots(dp, kcmax); /* 32-bit slots of a packed row or column */
    float *apack = lf_pool_scratch(job->pool, tid, 0, (size_t)(mcmax * ksmax) * sizeof(float));
    float *bpack = lf_pool_scratch(job->pool, tid, 1, (size_t)(ncmax * ksmax) * sizeof(float));
    if (!apack || !bpack) {
        atomic_store(&job->failed, LF_ENOMEM);
        return;
    }
    for (int64_t jc = n0; jc < n1; jc += dp->blk->nc) {
        const int64_t nc = min64(dp->blk->nc, n1 - jc);
        for (int64_t pc = 0; pc < K; pc += dp->blk->kc) {
            const int64_t kc = min64(dp->blk->kc, K - pc);
            const int first = pc == 0;
            const int64_t ks = lf_k_slots(dp, kc); /* 32-bit slots a packed row or column has */
            const a_read how = how_a_is_read(dp, job->a, n1 - n0, pc, kc);
            const float *bpanel = cached_panel(job->b->packed, dp, jc, pc, kc);
            const int by_sliver = !bpanel && sliver_packing(dp, job->b, m1 - m0, MC);
            if (!bpanel) {
                if (!by_sliver) lf_pack_b_panel(dp, job->b, jc, nc, pc, kc, NR, bpack);
                bpanel = bpack;
            }
            const int accumulate = !first || job->beta != 0.0f;
            /* tile rows and columns: MR×NR, or pair_mr × two slivers */
            const int64_t tr = how == A_IN_PLACE_PAIR ? dp->pair_mr : MR, tc = how == A_IN_PLACE_PAIR ? 2 * NR : NR;
            const int64_t nb = dp->blk->nb > tc ? dp->blk->nb / tc * tc : tc; /* the jb block: whole tiles */
            for (int64_t ic = m0; ic < m1; ic += MC) {
                if (lf_interrupt_pending()) { /* checked every MC×KC×NC block: ~1 ms */
                    atomic_store(&job->cancelled, 1);
                    return;
                }
                const int64_t mc = min64(MC, m1 - ic);
                if (how == A_PACKED)
                    for (int64_t ir = 0; ir < mc; ir += MR)
                        lf_pack_a_sliver(dp, job->a, ic + ir, min64(MR, mc - ir), min64(MR, mc - ir - MR), pc, kc, MR,
                               apack + ir * ks);
                for (int64_t jb = 0; jb < nc; jb += nb) {
                    const int64_t jend = min64(jb + nb, nc);
                    for (int64_t jr = jb; by_sliver && jr < jend; jr += NR)
                        lf_pack_b_panel(dp, job->b, jc + jr, min64(NR, nc - jr), pc, kc, NR, bpack + jr * ks);
                    for (int64_t ir = 0; ir < mc; ir += tr) {
                        const int64_t mr = min64(tr, mc - ir);
                        const float *arow = how == A_PACKED ? apack + ir * ks : a0->v.p + (ic + ir) * a0->v.rs + pc;
                        for (int64_t jr = jb; jr < jend; jr += tc) {
                            const int64_t nr = min64(tc, nc - jr);
                            const float *bias =
                                (first && job->beta == 0.0f && job->bias) ? job->bias + jc + jr : NULL;
                            const float *bp = bpanel + jr * ks;
                            float *ct = job->c + (ic + ir) * job->ldc + jc + jr;
                            if (how == A_PACKED)
                                dp->ukernel(kc, arow, bp, ct, job->ldc, mr, nr, accumulate, bias);
                            else if (how == A_IN_PLACE_PAIR)
                                dp->ukernel_pair(kc, arow, a0->v.rs, bp, NR * kc, ct, job->ldc, mr, nr, accumulate,
                                                 bias);
                            else
                                dp->ukernel_direct(kc, arow, a0->v.rs, bp, ct, job->ldc, mr, nr, accumulate, bias);
                        }
                    }
                }
            }
        }
    }
}

/* One thread's rows of W in the transposed orientation (w_rows_in_place): Cᵀ = W·xᵀ, W (M × K here, the
 * job's a) read in place by the pair tile, xᵀ (the job's b, N ≤ 256 columns) packed once for all of K. Each
 * block of MC rows of W accumulates its MC × N block of Cᵀ over all of K in a scratch, rows contiguous — the
 * tile's plain stores — and leaves it transposed into C once (with beta = 1, C's block is transposed in
 * first). K is cut where the x-rows orientation cuts it, and every sum is formed in its order: the same bits. */
static void w_rows_block_run(gemm_job *job, int tid) {
    const lf_dispatch *dp = job->dp;
    const int NR = dp->nr, TR = dp->pair_mr, TC = 2 * NR;
    const int64_t m0 = tid * job->mchunk, m1 = min64(job->M, m0 + job->mchunk), N = job->N, K = job->K;
    if (m0 >= m1) return;
    const int64_t KC = dp->blk->kc, MC = dp->blk->mc, kcmax = min64(KC, K), ksmax = lf_k_slots(dp, kcmax);
    const int64_t nsl = lf_block_slivers(N, N, NR) / NR, nkb = (K + KC - 1) / KC, panel = nsl * NR * ksmax;
    const int64_t ldt = nsl * NR;
    float *xpack = lf_pool_scratch(job->pool, tid, 1, (size_t)(panel * nkb) * sizeof(float));
    float *ct = lf_pool_scratch(job->pool, tid, 0, (size_t)(MC * ldt) * sizeof(float));
    const lf_segment *w = &job->a->seg[0];
    /* a 4-bit W: a block's rows dequantized (to bf16, as packing would) into rows of kc, lda kc */
    uint16_t *wq = w->qw ? (uint16_t *)lf_pool_scratch(job->pool, tid, 2, (size_t)(MC * kcmax) * sizeof(uint16_t)) : NULL;
    if (!xpack || !ct || (w->qw && !wq)) {
        atomic_store(&job->failed, LF_ENOMEM);
        return;
    }
    for (int64_t pc = 0; pc < K; pc += KC) /* K block pc at xpack + (pc / KC)·panel */
        lf_pack_b_panel(dp, job->b, 0, N, pc, min64(KC, K - pc), NR, xpack + pc / KC * panel);
    for (int64_t ic = m0; ic < m1; ic += MC) {
        if (lf_interrupt_pending()) {
            atomic_store(&job->cancelled, 1);
            return;
        }
        const int64_t mc = min64(MC, m1 - ic);
        if (job->beta != 0.0f) lf_transpose_f32(job->c + ic, job->ldc, N, mc, 1.0f, ct, ldt);
        for (int64_t pc = 0; pc < K; pc += KC) {
            const int64_t kc = min64(KC, K - pc), ks = lf_k_slots(dp, kc);
            const int accumulate = pc > 0 || job->beta != 0.0f;
            const float *bias = pc == 0 && job->beta == 0.0f && job->bias ? job->bias + ic : NULL;
            for (int64_t i = 0; wq && i < mc; i++) lf_qweight_span(w->qw, (ic + i) * w->v.rs + pc, kc, w->dtype, wq + i * kc);
            const uint16_t *wrows = wq ? wq : w->h + ic * w->v.rs + pc; /* row i at wrows + i·lda */
            const int64_t lda = wq ? kc : w->v.rs;
            for (int64_t jr = 0; jr < N; jr += TC) {
                const float *bp = xpack + pc / KC * panel + jr * ks;
                for (int64_t ir = 0; ir < mc; ir += TR)
                    dp->ukernel_pair(kc, (const float *)(wrows + ir * lda), lda, bp, NR * ks, ct + ir * ldt + jr, ldt,
                                     min64(TR, mc - ir), min64(TC, N - jr), accumulate, bias ? bias + ir : NULL);
            }
        }
        lf_transpose_f32(ct, ldt, mc, N, 1.0f, job->c + ic, job->ldc);
    }
}

/* tm×tn = nt grid minimising the largest block, never cutting finer than one tile. */
static void choose_grid(int64_t M, int64_t N, int nt, int MR, int NR, int *tm, int *tn) {
    const int64_t mtiles = (M + MR - 1) / MR, ntiles = (N + NR - 1) / NR;
    int64_t best = INT64_MAX;
    *tm = 1;
    *tn = 1;
    for (int i = 1; i <= nt; i++) {
        if (nt % i) continue;
        const int j = nt / i;
        if (i > mtiles || j > ntiles) continue;
        const int64_t rows = (mtiles + i - 1) / i * MR, cols = (ntiles + j - 1) / j * NR;
        const int64_t area = rows * cols;
        /* on a tie, split the larger dimension (repeats the packing of the smaller operand) */
        if (area < best || (area == best && ((M >= N) ? i > *tm : j > *tn))) {
            best = area;
            *tm = i;
            *tn = j;
        }
    }
}

/* the micro-kernel for N columns: the narrow tile when N fits it (the rank-r GEMMs) */
static const lf_dispatch *dispatch_for(int64_t N) {
    const lf_dispatch *dp = lf_current();
    return dp->narrow && N <= dp->narrow->nr ? dp->narrow : dp;
}

/* 1 if every segment of o is bf16 (16-bit bits, or quantized codes rounded to bf16), at scale 1, without
 * dropout (the bf16 tile multiplies the bits as they are) */
static int plain_bf16(const lf_operand *o) {
    return o->nseg == 1 && o->seg[0].dtype == LF_DT_BF16 && o->seg[0].scale == 1.0f && !o->seg[0].drop_threshold;
}

int lf_gemm_half_tile(lf_dtype dt) { return dt == LF_DT_BF16 && lf_get_isa() >= LF_ISA_AVX512_BF16; }

/* The tile of a GEMM: two plain bf16 operands take the bf16 pair tile on avx512_bf16, the AMX tile
 * on amx_bf16 (lf_gemm_half_tile); everything else dispatch_for(N) (half operands widened to fp32 while packing). */
static const lf_dispatch *dispatch_of(const lf_operand *a, const lf_operand *b, int64_t N) {
    if (plain_bf16(a) && plain_bf16(b) && lf_gemm_half_tile(LF_DT_BF16))
        return lf_get_isa() == LF_ISA_AMX_BF16 ? &lf_dispatch_amx_bf16 : &lf_dispatch_avx512_bf16;
    return dispatch_for(N);
}

/* 1 if C = x·Wᵀ (dispatched to dp by dispatch_of) runs as Cᵀ = W·xᵀ on the bf16 pair tile: W's rows read in place
 * (no transposes of W), x (≤ 256 rows, packed) the columns. The bf16 pair tile's dispatch means two plain bf16
 * operands (one segment, scale 1, no dropout; check_segments refuses addends and kept panels on them); beyond
 * that x must be 16-bit bits with rows contiguous, b = Wᵀ column-contiguous (bf16, or quantized: its rows
 * dequantized block by block into a scratch the tile reads in place), K even (pairs whole). */
static int w_rows_in_place(const lf_dispatch *dp, int64_t M, int64_t N, int64_t K, const lf_operand *a,
                           const lf_operand *b) {
    const lf_tunables *tu = lf_tune();
    if (!dp->ukernel_pair || dp->k_pairs != 1 || M < tu->w_in_place_min_n || M > tu->w_in_place_max_n || K % 2 ||
        (double)K * (double)N < tu->w_in_place_min_w)
        return 0;
    return a->seg[0].h && a->seg[0].v.cs == 1 && b->seg[0].v.rs == 1;
}

/* 1 if every element i·rs + j·cs (i < d0, j < d1) of a quantized segment's view lies in its weight's
 * [0, rows·cols), without overflow (a stride may be negative only along an extent of 1) */
static int q4_extent_ok(const lf_segment *s, int64_t d0, int64_t d1) {
    if (d0 <= 0 || d1 <= 0) return 1;
    const int64_t n = s->qw->rows * s->qw->cols; /* fits: lf_qweight_unfit checked it */
    int64_t last0 = 0, last1 = 0;
    if (d0 > 1 && (s->v.rs < 0 || !lf_mul_ok(d0 - 1, s->v.rs, &last0))) return 0;
    if (d1 > 1 && (s->v.cs < 0 || !lf_mul_ok(d1 - 1, s->v.cs, &last1))) return 0;
    return last0 < n && last1 < n - last0;
}

/* LF_EINVAL if a half or quantized segment asks for what only fp32 segments do: a low-rank addend, kept
 * panels (a 4-bit one also dropout); a dtype lf_dtype does not name; a 16-bit segment without its
 * bits; a 4-bit one whose weight lf_qweight_unfit refuses or whose view reaches outside it. o is (d, K)
 * (an A-operand, d = M) or, b_side, (K, d) (d = N); segment t spans its K range (dropout on a half
 * segment: widened, then masked). */
static int check_segments(const lf_operand *o, int64_t d, int64_t K, int b_side) {
    for (int t = 0; t < o->nseg; t++) {
        const lf_segment *s = &o->seg[t];
        if (s->dtype != LF_DT_F32 && s->dtype != LF_DT_BF16 && s->dtype != LF_DT_F16) return LF_EINVAL;
        if (!lf_seg_f32(s) && (o->add || o->packed)) return LF_EINVAL;
        if (s->dtype != LF_DT_F32 && !s->qw && !s->h) return LF_EINVAL;
        if (!s->qw) continue;
        const int64_t k0 = t == 0 ? 0 : o->k_split, k1 = t == 0 && o->nseg > 1 ? o->k_split : K;
        const int64_t kt = (k1 < K ? k1 : K) - k0; /* its K extent (≤ 0: none) */
        if (s->drop_threshold || lf_qweight_unfit(s->qw) || !q4_extent_ok(s, b_side ? kt : d, b_side ? d : kt))
            return LF_EINVAL;
    }
    return LF_OK;
}

int lf_gemm_row_splits(lf_pool *pool, int64_t M, int64_t N, int64_t K) {
    const lf_dispatch *dp = dispatch_for(N);
    int tm, tn;
    choose_grid(M, N, lf_threads_for(pool, 2.0 * (double)M * (double)N * (double)K, INT64_MAX), dp->mr, dp->nr, &tm, &tn);
    return tm;
}

int lf_gemm(lf_pool *pool, int64_t M, int64_t N, int64_t K, const lf_operand *a,
            const lf_operand *b, float beta, const float *bias, float *c, int64_t ldc) {
    if (!pool || M < 0 || N < 0 || K < 0 || (beta != 0.0f && beta != 1.0f)) return LF_EINVAL;
    if (check_segments(a, M, K, 0) || check_segments(b, N, K, 1)) return LF_EINVAL;
    if (M == 0 || N == 0) return LF_OK;
    if (!c || ldc < N) return LF_EINVAL;
    if (K == 0) { /* empty sum: C = beta·C + bias */
        if (beta == 0.0f)
            for (int64_t i = 0; i < M; i++)
                for (int64_t j = 0; j < N; j++) c[i * ldc + j] = bias ? bias[j] : 0.0f;
        return LF_OK;
    }
    int64_t mn, flops;
    if (!lf_mul_ok(M, N, &mn) || !lf_mul_ok(mn, K, &flops) || !lf_mul_ok(flops, 2, &flops))
        return LF_EOVERFLOW;
    const lf_dispatch *dp = dispatch_of(a, b, N);
    if (b->packed && (b->packed->N != N || b->packed->K != (b->nseg > 1 ? b->k_split : K) || b->add))
        return LF_EINVAL;
    gemm_job job = {.pool = pool, .dp = dp, .M = M, .N = N, .K = K, .a = a, .b = b,
                    .beta = beta, .bias = bias, .c = c, .ldc = ldc};
    lf_operand wa, xb;
    if (w_rows_in_place(dp, M, N, K, a, b)) { /* Cᵀ = W·xᵀ: W's rows read in place, xᵀ packed */
        wa = *b;
        wa.seg[0].v = (lf_view){NULL, b->seg[0].v.cs, 1};
        xb = *a;
        xb.seg[0].v = (lf_view){NULL, 1, a->seg[0].v.rs};
        job.a = &wa;
        job.b = &xb;
        job.M = N;
        job.N = M;
        job.w_rows = 1;
        M = job.M;
        N = job.N;
    }
    int nt = lf_threads_for(pool, (double)flops, INT64_MAX);
    const int tr = job.w_rows ? dp->pair_mr : dp->mr, tc = job.w_rows ? 2 * dp->nr : dp->nr; /* the tile */
    choose_grid(M, job.w_rows ? 1 : N, nt, tr, tc, &job.tm, &job.tn); /* Cᵀ: W's rows split, never x's (W read once) */
    nt = job.tm * job.tn;
    job.mchunk = ((M + tr - 1) / tr + job.tm - 1) / job.tm * tr;
    job.nchunk = ((N + tc - 1) / tc + job.tn - 1) / job.tn * tc;
    lf_pool_run(pool, nt, gemm_block, &job);
    if (atomic_load(&job.cancelled)) return LF_EINTR;
    return atomic_load(&job.failed); /* LF_OK (0) or a thread's status */
}

int lf_pack_b(lf_view b, int64_t K, int64_t N, lf_packed_b **out) {
    *out = NULL;
    if (K < 0 || N < 0) return LF_EINVAL;
    const lf_dispatch *dp = dispatch_for(N);
    const int64_t nsl = (N + dp->nr - 1) / dp->nr;
    int64_t n;
    if (!lf_mul_ok(nsl, dp->nr, &n) || !lf_mul_ok(n, K, &n) || !lf_mul_ok(n, (int64_t)sizeof(float), &n))
        return LF_EOVERFLOW;
    const size_t bytes = ((size_t)n + 63) / 64 * 64;
    lf_packed_b *pk = malloc(sizeof *pk);
    float *data = bytes ? aligned_alloc(64, bytes) : NULL;
    if (!pk || (bytes && !data)) {
        free(pk);
        free(data);
        return LF_ENOMEM;
    }
    *pk = (lf_packed_b){.dp = dp, .K = K, .N = N, .nsl = nsl, .src = b, .data = data, .bytes = bytes};
    const lf_operand ob = lf_operand_plain(b, 1.0f);
    for (int64_t pc = 0; pc < K && N > 0; pc += dp->blk->kc) /* block pc at data + pc·nsl·NR */
        lf_pack_b_panel(dp, &ob, 0, N, pc, min64(dp->blk->kc, K - pc), dp->nr, data + pc * nsl * dp->nr);
    *out = pk;
    return LF_OK;
}

void lf_packed_weight_free(lf_packed_b *pk) {
    if (!pk) return;
    free(pk->data);
    free(pk);
}

size_t lf_packed_weight_bytes(const lf_packed_b *pk) { return pk ? pk->bytes : 0; }

lf_operand lf_operand_typed(lf_tview t, float scale) {
    const int f32 = t.dtype == LF_DT_F32 && !t.qw;
    lf_operand o = lf_operand_plain((lf_view){f32 ? t.p : NULL, t.rs, t.cs}, scale);
    o.seg[0].dtype = t.dtype;
    o.seg[0].qw = t.qw;
    if (!f32 && !t.qw) o.seg[0].h = t.p;
    return o;
}

lf_operand lf_operand_dropped(lf_tview x, float scale, float p, uint64_t seed) {
    lf_operand o = lf_operand_typed(x, p > 0.0f ? scale / (1.0f - p) : scale);
    o.seg[0].drop_threshold = p > 0.0f ? lf_dropout_threshold(p) : 0u;
    o.seg[0].seed = seed;
    return o;
}

lf_operand lf_operand_concat(lf_tview a, float sa, lf_tview b, float sb, int64_t k_split) {
    lf_operand o = lf_operand_typed(a, sa);
    o.seg[1] = lf_operand_typed(b, sb).seg[0];
    o.nseg = 2;
    o.k_split = k_split;
    return o;
}

int lf_hgemm(lf_pool *pool, int64_t M, int64_t N, int64_t K, float alpha, lf_tview a, lf_tview b, float beta,
             const float *bias, float *c, int64_t ldc) {
    const lf_operand oa = lf_operand_typed(a, alpha), ob = lf_operand_typed(b, 1.0f);
    return lf_gemm(pool, M, N, K, &oa, &ob, beta, bias, c, ldc);
}

int lf_hgemm_w_rows(int64_t M, int64_t N, int64_t K, float alpha, lf_tview a, lf_tview b) {
    const lf_operand oa = lf_operand_typed(a, alpha), ob = lf_operand_typed(b, 1.0f);
    return w_rows_in_place(dispatch_of(&oa, &ob, N), M, N, K, &oa, &ob);
}

const char *lf_hgemm_path(float alpha, lf_tview a, lf_tview b) {
    const lf_operand oa = lf_operand_typed(a, alpha), ob = lf_operand_typed(b, 1.0f);
    const lf_dispatch *dp = dispatch_of(&oa, &ob, 1);
    return dp == &lf_dispatch_amx_bf16 ? "amx_bf16" : dp == &lf_dispatch_avx512_bf16 ? "bf16_pairs" : "widened";
}

int lf_sgemm(lf_pool *pool, int64_t M, int64_t N, int64_t K, float alpha, lf_view a, lf_view b,
             float beta, const float *bias, float *c, int64_t ldc) {
    const lf_operand oa = lf_operand_plain(a, alpha), ob = lf_operand_plain(b, 1.0f);
    return lf_gemm(pool, M, N, K, &oa, &ob, beta, bias, c, ldc);
}
