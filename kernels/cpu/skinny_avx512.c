/* skinny_avx512.c — the rank-r kernels of skinny_body.h for AVX-512 (16-wide vectors).
 * setup.py compiles this file with -mavx512f -mavx512dq -mf16c -ffp-contract=fast on x86-64;
 * its table is used only when cpuid reports AVX-512 (skinny.c). */
#include "internal.h"

#if defined(__x86_64__)
#include <immintrin.h>

/* horizontal sum of one vector (HSUM) */
static inline float hsum(__m512 v) { return _mm512_reduce_add_ps(v); }

#define VW 16
#define RU_ROWS 16 /* rank_update rows per register block: 16 accumulators of 32 zmm */
#define RA_ROWS 8  /* rank_add rows per register block (× 2 vectors: 16 accumulators) */
#define HSUM(v) hsum((__m512)(v))
#define F16_TO_F32(h) _cvtsh_ss(h) /* F16C */
#include "skinny_body.h"

const lf_skinny lf_skinny_avx512 = SKINNY_KERNELS;
#else
const lf_skinny lf_skinny_avx512 = {0};
#endif
