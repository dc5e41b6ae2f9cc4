/* quant4.c — bitsandbytes' weight storage on the CPU (lorafuse/quant.h): checks and dequantization of
 * any sub-matrix for 4-bit and 8-bit weights (the inner loops per ISA in quant4_simd.c), the 4-bit
 * kind's quantization and double quantization
 * exactly as bnb 0.50 does them on the CPU (its default `quantize_4bit`, its lookup-table
 * `quantize_blockwise`), the arithmetic written out above each loop. */
#include <float.h>
#include <math.h>
#include <stdlib.h>

#include "internal.h"
#include "quant4_internal.h"

int64_t lf_q4_blocks(int64_t rows, int64_t cols, int64_t blocksize) {
    int64_t n;
    if (rows < 0 || cols < 0 || blocksize < 1 || !lf_mul_ok(rows, cols, &n)) return -1;
    return n / blocksize + (n % blocksize != 0);
}

static int q4_blocksize_ok(int64_t b) { return b >= 32 && b <= 4096 && (b & (b - 1)) == 0; }

/* the 8-bit kind's checks (lf_qweight_unfit): a block per row, one fp32 scale each */
static const char *q8_unfit(const lf_qweight *w) {
    int64_t n;
    if (w->rows < 0 || w->cols < 0 || !lf_mul_ok(w->rows, w->cols, &n))
        return "the shape must be two sizes >= 0 whose product fits int64";
    if (w->blocksize != (w->cols > 0 ? w->cols : 1)) return "an int8 weight's block is its row (blocksize = cols)";
    if (w->nested) return "an int8 weight has no double quantization";
    if (w->nbytes < n || (n > 0 && !w->data)) return "data holds fewer than rows*cols int8 codes";
    if (w->n_absmax < w->rows || (w->rows > 0 && !w->absmax)) return "SCB holds fewer scales than rows";
    return NULL;
}

const char *lf_qweight_unfit(const lf_qweight *w) {
    if (!w) return "the weight is NULL";
    if (w->type == LF_Q8_ROW) return q8_unfit(w);
    if (w->type != LF_Q4_NF4 && w->type != LF_Q4_FP4) return "quant_type must be nf4, fp4 or int8";
    if (!q4_blocksize_ok(w->blocksize)) return "blocksize must be one of 32, 64, 128, 256, 512, 1024, 2048, 4096";
    const int64_t blocks = lf_q4_blocks(w->rows, w->cols, w->blocksize);
    if (blocks < 0) return "the shape must be two sizes >= 0 whose product fits int64";
    const int64_t n = w->rows * w->cols;
    if (w->nbytes < n / 2 + (n & 1) || (n > 0 && !w->data)) return "data holds fewer than ceil(rows*cols/2) bytes";
    if (!w->nested) {
        if (w->n_absmax < blocks || (blocks > 0 && !w->absmax)) return "absmax holds fewer scales than blocks";
        return NULL;
    }
    if (w->n_absmax < blocks || (blocks > 0 && !w->absmax_q)) return "absmax holds fewer codes than blocks";
    if (w->nested_blocksize < 1) return "nested_blocksize must be >= 1";
    const int64_t blocks2 = blocks / w->nested_blocksize + (blocks % w->nested_blocksize != 0);
    if (w->n_nested_absmax < blocks2 || (blocks2 > 0 && !w->nested_absmax))
        return "nested_absmax holds fewer scales than ceil(blocks / nested_blocksize)";
    if (blocks > 0 && !w->nested_code) return "nested_code (256 entries) is missing";
    return NULL;
}

static lf_q4_run_fn run_for_isa(void) {
    switch (lf_get_isa()) {
    case LF_ISA_AMX_BF16:
    case LF_ISA_AVX512_BF16:
    case LF_ISA_AVX512: return lf_q4_run_avx512;
    case LF_ISA_AVX2: return lf_q4_run_avx2;
    default: return lf_q4_run_generic;
    }
}

static lf_q8_run_fn q8_run_for_isa(void) {
    switch (lf_get_isa()) {
    case LF_ISA_AMX_BF16:
    case LF_ISA_AVX512_BF16: return lf_q8_run_bf16;
    case LF_ISA_AVX512: return lf_q8_run_avx512;
    case LF_ISA_AVX2: return lf_q8_run_avx2;
    default: return lf_q8_run_generic;
    }
}

/* lf_qweight_span of an 8-bit weight: the run cut at row ends, each piece one lf_q8_run_fn call with
 * its row's scale SCB[i]·fl(1/127) */
static void q8_span(const lf_qweight *w, int64_t e, int64_t n, lf_dtype dt, void *out) {
    const lf_q8_run_fn run = q8_run_for_isa();
    const size_t esize = dt == LF_DT_F32 ? sizeof(float) : sizeof(uint16_t);
    for (const int64_t end = e + n; e < end;) {
        const int64_t i = e / w->cols, stop = end < (i + 1) * w->cols ? end : (i + 1) * w->cols;
        run((const int8_t *)w->data + e, stop - e, lf_qweight_scale(w, i), dt, out);
        out = (char *)out + (size_t)(stop - e) * esize;
        e = stop;
    }
}

