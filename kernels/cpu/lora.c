/* lora.c — fused LoRA forward and adapter-only backward (fp32), all on lf_gemm.
 *
 * Legend: n tokens, k in_features, m out_features, r rank, s scale, p dropout.
 *   x (n,k)  W (m,k)  bias (m)  A (r,k)  B (m,r)  g = ∂L/∂y (n,m)
 *   x̃ = x ⊙ mask / (1-p)            mask(i,j) = lf_dropout_keep(seed, i·k + j)
 */
#include <stdlib.h>

#include "internal.h"
#include "lorafuse/dropout_hash.h"

static lf_view transpose(lf_view v) { return (lf_view){v.p, v.cs, v.rs}; }

int lf_lora_check_dims(int64_t n, int64_t k, int64_t m, int64_t r, float p) {
    if (n < 0 || k < 0 || m < 0 || r < 0) return LF_EINVAL;
    if (!(p >= 0.0f && p < 1.0f)) return LF_EINVAL;
    int64_t t;
    if (!lf_mul_ok(n, k, &t) || !lf_mul_ok(n, m, &t) || !lf_mul_ok(m, k, &t) ||
        !lf_mul_ok(n, r, &t) || !lf_mul_ok(r, k + m, &t))
        return LF_EOVERFLOW;
    return LF_OK;
}

/* operand reading x̃ (or x when p == 0): the mask index is the flat offset i·k + j */
static lf_operand dropped(lf_view x, float scale, float p, uint64_t seed) {
    return lf_operand_dropped(lf_tv32(x), scale, p, seed);
}

/* [p | q] along K: p covers [0, k_split), q covers [k_split, K) */
static lf_operand concat_k(lf_view p, float sp, lf_view q, float sq, int64_t k_split) {
    return lf_operand_concat(lf_tv32(p), sp, lf_tv32(q), sq, k_split);
}

static int contiguous_for_dropout(lf_view x, int64_t k, float p) {
    return p == 0.0f || (x.cs == 1 && x.rs == k);
}

/* y (n,m) = [x | s·u] · [W | B]ᵀ + bias on the rowdots kernel, for n ≤ LF_ROWDOTS_MAX_N tokens
 * (su = s·u: a few rows, copied) */
static int decode_output(lf_pool *pool, int64_t n, int64_t k, int64_t m, int64_t r, lf_view x, lf_view W,
                         const float *bias, lf_view B, float scale, const float *u, float *y) {
    float *su = malloc((size_t)(n * r > 0 ? n * r : 1) * sizeof(float));
    if (!su) return LF_ENOMEM;
    for (int64_t i = 0; i < n * r; i++) su[i] = scale * u[i];
    const lf_dots_seg seg[2] = {{x, W, k}, {(lf_view){su, r, 1}, B, r}};
    const int st = lf_rowdots(pool, n, m, seg, 2, 1.0f, bias, y, m);
    free(su);
    return st;
}

/* When the forward computes yᵀ (few_tokens_output): more tokens than the decode path takes, at
 * most few_tokens_max_n (C's columns are the tokens: one sliver of the AVX-512 wide tile, four of
 * AVX2's 16-column ones), and a W too big to stay in cache (few_tokens_min_w elements), whose packing
 * then costs as much as the arithmetic — and the tile reads W in place (lf_gemm_reads_a_in_place).
 * Beyond that the re-read W rows and padded columns cost more than packing W saves (measured per
 * ISA: tunables.c), and a W in cache packs cheaply. */
static int few_tokens(int64_t n, int64_t k, int64_t m, lf_view W) {
    const lf_tunables *tu = lf_tune();
    return n > LF_ROWDOTS_MAX_N && n <= tu->few_tokens_max_n && (double)m * (double)k >= tu->few_tokens_min_w &&
           W.cs == 1 && lf_gemm_reads_a_in_place(n);
}

