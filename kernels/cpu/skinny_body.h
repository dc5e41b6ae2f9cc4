/* skinny_body.h — the rank-r kernels, written once with GCC vector extensions and compiled
 * once per ISA by skinny.c (which defines VW, SUFFIX and TARGET before including this file).
 * They stream the big operand (x or g) once, in place, with no packing: for N = r the packing
 * a GEMM would do costs as much as the arithmetic.
 *
 *   rowdot:      c (M, R) = scale · a (M, K) · bt (K, R)      a rows contiguous (cs = 1)
 *                T rows of a at once: acc[t] += a[t, p] · bt[p, :]  (bt rows stay in L1/L2)
 *   rank_update: c (P, Q) = scale · s (T, P)ᵀ · w (T, Q)      w rows contiguous (cs = 1)
 *                (the worker computes a block [p0, P) × [q0, q1) of it)
 *                for each VW-chunk of Q: load w[t, chunk] for 8 tokens, then for every p
 *                c[p, chunk] += Σ_t s[t, p] · w[t, chunk]
 *   rowdots:     c (n, M) = scale · a (n, K) · b (M, K)ᵀ for a few rows n (decode): dot products
 *                of contiguous rows, b streamed once
 *   dropout_span, dropout_axpy_span: the dropout mask on a contiguous run of elements
 * Vectors are VW floats; Q / R tails use a masked copy through a small buffer. */

typedef float CAT(vf, SUFFIX) __attribute__((vector_size(VW * 4), aligned(4)));
#define VF CAT(vf, SUFFIX)

TARGET static inline __attribute__((always_inline)) VF CAT(vload, SUFFIX)(const float *p, int64_t n) {
    VF v = {0};
    memcpy(&v, p, (size_t)(n < VW ? n : VW) * sizeof(float));
    return v;
}

TARGET static inline __attribute__((always_inline)) void CAT(vstore, SUFFIX)(float *p, VF v, int64_t n) {
    memcpy(p, &v, (size_t)(n < VW ? n : VW) * sizeof(float));
}

#define ROWS 8 /* tokens per step: 8 independent accumulators hide the FMA latency */

/* rows [m0, m1) of c = scale · a · bt, for R ≤ RMAX·VW (bt is K × Rp, Rp = padded R) */
TARGET static void CAT(rowdot_rows, SUFFIX)(int64_t m0, int64_t m1, int64_t K, int64_t R, int64_t Rp,
                                            lf_view a, const float *bt, float scale, float *c) {
    for (int64_t j0 = 0; j0 < R; j0 += VW) {
        for (int64_t i0 = m0; i0 < m1; i0 += ROWS) {
            const int64_t rows = m1 - i0 < ROWS ? m1 - i0 : ROWS;
            const float *ar[ROWS];
            for (int t = 0; t < ROWS; t++) ar[t] = a.p + (i0 + (t < rows ? t : 0)) * a.rs;
            VF acc[ROWS];
            for (int t = 0; t < ROWS; t++) acc[t] = (VF){0};
            const float *b = bt + j0;
            for (int64_t p = 0; p < K; p++, b += Rp) {
                VF bv;
                memcpy(&bv, b, sizeof bv); /* bt is zero-padded to Rp: a full vector is there */
#pragma GCC unroll 8
                for (int t = 0; t < ROWS; t++) acc[t] += ar[t][p] * bv;
            }
            for (int64_t t = 0; t < rows; t++)
                CAT(vstore, SUFFIX)(c + (i0 + t) * R + j0, acc[t] * scale, R - j0);
        }
    }
}

/* block [p0, p1) × [q0, q1) of c = scale · sᵀ · w, c row stride ldc */
TARGET static void CAT(rank_update_block, SUFFIX)(int64_t p0, int64_t P, int64_t q0, int64_t q1, int64_t T,
                                                  lf_view s, lf_view w, float scale, float *c, int64_t ldc) {
    for (int64_t j = q0; j < q1; j += VW) {
        const int64_t width = q1 - j;
        for (int64_t p = p0; p < P; p++) CAT(vstore, SUFFIX)(c + p * ldc + j, (VF){0}, width);
        for (int64_t t0 = 0; t0 < T; t0 += ROWS) {
            const int64_t rows = T - t0 < ROWS ? T - t0 : ROWS;
            VF wv[ROWS];
            const float *sr[ROWS];
            for (int t = 0; t < ROWS; t++) {
                const int64_t tt = t0 + (t < rows ? t : 0);
                wv[t] = t < rows ? CAT(vload, SUFFIX)(w.p + tt * w.rs + j, width) : (VF){0};
                sr[t] = s.p + tt * s.rs;
            }
            for (int64_t p = p0; p < P; p++) {
                VF acc = CAT(vload, SUFFIX)(c + p * ldc + j, width);
                const int64_t off = p * s.cs;
                if (rows == ROWS) {
#pragma GCC unroll 8
                    for (int t = 0; t < ROWS; t++) acc += sr[t][off] * wv[t];
                } else { /* last token block: only real rows (a padded row could hold inf) */
                    for (int t = 0; t < rows; t++) acc += sr[t][off] * wv[t];
                }
                CAT(vstore, SUFFIX)(c + p * ldc + j, acc, width);
            }
        }
        for (int64_t p = p0; p < P; p++)
            CAT(vstore, SUFFIX)(c + p * ldc + j, CAT(vload, SUFFIX)(c + p * ldc + j, width) * scale, width);
    }
}

