/* gemm_pack.c — the packing of lf_gemm's operands (gemm.c): A into MR-tall k-major slivers, B into
 * NR-wide k-major slivers, reading each operand through lf_operand (internal.h): two K segments
 * concatenated, a per-segment scale, the dropout mask, a rank-r addend to b — none of these need
 * a pass of their own over memory. Row-major sources are packed by register transposes
 * (transpose.c). bf16 / fp16 segments are widened to fp32 as they are read (dp->widen), or, for
 * the bf16 tiles, packed as bf16 K-pairs (pack_*_pairs; AMX: pack_a_amx, pack_b_pairs).
 * Quantized (4-bit or 8-bit) segments (lf_segment.qw) are dequantized here, a memory-contiguous run at a
 * time (lf_qweight_span's SIMD runs) into a small stack buffer, rounded to the segment's dtype, then widened
 * or paired like a 16-bit segment; element by element only where neither stride is 1.
 */
#include <string.h>

#include "internal.h"
#include "lorafuse/dropout_hash.h"
#include "quant4_internal.h"

/* quantized segments on the bf16 tiles: runs are decoded Q4_CHUNK elements (even: K-pairs never straddle
 * two) at a time, Q4_COLS columns of a column-contiguous b at once (a multiple of every dp->tb that
 * divides the tiles' NR, so whole column blocks reach the register transposes): a 16 KiB block. */
enum { Q4_CHUNK = 512, Q4_COLS = 16 };

static int64_t min64(int64_t x, int64_t y) { return x < y ? x : y; }

/* K range [lo, hi) of segment t, intersected with [p0, p0+kc); returns segment start in K. */
static int64_t seg_range(const lf_operand *o, int t, int64_t p0, int64_t kc, int64_t *lo,
                         int64_t *hi) {
    const int64_t begin = t == 0 ? 0 : o->k_split;
    const int64_t end = (t == 0 && o->nseg > 1) ? o->k_split : INT64_MAX;
    *lo = p0 > begin ? p0 : begin;
    *hi = (p0 + kc) < end ? (p0 + kc) : end;
    return begin;
}

/* element off of a quantized segment as fp32: dequantized, rounded to its dtype, widened (exactly) */
static float q4_value(const lf_segment *s, int64_t off) {
    float f;
    uint16_t h;
    lf_qweight_span(s->qw, off, 1, s->dtype, s->dtype == LF_DT_F32 ? (void *)&f : (void *)&h);
    return s->dtype == LF_DT_F32 ? f : lf_half_to_f32(s->dtype, h);
}

/* value of the segment at memory offset off (widened if half or quantized, scale, then dropout mask) */
static inline float seg_value(const lf_segment *s, int64_t off) {
    const float w = lf_seg_f32(s) ? s->v.p[off] : s->qw ? q4_value(s, off) : lf_half_to_f32(s->dtype, s->h[off]);
    const float v = w * s->scale;
    if (s->drop_threshold && !lf_dropout_keep(s->seed, (uint64_t)off, s->drop_threshold))
        return 0.0f;
    return v;
}

/* dst[q·ld + i] = scale · src[i·rs + q] for i < rows, q < len: rows of a row-major source packed
 * k-major — whole TB×TB blocks through the ISA's register transpose, the edges element by
 * element (the same product, so the same rounding).
 * Each block also prefetches (to L2) the same block of the next sliver's rows, the `next_rows`
 * rows at src + next (next_rows = 0: none): a cold operand (W streamed from DRAM) is read 32 rows
 * at a time, too many streams for the hardware prefetcher (benchmarks/RESULTS.md, "Where the
 * thresholds come from"). */
