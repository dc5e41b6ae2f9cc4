/* lorafuse/status.h — the one status convention of lorafuse's C APIs: the CPU kernels
 * (lorafuse/kernels.h) and the CUDA kernels (lorafuse/cuda_kernels.h). Pure C11, also valid C++
 * and CUDA C++.
 *
 * Codes: every entry point that can fail returns an int: LF_OK (0) on success, else one negative
 * lf_status below. Outputs are unspecified after a failure. The numbers are part of the ABI (the
 * tests and the bindings use them): new codes are added at the end, never renumbered.
 *
 * Messages, the one rule:
 *   - lf_status_name(status) is a short static description of the code itself ("invalid argument
 *     (LF_EINVAL)"), for any code, known or not.
 *   - Detail — which argument was bad and why, or which CUDA / cuBLASLt call failed with what — is a
 *     thread-local, NUL-terminated message kept by the library that failed, valid until that thread's
 *     next call into it: lf_cuda_last_error() for the CUDA kernels. Every CUDA entry point clears it
 *     on entry and sets it on every failure; an LF_EINVAL message names the argument first
 *     ("x is NULL", "output y overlaps input x").
 *   - The CPU kernels keep no detail message: their binding (csrc/) validates every argument and
 *     names it before a kernel runs, so what a CPU kernel can still return is coarse (a workspace
 *     allocation, an interrupt, an overflow it guards against, a lorafuse bug) and its
 *     lf_status_name says all there is.
 *   - A binding raises one Python exception per code (csrc/status_py.h) whose message is
 *     "<entry point>: <detail, or lf_status_name>".
 * Argument checks that both sides share (size products, pointer alignment, overlapping operands)
 * are in lorafuse/validate.h.
 */
#ifndef LORAFUSE_STATUS_H
#define LORAFUSE_STATUS_H

#ifdef __cplusplus
extern "C" {
#endif

typedef enum {
    LF_OK = 0,
    LF_EINVAL = -1,    /* an argument is invalid (negative size, NULL where data is needed, p∉[0,1)) */
    LF_ENOMEM = -2,    /* a workspace allocation failed */
    LF_EOVERFLOW = -3, /* a size product overflows int64 */
    LF_EISA = -4,      /* the requested instruction set is not supported by this CPU */
    LF_EINTR = -5,     /* stopped early by lf_interrupt_request(); outputs are incomplete */
    LF_EINTERNAL = -6, /* an internal invariant failed (a lorafuse bug); outputs are incomplete */
    LF_ECUDA = -7,     /* a CUDA runtime call failed (no driver or device, a launch, an allocation) */
    LF_ECUBLAS = -8,   /* a cuBLASLt call failed or found no algorithm */
} lf_status;

/* A short static description of `status`; never NULL. */
static inline const char *lf_status_name(int status) {
    switch (status) {
    case LF_OK: return "success (LF_OK)";
    case LF_EINVAL: return "invalid argument (LF_EINVAL)";
    case LF_ENOMEM: return "out of memory for workspace (LF_ENOMEM)";
    case LF_EOVERFLOW: return "sizes overflow int64 (LF_EOVERFLOW)";
    case LF_EISA: return "ISA not supported by this CPU (LF_EISA)";
    case LF_EINTR: return "interrupted (LF_EINTR)";
    case LF_EINTERNAL: return "internal error in the kernels, a lorafuse bug: please report it (LF_EINTERNAL)";
    case LF_ECUDA: return "a CUDA runtime call failed (LF_ECUDA)";
    case LF_ECUBLAS: return "a cuBLASLt call failed (LF_ECUBLAS)";
    default: return "unknown lorafuse status";
    }
}

#ifdef __cplusplus
}
#endif

#endif /* LORAFUSE_STATUS_H */