/* dst[j] = keep(off0 + j) ? src[j] · scale : 0 — dropout on a contiguous run (x̃ rows);
 * the hash vectorises (64-bit lane multiplies) under the ISA's target. */
TARGET static void CAT(dropout_span, SUFFIX)(const float *src, int64_t n, uint64_t off0, uint64_t seed,
                                             uint32_t thr, float scale, float *dst) {
    for (int64_t j = 0; j < n; j++) {
        const uint32_t h = (uint32_t)(lf_splitmix64(seed ^ (off0 + (uint64_t)j)) >> 40);
        dst[j] = h >= thr ? src[j] * scale : 0.0f;
    }
}

/* dst[j] += keep(off0 + j) ? coef · t[j] : 0 — the dropout part of dx, one row at a time */
TARGET static void CAT(dropout_axpy_span, SUFFIX)(const float *t, int64_t n, uint64_t off0, uint64_t seed,
                                                  uint32_t thr, float coef, float *dst) {
    for (int64_t j = 0; j < n; j++) {
        const uint32_t h = (uint32_t)(lf_splitmix64(seed ^ (off0 + (uint64_t)j)) >> 40);
        dst[j] += h >= thr ? coef * t[j] : 0.0f;
    }
}

/* rows j ∈ [j0, j1) of c (n, ·) (+)= scale · a (n, K) · b (·, K)ᵀ for n ≤ LF_ROWDOTS_MAX_N: each
 * output is a dot product of two contiguous rows, and b (W at decode) is streamed once, in
 * place — packing it would cost more than the few rows of arithmetic. */
TARGET static void CAT(rowdots_block, SUFFIX)(int64_t j0, int64_t j1, int64_t n, int64_t K, lf_view a,
                                              lf_view b, float scale, float *c, int64_t ldc, int accumulate) {
    const int64_t kfull = K / VW * VW;
    for (int64_t j = j0; j < j1; j += 2) {
        const int two = j + 1 < j1;
        const float *b0 = b.p + j * b.rs, *b1 = b.p + (j + two) * b.rs;
        VF acc[LF_ROWDOTS_MAX_N][2];
        for (int64_t i = 0; i < n; i++) acc[i][0] = acc[i][1] = (VF){0};
        for (int64_t p = 0; p < K; p += VW) {
            VF w0, w1;
            if (p < kfull) {
                memcpy(&w0, b0 + p, sizeof w0);
                memcpy(&w1, b1 + p, sizeof w1);
            } else {
                w0 = CAT(vload, SUFFIX)(b0 + p, K - p);
                w1 = CAT(vload, SUFFIX)(b1 + p, K - p);
            }
            for (int64_t i = 0; i < n; i++) {
                VF xv;
                if (p < kfull) memcpy(&xv, a.p + i * a.rs + p, sizeof xv);
                else xv = CAT(vload, SUFFIX)(a.p + i * a.rs + p, K - p);
                acc[i][0] += xv * w0;
                acc[i][1] += xv * w1;
            }
        }
        for (int64_t i = 0; i < n; i++) {
            float *ci = c + i * ldc + j;
            ci[0] = (accumulate ? ci[0] : 0.0f) + scale * HSUM(acc[i][0]);
            if (two) ci[1] = (accumulate ? ci[1] : 0.0f) + scale * HSUM(acc[i][1]);
        }
    }
}

static const lf_skinny CAT(skinny, SUFFIX) = {
    .rowdots_block = CAT(rowdots_block, SUFFIX),
    .vw = VW,
    .dropout_span = CAT(dropout_span, SUFFIX),
    .dropout_axpy_span = CAT(dropout_axpy_span, SUFFIX),
    .rowdot_rows = CAT(rowdot_rows, SUFFIX),
    .rank_update_block = CAT(rank_update_block, SUFFIX),
};

#undef VF
