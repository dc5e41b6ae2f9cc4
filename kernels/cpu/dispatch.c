/* dispatch.c — run-time choice of the micro-kernel (cpuid + xgetbv), never the build machine's.
 * The library's only globals live here: the dispatch pointer, set once at import (or by tests),
 * and the interrupt flag, which a signal handler can reach only through a global. */
#include <signal.h>
#include <stddef.h>

#include "internal.h"

#if defined(__x86_64__) || defined(__i386__)
#include <cpuid.h>

static uint64_t xgetbv0(void) {
    uint32_t lo, hi;
    __asm__ volatile("xgetbv" : "=a"(lo), "=d"(hi) : "c"(0));
    return ((uint64_t)hi << 32) | lo;
}

lf_isa lf_cpu_best_isa(void) {
    unsigned a, b, c, d;
    if (!__get_cpuid(1, &a, &b, &c, &d)) return LF_ISA_GENERIC;
    const int osxsave = (c >> 27) & 1, avx = (c >> 28) & 1, fma = (c >> 12) & 1;
    if (!osxsave || !avx) return LF_ISA_GENERIC;
    const uint64_t xcr0 = xgetbv0();
    if ((xcr0 & 0x6) != 0x6) return LF_ISA_GENERIC; /* OS saves XMM and YMM state */
    if (!__get_cpuid_count(7, 0, &a, &b, &c, &d)) return LF_ISA_GENERIC;
    const int avx2 = (b >> 5) & 1, avx512f = (b >> 16) & 1, avx512dq = (b >> 17) & 1;
    if (avx512f && avx512dq && (xcr0 & 0xE6) == 0xE6) return LF_ISA_AVX512; /* + opmask, ZMM */
    if (avx2 && fma) return LF_ISA_AVX2;
    return LF_ISA_GENERIC;
}
#else
lf_isa lf_cpu_best_isa(void) { return LF_ISA_GENERIC; }
#endif

static const lf_dispatch *table_for(lf_isa isa) {
    switch (isa) {
    case LF_ISA_AVX512: return &lf_dispatch_avx512;
    case LF_ISA_AVX2: return &lf_dispatch_avx2;
    default: return &lf_dispatch_generic;
    }
}

/* The one global: which ISA's micro-kernel the GEMM calls. */
static const lf_dispatch *g_dispatch = NULL;

const lf_dispatch *lf_current(void) {
    if (!g_dispatch) g_dispatch = table_for(lf_cpu_best_isa());
    return g_dispatch;
}

int lf_set_isa(lf_isa isa) {
    if (isa < LF_ISA_GENERIC || isa > LF_ISA_AVX512) return LF_EINVAL;
    if (isa > lf_cpu_best_isa()) return LF_EISA;
    g_dispatch = table_for(isa);
    return LF_OK;
}

lf_isa lf_get_isa(void) { return lf_current()->isa; }

const char *lf_isa_name(lf_isa isa) {
    switch (isa) {
    case LF_ISA_AVX512: return "avx512";
    case LF_ISA_AVX2: return "avx2";
    case LF_ISA_GENERIC: return "generic";
    }
    return "unknown";
}

int lf_mul_ok(int64_t a, int64_t b, int64_t *out) { return !__builtin_mul_overflow(a, b, out); }

/* Set from a SIGINT handler, polled by the GEMM at each cache block. */
static volatile sig_atomic_t g_interrupt = 0;

void lf_interrupt_request(void) { g_interrupt = 1; }
void lf_interrupt_clear(void) { g_interrupt = 0; }
int lf_interrupt_pending(void) { return g_interrupt != 0; }