/* y (n,m) = ([W | B] · [x | s·u]ᵀ)ᵀ + bias for a few tokens: W (rows contiguous) is the GEMM's
 * A-operand, read in place by the micro-kernel and never packed — with few rows of x per W panel,
 * packing W (reading it and writing the panels) costs as much as the arithmetic. yᵀ (m,n) is
 * transposed into y. */
static int few_tokens_output(lf_pool *pool, int64_t n, int64_t k, int64_t m, int64_t r, lf_view x, lf_view W,
                             const float *bias, lf_view B, float scale, const float *u, float *y) {
    float *yt = malloc((size_t)(m * n > 0 ? m * n : 1) * sizeof(float));
    if (!yt) return LF_ENOMEM;
    const lf_operand wb = concat_k(W, 1.0f, B, 1.0f, k);
    const lf_operand xu = concat_k(transpose(x), 1.0f, (lf_view){u, 1, r}, scale, k); /* (k + r, n) */
    const int st = lf_gemm(pool, m, n, k + r, &wb, &xu, 0.0f, NULL, yt, n);
    if (!st) {
        lf_transpose_f32(yt, n, m, n, 1.0f, y, m);
        for (int64_t i = 0; bias && i < n; i++)
            for (int64_t j = 0; j < m; j++) y[i * m + j] += bias[j];
    }
    free(yt);
    return st;
}

/* y (n,m) = x · Wᵀ + bias, then y += u · (s·Bᵀ) row block by row block (rank_rows.c): the half
 * bases' plan (lora_half.c), open to fp32 operands too */
static int split_output(lf_pool *pool, int64_t n, int64_t k, int64_t m, int64_t r, lf_view x, lf_view W,
                        const float *bias, lf_view B, float scale, const float *u, float *y, const lf_packed_b *wpack) {
    const lf_operand xo = lf_operand_plain(x, 1.0f);
    lf_operand wt = lf_operand_plain(transpose(W), 1.0f);
    wt.packed = wpack;
    int st = lf_gemm(pool, n, m, k, &xo, &wt, 0.0f, bias, y, m);
    float *bt = st ? NULL : lf_widened_copy((lf_tview){B.p, B.cs, B.rs, LF_DT_F32, NULL}, r, m, scale); /* s·Bᵀ (r, m) */
    if (!st && !bt) st = LF_ENOMEM;
    if (!st)
        st = lf_rank_rows(pool, n, m, r, (lf_view){u, r, 1}, (lf_view){bt, m, 1}, 1.0f, NULL, y, m, LF_DT_F32,
                          LF_DT_F32, NULL, 0, NULL);
    free(bt);
    return st;
}

/* u (n,r) = x̃·Aᵀ, then y from it, on the paths of `plan` (lf_plan_forward) */
static int forward_with_u(lf_pool *pool, lf_forward_plan plan, int64_t n, int64_t k, int64_t m, int64_t r,
                          lf_view x, lf_view W, const float *bias, lf_view A, lf_view B, float scale,
                          float dropout_p, uint64_t seed, float *y, float *u, const lf_packed_b *wpack) {
    int st;
    if (plan.u == LF_U_ROWDOTS) {
        const lf_dots_seg useg = {x, A, k};
        st = lf_rowdots(pool, n, r, &useg, 1, 1.0f, NULL, u, r);
    } else if (plan.u == LF_U_SKINNY) { /* x̃ regenerated from the seed as x is streamed */
        const lf_mask xm = {seed, dropout_p > 0.0f ? lf_dropout_threshold(dropout_p) : 0u, 1.0f / (1.0f - dropout_p)};
        st = lf_rowdot(pool, n, k, r, lf_tv32(x), lf_tv32(transpose(A)), 1.0f, u, dropout_p > 0.0f ? &xm : NULL);
    } else {
        const lf_operand xd = dropped(x, 1.0f, dropout_p, seed);
        const lf_operand at = lf_operand_plain(transpose(A), 1.0f);
        st = lf_gemm(pool, n, r, k, &xd, &at, 0.0f, NULL, u, r);
    }
    if (st) return st;
    if (plan.y == LF_Y_DECODE) return decode_output(pool, n, k, m, r, x, W, bias, B, scale, u, y);
    if (plan.y == LF_Y_FEW_TOKENS) return few_tokens_output(pool, n, k, m, r, x, W, bias, B, scale, u, y);
    if (plan.y == LF_Y_SPLIT) return split_output(pool, n, k, m, r, x, W, bias, B, scale, u, y, wpack);
    /* y (n,m) = [x | s·u] · [Wᵀ ; Bᵀ] + bias  — one GEMM over K' = k + r ("augmented K") */
    const lf_operand xu = concat_k(x, 1.0f, (lf_view){u, r, 1}, scale, k);
    lf_operand wb = concat_k(transpose(W), 1.0f, transpose(B), 1.0f, k);
    wb.packed = wpack;
    return lf_gemm(pool, n, m, k + r, &xu, &wb, 0.0f, bias, y, m);
}

