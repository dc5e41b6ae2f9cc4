/* lora_half.c — fused LoRA forward and adapter-only backward on a half-precision base (bf16 / fp16
 * x, W, g), adapters fp32 (PEFT's default) or in the base's dtype; all on lf_gemm and lf_rank_rows.
 *
 * Legend as lora.c: n tokens, k in_features, m out_features, r rank, s scale, p dropout,
 *   x̃ = x ⊙ mask / (1-p),  mask(i,j) = lf_dropout_keep(seed, i·k + j).
 * Every half element is widened exactly (or multiplied as it is by the bf16 tiles); sums are fp32:
 *   u  = x̃·Aᵀ                                    fp32, kept for the backward
 *   y  = round_base(x·Wᵀ + bias + s·u·Bᵀ)         one rounding, after the whole fp32 sum
 *   v  = g·B,  dB = round_ad(s·gᵀ·u),  dA = round_ad(s·vᵀ·x̃)
 *   dx = round_base(g·W + s·drop'(v·A))
 * PEFT rounds x·Wᵀ + bias to the base dtype first and adds the fp32 LoRA term to that; this rounds
 * once (tests/tolerances.py bounds both against float64).
 * A float32 x (and g) on a half W ('mixed': QLoRA's fp32 activations on a bf16-compute base, as
 * bitsandbytes + PEFT run them) keeps PEFT's two roundings instead: the base product on x rounded to
 * W's dtype, rounded itself, then the fp32 rank-r term from the fp32 x added, y float32:
 *   y  = round_W(round_W(x)·Wᵀ + bias) + s·u·Bᵀ,   dx = round_W(round_W(g)·W) + s·drop'(v·A)
 * u, v, dA, dB from the fp32 x and g (adapters fp32).
 * DoRA's column scale c = μ/ν (lf_col_scale, kernels.h; a half x, fp32 adapters, no dropout) keeps the base
 * product's own rounding too, then scales the columns of the fp32 sum z̃ in rank_rows' rounding pass:
 *   z̃ = round_W(x·Wᵀ) + s·u·Bᵀ (kept),   y = round(bias + c ⊙ z̃)
 * and the backward runs on g' = g ⊙ c with c folded into the rank-r products (exact rewrites):
 *   gh = round_W(g ⊙ c) and dc = Σ_i g ⊙ z̃ in one pass over g (col_scale.c),   v = g·(c ⊙ B),
 *   dB = c ⊙ (s·gᵀ·u) row by row,   dx = round(round_W(gh·W) + s·v·A).
 * The products x·Wᵀ and g·W of a bf16 base take the bf16 tiles (vdpbf16ps / AMX) where the ISA has
 * them: they run alone ('split' / 'masked' plans) into an fp32 buffer, and the rank-r term is added
 * to it row block by row block and rounded to the output while the rows are in cache
 * (rank_rows.c). Elsewhere (fp16, or no bf16 tile) one widened GEMM over the augmented K forms the
 * whole sum ('augmented'), rounded row block by row block the same way. A few tokens ('decode') stream
 * W once in place (rowdots_half.c, which hands a quantized W to rowdots_quant.c; dx's g·W by
 * lf_rows_axpy). The rank-r products u, v, dBᵀ, dA run on the skinny kernels, which widen half rows
 * as they read them ('skinny'), or as GEMMs ('gemm').
 */
#include <stdlib.h>
#include <string.h>

#include "internal.h"
#include "lorafuse/dropout_hash.h"
#include "lorafuse/quant.h"

static lf_tview ttranspose(lf_tview v) {
    const int64_t rs = v.rs;
    v.rs = v.cs;
    v.cs = rs;
    return v;
}

static int is_half(lf_dtype dt) { return dt == LF_DT_BF16 || dt == LF_DT_F16; }

/* the dtype rules of kernels.h: W of a half dtype (the base's), x (and g) of that dtype or — mixed — float32
 * with rows contiguous; A and B one dtype, fp32 or the base's (fp32 when mixed); W may be a quantized weight
 * (lf_tview.qw: 4-bit or 8-bit) stored (m, k) as it is, its elements rounded to the base dtype — never
 * transposed, never A or B */
