/* dispatch.c — run-time choice of the micro-kernel (cpuid + xgetbv), never the build machine's.
 * The library's only globals live here: the ISA level in use, set once at import (or by tests),
 * the SIGINT target, which a signal handler can reach only through a global (with the
 * thread-local cancellation token of the calling thread), and the once-per-process answer to
 * Linux's AMX permission request. */
#define _GNU_SOURCE /* syscall() */
#include <stddef.h>

#include "internal.h"

#if defined(__x86_64__) || defined(__i386__)
#include <cpuid.h>
#if defined(__linux__)
#include <sys/syscall.h>
#include <unistd.h>
#endif

static uint64_t xgetbv0(void) {
    uint32_t lo, hi;
    __asm__ volatile("xgetbv" : "=a"(lo), "=d"(hi) : "c"(0));
    return ((uint64_t)hi << 32) | lo;
}

/* 1 if this process may use AMX tile data: Linux (≥ 5.16) keeps the 8 KiB XTILEDATA state off
 * until a process asks, arch_prctl(ARCH_REQ_XCOMP_PERM = 0x1023, XFEATURE_XTILEDATA = 18); asked
 * once per process (the answer is kept; asking again is harmless, so a race only asks twice).
 * Elsewhere: 0 (no AMX). */
static int amx_permitted(void) {
#if defined(__linux__) && defined(SYS_arch_prctl)
    static int answer = -1; /* -1: not asked yet */
    int a = __atomic_load_n(&answer, __ATOMIC_ACQUIRE);
    if (a < 0) {
        a = syscall(SYS_arch_prctl, 0x1023, 18) == 0;
        __atomic_store_n(&answer, a, __ATOMIC_RELEASE);
    }
    return a;
#else
    return 0;
#endif
}

/* AMX-BF16 usable: cpuid leaf 7.0 EDX bit 24 (AMX-TILE) and bit 22 (AMX-BF16), XCR0 bits 17
 * (XTILECFG) and 18 (XTILEDATA) enabled by the OS, and the permission above */
static int amx_bf16_usable(uint64_t xcr0, unsigned edx7) {
    const uint64_t tile_bits = (1ull << 17) | (1ull << 18);
    return ((edx7 >> 24) & 1) && ((edx7 >> 22) & 1) && (xcr0 & tile_bits) == tile_bits && amx_permitted();
}

lf_isa lf_cpu_best_isa(void) {
    unsigned a, b, c, d;
    if (!__get_cpuid(1, &a, &b, &c, &d)) return LF_ISA_GENERIC;
    const int osxsave = (c >> 27) & 1, avx = (c >> 28) & 1, fma = (c >> 12) & 1, f16c = (c >> 29) & 1;
    if (!osxsave || !avx) return LF_ISA_GENERIC;
    const uint64_t xcr0 = xgetbv0();
    if ((xcr0 & 0x6) != 0x6) return LF_ISA_GENERIC; /* OS saves XMM and YMM state */
    if (!__get_cpuid_count(7, 0, &a, &b, &c, &d)) return LF_ISA_GENERIC;
    const int avx2 = (b >> 5) & 1, avx512f = (b >> 16) & 1, avx512dq = (b >> 17) & 1;
    const unsigned edx7 = d;
    if (avx512f && avx512dq && (xcr0 & 0xE6) == 0xE6) { /* + opmask, ZMM */
        /* leaf 7 subleaf 1, EAX bit 5: AVX512_BF16 (vdpbf16ps, vcvtne2ps2bf16) */
        const int bf16 = __get_cpuid_count(7, 1, &a, &b, &c, &d) && ((a >> 5) & 1);
        if (!bf16) return LF_ISA_AVX512;
        return amx_bf16_usable(xcr0, edx7) ? LF_ISA_AMX_BF16 : LF_ISA_AVX512_BF16;
    }
    /* F16C (vcvtph2ps) widens fp16 GEMM operands at this level; every AVX2 CPU has it */
    if (avx2 && fma && f16c) return LF_ISA_AVX2;
    return LF_ISA_GENERIC;
}
#else
lf_isa lf_cpu_best_isa(void) { return LF_ISA_GENERIC; }
#endif

/* the fp32 micro-kernels of a level (avx512_bf16, amx_bf16: AVX-512's; their bf16 tiles are chosen
 * per GEMM by the operands' dtypes, gemm.c) */
static const lf_dispatch *table_for(lf_isa isa) {
    switch (isa) {
    case LF_ISA_AMX_BF16:
    case LF_ISA_AVX512_BF16:
    case LF_ISA_AVX512: return &lf_dispatch_avx512;
    case LF_ISA_AVX2: return &lf_dispatch_avx2;
    default: return &lf_dispatch_generic;
    }
}

/* The one global: the ISA level in use (-1 until first asked: the CPU's best). */
static int g_isa = -1;

lf_isa lf_get_isa(void) {
    if (g_isa < 0) g_isa = (int)lf_cpu_best_isa();
    return (lf_isa)g_isa;
}

const lf_dispatch *lf_current(void) { return table_for(lf_get_isa()); }

int lf_set_isa(lf_isa isa) {
    if (isa < LF_ISA_GENERIC || isa > LF_ISA_AMX_BF16) return LF_EINVAL;
    if (isa > lf_cpu_best_isa()) return LF_EISA;
    g_isa = (int)isa;
    return LF_OK;
}

const char *lf_isa_name(lf_isa isa) {
    switch (isa) {
    case LF_ISA_AMX_BF16: return "amx_bf16";
    case LF_ISA_AVX512_BF16: return "avx512_bf16";
    case LF_ISA_AVX512: return "avx512";
    case LF_ISA_AVX2: return "avx2";
    case LF_ISA_GENERIC: return "generic";
    }
    return "unknown";
}

int lf_mul_ok(int64_t a, int64_t b, int64_t *out) { return !__builtin_mul_overflow(a, b, out); }

/* ---- per-call cancellation (kernels.h). The token a thread's kernels poll is thread-local; the
 * pool binds the caller's token on its workers for each job (pool.c). The SIGINT target is the
 * second global: a signal handler can reach nothing else. Tokens are read and written with
 * lock-free atomic builtins (async-signal-safe). */
static _Thread_local lf_cancel *tl_cancel = NULL;
static lf_cancel *g_sigint_target = NULL;

void lf_cancel_bind(lf_cancel *c) { tl_cancel = c; }
lf_cancel *lf_cancel_bound(void) { return tl_cancel; }
void lf_cancel_request(lf_cancel *c) {
    if (c) __atomic_store_n(&c->requested, 1, __ATOMIC_RELEASE);
}
int lf_interrupt_pending(void) {
    const lf_cancel *c = tl_cancel;
    return c && __atomic_load_n(&c->requested, __ATOMIC_ACQUIRE);
}
void lf_interrupt_target(lf_cancel *c) { __atomic_store_n(&g_sigint_target, c, __ATOMIC_RELEASE); }
void lf_interrupt_request(void) { lf_cancel_request(__atomic_load_n(&g_sigint_target, __ATOMIC_ACQUIRE)); }