/* Inference (u not wanted): y = x · (W + s·B·A)ᵀ + bias with the rank-r term added to W's
 * panels as they are packed, when that costs fewer flops than producing u and the r extra
 * K columns. Each W element is packed once per row block of the GEMM's thread grid, so
 *     merged: 2·m·k·r·row_blocks      augmented: 2·n·r·(k + m)
 * (few outputs m, many tokens n favour merging: 512×896×128 r16, M cut in 2: 7.3 vs 16.8 Mflop;
 * 512×576×576, N cut in 2: 10.6 vs 18.9 — counts, not timings). */
static int merged_is_cheaper(lf_pool *pool, int64_t n, int64_t k, int64_t m, int64_t r) {
    if (r <= 0 || r > LF_SKINNY_MAX_R || n <= LF_ROWDOTS_MAX_N) return 0;
    const double row_blocks = (double)lf_gemm_row_splits(pool, n, m, k);
    return (double)m * (double)k * row_blocks < (double)n * (double)(k + m);
}

lf_forward_plan lf_plan_forward(lf_pool *pool, int64_t n, int64_t k, int64_t m, int64_t r, lf_view x, lf_view W,
                                lf_view A, lf_view B, float dropout_p, int need_u, const lf_packed_b *wpack) {
    /* merged: taken even when W's panels are kept (wpack is then unused): where merging wins, W is
     * small next to x, so its packing is cheap */
    if (!need_u && dropout_p == 0.0f && merged_is_cheaper(pool, n, k, m, r))
        return (lf_forward_plan){LF_U_NONE, LF_Y_MERGED};
    /* decode (a few tokens): every output is a dot product of contiguous rows, W streamed once
     * in place and never packed */
    const int decode = lf_rowdots_ok(n, x, W) && B.cs == 1;
    lf_forward_plan plan;
    /* u (n,r) = x̃ · Aᵀ  — dot products of rows at decode, else one streaming read of x
     * (skinny.c), or a GEMM with dropout */
    plan.u = dropout_p == 0.0f && decode && A.cs == 1 ? LF_U_ROWDOTS : lf_skinny_ok(x, r) ? LF_U_SKINNY : LF_U_GEMM;
    plan.y = decode                                  ? LF_Y_DECODE
             : !wpack && few_tokens(n, k, m, W) ? LF_Y_FEW_TOKENS
                                                : LF_Y_AUGMENTED;
    return plan;
}

