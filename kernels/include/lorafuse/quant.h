/* lorafuse/quant.h — bitsandbytes' quantized weight storage, read (and the 4-bit kind written) as it is:
 * 4-bit NF4 / FP4 (QLoRA) and 8-bit row-wise int8 (LLM.int8's Int8Params).
 *
 * Pure C11, like kernels.h. The 4-bit layout (bitsandbytes 0.50 `quantize_4bit` / `dequantize_4bit`):
 *   W (rows, cols) is read as one flat array w[e], e = i·cols + j (C order), cut into blocks of
 *   B = blocksize consecutive elements (B ∈ {32, 64, …, 4096}; a block may straddle rows; the last
 *   one may be short). Block b has a scale absmax[b] = max |w[e]| over the block.
 *   Element e is the 4-bit code q[e] in byte e/2 of `data`: the HIGH nibble for even e, the low
 *   nibble for odd e (an odd count leaves the last low nibble 0). Dequantized:
 *       w'[e] = code[q[e]] · absmax[e / B]          (one fp32 product, then rounded once to the
 *                                                   output dtype, to nearest even)
 *   with code the 16-entry table of the type (lf_q4_code: bnb's get_4bit_type, NF4 or FP4).
 * Double quantization ("nested", bnb's compress_statistics=True): absmax itself is stored as uint8
 * codes qa[b] of bnb's 8-bit blockwise format over blocks of B2 = nested_blocksize (256) scales,
 * with a code table c2 (256 entries, bnb's create_dynamic_map), fp32 scales a2[b / B2] and one fp32
 * offset (the mean of the scales, subtracted before quantizing them):
 *       absmax[b] = (c2[qa[b]] · a2[b / B2]) + offset          (two fp32 roundings, in this order)
 * The 8-bit layout (bnb's Int8Params on the CPU: `int8_vectorwise_quant`, and the weight its
 * Linear8bitLt computes with in training, `MatMul8bitFp`): W (rows, cols) as int8 codes c[e] (C order,
 * one byte each) and one fp32 scale SCB[i] per row (the row's absmax). Dequantized:
 *       w'[i, j] = c[i·cols + j] · (SCB[i] · fl(1/127))      (two fp32 products, in this order, then
 *                                                           rounded once to the output dtype)
 */
#ifndef LORAFUSE_QUANT4_H
#define LORAFUSE_QUANT4_H

#include <stdint.h>

#include "lorafuse/kernels.h"

#ifdef __cplusplus
extern "C" {
#endif

typedef enum { LF_Q4_NF4 = 0, LF_Q4_FP4 = 1, LF_Q8_ROW = 2 } lf_qtype;

/* The 16 code values of a type, fp32, indexed by the 4-bit code (bnb's get_4bit_type: NF4 sorted
 * from -1 to 1; FP4 sign bit 8, values ∈ {0, 1/192, 1/6, 1/4, 1/3, 1/2, 2/3, 1}; both codes 0 and
 * 8 of FP4 are +0, as in bnb's table), or NULL for an unknown type. */
const float *lf_q4_code(lf_qtype type);

/* bnb's create_dynamic_map() (signed, 7 exponent bits): the 256-entry table of its 8-bit blockwise
 * format, which double quantization stores the scales in. */
const float *lf_q8_dynamic_code(void);

/* One stored 4-bit weight (pointers borrowed, never written); typedef'd in kernels.h (lf_tview.qw). */
struct lf_qweight {
    const uint8_t *data; /* packed codes, nbytes of them */
    int64_t nbytes;
    int64_t rows, cols;  /* W's shape: rows = out_features, cols = in_features */
    int64_t blocksize;   /* B */
    lf_qtype type;
    int nested;          /* 0: absmax is fp32 (n_absmax ≥ blocks); 1: absmax_q + the nested fields */
    const float *absmax;
    const uint8_t *absmax_q;
    int64_t n_absmax;    /* elements of absmax or absmax_q */
    const float *nested_absmax; /* a2, n_nested_absmax ≥ ceil(blocks / B2) */
    int64_t n_nested_absmax;
    const float *nested_code;   /* c2: 256 entries */
    int64_t nested_blocksize;   /* B2 ≥ 1 */
    float offset;
};

/* Blocks of a weight: ceil(rows·cols / B); -1 if a size is negative or the product overflows. */
int64_t lf_q4_blocks(int64_t rows, int64_t cols, int64_t blocksize);

/* NULL if w is consistent — sizes ≥ 0 whose products fit int64, B a power of two in [32, 4096] (4-bit)
 * or max(cols, 1) (8-bit, not nested), a known type, every array present and long enough for rows·cols
 * elements — else a static sentence saying what is wrong (the binding raises it). The kernels below
 * check it too (LF_EINVAL). */
const char *lf_qweight_unfit(const lf_qweight *w);

/* The sub-matrix rows [r0, r1) × cols [c0, c1) of w dequantized into out (row stride ldo elements,
 * ldo ≥ c1 - c0): out_dtype LF_DT_F32 (float), LF_DT_BF16 or LF_DT_F16 (uint16_t bits, rounded to
 * nearest even from the fp32 product). Bit-identical to bnb's dequantize_4bit with that dtype (8-bit:
 * to MatMul8bitFp's W in that dtype).
 * Runs on the calling thread with the ISA in use (lf_get_isa): AVX-512 / AVX2 / generic, one result.
 * LF_EINVAL: lf_qweight_unfit(w), a range outside W, ldo too small, out NULL with a non-empty range. */
int lf_qweight_dequantize(const lf_qweight *w, int64_t r0, int64_t r1, int64_t c0, int64_t c1, lf_dtype out_dtype,
                     void *out, int64_t ldo);

/* Quantize n elements of src (fp32, or bf16 / fp16 bits: widened exactly) as bnb's quantize_4bit
 * does on the CPU: packed (ceil(n/2) bytes) and absmax (ceil(n/B) fp32 scales). With B ∈ [32, 4096]
 * a power of two. LF_EINVAL also for a non-finite element (bnb would store NaN scales). */
int lf_q4_quantize(lf_qtype type, int64_t blocksize, int64_t n, const void *src, lf_dtype src_dtype,
                   uint8_t *packed, float *absmax);

/* Double quantization of nblocks scales as bnb's quantize_4bit(compress_statistics=True):
 * qa[b] and a2 (ceil(nblocks / nested_blocksize) scales) = bnb's CPU quantize_blockwise of
 * (absmax[b] - offset) with lf_q8_dynamic_code() and blocks of nested_blocksize ∈ [1, 4096]. bnb's
 * offset is torch's mean of absmax (pass it for bit-identity); lf_q4_mean is a portable one. */
int lf_q4_double_quant(const float *absmax, int64_t nblocks, float offset, int64_t nested_blocksize, uint8_t *qa,
                       float *a2);

/* The mean of x[0..n) summed in double, rounded once to float (torch's fp32 mean may differ in the
 * last bit: its summation order is its own); 0 for n == 0. */
float lf_q4_mean(const float *x, int64_t n);

/* bnb's 8-bit blockwise quantization on the CPU (its lookup-table kernel, bit for bit): per block of
 * B consecutive x, scale a = max |x|, then q = the code index of x·(1/a) from a 65536-entry table
 * of the nearest of the 256 sorted `code` values (a = 0: q = 0). LF_ENOMEM if the table cannot be
 * allocated. */
int lf_q8_quantize_blockwise(const float *x, int64_t n, int64_t blocksize, const float *code, uint8_t *q,
                             float *absmax);

#ifdef __cplusplus
}
#endif
#endif