static void pack_rows(const lf_dispatch *dp, const float *src, int64_t rs, int64_t rows, int64_t len, float scale,
                      float *dst, int64_t ld, int64_t next, int64_t next_rows) {
    int64_t q0 = 0;
    const int tb = dp->tb;
    if (dp->transpose)
        for (; q0 + tb <= len; q0 += tb)
            for (int64_t i = 0; i < rows; i += tb) {
                for (int64_t t = i; t < i + tb && t < next_rows; t++)
                    __builtin_prefetch(src + next + t * rs + q0, 0, 2);
                dp->transpose(src + i * rs + q0, rs, rows - i < tb ? (int)(rows - i) : tb, scale, dst + q0 * ld + i,
                              ld);
            }
    for (int64_t i = 0; i < rows; i++)
        for (int64_t q = q0; q < len; q++) dst[q * ld + i] = src[i * rs + q] * scale;
}

/* dst[j] = segment s at offsets off + j, j < n ≤ LF_MAX_KC (a contiguous run of its memory): masked,
 * widened or scaled by the ISA's span kernels; a 4-bit run dequantized by lf_qweight_span to the segment's
 * dtype (fp32 into dst; bf16 / fp16 bits into a stack run, then widened exactly), then scaled */
static void seg_span(const lf_dispatch *dp, const lf_segment *s, int64_t off, int64_t n, float *dst) {
    if (s->qw && s->dtype == LF_DT_F32) {
        lf_qweight_span(s->qw, off, n, LF_DT_F32, dst);
        if (s->scale != 1.0f)
            for (int64_t j = 0; j < n; j++) dst[j] *= s->scale;
    } else if (s->qw) {
        uint16_t bits[LF_MAX_KC];
        lf_qweight_span(s->qw, off, n, s->dtype, bits);
        dp->widen(bits, n, s->dtype, s->scale, dst);
    } else if (s->dtype != LF_DT_F32 && s->drop_threshold) { /* half x̃: widened exactly, then masked and scaled */
        dp->widen(s->h + off, n, s->dtype, 1.0f, dst);
        lf_skinny_current()->dropout_span(dst, n, (uint64_t)off, s->seed, s->drop_threshold, s->scale, dst);
    } else if (s->dtype != LF_DT_F32)
        dp->widen(s->h + off, n, s->dtype, s->scale, dst);
    else if (s->drop_threshold)
        lf_skinny_current()->dropout_span(s->v.p + off, n, (uint64_t)off, s->seed, s->drop_threshold, s->scale, dst);
    else
        for (int64_t j = 0; j < n; j++) dst[j] = s->v.p[off + j] * s->scale;
}

/* dst[q·ld + i] = segment s at offset off + i·stride + q, for i < runs, q < len: `runs` contiguous
 * runs of memory (rows of x̃ or of a half A, columns of a half or quantized Wᵀ), made fp32 (seg_span)
 * RUN_CHUNK at a time for up to RUN_ROWS runs at once into a row-major stack block (16 KiB), which
 * pack_rows then stores k-major (the ISA's register transposes) */
enum { RUN_ROWS = 16, RUN_CHUNK = 256 };
static void pack_runs(const lf_dispatch *dp, const lf_segment *s, int64_t off, int64_t stride, int64_t runs,
                      int64_t len, float *dst, int64_t ld) {
    float blk[RUN_ROWS * RUN_CHUNK];
    for (int64_t i0 = 0; i0 < runs; i0 += RUN_ROWS)
        for (int64_t q0 = 0; q0 < len; q0 += RUN_CHUNK) {
            const int64_t rows = min64(RUN_ROWS, runs - i0), n = min64(RUN_CHUNK, len - q0);
            for (int64_t i = 0; i < rows; i++) seg_span(dp, s, off + (i0 + i) * stride + q0, n, blk + i * RUN_CHUNK);
            pack_rows(dp, blk, RUN_CHUNK, rows, n, 1.0f, dst + q0 * ld + i0, ld, 0, 0);
        }
}

/* ---- bf16 K-pairs, for the bf16 tile (dp->k_pairs): slot pp of a packed row (A) or column (B)
 * holds element 2pp of the K block in its low 16 bits and element 2pp+1 in its high 16 bits —
 * the order vdpbf16ps multiplies them in — and 0 for an element past kc (odd K) or a row or
 * column past the operand's edge. Segment 0 alone (lf_gemm takes this tile for one segment). */