const char *lf_forward_plan_unfit(lf_forward_plan plan, int64_t n, int64_t r, lf_view x, lf_view W, lf_view A,
                                  lf_view B, float dropout_p, int need_u) {
    if ((unsigned)plan.u > LF_U_GEMM || (unsigned)plan.y > LF_Y_SPLIT) return "unknown path";
    if ((plan.u == LF_U_NONE) != (plan.y == LF_Y_MERGED)) return "u 'none' goes with y 'merged' and only with it";
    if (plan.y == LF_Y_MERGED && need_u) return "y 'merged' does not form u, which is wanted";
    if (plan.y == LF_Y_MERGED && dropout_p > 0.0f) return "y 'merged' takes no dropout";
    if (plan.y == LF_Y_MERGED && r > LF_SKINNY_MAX_R) return "y 'merged' takes a rank of at most 64";
    if (plan.u == LF_U_ROWDOTS && !(dropout_p == 0.0f && lf_rowdots_ok(n, x, A)))
        return "u 'rowdots' needs no dropout, at most 8 tokens, rows of x and A contiguous";
    if (plan.u == LF_U_SKINNY && !lf_skinny_ok(x, r)) return "u 'skinny' needs rows of x contiguous and 1 <= r <= 64";
    if (plan.y == LF_Y_DECODE && !(lf_rowdots_ok(n, x, W) && B.cs == 1))
        return "y 'decode' needs at most 8 tokens and rows of x, W and B contiguous";
    return NULL;
}

int lf_lora_forward_f32(lf_pool *pool, int64_t n, int64_t k, int64_t m, int64_t r, lf_view x,
                        lf_view W, const float *bias, lf_view A, lf_view B, float scale,
                        float dropout_p, uint64_t seed, float *y, float *u, const lf_packed_b *wpack,
                        const lf_forward_plan *force, lf_forward_plan *plan_out) {
    int st = lf_lora_check_dims(n, k, m, r, dropout_p);
    if (st) return st;
    if (!contiguous_for_dropout(x, k, dropout_p)) return LF_EINVAL;
    if (wpack && !lf_packed_weight_matches(wpack, W, m, k, 0)) return LF_EINVAL;
    if (force && lf_forward_plan_unfit(*force, n, r, x, W, A, B, dropout_p, u != NULL)) return LF_EINVAL;
    const lf_forward_plan plan =
        force ? *force : lf_plan_forward(pool, n, k, m, r, x, W, A, B, dropout_p, u != NULL, wpack);
    if (plan_out) *plan_out = plan;
    if (plan.y == LF_Y_MERGED) {
        /* b (k, m) = Wᵀ + s·Aᵀ·Bᵀ, packed on the fly */
        const lf_lowrank add = {transpose(A), transpose(B), r, scale};
        const lf_operand xo = lf_operand_plain(x, 1.0f);
        lf_operand wt = lf_operand_plain(transpose(W), 1.0f);
        wt.add = &add;
        return lf_gemm(pool, n, m, k, &xo, &wt, 0.0f, bias, y, m);
    }
    float *ubuf = u ? u : malloc((size_t)(n * r > 0 ? n * r : 1) * sizeof(float));
    if (!ubuf) return LF_ENOMEM;
    st = forward_with_u(pool, plan, n, k, m, r, x, W, bias, A, B, scale, dropout_p, seed, y, ubuf, wpack);
    if (!u) free(ubuf);
    return st;
}

/* W (m,k) as the B-operand it is in the forward (Wᵀ, k×m) or in dx = g·W (W, m×k) */
static lf_view weight_operand(lf_view W, int for_backward) { return for_backward ? W : transpose(W); }

int lf_pack_weight(lf_view W, int64_t m, int64_t k, int for_backward, lf_packed_b **out) {
    if (!out) return LF_EINVAL;
    *out = NULL;
    if (m < 0 || k < 0 || (m > 0 && k > 0 && !W.p)) return LF_EINVAL;
    return lf_pack_b(weight_operand(W, for_backward), for_backward ? m : k, for_backward ? k : m, out);
}

int lf_packed_weight_matches(const lf_packed_b *pw, lf_view W, int64_t m, int64_t k, int for_backward) {
    const lf_view b = weight_operand(W, for_backward);
    return pw && pw->src.p == b.p && pw->src.rs == b.rs && pw->src.cs == b.cs && pw->K == (for_backward ? m : k) &&
           pw->N == (for_backward ? k : m);
}

