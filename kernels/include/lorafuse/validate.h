/* lorafuse/validate.h — argument checks shared by the CPU binding (csrc/args.c) and the CUDA
 * kernels' C API (kernels/cuda/lora_plan.h, lora_cublaslt.cu): size products that must fit int64,
 * byte extents of operands, and the one overlap rule. Pure C11 (header-only, static inline), also
 * valid C++ and CUDA C++; no allocation, no global state.
 *
 * The overlap rule: two operands overlap when their byte extents [lo, hi) — from the lowest to one
 * past the highest byte an operand's elements occupy — are both non-empty and share a byte. An
 * output (anything a call writes, workspaces included) may overlap no other operand of the call;
 * inputs may overlap each other. It is conservative for strided operands (interleaved views whose
 * elements never meet are still refused), like NumPy's may_share_memory.
 */
#ifndef LORAFUSE_VALIDATE_H
#define LORAFUSE_VALIDATE_H

#include <stddef.h>
#include <stdint.h>
#include <stdio.h>

#include "lorafuse/status.h"

#ifdef __cplusplus
extern "C" {
#endif

/* ---------------------------------------------------------------- sizes */

/* *out = a·b: 0, or -1 (out untouched) when a or b is negative or the product exceeds INT64_MAX. */
static inline int lf_mul_i64(int64_t a, int64_t b, int64_t *out) {
    if (a < 0 || b < 0 || (a > 0 && b > INT64_MAX / a)) return -1;
    *out = a * b;
    return 0;
}

/* ---------------------------------------------------------------- extents and the overlap rule */

typedef struct {
    uintptr_t lo, hi; /* bytes [lo, hi); lo == hi: empty */
} lf_extent;

static inline int lf_extents_overlap(lf_extent a, lf_extent b) {
    return a.lo < a.hi && b.lo < b.hi && a.lo < b.hi && b.lo < a.hi;
}

/* `bytes` dense bytes from p (bytes >= 0, p + bytes not past the address space: lf_check_operands) */
static inline lf_extent lf_dense_extent(const void *p, int64_t bytes) {
    const uintptr_t lo = (uintptr_t)p;
    lf_extent e = {lo, lo + (uintptr_t)(bytes > 0 ? bytes : 0)};
    return e;
}

/* A strided array: `first` = its element 0, dims[ndim], byte strides of any sign, itemsize bytes
 * (NumPy's npy_intp is intptr_t). Empty when any dim is 0. */
static inline lf_extent lf_strided_extent(const void *first, int ndim, const intptr_t *dims,
                                          const intptr_t *strides, intptr_t itemsize) {
    lf_extent e = {(uintptr_t)first, (uintptr_t)first};
    for (int d = 0; d < ndim; d++)
        if (dims[d] == 0) return e;
    for (int d = 0; d < ndim; d++) {
        const intptr_t span = (dims[d] - 1) * strides[d];
        if (span < 0) e.lo -= (uintptr_t)(-span);
        else e.hi += (uintptr_t)span;
    }
    e.hi += (uintptr_t)itemsize;
    return e;
}

/* ---------------------------------------------------------------- the operands of one call */

enum { LF_OPERAND_IN = 0, LF_OPERAND_OUT = 1 };

typedef struct {
    const char *name;  /* as the C API names it: "x", "y", "xdrop_ws" */
    const void *ptr;   /* NULL: absent (an error when required) */
    int64_t bytes;     /* dense extent from ptr (0: touches nothing) */
    int64_t align;     /* ptr must be a multiple of this (its element size); 1: any */
    int role;          /* LF_OPERAND_IN (read) or LF_OPERAND_OUT (written, workspaces included) */
    int required;      /* NULL is refused */
    const char *need;  /* why it is required (for the NULL message), or NULL */
} lf_operand;

/* LF_OK, or LF_EINVAL with a message in msg[msg_size] naming the first offence, checked in this order
 * over all operands: a required operand that is NULL ("x is NULL"); a non-empty operand that is
 * misaligned for its element size or runs past the end of the address space; an output that
 * overlaps another operand ("output y overlaps input x", "output dA overlaps output dB"). */
static inline int lf_check_operands(const lf_operand *ops, int count, char *msg, size_t msg_size) {
    for (int i = 0; i < count; i++)
        if (!ops[i].ptr && ops[i].required) {
            snprintf(msg, msg_size, "%s is NULL%s%s%s", ops[i].name, ops[i].need ? " (" : "",
                     ops[i].need ? ops[i].need : "", ops[i].need ? ")" : "");
            return LF_EINVAL;
        }
    for (int i = 0; i < count; i++) {
        const uintptr_t p = (uintptr_t)ops[i].ptr;
        if (!p || ops[i].bytes <= 0) continue;
        if (ops[i].align > 1 && p % (uintptr_t)ops[i].align) {
            snprintf(msg, msg_size, "%s (address 0x%llx) is not aligned to %lld bytes (its element size)",
                     ops[i].name, (unsigned long long)p, (long long)ops[i].align);
            return LF_EINVAL;
        }
        if ((uint64_t)ops[i].bytes > (uint64_t)(UINTPTR_MAX - p)) {
            snprintf(msg, msg_size, "%s (address 0x%llx, %lld bytes) runs past the end of the address space",
                     ops[i].name, (unsigned long long)p, (long long)ops[i].bytes);
            return LF_EINVAL;
        }
    }
    for (int i = 0; i < count; i++) {
        if (ops[i].role != LF_OPERAND_OUT || !ops[i].ptr) continue;
        for (int j = 0; j < count; j++) {
            if (j == i || !ops[j].ptr || (ops[j].role == LF_OPERAND_OUT && j < i)) continue;
            if (lf_extents_overlap(lf_dense_extent(ops[i].ptr, ops[i].bytes),
                                   lf_dense_extent(ops[j].ptr, ops[j].bytes))) {
                snprintf(msg, msg_size, "output %s overlaps %s %s in memory", ops[i].name,
                         ops[j].role == LF_OPERAND_OUT ? "output" : "input", ops[j].name);
                return LF_EINVAL;
            }
        }
    }
    return LF_OK;
}

#ifdef __cplusplus
}
#endif

#endif /* LORAFUSE_VALIDATE_H */