static int dtypes_ok(lf_tview x, int64_t k, int64_t m, lf_tview W, lf_tview A, lf_tview B) {
    const int qw_ok =
        !W.qw || (W.rs == k && W.cs == 1 && W.qw->rows == m && W.qw->cols == k && !lf_qweight_unfit(W.qw));
    const int x_ok = x.dtype == W.dtype || (x.dtype == LF_DT_F32 && x.cs == 1 && A.dtype == LF_DT_F32);
    return is_half(W.dtype) && x_ok && A.dtype == B.dtype && (A.dtype == LF_DT_F32 || A.dtype == W.dtype) && qw_ok &&
           !A.qw && !B.qw;
}

/* x (n, k) fp32 with rows contiguous narrowed to dt, C-contiguous (malloc'd; NULL on failure): the base's
 * operand of a mixed call */
static uint16_t *narrowed_copy(lf_tview x, int64_t n, int64_t k, lf_dtype dt) {
    uint16_t *h = malloc((size_t)(n * k > 0 ? n * k : 1) * sizeof(uint16_t));
    for (int64_t i = 0; h && i < n; i++) lf_narrow((const float *)x.p + i * x.rs, k, dt, h + i * k);
    return h;
}

/* 1 if the GEMM of these two operands (unscaled) runs a bf16 tile */
static int on_bf16_tile(lf_tview a, lf_tview b) { return strcmp(lf_hgemm_path(1.0f, a, b), "widened") != 0; }

/* 1 if the skinny kernel (one streaming read, lf_rowdot) can form a rank-r product over these rows */
static int skinny_rows(lf_tview big, int64_t r) { return big.cs == 1 && r > 0 && r <= LF_SKINNY_MAX_R; }

/* the base's view of x: x itself, or for a float32 x its rows as W's dtype would hold them (what the
 * plan asks of the base product; p unused) */
static lf_tview base_view(lf_tview x, lf_tview W) {
    return x.dtype == LF_DT_F32 ? (lf_tview){x.p, x.rs, 1, W.dtype, NULL} : x;
}

lf_forward_plan lf_plan_forward_half(int64_t n, lf_tview x, lf_tview W, int64_t r) {
    const lf_tview xb = base_view(x, W);
    const int tile = on_bf16_tile(xb, ttranspose(W)), decode_max = lf_tune()->half_decode_max_n;
    const int decode = lf_rowdots_half_ok(n, xb, W) && (W.qw || !tile || !decode_max || n <= decode_max);
    const lf_forward_y_path y = decode ? LF_Y_DECODE : x.dtype == LF_DT_F32 || tile ? LF_Y_SPLIT : LF_Y_AUGMENTED;
    return (lf_forward_plan){skinny_rows(x, r) ? LF_U_SKINNY : LF_U_GEMM, y};
}

const char *lf_forward_plan_unfit_half(lf_forward_plan plan, int64_t n, lf_tview x, lf_tview W, int64_t r) {
    if ((unsigned)plan.u > LF_U_GEMM || (unsigned)plan.y > LF_Y_SPLIT) return "unknown path";
    if (plan.u != LF_U_GEMM && plan.u != LF_U_SKINNY) return "a bf16/fp16 base forms u by 'skinny' or 'gemm' only";
    if (plan.u == LF_U_SKINNY && !skinny_rows(x, r)) return "u 'skinny' needs rows of x contiguous and 1 <= r <= 64";
    if (plan.y == LF_Y_DECODE && !lf_rowdots_half_ok(n, base_view(x, W), W))
        return "y 'decode' needs at most 8 tokens (24 with a 4-bit W where the GEMM would widen it, 32 with a dense "
               "bf16 W on the avx512_bf16 pairs kernels) and rows of x and W contiguous";
    if (plan.y != LF_Y_SPLIT && plan.y != LF_Y_AUGMENTED && plan.y != LF_Y_DECODE)
        return "a bf16/fp16 base takes y 'decode', 'split' or 'augmented' only";
    if (plan.y == LF_Y_AUGMENTED && x.dtype == LF_DT_F32)
        return "a float32 x on a bf16/fp16 base takes y 'decode' or 'split' (the base product rounded alone)";
    return NULL;
}