void lf_qweight_span(const lf_qweight *w, int64_t e, int64_t n, lf_dtype dt, void *out) {
    if (w->type == LF_Q8_ROW) {
        q8_span(w, e, n, dt, out);
        return;
    }
    /* into bf16 / fp16: the vpermw span where the avx512_bf16 level has VBMI (Zen 4, Sapphire Rapids), else the
     * vpshufb span from the avx2 level up (the same bits; each forced and tested); fp32 by the ISA's run per block */
    const lf_isa isa = lf_get_isa();
    if (dt != LF_DT_F32 && isa >= LF_ISA_AVX512_BF16 && lf_q4_span16_vbmi(w, e, n, dt, out)) return;
    if (dt != LF_DT_F32 && isa >= LF_ISA_AVX2 && lf_q4_span16_avx2(w, e, n, dt, out)) return;
    lf_q4_span_blocks(w, e, n, dt, out, run_for_isa());
}

int lf_qweight_dequantize(const lf_qweight *w, int64_t r0, int64_t r1, int64_t c0, int64_t c1, lf_dtype out_dtype,
                     void *out, int64_t ldo) {
    if (lf_qweight_unfit(w) || r0 < 0 || r0 > r1 || r1 > w->rows || c0 < 0 || c0 > c1 || c1 > w->cols)
        return LF_EINVAL;
    if (out_dtype != LF_DT_F32 && out_dtype != LF_DT_BF16 && out_dtype != LF_DT_F16) return LF_EINVAL;
    if (r0 == r1 || c0 == c1) return LF_OK;
    int64_t last_row;
    if (!out || ldo < c1 - c0 || !lf_mul_ok(r1 - r0 - 1, ldo, &last_row)) return LF_EINVAL;
    const size_t esize = out_dtype == LF_DT_F32 ? sizeof(float) : sizeof(uint16_t);
    /* row i, columns [c0, c1): the flat run e ∈ [i·cols + c0, i·cols + c1) */
    for (int64_t i = r0; i < r1; i++)
        lf_qweight_span(w, i * w->cols + c0, c1 - c0, out_dtype, (char *)out + (size_t)((i - r0) * ldo) * esize);
    return LF_OK;
}

/* ---------------------------------------------------------------- 4-bit quantization */

/* the code of a scaled s ∈ [-1, 1]: p = #{bounds < s} (a branch-free binary search over the 15
 * sorted bounds: torch.bucketize, right=False), then NF4's code p, FP4's order[p] */
static uint8_t q4_code_of(float s, lf_qtype type) {
    const float *bounds = type == LF_Q4_NF4 ? lf_q4_bounds_nf4 : lf_q4_bounds_fp4;
    int p = 0;
    for (int step = 8; step; step >>= 1)
        if (p + step - 1 < 15 && bounds[p + step - 1] < s) p += step;
    return type == LF_Q4_NF4 ? (uint8_t)p : lf_q4_order_fp4[p];
}

int lf_q4_quantize(lf_qtype type, int64_t blocksize, int64_t n, const void *src, lf_dtype src_dtype,
                   uint8_t *packed, float *absmax) {
    if ((type != LF_Q4_NF4 && type != LF_Q4_FP4) || !q4_blocksize_ok(blocksize) || n < 0 ||
        (src_dtype != LF_DT_F32 && src_dtype != LF_DT_BF16 && src_dtype != LF_DT_F16))
        return LF_EINVAL;
    if (n == 0) return LF_OK;
    if (!src || !packed || !absmax) return LF_EINVAL;
    /* bnb (backends/default quantize_4bit), per block of B = blocksize flat elements x:
     *   a = max |x|;  a full block stores a and scales s = clamp(x · (1 / max(a, 1e-38f)), -1, 1);
     *   the short last block stores a' = max(a, 1e-38f) and scales s = clamp(x / a', -1, 1)
     * then code(s) as q4_code_of; two codes a byte, the even element in the high nibble, an odd n
     * padded with code(0). Codes are written as they come (a nibble at a time). */
    const float tiny = 1e-38f; /* torch's clamp(min=1e-38) on fp32: the float nearest 1e-38 */
    for (int64_t start = 0; start < n; start += blocksize) {
        const int64_t len = n - start < blocksize ? n - start : blocksize;
        float a = 0.0f;
        for (int64_t k = 0; k < len; k++) {
            const float v = fabsf(lf_elem_f32(src, src_dtype, start + k));
            if (!(v <= FLT_MAX)) return LF_EINVAL; /* inf or NaN */
            if (v > a) a = v;
        }
        const int full = len == blocksize;
        const float clamped = a < tiny ? tiny : a, recip = 1.0f / clamped;
        absmax[start / blocksize] = full ? a : clamped;
        for (int64_t k = 0; k < len; k++) {
            const float x = lf_elem_f32(src, src_dtype, start + k);
            float s = full ? x * recip : x / clamped;
            s = s < -1.0f ? -1.0f : s > 1.0f ? 1.0f : s;
            const uint8_t q = q4_code_of(s, type);
            const int64_t e = start + k;
            if (e & 1) packed[e >> 1] = (uint8_t)(packed[e >> 1] | q);
            else packed[e >> 1] = (uint8_t)(q << 4);
        }
    }
    if (n & 1) packed[n >> 1] = (uint8_t)(packed[n >> 1] | q4_code_of(0.0f, type));
    return LF_OK;
}

