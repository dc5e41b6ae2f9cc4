/* fma_peak.c — this CPU's fp32 peak, measured: a register-only loop of independent FMA chains
 * (and, in mode bf16, of vdpbf16ps chains: the AVX512_BF16 peak of the bf16 GEMM tile).
 *
 * 12 accumulators × 16 lanes (zmm) — enough independent chains to cover FMA latency (4 cycles)
 * × throughput (up to 2/cycle) — no loads or stores in the loop, so the rate is the FMA units'
 * alone. Run with T threads (pthreads) to see whether the cores scale (real cores: ×T;
 * SMT siblings sharing FMA units: less).
 * Build: gcc -O2 -mavx512f -mfma -pthread fma_peak.c -o fma_peak     Run: ./fma_peak THREADS [ymm|bf16]
 * Prints GFLOP/s (1 FMA = 2 flops; 1 vdpbf16ps zmm = 16 lanes × 2 bf16 products × 2 = 64 flops).
 * bf16 needs a CPU with AVX512_BF16 (the loop carries its own target attribute; elsewhere it would
 * fault with SIGILL, so callers check cpuid first, as bench_gemm.py does). */
#define _POSIX_C_SOURCE 200809L
#include <immintrin.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#define ITERS 200000000L
static int use_ymm = 0, use_bf16 = 0;

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

__attribute__((target("avx512f,avx512bf16"))) static float run_bf16(long n) {
    CHAINS(__m512, DPBF16, _mm512_set1_ps)
    return _mm512_cvtss_f32(a0) + _mm512_cvtss_f32(a6) + _mm512_cvtss_f32(a11);
}

static void *run(void *out) {
    float sink = 0;
    if (use_bf16) {
        const long n = ITERS / 4;
        sink = run_bf16(n);
        *(double *)out = (double)n * 12 * 16 * 4;
    } else if (use_ymm) {
        const long n = ITERS / 2;
        CHAINS(__m256, _mm256_fmadd_ps, _mm256_set1_ps)
        sink = _mm256_cvtss_f32(a0) + _mm256_cvtss_f32(a6) + _mm256_cvtss_f32(a11);
        *(double *)out = (double)n * 12 * 8 * 2;
    } else {
        const long n = ITERS / 4;
        CHAINS(__m512, _mm512_fmadd_ps, _mm512_set1_ps)
        sink = _mm512_cvtss_f32(a0) + _mm512_cvtss_f32(a6) + _mm512_cvtss_f32(a11);
        *(double *)out = (double)n * 12 * 16 * 2;
    }
    if (sink == 12345.f) puts("");
    return NULL;
}

int main(int argc, char **argv) {
    int t = argc > 1 ? atoi(argv[1]) : 1;
    use_ymm = argc > 2 && !strcmp(argv[2], "ymm");
    use_bf16 = argc > 2 && !strcmp(argv[2], "bf16");
    if (t < 1 || t > 256) return 1;
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