/* the pair of bf16 bits at h[off] and h[off + step]; the second is 0 unless `both` */
static inline uint32_t pair_at(const uint16_t *h, int64_t off, int64_t step, int both) {
    return (uint32_t)h[off] | (both ? (uint32_t)h[off + step] << 16 : 0u);
}

/* The n 16-bit elements of segment s at offsets off + t·step, t < n, for the pair tiles: in place
 * (s->h; *stride = step), or a quantized segment's dequantized to bf16 bits into buf (n ≤ its length;
 * *stride = 1): one lf_qweight_span run when step == 1, element by element otherwise. */
static const uint16_t *bits_of(const lf_segment *s, int64_t off, int64_t step, int64_t n, uint16_t *buf,
                               int64_t *stride) {
    if (!s->qw) {
        *stride = step;
        return s->h + off;
    }
    *stride = 1;
    if (step == 1)
        lf_qweight_span(s->qw, off, n, s->dtype, buf);
    else
        for (int64_t t = 0; t < n; t++) lf_qweight_span(s->qw, off + t * step, 1, s->dtype, buf + t);
    return buf;
}

/* AMX A (dp->k_pairs == 2): MR/16 row-major tiles of 16 rows × 32 k per K step st of 32,
 *     dst[(st·MR + i)·16 + t] = pair (a(i0+i, p0+2pp), a(i0+i, p0+2pp+1)),  pp = 16·st + t,
 * for st < ceil(kc/32), i < MR; 0 for a row past mr or a k past kc. */
static void pack_a_amx(const lf_segment *s, int64_t i0, int64_t mr, int64_t p0, int64_t kc, int MR, uint32_t *dst) {
    const int64_t nst = (kc + 31) / 32, rs = s->v.rs, cs = s->v.cs;
    uint16_t buf[32];
    for (int64_t i = 0; i < MR; i++)
        for (int64_t st = 0; st < nst; st++) {
            uint16_t *d = (uint16_t *)(dst + (st * MR + i) * 16);
            const int64_t k0 = 32 * st, n = i >= mr ? 0 : min64(kc - k0, 32); /* 0 ≤ n ≤ 32: k0 < kc */
            if (n > 0) {
                int64_t stride;
                const uint16_t *src = bits_of(s, (i0 + i) * rs + (p0 + k0) * cs, cs, n, buf, &stride);
                if (stride == 1)
                    memcpy(d, src, (size_t)n * sizeof(uint16_t));
                else
                    for (int64_t q = 0; q < n; q++) d[q] = src[q * stride];
            }
            for (int64_t q = n; q < 32; q++) d[q] = 0;
        }
}

/* The K-pairs of n k of the panel's columns jlo + j, j < w, of a column-contiguous b, column j's n
 * bf16 at src + j·cs: pair pp of panel column c to dst[c/NR·NR·ld + pp·NR + c%NR] (pack_b_pairs'
 * layout), the last one half zero for an odd n. The pairs are whole 32-bit words, so TB×TB blocks of
 * them (TB columns × TB pairs) go through the ISA's register transpose (dp->transpose: shuffles only,
 * at scale 1 no arithmetic, so every bit pattern is kept) when cs is even (jlo: a multiple of TB), the
 * rest column by column. Column block outer: its TB columns are read as TB sequential streams (the
 * prefetcher follows them), not w streams advanced TB pairs at a time. */