/* 1 if a column scale fits the call: none, or a half x (g) of W's dtype, fp32 adapters, no dropout */
static int col_scale_ok(const lf_col_scale *cs, lf_tview x, lf_tview A, float dropout_p) {
    return !cs || (cs->c && x.dtype != LF_DT_F32 && A.dtype == LF_DT_F32 && dropout_p == 0.0f);
}

int lf_lora_forward_half(lf_pool *pool, int64_t n, int64_t k, int64_t m, int64_t r, lf_tview x, lf_tview W,
                         lf_tview bias, lf_tview A, lf_tview B, float scale, float dropout_p, uint64_t seed,
                         const lf_col_scale *cs, void *y, float *u, const lf_forward_plan *force,
                         lf_forward_plan *plan_out) {
    int st = lf_lora_check_dims(n, k, m, r, dropout_p);
    if (st) return st;
    if (!dtypes_ok(x, k, m, W, A, B) || (bias.p && bias.dtype != LF_DT_F32 && bias.dtype != W.dtype)) return LF_EINVAL;
    if (dropout_p > 0.0f && !(x.cs == 1 && x.rs == k)) return LF_EINVAL;
    if (force && lf_forward_plan_unfit_half(*force, n, x, W, r)) return LF_EINVAL;
    if (!col_scale_ok(cs, x, A, dropout_p) || (cs && force && force->y == LF_Y_AUGMENTED)) return LF_EINVAL;
    lf_forward_plan plan = force ? *force : lf_plan_forward_half(n, x, W, r);
    if (cs && plan.y == LF_Y_AUGMENTED) plan.y = LF_Y_SPLIT; /* the base product rounded alone */
    if (plan_out) *plan_out = plan;
    const int mixed = x.dtype == LF_DT_F32; /* y float32: c is y itself */
    const int round_base = mixed || cs;     /* the base product rounded to W's dtype alone */
    uint16_t *xh = mixed ? narrowed_copy(x, n, k, W.dtype) : NULL;
    const lf_tview xb = mixed ? (lf_tview){xh, k, 1, W.dtype, NULL} : x; /* the base product's x */
    float *ubuf = u ? u : malloc((size_t)(n * r > 0 ? n * r : 1) * sizeof(float));
    float *bias32 = bias.p ? lf_widened_copy(bias, 1, m, 1.0f) : NULL;
    /* the fp32 sum of y (DoRA: z̃, kept where asked) */
    float *c = mixed ? y : cs && cs->z ? cs->z : malloc((size_t)(n * m > 0 ? n * m : 1) * sizeof(float));
    const int own_c = c != y && !(cs && c == cs->z);
    const int split = plan.y != LF_Y_AUGMENTED; /* the rank-r term added to c afterwards */
    float *bt = split ? lf_widened_copy(ttranspose(B), r, m, scale) : NULL; /* s·Bᵀ (r, m) */
    if (!ubuf || !c || (mixed && !xh) || (bias.p && !bias32) || (split && !bt)) {
        st = LF_ENOMEM;
        goto done;
    }
    /* u (n,r) = x̃ · Aᵀ: x streamed once (skinny) or a GEMM over x̃ */
    if (plan.u == LF_U_SKINNY) { /* x̃ regenerated from the seed as x is streamed */
        const lf_mask xm = {seed, dropout_p > 0.0f ? lf_dropout_threshold(dropout_p) : 0u, 1.0f / (1.0f - dropout_p)};
        st = lf_rowdot(pool, n, k, r, x, ttranspose(A), 1.0f, ubuf, dropout_p > 0.0f ? &xm : NULL);
    } else {
        const lf_operand xd = lf_operand_dropped(x, 1.0f, dropout_p, seed), at = lf_operand_typed(ttranspose(A), 1.0f);
        st = lf_gemm(pool, n, r, k, &xd, &at, 0.0f, NULL, ubuf, r);
    }
    if (st) goto done;
    const lf_view uv = {ubuf, r, 1};
    if (split) {
        /* c = x · Wᵀ + bias (decode: W streamed in place; split: a GEMM), then y = round(c + u · (s·Bᵀ));
         * DoRA: c = x · Wᵀ, its own rounding, + u · (s·Bᵀ) = z̃, then y = round(bias + col ⊙ z̃) */
        const float *cbias = cs ? NULL : bias32;
        const lf_cols_affine aff = {cs ? cs->c : NULL, bias32};
        const lf_operand xo = lf_operand_typed(xb, 1.0f), wt = lf_operand_typed(ttranspose(W), 1.0f);
        st = plan.y == LF_Y_DECODE ? lf_rowdots_half(pool, n, m, k, xb, W, cbias, c, m)
                                   : lf_gemm(pool, n, m, k, &xo, &wt, 0.0f, cbias, c, m);
        /* mixed: the base product's own rounding, then the fp32 term, y float32 (c) */
        if (!st)
            st = lf_rank_rows(pool, n, m, r, uv, (lf_view){bt, m, 1}, 1.0f, NULL, c, m,
                              round_base ? W.dtype : LF_DT_F32, W.dtype, mixed ? NULL : y, m, cs ? &aff : NULL);
    } else {
        /* c = [x | s·u] · [Wᵀ ; Bᵀ] + bias over K' = k + r, then y = round(c) */
        const lf_operand xu = lf_operand_concat(x, 1.0f, lf_tv32((lf_view){ubuf, r, 1}), scale, k);
        const lf_operand wb = lf_operand_concat(ttranspose(W), 1.0f, ttranspose(B), 1.0f, k);
        st = lf_gemm(pool, n, m, k + r, &xu, &wb, 0.0f, bias32, c, m);
        if (!st) st = lf_rank_rows(pool, n, m, 0, uv, uv, 1.0f, NULL, c, m, LF_DT_F32, x.dtype, y, m, NULL);
    }
done:
    if (!u) free(ubuf);
    free(bias32);
    if (own_c) free(c);
    free(bt);
    free(xh);
    return st;
}

