/* lorafuse/kernels.h — the one C API that the CPython binding calls.
 *
 * Pure C11: raw pointers, int64_t sizes and strides, int status codes. Nothing here knows
 * about Python, NumPy or torch.
 *
 * Dimension legend (DESIGN.md §1, PyTorch conventions):
 *   n = tokens (batch·seq), k = in_features, m = out_features, r = LoRA rank, s = scale.
 *   x (n,k)  W (m,k)  bias (m)  A (r,k) = lora_A.weight  B (m,r) = lora_B.weight
 *
 * Forward:   u = x̃·Aᵀ (n,r),   y = x·Wᵀ + bias + s·u·Bᵀ = [x | s·u]·[W | B]ᵀ + bias (n,m)
 * Backward:  v = g·B (n,r),  dB = s·gᵀ·u,  dA = s·vᵀ·x̃,  dx = g·W + s·drop'(v·A)
 * where x̃ = x ⊙ mask / (1-p), mask from dropout_hash.h (regenerated, never stored).
 */
#ifndef LORAFUSE_KERNELS_H
#define LORAFUSE_KERNELS_H

#include <stddef.h>
#include <stdint.h>

#include "lorafuse/status.h"

#ifdef __cplusplus
extern "C" {
#endif

/* Status codes (LF_OK, LF_EINVAL, ...) and the message convention: lorafuse/status.h. */

/* ---- cancellation, per call: a caller binds a token to its thread (lf_cancel_bind); the kernels
 *      it then calls poll that token — on its thread and on the pool workers running its jobs — at
 *      every block (well under a millisecond), and return LF_EINTR once it is requested. Kernels
 *      called from other threads (another token, or none) never see it. ---- */
typedef struct {
    int requested; /* read and written atomically (lf_cancel_request, lf_interrupt_pending) */
} lf_cancel;
void lf_cancel_bind(lf_cancel *c);    /* the calling thread's token from now on; NULL: none */
void lf_cancel_request(lf_cancel *c); /* async-signal-safe */
int lf_interrupt_pending(void);       /* 1 if the token bound to this thread is requested */
/* For a SIGINT handler: lf_interrupt_request() (async-signal-safe) requests the token last given to
 * lf_interrupt_target (NULL: none, the request is dropped) — the call the user meant to stop. */
void lf_interrupt_target(lf_cancel *c);
void lf_interrupt_request(void);

/* ---- instruction-set dispatch (the library's only global state) ---- */
/* Ordered: each level implies the ones below it. LF_ISA_AVX512_BF16 is AVX-512 plus the
 * AVX512_BF16 dot product (vdpbf16ps): fp32 work runs the AVX-512 kernels, two bf16 GEMM
 * operands the bf16 pair tile (ukernel_avx512_bf16.c). LF_ISA_AMX_BF16 is that plus AMX-TILE and
 * AMX-BF16 (with the OS's permission for tile data): two bf16 GEMM operands run the AMX tiles
 * (ukernel_amx_bf16.c), everything else as on avx512_bf16. */
typedef enum { LF_ISA_GENERIC = 0, LF_ISA_AVX2 = 1, LF_ISA_AVX512 = 2, LF_ISA_AVX512_BF16 = 3, LF_ISA_AMX_BF16 = 4 } lf_isa;

lf_isa lf_cpu_best_isa(void);      /* best ISA this CPU and OS support (cpuid + xgetbv) */
int lf_set_isa(lf_isa isa);        /* LF_EISA if the CPU lacks it; not thread-safe vs running kernels */
lf_isa lf_get_isa(void);
const char *lf_isa_name(lf_isa isa); /* "generic" | "avx2" | "avx512" | "avx512_bf16" | "amx_bf16" */

/* ---- thread pool: torch's OpenMP runtime when one is loaded (one pool for both, nothing to
 *      fight), else pthreads that sleep on a condition variable after a short spin ---- */
typedef struct lf_pool lf_pool;
lf_pool *lf_pool_create(int nthreads); /* nthreads >= 1; NULL on failure */
void lf_pool_destroy(lf_pool *pool);
int lf_pool_threads(const lf_pool *pool);
/* 1 if jobs run on an already-loaded libgomp (torch's) rather than the pthread workers */
int lf_pool_uses_openmp(lf_pool *pool);
/* In a fork()'s child of the process that made the pool: fresh locks and pthread workers of this process (never
 * libgomp's, whose team stayed in the parent), and 1; else 0 and nothing changes. Call it before any other use of
 * the pool in a process that may have forked, with no other thread using it (lorafuse._C: holding the GIL). */
int lf_pool_after_fork(lf_pool *pool);

/* ---- strided read-only matrix: element (i, j) at p[i*rs + j*cs] (strides in elements) ---- */
typedef struct {
    const float *p;
    int64_t rs, cs;
} lf_view;

/* C (M,N; row stride ldc) = beta·C + alpha·a·b (+ bias[j] when beta == 0).
 * a (M,K), b (K,N) strided; beta ∈ {0, 1}; bias (N) or NULL; C must not alias a, b or bias. */
int lf_sgemm(lf_pool *pool, int64_t M, int64_t N, int64_t K, float alpha, lf_view a, lf_view b,
             float beta, const float *bias, float *c, int64_t ldc);

/* ---- half-precision operands: element types of lf_hgemm's inputs ---- */
typedef enum { LF_DT_F32 = 0, LF_DT_BF16 = 1, LF_DT_F16 = 2 } lf_dtype;
/* bitsandbytes' 4-bit or 8-bit storage of a weight (lorafuse/quant.h) */
typedef struct lf_qweight lf_qweight;

/* strided matrix of any lf_dtype: element (i, j) at ((const T *)p)[i*rs + j*cs] (strides in
 * elements), T = float for LF_DT_F32, uint16_t (the bits of a bfloat16 / IEEE binary16) otherwise.
 * With qw != NULL (p unused) the elements come from a quantized weight W (rows, cols) instead: element
 * (i, j) is W's flat element e = i*rs + j*cs (C order, e = r*cols + c), of value
 *     code[q[e]] · absmax[e / B]    (4-bit: one fp32 product, bnb's dequantize_4bit)
 *     c[e] · (SCB[r] · fl(1/127))   (8-bit: bnb's MatMul8bitFp)
 * rounded once to dtype (fp32: as it is; bf16 / fp16: to nearest even) — so Wᵀ, the forward's
 * operand, is {rs = 1, cs = cols} and W of dx = g·W is {rs = cols, cs = 1}. Dequantized while the
 * GEMM packs it (gemm_pack.c); W in full precision never exists in memory. */
typedef struct {
    const void *p;
    int64_t rs, cs;
    lf_dtype dtype;
    const lf_qweight *qw; /* NULL: an ordinary operand (last, so {p, rs, cs, dtype} still initialises one) */
} lf_tview;

/* C (M,N; row stride ldc, fp32) = beta·C + alpha·a·b (+ bias[j] when beta == 0), a (M,K) and b (K,N)
 * each fp32, bf16 or fp16 (either may be a quantized weight's view, qw), accumulated in fp32. Two bf16
 * operands with alpha == 1 on the avx512_bf16 level run vdpbf16ps on bf16 K-pairs, on the amx_bf16
 * level AMX's tdpbf16ps (their rounding: tests/tolerances.py); everything else widens the half
 * operands to fp32 while packing (exact) and runs the fp32 micro-kernels.
 * beta ∈ {0, 1}; bias (N) or NULL; C must not alias a, b or bias. LF_EINVAL before any compute for a
 * qw view whose weight is inconsistent (lf_qweight_unfit) or whose elements i*rs + j*cs fall outside
 * [0, rows·cols) for some (i, j) of the operand's extent. */
int lf_hgemm(lf_pool *pool, int64_t M, int64_t N, int64_t K, float alpha, lf_tview a, lf_tview b, float beta,
             const float *bias, float *c, int64_t ldc);
/* How lf_hgemm runs these operands on the ISA in use: "amx_bf16" (AMX tiles), "bf16_pairs"
 * (vdpbf16ps on K-pairs) or "widened" (to fp32 while packing, the fp32 micro-kernels) */
const char *lf_hgemm_path(float alpha, lf_tview a, lf_tview b);
/* 1 if lf_hgemm of a (M, K) · b (K, N) runs transposed, W's rows read in place (gemm.c w_rows_in_place; the
 * same bits), else 0 */
int lf_hgemm_w_rows(int64_t M, int64_t N, int64_t K, float alpha, lf_tview a, lf_tview b);

/* ---- packed frozen weight (opt-in cache): the GEMM panels of W, packed once and reused by
 *      every call while W is unchanged — a call then skips re-packing W, at the memory cost
 *      of a copy of W per direction. The caller guarantees W is not modified meanwhile. ---- */
typedef struct lf_packed_b lf_packed_b;
/* *out = W (m,k) packed for the forward (for_backward = 0: the operand Wᵀ of y = x·Wᵀ) or for
 * dx = g·W (for_backward = 1), for the current ISA. Free with lf_packed_weight_free. */
int lf_pack_weight(lf_view W, int64_t m, int64_t k, int for_backward, lf_packed_b **out);
void lf_packed_weight_free(lf_packed_b *pw);
size_t lf_packed_weight_bytes(const lf_packed_b *pw);
/* 1 if pw was packed from this very view of W (m,k) in this direction */
int lf_packed_weight_matches(const lf_packed_b *pw, lf_view W, int64_t m, int64_t k, int for_backward);

/* The forward's plan: how u = x̃·Aᵀ is formed and how y is, chosen by lf_plan_forward alone
 * (lora.c says when each applies and why). */
typedef enum {
    LF_U_NONE = 0, /* u not formed: y from W + s·B·A merged into W's packed panels */
    LF_U_ROWDOTS,  /* dot products of contiguous rows (decode sizes) */
    LF_U_SKINNY,   /* one streaming read of x (skinny.c) */
    LF_U_GEMM,     /* a GEMM over x̃ (dropout, or strides the others do not take) */
} lf_forward_u_path;
typedef enum {
    LF_Y_MERGED = 0, /* x · (W + s·B·A)ᵀ, the rank-r term added while W is packed */
    LF_Y_DECODE,     /* dot products of rows, W streamed once in place */
    LF_Y_FEW_TOKENS, /* yᵀ = [W | B]·[x | s·u]ᵀ, W read in place by the micro-kernel */
    LF_Y_AUGMENTED,  /* one GEMM over k + r: [x | s·u] · [Wᵀ ; Bᵀ] */
    LF_Y_SPLIT,      /* x · Wᵀ + bias alone (for a bf16 base: the bf16 tiles), then + s·u·Bᵀ row block by
                        row block (rank_rows.c), rounded there to a half output */
} lf_forward_y_path;
typedef struct {
    lf_forward_u_path u;
    lf_forward_y_path y;
} lf_forward_plan;

/* The plan lf_lora_forward_f32 runs for these operands (need_u: whether u is an output). */
lf_forward_plan lf_plan_forward(lf_pool *pool, int64_t n, int64_t k, int64_t m, int64_t r, lf_view x, lf_view W,
                                lf_view A, lf_view B, float dropout_p, int need_u, const lf_packed_b *wpack);

/* NULL if `plan` can run these operands, else why not (a static sentence naming the path). Every
 * path has preconditions; lf_plan_forward only picks plans that meet them. */
const char *lf_forward_plan_unfit(lf_forward_plan plan, int64_t n, int64_t r, lf_view x, lf_view W, lf_view A,
                                  lf_view B, float dropout_p, int need_u);

/* Fused LoRA forward (fp32). y (n,m) and u (n,r) are C-contiguous outputs; u == NULL means u is
 * not wanted (inference): y may then be computed with W + s·B·A merged on the fly.
 * dropout_p ∈ [0,1); when > 0, x must be C-contiguous (x.rs == k, x.cs == 1): the mask index
 * is the flat element index i·k + j. wpack: W packed by lf_pack_weight(..., 0), or NULL.
 * force: the plan to run instead of lf_plan_forward's (LF_EINVAL if lf_forward_plan_unfit), or NULL.
 * plan: where to write the plan it ran, or NULL. */
int lf_lora_forward_f32(lf_pool *pool, int64_t n, int64_t k, int64_t m, int64_t r, lf_view x,
                        lf_view W, const float *bias, lf_view A, lf_view B, float scale,
                        float dropout_p, uint64_t seed, float *y, float *u, const lf_packed_b *wpack,
                        const lf_forward_plan *force, lf_forward_plan *plan);

/* The backward's plan, chosen by lf_plan_backward alone (lora.c). */
typedef enum {
    LF_VB_SKINNY = 0, /* v = g·B and dB = s·gᵀ·u with g streamed once per product (skinny.c) */
    LF_VB_GEMM,       /* both as GEMMs (strides the skinny kernels do not take, r > 64) */
} lf_backward_vb_path;
typedef enum {
    LF_DA_SKINNY = 0, /* dA = s·vᵀ·x̃ with x streamed, x̃ regenerated from the seed on the way */
    LF_DA_GEMM,       /* a GEMM over x̃ */
} lf_backward_da_path;
typedef enum {
    LF_DX_NONE = 0,  /* dx not wanted */
    LF_DX_AUGMENTED, /* no dropout: one GEMM over m + r, [g | s·v] · [W ; A] */
    LF_DX_MASKED,    /* dropout, or a few tokens: g·W (then W streamed row by row), then + s/(1-p)·mask ⊙ (v·A) */
} lf_backward_dx_path;
typedef struct {
    lf_backward_vb_path vb;
    lf_backward_da_path da;
    lf_backward_dx_path dx;
} lf_backward_plan;

/* The plan lf_lora_backward_f32 runs for these operands (n tokens; need_dx: whether dx is an output). */
lf_backward_plan lf_plan_backward(int64_t n, int64_t r, lf_view g, lf_view x, lf_view u, lf_view W, float dropout_p,
                                  int need_dx);

/* NULL if `plan` can run these operands, else why not (lf_forward_plan_unfit's counterpart). */
const char *lf_backward_plan_unfit(lf_backward_plan plan, int64_t r, lf_view g, lf_view x, lf_view u,
                                   float dropout_p, int need_dx);

/* Adapter-only backward (fp32). g (n,m), x (n,k), u (n,r) as saved by forward.
 * Outputs C-contiguous: dx (n,k) or NULL to skip, dA (r,k), dB (m,r). dW is never formed.
 * wpack: W packed by lf_pack_weight(..., 1), or NULL. force: the plan to run instead of
 * lf_plan_backward's (LF_EINVAL if lf_backward_plan_unfit), or NULL. plan: where to write the plan
 * it ran, or NULL. */
int lf_lora_backward_f32(lf_pool *pool, int64_t n, int64_t k, int64_t m, int64_t r, lf_view g,
                         lf_view x, lf_view u, lf_view W, lf_view A, lf_view B, float scale,
                         float dropout_p, uint64_t seed, float *dx, float *dA, float *dB,
                         const lf_packed_b *wpack, const lf_backward_plan *force, lf_backward_plan *plan);

/* ---- half-precision bases (lora_half.c): x, W and g bf16 or fp16 (one dtype), the adapters A and B
 *      fp32 (PEFT's default on a half base) or the base's dtype, bias any of the three. Every product
 *      is exact and summed in fp32; u = x̃·Aᵀ is kept in fp32; y and dx are rounded once, to the
 *      base's dtype, after their full fp32 sum; dA and dB once, to the adapters' dtype. Products of
 *      two bf16 operands (x·Wᵀ, g·W) run the bf16 tiles where the ISA has them (lf_hgemm). A float32 x
 *      and g with rows contiguous on a half W ('mixed', fp32 adapters): the base products on x, g rounded
 *      to W's dtype and rounded themselves, the rank-r terms in fp32 added after; y, dx float32
 *      (lora_half.c). ---- */

/* The forward's plan for a half base of n tokens: u 'skinny' (x streamed once, x̃ regenerated) for rows
 * of x contiguous and 1 ≤ r ≤ 64, else 'gemm'; y 'decode' for at most 8 tokens with rows of x and W
 * contiguous (W streamed once in place; with AMX for a dense bf16 W at most the tunable
 * half_decode_max_n), else 'split' when x·Wᵀ takes a bf16 tile, else 'augmented' (one widened GEMM). */
lf_forward_plan lf_plan_forward_half(int64_t n, lf_tview x, lf_tview W, int64_t r);
/* NULL if `plan` can run these operands of a half base, else why not (u 'skinny' or 'gemm'; y 'decode'
 * within its preconditions, 'split' or 'augmented'). */
const char *lf_forward_plan_unfit_half(lf_forward_plan plan, int64_t n, lf_tview x, lf_tview W, int64_t r);

/* DoRA's column scale on a half base (a bf16 / fp16 x and g of W's dtype, fp32 adapters, no dropout; lora_half.c).
 * The forward keeps the base product's own rounding and puts bias and scale after the fp32 sum z̃:
 *     z̃ = round_W(x·Wᵀ) + s·u·Bᵀ  (fp32, into z when it is not NULL),   y = round(bias + c ⊙ z̃)
 * and the backward runs on g' = g ⊙ c:  v = g'·B, dB = s·g'ᵀ·u, dA = s·vᵀ·x,
 *     dx = round(round_W(round_W(g')·W) + s·v·A),   dc_j = Σ_i g_ij·z̃_ij (into dc when it is not NULL; z read).
 * A plan's 'augmented' y or dx (one GEMM over the rank-r term too) becomes 'split' / 'masked'; forced, LF_EINVAL. */
typedef struct {
    const float *c; /* (m): μ/ν */
    float *z;       /* (n, m) C-contiguous fp32: the forward's z̃ out (NULL: not kept), the backward's in for dc */
    float *dc;      /* (m) fp32: the backward's Σ_i g ⊙ z̃, or NULL */
} lf_col_scale;

/* Fused LoRA forward on a half base. x (n,k) [dropout: C-contiguous], W (m,k), bias (m) — bias.p NULL
 * for none, its rs unused (elements at p[j·cs]) —, A (r,k), B (m,r) as the dtypes above, any strides.
 * y (n,m) C-contiguous in x's dtype (float, or uint16_t bits); u (n,r) C-contiguous fp32, or NULL (not kept).
 * cs: DoRA's column scale (above), or NULL. force / plan as lf_lora_forward_f32. LF_EINVAL for dtypes outside the
 * rules above. */
int lf_lora_forward_half(lf_pool *pool, int64_t n, int64_t k, int64_t m, int64_t r, lf_tview x, lf_tview W,
                         lf_tview bias, lf_tview A, lf_tview B, float scale, float dropout_p, uint64_t seed,
                         const lf_col_scale *cs, void *y, float *u, const lf_forward_plan *force,
                         lf_forward_plan *plan);

/* The backward's plan for a half base: v/dB 'skinny' (v = g·B and dBᵀ = s·uᵀ·g with g streamed) for rows
 * of g contiguous and 1 ≤ r ≤ 64, else 'gemm'; dA 'skinny' (x streamed, x̃ regenerated) for rows of x
 * contiguous and 1 ≤ r ≤ 64, else 'gemm'; dx 'masked' (g·W alone — for n ≤ 8 tokens on a W with rows
 * contiguous, or a 4-bit W, streamed row by row —, then the rank-r term row block by row block) with
 * dropout, for n ≤ 8 such tokens, or when g·W takes a bf16 tile, else 'augmented'. */
lf_backward_plan lf_plan_backward_half(int64_t n, lf_tview g, lf_tview x, lf_tview W, int64_t r, float dropout_p,
                                       int need_dx);
/* NULL if `plan` can run these operands of a half base, else why not. */
const char *lf_backward_plan_unfit_half(lf_backward_plan plan, lf_tview g, lf_tview x, int64_t r, float dropout_p,
                                        int need_dx);

/* Adapter-only backward on a half base: g (n,m) and x (n,k) [dropout: C-contiguous] in the base's
 * dtype (or both float32, mixed), u (n,r) fp32 as the forward kept it, W, A, B as in the forward. Outputs
 * C-contiguous: dx (n,k) in g's dtype or NULL to skip, dA (r,k) and dB (m,r) in the adapters' dtype (float or
 * uint16_t bits). cs: DoRA's column scale (above), or NULL. */
int lf_lora_backward_half(lf_pool *pool, int64_t n, int64_t k, int64_t m, int64_t r, lf_tview g, lf_tview x,
                          lf_view u, lf_tview W, lf_tview A, lf_tview B, float scale, float dropout_p, uint64_t seed,
                          const lf_col_scale *cs, void *dx, void *dA, void *dB, const lf_backward_plan *force,
                          lf_backward_plan *plan);

/* DoRA's pass over a float32 upstream gradient g (n, m), any strides (col_scale.c), with c (m) = μ/ν:
 *     out (n, m) C-contiguous = g ⊙ c,   dc (m) = Σ_i g_ij·z_ij (z (n, m), rows ldz ≥ m apart; dc NULL: not summed)
 * one read of g and z; rows on the pool, dc summed per thread then in thread order. LF_EINVAL for bad sizes. */
int lf_dora_grad_f32(lf_pool *pool, int64_t n, int64_t m, lf_view g, const float *c, const float *z, int64_t ldz,
                     float *out, float *dc);

/* out (n,k) C-contiguous = x̃ = x ⊙ mask / (1-p) for C-contiguous x — the exact mask the
 * kernels apply (for tests and for the pure-torch path). */
int lf_dropout_f32(int64_t n, int64_t k, const float *x, float dropout_p,
                   uint64_t seed, float *out);

#ifdef __cplusplus
}
#endif
#endif