static void pairs_of_columns(const lf_dispatch *dp, const uint16_t *src, int64_t cs, int64_t jlo, int64_t w,
                             int64_t n, int NR, int64_t ld, uint32_t *dst) {
    const int64_t tb = dp->transpose && cs % 2 == 0 ? dp->tb : 0; /* NR a multiple of it, or w ≤ NR (A's rows) */
    const int64_t pq = tb ? n / 2 / tb * tb : 0; /* pairs [0, pq) of every column done by blocks */
    for (int64_t j = 0; tb && j < w; j += tb)
        for (int64_t p = 0; p < pq; p += tb) {
            const int64_t c = jlo + j;
            dp->transpose((const float *)(src + j * cs + 2 * p), cs / 2, (int)min64(w - j, tb), 1.0f,
                          (float *)(dst + c / NR * NR * ld + p * NR + c % NR), NR);
        }
    for (int64_t j = 0; j < w; j++) {
        const uint16_t *col = src + j * cs;
        uint32_t *d = dst + (jlo + j) / NR * NR * ld + (jlo + j) % NR;
        int64_t pp = pq;
        for (; pp < n / 2; pp++) memcpy(d + pp * NR, col + 2 * pp, sizeof(uint32_t));
        if (n % 2) d[pp * NR] = col[2 * pp];
    }
}

/* dst[pp·MR + i] = pair (a(i0+i, p0+2pp), a(i0+i, p0+2pp+1)) for i < MR (0 past mr), pp < ceil(kc/2): plain
 * 16-bit rows (cs 1) are laid out as W's columns are, so pairs_of_columns packs them (register transposes of MR
 * rows × TB pairs); any other a row by row, each read Q4_CHUNK k at a time (bits_of) */
static void pack_a_pairs(const lf_dispatch *dp, const lf_segment *s, int64_t i0, int64_t mr, int64_t p0, int64_t kc,
                         int MR, uint32_t *dst) {
    const int64_t np = (kc + 1) / 2, rs = s->v.rs, cs = s->v.cs;
    for (int64_t i = mr; i < MR; i++) /* the rows past mr */
        for (int64_t pp = 0; pp < np; pp++) dst[pp * MR + i] = 0u;
    if (s->h && !s->qw && cs == 1) {
        pairs_of_columns(dp, s->h + i0 * rs + p0, rs, 0, mr, kc, MR, np, dst);
        return;
    }
    uint16_t buf[Q4_CHUNK];
    for (int64_t i = 0; i < mr; i++)
        for (int64_t k0 = 0; k0 < kc; k0 += Q4_CHUNK) {
            const int64_t n = min64(Q4_CHUNK, kc - k0);
            int64_t st;
            const uint16_t *row = bits_of(s, (i0 + i) * rs + (p0 + k0) * cs, cs, n, buf, &st);
            uint32_t *d = dst + k0 / 2 * MR + i;
            int64_t pp = 0;
            if (st == 1) /* the row's pairs are whole 32-bit words of memory (perhaps unaligned) */
                for (; pp < n / 2; pp++) memcpy(d + pp * MR, row + 2 * pp, sizeof(uint32_t));
            for (; pp < (n + 1) / 2; pp++) d[pp * MR] = pair_at(row, 2 * pp * st, st, 2 * pp + 1 < n);
        }
}

/* dst[q·NR·ld + pp·NR + j] = pair (b(p0+2pp, j0+q·NR+j), b(p0+2pp+1, j0+q·NR+j)) for pp < np =
 * ceil(kc/2), 0 for np ≤ pp < ld (ld = lf_k_slots: AMX pads K to 32) and past nc, for every sliver
 * q of the nc columns. Column-contiguous b (Wᵀ): pairs_of_columns, on the columns in place, or (quantized)
 * on Q4_COLS columns × Q4_CHUNK k at a time dequantized into a stack block; else pair row by pair row,
 * Q4_CHUNK columns at a time (bits_of: contiguous when b is row-major). */