lf_backward_plan lf_plan_backward_half(int64_t n, lf_tview g, lf_tview x, lf_tview W, int64_t r, float dropout_p,
                                       int need_dx) {
    const int streamed = lf_rows_axpy_streams(n, W.cs, W.dtype);
    const lf_backward_dx_path dx = !need_dx ? LF_DX_NONE
                                   : dropout_p > 0.0f || g.dtype == LF_DT_F32 || streamed || on_bf16_tile(g, W)
                                       ? LF_DX_MASKED
                                       : LF_DX_AUGMENTED;
    return (lf_backward_plan){skinny_rows(g, r) ? LF_VB_SKINNY : LF_VB_GEMM, skinny_rows(x, r) ? LF_DA_SKINNY : LF_DA_GEMM,
                              dx};
}

const char *lf_backward_plan_unfit_half(lf_backward_plan plan, lf_tview g, lf_tview x, int64_t r, float dropout_p,
                                        int need_dx) {
    if ((unsigned)plan.vb > LF_VB_GEMM || (unsigned)plan.da > LF_DA_GEMM || (unsigned)plan.dx > LF_DX_MASKED)
        return "unknown path";
    if (plan.vb == LF_VB_SKINNY && !skinny_rows(g, r)) return "v/dB 'skinny' needs rows of g contiguous and 1 <= r <= 64";
    if (plan.da == LF_DA_SKINNY && !skinny_rows(x, r)) return "dA 'skinny' needs rows of x contiguous and 1 <= r <= 64";
    if ((plan.dx == LF_DX_NONE) == (need_dx != 0)) return need_dx ? "dx is wanted: dx 'none' does not form it"
                                                                 : "dx is not wanted: its path must be 'none'";
    if (plan.dx == LF_DX_AUGMENTED && dropout_p > 0.0f) return "dx 'augmented' takes no dropout (use 'masked')";
    if (plan.dx == LF_DX_AUGMENTED && g.dtype == LF_DT_F32)
        return "a float32 g on a bf16/fp16 base takes dx 'masked' (g·W rounded alone)";
    return NULL;
}

