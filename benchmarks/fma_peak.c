/* fma_peak.c — this CPU's fp32 peak, measured: a register-only loop of independent FMA chains.
 *
 * 12 accumulators × 16 lanes (zmm) — enough independent chains to cover FMA latency (4 cycles)
 * × throughput (up to 2/cycle) — no loads or stores in the loop, so the rate is the FMA units'
 * alone. Run with T threads (pthreads) to see whether the cores scale (real cores: ×T;
 * SMT siblings sharing FMA units: less).
 * Build: gcc -O2 -mavx512f -mfma -pthread fma_peak.c -o fma_peak     Run: ./fma_peak THREADS [ymm]
 * Prints GFLOP/s (1 FMA = 2 flops). */
#define _POSIX_C_SOURCE 200809L
#include <immintrin.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#define ITERS 200000000L
static int use_ymm = 0;

static double now(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + 1e-9 * ts.tv_nsec;
}

static void *run(void *out) {
    float sink = 0;
    if (use_ymm) {
        __m256 a[12], b = _mm256_set1_ps(1.0000001f), c = _mm256_set1_ps(1e-7f);
        for (int i = 0; i < 12; i++) a[i] = _mm256_set1_ps((float)i);
        for (long it = 0; it < ITERS / 2; it++)
            for (int i = 0; i < 12; i++) a[i] = _mm256_fmadd_ps(a[i], b, c);
        for (int i = 0; i < 12; i++) sink += _mm256_cvtss_f32(a[i]);
        *(double *)out = (double)ITERS / 2 * 12 * 8 * 2;
    } else {
        __m512 a[12], b = _mm512_set1_ps(1.0000001f), c = _mm512_set1_ps(1e-7f);
        for (int i = 0; i < 12; i++) a[i] = _mm512_set1_ps((float)i);
        for (long it = 0; it < ITERS / 4; it++)
            for (int i = 0; i < 12; i++) a[i] = _mm512_fmadd_ps(a[i], b, c);
        for (int i = 0; i < 12; i++) sink += _mm512_cvtss_f32(a[i]);
        *(double *)out = (double)ITERS / 4 * 12 * 16 * 2;
    }
    if (sink == 12345.f) puts("");
    return NULL;
}

int main(int argc, char **argv) {
    int t = argc > 1 ? atoi(argv[1]) : 1;
    use_ymm = argc > 2 && !strcmp(argv[2], "ymm");
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