static void pack_b_pairs(const lf_dispatch *dp, const lf_segment *s, int64_t j0, int64_t nc, int64_t p0, int64_t kc,
                         int NR, int64_t ld, uint32_t *dst) {
    const int64_t np = (kc + 1) / 2, rs = s->v.rs, cs = s->v.cs, ncp = (nc + NR - 1) / NR * NR;
    for (int64_t j = nc; j < ncp; j++) /* the last sliver's missing columns */
        for (int64_t pp = 0; pp < np; pp++) dst[j / NR * NR * ld + pp * NR + j % NR] = 0u;
    for (int64_t q = 0; q < ncp / NR && np < ld; q++) /* the rows past K in each sliver */
        memset(dst + q * NR * ld + np * NR, 0, (size_t)((ld - np) * NR) * sizeof(uint32_t));
    uint16_t buf[Q4_COLS * Q4_CHUNK];
    if (rs == 1 && !s->qw) {
        pairs_of_columns(dp, s->h + j0 * cs + p0, cs, 0, nc, kc, NR, ld, dst);
        return;
    }
    if (rs == 1) { /* column c, k ∈ [k0, k0 + n): W's flat run (j0 + c)·cs + p0 + k0 … */
        for (int64_t jb = 0; jb < nc; jb += Q4_COLS)
            for (int64_t k0 = 0; k0 < kc; k0 += Q4_CHUNK) {
                const int64_t w = min64(Q4_COLS, nc - jb), n = min64(Q4_CHUNK, kc - k0);
                for (int64_t j = 0; j < w; j++)
                    lf_qweight_span(s->qw, (j0 + jb + j) * cs + p0 + k0, n, s->dtype, buf + j * Q4_CHUNK);
                pairs_of_columns(dp, buf, Q4_CHUNK, jb, w, n, NR, ld, dst + k0 / 2 * NR);
            }
        return;
    }
    /* rows 2pp and 2pp+1 (none past kc), columns [j1, j1 + n): sliver by sliver (Q4_CHUNK is a multiple
     * of NR, so a chunk starts a sliver), pair t of a sliver = r0[t] | r1[t] << 16 */
    for (int64_t pp = 0; pp < np; pp++) {
        const int both = 2 * pp + 1 < kc;
        for (int64_t j1 = 0; j1 < nc; j1 += Q4_CHUNK) {
            const int64_t n = min64(Q4_CHUNK, nc - j1), off = (p0 + 2 * pp) * rs + (j0 + j1) * cs;
            int64_t st;
            const uint16_t *r0 = bits_of(s, off, cs, n, buf, &st);
            const uint16_t *r1 = both ? bits_of(s, off + rs, cs, n, buf + Q4_CHUNK, &st) : r0;
            for (int64_t j = 0; j < n; j += NR) { /* sliver (j1 + j) / NR: NR pairs, one contiguous run of dst */
                uint32_t *d = dst + (j1 + j) / NR * NR * ld + pp * NR;
                const int64_t w = min64(NR, n - j);
                if (st == 1 && both) /* row-major b (W in dx = g·W): two rows interleaved, vectorisable */
                    for (int64_t t = 0; t < w; t++) d[t] = (uint32_t)r0[j + t] | (uint32_t)r1[j + t] << 16;
                else
                    for (int64_t t = 0; t < w; t++)
                        d[t] = (uint32_t)r0[(j + t) * st] | (both ? (uint32_t)r1[(j + t) * st] << 16 : 0u);
            }
        }
    }
}

/* dst[p*MR + i] = a(i0+i, p0+p) for i < mr (zero for mr <= i < MR), p < kc; next_mr: rows of
 * the sliver packed after this one (at i0 + MR), prefetched meanwhile */
