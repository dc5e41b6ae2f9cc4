/* fma_peak.c — this CPU's fp32 peak, measured: a register-only loop of independent FMA chains
 * (and, in mode bf16, of vdpbf16ps chains: the AVX512_BF16 peak of the bf16 GEMM tile; in mode amx,
 * of tdpbf16ps on four independent 16×16 fp32 tiles, as the amx_bf16 GEMM tile runs them).
 *
 * 12 accumulators × 16 lanes (zmm) — enough independent chains to cover FMA latency (4 cycles)
 * × throughput (up to 2/cycle) — no loads or stores in the loop, so the rate is the FMA units'
 * alone. Run with T threads (pthreads) to see whether the cores scale (real cores: ×T;
 * SMT siblings sharing FMA units: less).
 * Build: gcc -O2 -mavx2 -mfma -pthread fma_peak.c -o fma_peak     Run: ./fma_peak THREADS [zmm|ymm|bf16|amx]
 * Prints GFLOP/s (1 FMA = 2 flops; 1 vdpbf16ps zmm = 16 lanes × 2 bf16 products × 2 = 64 flops;
 * 1 tdpbf16ps on 16×16 tiles = 16·16·32·2 = 16384 flops). amx needs AMX-BF16 and Linux's permission
 * (asked here; exits 2 without it); its instructions are written as asm, so no -mamx flags.
 * zmm needs AVX-512F, bf16 AVX512_BF16 (each loop carries its own target attribute, so the program
 * builds and its ymm mode runs on any AVX2 CPU; elsewhere they would fault with SIGILL, so callers
 * check cpuid first, as bench_gemm.py does). */
#include <immintrin.h>
#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

#define _GNU_SOURCE /* syscall() */
#define ITERS 200000000L
static int use_ymm = 0, use_bf16 = 0, use_amx = 0;

static double now(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + 1e-9 * ts.tv_nsec;
}

/* 12 named accumulators (not an array: each must live in its own register); the empty asm
 * makes every chain observable, so the compiler can neither drop nor fold any FMA */
#define CHAINS(T, FMA, SET)                                                                      \
    T a0 = SET(0), a1 = SET(1), a2 = SET(2), a3 = SET(3), a4 = SET(4), a5 = SET(5), a6 = SET(6),  \
      a7 = SET(7), a8 = SET(8), a9 = SET(9), a10 = SET(10), a11 = SET(11), b = SET(1.0000001f),   \
      c = SET(1e-7f);                                                                            \
    for (long it = 0; it < n; it++) {                                                            \
        __asm__ volatile("" : "+v"(a0), "+v"(a1), "+v"(a2), "+v"(a3), "+v"(a4), "+v"(a5));       \
        __asm__ volatile("" : "+v"(a6), "+v"(a7), "+v"(a8), "+v"(a9), "+v"(a10), "+v"(a11));     \
        a0 = FMA(a0, b, c); a1 = FMA(a1, b, c); a2 = FMA(a2, b, c); a3 = FMA(a3, b, c);          \
        a4 = FMA(a4, b, c); a5 = FMA(a5, b, c); a6 = FMA(a6, b, c); a7 = FMA(a7, b, c);          \
        a8 = FMA(a8, b, c); a9 = FMA(a9, b, c); a10 = FMA(a10, b, c); a11 = FMA(a11, b, c);      \
    }

/* acc += a·b on 16 lanes of bf16 pairs: the CHAINS loop with vdpbf16ps as its FMA */
#define DPBF16(acc, x, y) _mm512_dpbf16_ps(acc, (__m512bh)_mm512_castps_si512(x), (__m512bh)_mm512_castps_si512(y))

__attribute__((target("avx512f"))) static float run_zmm(long n) {
    CHAINS(__m512, _mm512_fmadd_ps, _mm512_set1_ps)
    return _mm512_cvtss_f32(a0) + _mm512_cvtss_f32(a6) + _mm512_cvtss_f32(a11);
}

static float run_ymm(long n) {
    CHAINS(__m256, _mm256_fmadd_ps, _mm256_set1_ps)
    return _mm256_cvtss_f32(a0) + _mm256_cvtss_f32(a6) + _mm256_cvtss_f32(a11);
}

__attribute__((target("avx512f,avx512bf16"))) static float run_bf16(long n) {
    CHAINS(__m512, DPBF16, _mm512_set1_ps)
    return _mm512_cvtss_f32(a0) + _mm512_cvtss_f32(a6) + _mm512_cvtss_f32(a11);
}

/* n rounds of 4 tdpbf16ps: C tiles 0..3 += A tile 4 or 5 · B tile 6 or 7 (16 rows × 64 bytes
 * each, palette 1), four independent chains; the A and B tiles hold zeros (speed does not depend
 * on the values) */
static void run_amx(long n) {
    struct {
        uint8_t palette, start_row, reserved[14];
        uint16_t colsb[16];
        uint8_t rows[16];
    } cfg = {.palette = 1};
    for (int t = 0; t < 8; t++) {
        cfg.colsb[t] = 64;
        cfg.rows[t] = 16;
    }
    __asm__ volatile("ldtilecfg %0" ::"m"(cfg));
    __asm__ volatile("tilezero %%tmm0\n\ttilezero %%tmm1\n\ttilezero %%tmm2\n\ttilezero %%tmm3\n\t"
                     "tilezero %%tmm4\n\ttilezero %%tmm5\n\ttilezero %%tmm6\n\ttilezero %%tmm7" ::);
    for (long it = 0; it < n; it++)
        __asm__ volatile("tdpbf16ps %%tmm6, %%tmm4, %%tmm0\n\ttdpbf16ps %%tmm7, %%tmm4, %%tmm1\n\t"
                         "tdpbf16ps %%tmm6, %%tmm5, %%tmm2\n\ttdpbf16ps %%tmm7, %%tmm5, %%tmm3" ::);
    __asm__ volatile("tilerelease" ::);
}

static void *run(void *out) {
    float sink = 0;
    if (use_amx) {
        const long n = ITERS / 40;
        run_amx(n);
        *(double *)out = (double)n * 4 * 16384;
    } else if (use_bf16) {
        const long n = ITERS / 4;
        sink = run_bf16(n);
        *(double *)out = (double)n * 12 * 16 * 4;
    } else if (use_ymm) {
        const long n = ITERS / 2;
        sink = run_ymm(n);
        *(double *)out = (double)n * 12 * 8 * 2;
    } else {
        const long n = ITERS / 4;
        sink = run_zmm(n);
        *(double *)out = (double)n * 12 * 16 * 2;
    }
    if (sink == 12345.f) puts("");
    return NULL;
}

int main(int argc, char **argv) {
    int t = argc > 1 ? atoi(argv[1]) : 1;
    use_ymm = argc > 2 && !strcmp(argv[2], "ymm");
    use_bf16 = argc > 2 && !strcmp(argv[2], "bf16");
    use_amx = argc > 2 && !strcmp(argv[2], "amx");
    if (t < 1 || t > 256) return 1;
    /* Linux: ARCH_REQ_XCOMP_PERM (0x1023) for XFEATURE_XTILEDATA (18), before the threads start */
    if (use_amx && syscall(SYS_arch_prctl, 0x1023, 18) != 0) return 2;
    pthread_t th[256];
    double flops[256];
    double t0 = now();
    for (int i = 0; i < t; i++) pthread_create(&th[i], NULL, run, &flops[i]);
    double total = 0;
    for (int i = 0; i < t; i++) {
        pthread_join(th[i], NULL);
        total += flops[i];
    }
    printf("%.1f\n", total / (now() - t0) / 1e9);
    return 0;
}