lf_backward_plan lf_plan_backward(int64_t n, int64_t r, lf_view g, lf_view x, lf_view u, lf_view W, float dropout_p,
                                  int need_dx) {
    lf_backward_plan plan;
    plan.vb = lf_skinny_ok(g, r) && lf_skinny_ok(u, r) ? LF_VB_SKINNY : LF_VB_GEMM;
    plan.da = lf_skinny_ok(x, r) ? LF_DA_SKINNY : LF_DA_GEMM;
    plan.dx = !need_dx                                                      ? LF_DX_NONE
              : dropout_p == 0.0f && !lf_rows_axpy_streams(n, W.cs, LF_DT_F32) ? LF_DX_AUGMENTED
                                                                               : LF_DX_MASKED;
    return plan;
}

const char *lf_backward_plan_unfit(lf_backward_plan plan, int64_t r, lf_view g, lf_view x, lf_view u,
                                   float dropout_p, int need_dx) {
    if ((unsigned)plan.vb > LF_VB_GEMM || (unsigned)plan.da > LF_DA_GEMM || (unsigned)plan.dx > LF_DX_MASKED)
        return "unknown path";
    if ((plan.dx == LF_DX_NONE) == (need_dx != 0)) return need_dx ? "dx is wanted: dx 'none' does not form it"
                                                                 : "dx is not wanted: its path must be 'none'";
    if (plan.dx == LF_DX_AUGMENTED && dropout_p > 0.0f) return "dx 'augmented' takes no dropout (use 'masked')";
    if (plan.vb == LF_VB_SKINNY && !(lf_skinny_ok(g, r) && lf_skinny_ok(u, r)))
        return "v/dB 'skinny' needs rows of g and u contiguous and 1 <= r <= 64";
    if (plan.da == LF_DA_SKINNY && !lf_skinny_ok(x, r)) return "dA 'skinny' needs rows of x contiguous and 1 <= r <= 64";
    return NULL;
}

