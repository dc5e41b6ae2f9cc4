/* ukernel_generic.c — portable C micro-kernel (any x86-64 or other CPU): a 4×16 register tile.
 *   c[i][j] (+)= Σ_p ap[p*4 + i] · bp[p*16 + j]     (see lf_ukernel_fn in internal.h)
 * Plain loops the compiler vectorises with the baseline ISA (SSE2 on x86-64). */
#include "internal.h"

enum { MR = 4, NR = 16 };

static void ukernel_generic(int64_t kc, const float *ap, const float *bp, float *c, int64_t ldc,
                            int64_t mr, int64_t nr, int accumulate, const float *bias) {
    float t[MR][NR] = {{0}};
    for (int64_t p = 0; p < kc; p++) {
        for (int i = 0; i < MR; i++) {
            const float a = ap[p * MR + i];
            for (int j = 0; j < NR; j++) t[i][j] += a * bp[p * NR + j];
        }
    }
    for (int64_t i = 0; i < mr; i++) {
        float *ci = c + i * ldc;
        for (int64_t j = 0; j < nr; j++)
            ci[j] = (accumulate ? ci[j] : (bias ? bias[j] : 0.0f)) + t[i][j];
    }
}

const lf_dispatch lf_dispatch_generic = {
    .isa = LF_ISA_GENERIC, .mr = MR, .nr = NR, .blk = &lf_tunables_generic.wide,
    .ukernel = ukernel_generic, .widen = lf_widen_generic,
};
