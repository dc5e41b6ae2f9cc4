/* skinny_generic.c — the rank-r kernels of skinny_body.h for any CPU (4-wide vectors).
 * setup.py compiles this file with -ffp-contract=fast only. */
#define VW 4
#define RU_ROWS 8
#define RA_ROWS 4
#define HSUM(v) ((v)[0] + (v)[1] + (v)[2] + (v)[3])
#define F16_TO_F32(h) lf_f16_to_f32(h)
#include "skinny_body.h"

const lf_skinny lf_skinny_generic = SKINNY_KERNELS;