/* ---------------------------------------------------------------- 8-bit blockwise (double quant) */

#define LF_Q8_LUT 65536

/* bnb's table from a 16-bit grid of [-1, 1] to the nearest of 256 sorted codes (fp32 throughout):
 *   mid[c] = 0.5 · (code[c] + code[c+1]);  grid value g_i = -1 + (2·i) / 65535;
 *   lut[i] = #{c : mid[c] < g_i} */
static void q8_build_lut(const float *code, uint8_t *lut) {
    float mid[255];
    for (int c = 0; c < 255; c++) mid[c] = 0.5f * (code[c] + code[c + 1]);
    int c = 0;
    for (int i = 0; i < LF_Q8_LUT; i++) {
        const float g = -1.0f + (2.0f * (float)i) / (float)(LF_Q8_LUT - 1);
        while (c < 255 && mid[c] < g) c++;
        lut[i] = (uint8_t)c;
    }
}

/* one block of len x: *absmax = a = max |x|; a = 0 gives codes 0, else with v = x · (1 / a)
 * clamped to [-1, 1], the grid index ⌊((v + 1) · 0.5) · 65535 + 0.5⌋ (each step an fp32
 * rounding, truncated as bnb's cast to uint16) and its table entry */
static void q8_block(const float *x, int64_t len, const uint8_t *lut, uint8_t *q, float *absmax) {
    float a = 0.0f;
    for (int64_t k = 0; k < len; k++) a = fabsf(x[k]) > a ? fabsf(x[k]) : a;
    *absmax = a;
    if (a == 0.0f) {
        for (int64_t k = 0; k < len; k++) q[k] = 0;
        return;
    }
    const float inv = 1.0f / a;
    for (int64_t k = 0; k < len; k++) {
        float v = x[k] * inv;
        v = v < -1.0f ? -1.0f : v > 1.0f ? 1.0f : v;
        float t = (v + 1.0f) * 0.5f;
        t = t * (float)(LF_Q8_LUT - 1);
        t = t + 0.5f;
        q[k] = lut[(uint16_t)t];
    }
}

static int q8_check(int64_t n, int64_t blocksize, const void *x, const void *q, const float *absmax) {
    if (n < 0 || blocksize < 1 || blocksize > 4096) return LF_EINVAL;
    return n > 0 && (!x || !q || !absmax) ? LF_EINVAL : LF_OK;
}

int lf_q8_quantize_blockwise(const float *x, int64_t n, int64_t blocksize, const float *code, uint8_t *q,
                             float *absmax) {
    int status = q8_check(n, blocksize, x, q, absmax);
    if (status || n == 0) return status;
    for (int64_t k = 0; k < n; k++)
        if (!(fabsf(x[k]) <= FLT_MAX)) return LF_EINVAL;
    uint8_t *lut = malloc(LF_Q8_LUT);
    if (!code || !lut) {
        free(lut);
        return code ? LF_ENOMEM : LF_EINVAL;
    }
    q8_build_lut(code, lut);
    for (int64_t start = 0; start < n; start += blocksize)
        q8_block(x + start, n - start < blocksize ? n - start : blocksize, lut, q + start, absmax + start / blocksize);
    free(lut);
    return LF_OK;
}

int lf_q4_double_quant(const float *absmax, int64_t nblocks, float offset, int64_t nested_blocksize, uint8_t *qa,
                       float *a2) {
    int status = q8_check(nblocks, nested_blocksize, absmax, qa, a2);
    if (status || nblocks == 0) return status;
    if (!(fabsf(offset) <= FLT_MAX)) return LF_EINVAL;
    for (int64_t b = 0; b < nblocks; b++)
        if (!(fabsf(absmax[b]) <= FLT_MAX)) return LF_EINVAL;
    uint8_t *lut = malloc(LF_Q8_LUT);
    if (!lut) return LF_ENOMEM;
    q8_build_lut(lf_q8_dynamic_code(), lut);
    /* bnb: quantize_blockwise(absmax - offset, blocksize=256): the fp32 differences, one nested block
     * at a time */
    float d[4096];
    for (int64_t start = 0; start < nblocks; start += nested_blocksize) {
        const int64_t len = nblocks - start < nested_blocksize ? nblocks - start : nested_blocksize;
        for (int64_t k = 0; k < len; k++) d[k] = absmax[start + k] - offset;
        q8_block(d, len, lut, qa + start, a2 + start / nested_blocksize);
    }
    free(lut);
    return LF_OK;
}

float lf_q4_mean(const float *x, int64_t n) {
    double s = 0.0;
    for (int64_t k = 0; k < n; k++) s += x[k];
    return n > 0 ? (float)(s / (double)n) : 0.0f;
}