int lf_lora_backward_f32(lf_pool *pool, int64_t n, int64_t k, int64_t m, int64_t r, lf_view g,
                         lf_view x, lf_view u, lf_view W, lf_view A, lf_view B, float scale,
                         float dropout_p, uint64_t seed, float *dx, float *dA, float *dB,
                         const lf_packed_b *wpack, const lf_backward_plan *force, lf_backward_plan *plan_out) {
    int st = lf_lora_check_dims(n, k, m, r, dropout_p);
    if (st) return st;
    if (!contiguous_for_dropout(x, k, dropout_p)) return LF_EINVAL;
    if (wpack && !lf_packed_weight_matches(wpack, W, m, k, 1)) return LF_EINVAL;
    if (force && lf_backward_plan_unfit(*force, r, g, x, u, dropout_p, dx != NULL)) return LF_EINVAL;
    const lf_backward_plan plan = force ? *force : lf_plan_backward(n, r, g, x, u, W, dropout_p, dx != NULL);
    if (plan_out) *plan_out = plan;
    /* v (n,r) = g · B */
    float *v = malloc((size_t)(n * r > 0 ? n * r : 1) * sizeof(float));
    if (!v) return LF_ENOMEM;
    const lf_view vv = {v, r, 1};
    const lf_operand go = lf_operand_plain(g, 1.0f);
    if (plan.vb == LF_VB_SKINNY) {
        st = lf_rowdot(pool, n, m, r, lf_tv32(g), lf_tv32(B), 1.0f, v, NULL);
    } else {
        const lf_operand bo = lf_operand_plain(B, 1.0f);
        st = lf_gemm(pool, n, r, m, &go, &bo, 0.0f, NULL, v, r);
    }
    /* dB (m,r) = s · gᵀ · u */
    if (!st) {
        if (plan.vb == LF_VB_SKINNY) {
            st = lf_rank_update(pool, m, r, n, g, lf_tv32(u), scale, dB, r, NULL);
        } else {
            const lf_operand gt = lf_operand_plain(transpose(g), scale), uo = lf_operand_plain(u, 1.0f);
            st = lf_gemm(pool, m, r, n, &gt, &uo, 0.0f, NULL, dB, r);
        }
    }
    /* dA (r,k) = s · vᵀ · x̃ */
    if (!st) {
        if (plan.da == LF_DA_SKINNY) { /* x̃ regenerated as x is streamed */
            const lf_mask xm = {seed, dropout_p > 0.0f ? lf_dropout_threshold(dropout_p) : 0u,
                                1.0f / (1.0f - dropout_p)};
            st = lf_rank_update(pool, r, k, n, vv, lf_tv32(x), scale, dA, k, dropout_p > 0.0f ? &xm : NULL);
        } else {
            const lf_operand vt = lf_operand_plain(transpose(vv), scale);
            const lf_operand xd = dropped(x, 1.0f, dropout_p, seed);
            st = lf_gemm(pool, r, k, n, &vt, &xd, 0.0f, NULL, dA, k);
        }
    }
    if (!st && plan.dx != LF_DX_NONE) {
        if (plan.dx == LF_DX_AUGMENTED) {
            /* dx (n,k) = [g | s·v] · [W ; A]  — one GEMM over K' = m + r */
            const lf_operand gv = concat_k(g, 1.0f, vv, scale, m);
            lf_operand wa = concat_k(W, 1.0f, A, 1.0f, m);
            wa.packed = wpack;
            st = lf_gemm(pool, n, k, m + r, &gv, &wa, 0.0f, NULL, dx, k);
        } else {
            /* dx = g · W (a few tokens: W's rows streamed once, never packed), then + s/(1-p) · mask ⊙ (v · A): the
             * mask sits on the product */
            if (lf_rows_axpy_streams(n, W.cs, LF_DT_F32)) {
                st = lf_rows_axpy(pool, n, m, k, lf_tv32(g), lf_tv32(W), dx, k);
            } else {
                lf_operand wo = lf_operand_plain(W, 1.0f);
                wo.packed = wpack;
                st = lf_gemm(pool, n, k, m, &go, &wo, 0.0f, NULL, dx, k);
            }
            float *acopy = NULL; /* the rank-r update reads A's rows as vectors */
            lf_view Ar = A;
            if (!st && n > 0 && k > 0 && A.cs != 1 && r > 0) {
                acopy = lf_widened_copy((lf_tview){A.p, A.rs, A.cs, LF_DT_F32, NULL}, r, k, 1.0f);
                if (!acopy) st = LF_ENOMEM;
                Ar = (lf_view){acopy, k, 1};
            }
            if (!st) { /* dx += s/(1-p) · mask ⊙ (v · A), row block by row block (rank_rows.c) */
                const lf_mask xm = {seed, lf_dropout_threshold(dropout_p), 1.0f};
                st = lf_rank_rows(pool, n, k, r, vv, Ar, scale / (1.0f - dropout_p), &xm, dx, k, LF_DT_F32,
                                  LF_DT_F32, NULL, 0, NULL);
            }
            free(acopy);
        }
    }
    free(v);
    return st;
}

int lf_dropout_f32(int64_t n, int64_t k, const float *x, float dropout_p,
                   uint64_t seed, float *out) {
    int st = lf_lora_check_dims(n, k, 0, 0, dropout_p);
    if (st) return st;
    /* threshold 0 keeps every element, so p = 0 is the identity */
    lf_skinny_current()->dropout_span(x, n * k, 0, seed, lf_dropout_threshold(dropout_p),
                                      1.0f / (1.0f - dropout_p), out);
    return LF_OK;
}