void lf_pack_a_sliver(const lf_dispatch *dp, const lf_operand *a, int64_t i0, int64_t mr, int64_t next_mr, int64_t p0,
                      int64_t kc, int MR, float *dst) {
    if (dp->k_pairs) {
        if (dp->k_pairs == 2) pack_a_amx(&a->seg[0], i0, mr, p0, kc, MR, (uint32_t *)dst);
        else pack_a_pairs(dp, &a->seg[0], i0, mr, p0, kc, MR, (uint32_t *)dst);
        return;
    }
    if (mr < MR)
        for (int64_t p = 0; p < kc; p++)
            for (int64_t i = mr; i < MR; i++) dst[p * MR + i] = 0.0f;
    for (int t = 0; t < a->nseg; t++) {
        int64_t lo, hi;
        const int64_t begin = seg_range(a, t, p0, kc, &lo, &hi);
        if (lo >= hi) continue;
        const lf_segment *s = &a->seg[t];
        const int64_t rs = s->v.rs, cs = s->v.cs;
        if (cs == 1 && !s->drop_threshold && lf_seg_f32(s)) { /* row-major source (x): a transpose */
            pack_rows(dp, s->v.p + i0 * rs + (lo - begin), rs, mr, hi - lo, s->scale, dst + (lo - p0) * MR, MR, MR * rs,
                      next_mr);
        } else if (cs == 1) { /* x̃ rows, or half or quantized rows: each contiguous run to fp32 first */
            pack_runs(dp, s, i0 * rs + (lo - begin), rs, mr, hi - lo, dst + (lo - p0) * MR, MR);
        } else {
            for (int64_t p = lo; p < hi; p++) {
                float *d = dst + (p - p0) * MR;
                for (int64_t i = 0; i < mr; i++) d[i] = seg_value(s, (i0 + i) * rs + (p - begin) * cs);
            }
        }
    }
}

/* rows [lo, hi) of segment s (starting at K = begin) into one sliver: dst[p*NR + j] =
 * b(p0+p, j0+j) for j < nr; next_nr: columns of the sliver packed after this one (at j0 + NR) */
static void pack_b_sliver(const lf_dispatch *dp, const lf_segment *s, int64_t begin, int64_t lo, int64_t hi,
                          int64_t j0, int64_t nr, int64_t next_nr, int64_t p0, int NR, float *dst) {
    const int64_t rs = s->v.rs, cs = s->v.cs; /* cs != 1: lf_pack_b_panel copies row-major rows itself */
    if (rs == 1 && !s->drop_threshold && lf_seg_f32(s)) { /* column-contiguous (Wᵀ of row-major W) */
        pack_rows(dp, s->v.p + j0 * cs + (lo - begin), cs, nr, hi - lo, s->scale, dst + (lo - p0) * NR, NR, NR * cs,
                  next_nr);
    } else if (rs == 1 && !lf_seg_f32(s)) { /* half or quantized columns: each run to fp32 first */
        pack_runs(dp, s, j0 * cs + (lo - begin), cs, nr, hi - lo, dst + (lo - p0) * NR, NR);
    } else {
        for (int64_t p = lo; p < hi; p++) {
            float *d = dst + (p - p0) * NR;
            for (int64_t j = 0; j < nr; j++) d[j] = seg_value(s, (p - begin) * rs + (j0 + j) * cs);
        }
    }
}

/* dst[p·NR + j] += s · Σ_q L(p0+p, q) · R(q, j0+j) for rows [lo, hi) of segment 0 and j < nr
 * (the low-rank addend of the operand; lf_lowrank) */
static void pack_b_addend(const lf_lowrank *lr, int64_t lo, int64_t hi, int64_t j0, int64_t nr, int64_t p0, int NR,
                          float *dst) {
    float rt[LF_SKINNY_MAX_R * LF_MAX_NR]; /* s·R[:, j0:j0+nr], zero-padded to NR */
    for (int64_t q = 0; q < lr->r; q++)
        for (int64_t j = 0; j < NR; j++)
            rt[q * NR + j] = j < nr ? lr->scale * lr->R.p[q * lr->R.rs + (j0 + j) * lr->R.cs] : 0.0f;
    const lf_view L = {lr->L.p + lo * lr->L.rs, lr->L.rs, lr->L.cs};
    lf_skinny_current()->rank_add(hi - lo, NR, lr->r, L, rt, NR, dst + (lo - p0) * NR, NR);
}

/* The kc×nc panel of b at (p0, j0) as NR-wide k-major slivers, sliver q at dst + q·NR·kc:
 * dst[q·NR·kc + p·NR + j] = b(p0+p, j0+q·NR+j), zero past nc. A row-major segment (W in dx = g·W,
 * fp32, half or quantized; x̃ or a half x in dA = s·vᵀ·x̃) is copied row by row across all slivers, so b is
 * read in address order — one stream instead of one per sliver; the others are packed sliver by sliver. */