int lf_lora_backward_half(lf_pool *pool, int64_t n, int64_t k, int64_t m, int64_t r, lf_tview g, lf_tview x,
                          lf_view u, lf_tview W, lf_tview A, lf_tview B, float scale, float dropout_p, uint64_t seed,
                          const lf_col_scale *cs, void *dx, void *dA, void *dB, const lf_backward_plan *force,
                          lf_backward_plan *plan_out) {
    int st = lf_lora_check_dims(n, k, m, r, dropout_p);
    if (st) return st;
    if (!dtypes_ok(x, k, m, W, A, B) || g.dtype != x.dtype || (g.dtype == LF_DT_F32 && g.cs != 1)) return LF_EINVAL;
    if (dropout_p > 0.0f && !(x.cs == 1 && x.rs == k)) return LF_EINVAL;
    if (force && lf_backward_plan_unfit_half(*force, g, x, r, dropout_p, dx != NULL)) return LF_EINVAL;
    if (!col_scale_ok(cs, g, A, dropout_p) || (cs && cs->dc && !cs->z) || (cs && force && force->dx == LF_DX_AUGMENTED))
        return LF_EINVAL;
    lf_backward_plan plan = force ? *force : lf_plan_backward_half(n, g, x, W, r, dropout_p, dx != NULL);
    if (cs && plan.dx == LF_DX_AUGMENTED) plan.dx = LF_DX_MASKED; /* g'·W rounded alone */
    if (plan_out) *plan_out = plan;
    const lf_dtype adt = A.dtype;
    float *v = malloc((size_t)(n * r > 0 ? n * r : 1) * sizeof(float));
    float *dbt = malloc((size_t)(r * m > 0 ? r * m : 1) * sizeof(float));                 /* dBᵀ (r, m) */
    float *da32 = adt == LF_DT_F32 ? dA : malloc((size_t)(r * k > 0 ? r * k : 1) * sizeof(float));
    const int mixed = g.dtype == LF_DT_F32; /* dx float32: dx32 is dx itself; g·W on g narrowed to W's dtype */
    float *dx32 = !dx ? NULL : mixed ? dx : malloc((size_t)(n * k > 0 ? n * k : 1) * sizeof(float)); /* dx's fp32 sum */
    uint16_t *gh = mixed && dx ? narrowed_copy(g, n, m, W.dtype) /* the base product's g: g', rounded (DoRA) */
                   : cs && dx ? malloc((size_t)(n * m > 0 ? n * m : 1) * sizeof(uint16_t)) : NULL;
    const lf_tview gb = gh ? (lf_tview){gh, m, 1, W.dtype, NULL} : g;
    float *bc = cs ? lf_widened_copy(B, m, r, 1.0f) : NULL; /* DoRA: c ⊙ B (m, r), v = g·(c ⊙ B) = g'·B */
    for (int64_t j = 0; bc && j < m; j++)
        for (int64_t q = 0; q < r; q++) bc[j * r + q] *= cs->c[j];
    const lf_tview bv = bc ? (lf_tview){bc, r, 1, LF_DT_F32, NULL} : B;
    /* A's rows as fp32 vectors for the masked dx: A itself when it is fp32 with rows contiguous, else a copy */
    const int a_in_place = A.dtype == LF_DT_F32 && A.cs == 1;
    float *acopy = plan.dx == LF_DX_MASKED && !a_in_place ? lf_widened_copy(A, r, k, 1.0f) : NULL;
    const lf_view a32 = a_in_place ? (lf_view){A.p, A.rs, 1} : (lf_view){acopy, k, 1};
    if (!v || !dbt || !da32 || (dx && !dx32) || ((mixed || cs) && dx && !gh) || (cs && !bc) ||
        (plan.dx == LF_DX_MASKED && !a_in_place && !acopy)) {
        st = LF_ENOMEM;
        goto done;
    }
    const lf_view vv = {v, r, 1};
    /* DoRA: gh = round_W(g ⊙ c) and dc = Σ_i g ⊙ z̃, one pass over g */
    if (cs && (gh || cs->dc)) st = lf_scale_cols(pool, n, m, g, cs->c, cs->z, m, W.dtype, gh, cs->dc);
    /* v (n,r) = g · B (DoRA: g · (c ⊙ B)): g streamed once (skinny) or a GEMM */
    const lf_operand go = lf_operand_typed(g, 1.0f), bo = lf_operand_typed(bv, 1.0f);
    if (!st)
        st = plan.vb == LF_VB_SKINNY ? lf_rowdot(pool, n, m, r, g, bv, 1.0f, v, NULL)
                                     : lf_gemm(pool, n, r, m, &go, &bo, 0.0f, NULL, v, r);
    /* dBᵀ (r,m) = s · uᵀ · g — g (the big operand) read by rows: streamed (skinny) or as a GEMM's B-operand */
    if (!st && plan.vb == LF_VB_SKINNY) {
        st = lf_rank_update(pool, r, m, n, u, g, scale, dbt, m, NULL);
    } else if (!st) {
        const lf_operand ut = lf_operand_plain((lf_view){u.p, u.cs, u.rs}, scale);
        st = lf_gemm(pool, r, m, n, &ut, &go, 0.0f, NULL, dbt, m);
    }
    if (!st) {
        float *db32 = adt == LF_DT_F32 ? dB : malloc((size_t)(m * r > 0 ? m * r : 1) * sizeof(float));
        if (!db32) {
            st = LF_ENOMEM;
            goto done;
        }
        lf_transpose_f32(dbt, m, r, m, 1.0f, db32, r);
        for (int64_t j = 0; cs && j < m; j++) /* DoRA: dB = c ⊙ (s·gᵀ·u) by rows, = s·g'ᵀ·u */
            for (int64_t q = 0; q < r; q++) db32[j * r + q] *= cs->c[j];
        if (adt != LF_DT_F32) {
            lf_narrow(db32, m * r, adt, dB);
            free(db32);
        }
    }
    /* dA (r,k) = s · vᵀ · x̃: x streamed with x̃ regenerated from the seed (skinny), or a GEMM over x̃ */
    if (!st && plan.da == LF_DA_SKINNY) {
        const lf_mask xm = {seed, dropout_p > 0.0f ? lf_dropout_threshold(dropout_p) : 0u, 1.0f / (1.0f - dropout_p)};
        st = lf_rank_update(pool, r, k, n, vv, x, scale, da32, k, dropout_p > 0.0f ? &xm : NULL);
    } else if (!st) {
        const lf_operand vt = lf_operand_plain((lf_view){v, 1, r}, scale), xd = lf_operand_dropped(x, 1.0f, dropout_p, seed);
        st = lf_gemm(pool, r, k, n, &vt, &xd, 0.0f, NULL, da32, k);
    }
    if (!st && adt != LF_DT_F32) lf_narrow(da32, r * k, adt, dA);
    if (!st && plan.dx == LF_DX_MASKED) {
        /* dx32 = g · W, then dx = round(dx32 + s/(1-p) · mask ⊙ (v · A)). g·W for a few tokens with W's rows
         * contiguous (a quantized W as stored): W streamed once row by row (lf_rows_axpy), never packed */
        if (lf_rows_axpy_streams(n, W.cs, W.dtype)) {
            st = lf_rows_axpy(pool, n, m, k, gb, W, dx32, k);
        } else {
            const lf_operand gbo = lf_operand_typed(gb, 1.0f), wo = lf_operand_typed(W, 1.0f);
            st = lf_gemm(pool, n, k, m, &gbo, &wo, 0.0f, NULL, dx32, k);
        }
        /* mixed: g·W's own rounding, then the fp32 term, dx float32 (dx32); DoRA: g'·W's own rounding */
        const lf_mask xm = {seed, dropout_p > 0.0f ? lf_dropout_threshold(dropout_p) : 0u, 1.0f};
        if (!st)
            st = lf_rank_rows(pool, n, k, r, vv, a32, scale / (1.0f - dropout_p), &xm, dx32, k,
                              mixed || cs ? W.dtype : LF_DT_F32, W.dtype, mixed ? NULL : dx, k, NULL);
    } else if (!st && plan.dx == LF_DX_AUGMENTED) {
        /* dx = round([g | s·v] · [W ; A]) — one GEMM over K' = m + r */
        const lf_operand gv = lf_operand_concat(g, 1.0f, lf_tv32((lf_view){v, r, 1}), scale, m);
        const lf_operand wa = lf_operand_concat(W, 1.0f, A, 1.0f, m);
        st = lf_gemm(pool, n, k, m + r, &gv, &wa, 0.0f, NULL, dx32, k);
        if (!st) st = lf_rank_rows(pool, n, k, 0, vv, vv, 1.0f, NULL, dx32, k, LF_DT_F32, x.dtype, dx, k, NULL);
    }
done:
    free(v);
    free(dbt);
    if (da32 != dA) free(da32);
    if (!mixed) free(dx32);
    free(gh);
    free(bc);
    free(acopy);
    return st;
}