void lf_pack_b_panel(const lf_dispatch *dp, const lf_operand *b, int64_t j0, int64_t nc, int64_t p0, int64_t kc,
                     int NR, float *dst) {
    if (dp->k_pairs) {
        pack_b_pairs(dp, &b->seg[0], j0, nc, p0, kc, NR, lf_k_slots(dp, kc), (uint32_t *)dst);
        return;
    }
    const int64_t nslivers = (nc + NR - 1) / NR, tail = nc - (nslivers - 1) * NR;
    float *last = dst + (nslivers - 1) * NR * kc;
    if (tail < NR)
        for (int64_t p = 0; p < kc; p++)
            for (int64_t j = tail; j < NR; j++) last[p * NR + j] = 0.0f;
    const lf_packed_b *pk = b->packed && b->packed->dp == dp ? b->packed : NULL;
    for (int t = 0; t < b->nseg; t++) {
        int64_t lo, hi;
        const int64_t begin = seg_range(b, t, p0, kc, &lo, &hi);
        if (lo >= hi) continue;
        const lf_segment *s = &b->seg[t];
        if (t == 0 && pk) { /* the rows of segment 0 from its kept block (length K0 - p0 < kc) */
            const int64_t kcb = pk->K - p0 < dp->blk->kc ? pk->K - p0 : dp->blk->kc;
            const float *src = pk->data + p0 * pk->nsl * NR + j0 / NR * NR * kcb + (lo - p0) * NR;
            for (int64_t q = 0; q < nslivers; q++)
                memcpy(dst + q * NR * kc + (lo - p0) * NR, src + q * NR * kcb, (size_t)((hi - lo) * NR) * sizeof(float));
        } else if (s->v.cs == 1) {
            /* row-major rows, read in address order: a plain fp32 row directly (scaled as it is
             * copied), any other (x̃, half, quantized) made fp32 first by seg_span, a run of whole slivers at
             * a time — not sliver by sliver, which reads NR elements of each of kc rows one row
             * stride apart (rows 4 KiB apart share one L1 set) */
            const int plain = !s->drop_threshold && lf_seg_f32(s);
            const int64_t chunk = LF_MAX_KC / NR * NR;
            float run[LF_MAX_KC];
            for (int64_t p = lo; p < hi; p++)
                for (int64_t c0 = 0; c0 < nc; c0 += chunk) {
                    const int64_t len = nc - c0 < chunk ? nc - c0 : chunk, off = (p - begin) * s->v.rs + j0 + c0;
                    const float *src = plain ? s->v.p + off : run;
                    const float scale = plain ? s->scale : 1.0f;
                    if (!plain) seg_span(dp, s, off, len, run);
                    for (int64_t q = 0; q * NR < len; q++) {
                        float *d = dst + (c0 / NR + q) * NR * kc + (p - p0) * NR;
                        const int64_t nr = len - q * NR < NR ? len - q * NR : NR;
                        for (int64_t j = 0; j < nr; j++) d[j] = src[q * NR + j] * scale;
                    }
                }
        } else {
            for (int64_t q = 0; q < nslivers; q++)
                pack_b_sliver(dp, s, begin, lo, hi, j0 + q * NR, q == nslivers - 1 ? tail : NR,
                              q + 1 >= nslivers ? 0 : q + 1 == nslivers - 1 ? tail : NR, p0, NR, dst + q * NR * kc);
        }
    }
    if (b->add) {
        int64_t lo, hi;
        seg_range(b, 0, p0, kc, &lo, &hi);
        for (int64_t q = 0; lo < hi && q < nslivers; q++)
            pack_b_addend(b->add, lo, hi, j0 + q * NR, q == nslivers - 1 ? tail : NR, p0, NR, dst + q * NR * kc);
    }
}


void lf_transpose_f32(const float *src, int64_t rs, int64_t rows, int64_t cols, float scale, float *dst, int64_t ld) {
    pack_rows(lf_current(), src, rs, rows, cols, scale, dst, ld, 0, 0);
}
