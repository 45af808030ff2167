/* Few-row bf16 linear layer on the CPU: y[t, r] = sum_k x[t, k] * w[r, k], accumulated in float32.
 *
 * Built by toolkit/moe/cpu_gemv.py with the machine's C compiler (-O3 -march=native -fopenmp) and
 * called through ctypes. Every weight row is read from memory once for up to 4 tokens. With
 * AVX512-BF16 (Xeon since Cooper Lake, AMD since Zen 4) one instruction multiplies 32 bf16 pairs
 * and adds them into float32 lanes, 4 weight rows at a time sharing each load of x; elsewhere bf16
 * widens to float32 by a 16-bit shift and feeds fused multiply-adds. Rows are split over OpenMP
 * threads (torch's own runtime, loaded before this library). Results round to nearest even, as
 * torch rounds float32 to bf16.
 */
#include <stdint.h>
#include <string.h>
#include <stdlib.h>
#if defined(__AVX512F__) || defined(__AVX2__)
#include <immintrin.h>
#endif
#if defined(__AVX512BF16__) && defined(__AVX512BW__)
#define HAVE_DPBF16 1 /* bf16 dot products; otherwise bf16 widens to float32 */
#endif

static inline float bf16_to_f32(uint16_t h) {
    uint32_t u = (uint32_t)h << 16;
    float f;
    memcpy(&f, &u, 4);
    return f;
}

static inline uint16_t f32_to_bf16(float f) {
    uint32_t u;
    memcpy(&u, &f, 4);
    if ((u & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((u >> 16) | 0x40); /* NaN stays a quiet NaN */
    u += 0x7fffu + ((u >> 16) & 1u);
    return (uint16_t)(u >> 16);
}

#ifndef HAVE_DPBF16
#if defined(__AVX512F__)
#define LANES 16
typedef __m512 vec;
static inline vec vzero(void) { return _mm512_setzero_ps(); }
static inline vec vload_bf16(const uint16_t *p) {
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)p)), 16));
}
static inline vec vload(const float *p) { return _mm512_loadu_ps(p); }
static inline vec vfma(vec a, vec b, vec c) { return _mm512_fmadd_ps(a, b, c); }
static inline float vsum(vec a) { return _mm512_reduce_add_ps(a); }
#elif defined(__AVX2__)
#define LANES 8
typedef __m256 vec;
static inline vec vzero(void) { return _mm256_setzero_ps(); }
static inline vec vload_bf16(const uint16_t *p) {
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i *)p)), 16));
}
static inline vec vload(const float *p) { return _mm256_loadu_ps(p); }
static inline vec vfma(vec a, vec b, vec c) { return _mm256_fmadd_ps(a, b, c); }
static inline float vsum(vec a) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps(a, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}
#endif

/* One weight row against T tokens (T <= 4): two accumulators per token hide the FMA latency. */
#define ROW_KERNEL(T)                                                                                  \
    static void row_##T(const float *x, int64_t K, const uint16_t *w, float *out) {                    \
        int64_t k = 0;                                                                                 \
        VEC_PART(T)                                                                                    \
        for (; k < K; ++k) {                                                                           \
            float wk = bf16_to_f32(w[k]);                                                              \
            for (int t = 0; t < T; ++t) out[t] += wk * x[t * K + k];                                   \
        }                                                                                              \
    }

#ifdef LANES
#define VEC_PART(T)                                                                                    \
    vec a[T], b[T];                                                                                    \
    for (int t = 0; t < T; ++t) { a[t] = vzero(); b[t] = vzero(); }                                    \
    for (; k + 2 * LANES <= K; k += 2 * LANES) {                                                       \
        vec w0 = vload_bf16(w + k), w1 = vload_bf16(w + k + LANES);                                    \
        for (int t = 0; t < T; ++t) {                                                                  \
            a[t] = vfma(w0, vload(x + t * K + k), a[t]);                                               \
            b[t] = vfma(w1, vload(x + t * K + k + LANES), b[t]);                                       \
        }                                                                                              \
    }                                                                                                  \
    for (int t = 0; t < T; ++t) out[t] = vsum(a[t]) + vsum(b[t]);
#else
#define VEC_PART(T) for (int t = 0; t < T; ++t) out[t] = 0.0f;
#endif

ROW_KERNEL(1)
ROW_KERNEL(2)
ROW_KERNEL(3)
ROW_KERNEL(4)

typedef void (*row_fn)(const float *, int64_t, const uint16_t *, float *);
static const row_fn ROWS[5] = {0, row_1, row_2, row_3, row_4};

/* x widened to float32 once, then each weight row against up to 4 tokens; -1 when x's copy cannot be allocated */
static int linear_widen(const uint16_t *x, int64_t n, int64_t K, int64_t ldx, const uint16_t *w, int64_t N,
                        int64_t ldw, uint16_t *y, int64_t ldy, int threads) {
    float *xf = (float *)malloc(sizeof(float) * (size_t)(n * K > 0 ? n * K : 1));
    if (!xf) return -1;
    for (int64_t t = 0; t < n; ++t)
        for (int64_t k = 0; k < K; ++k) xf[t * K + k] = bf16_to_f32(x[t * ldx + k]);
    const int64_t block = 16; /* rows per scheduling unit: small enough to balance 15 threads over 4096 rows */
    const int64_t blocks = (N + block - 1) / block;
#pragma omp parallel for schedule(static) num_threads(threads)
    for (int64_t bi = 0; bi < blocks; ++bi) {
        const int64_t r1 = (bi + 1) * block < N ? (bi + 1) * block : N;
        for (int64_t r = bi * block; r < r1; ++r) {
            for (int64_t t0 = 0; t0 < n; t0 += 4) {
                const int T = (int)(n - t0 < 4 ? n - t0 : 4);
                float out[4];
                ROWS[T](xf + t0 * K, K, w + r * ldw, out);
                for (int t = 0; t < T; ++t) y[(t0 + t) * ldy + r] = f32_to_bf16(out[t]);
            }
        }
    }
    free(xf);
    return 0;
}

#else
/* R weight rows x T tokens (T <= 4): out[t * R + r]. 32 bf16 pairs per instruction; a masked tail. */
#define DP_KERNEL(R, T)                                                                                \
    static void dp_##R##_##T(const uint16_t *x, int64_t ldx, int64_t K, const uint16_t *w, int64_t ldw, \
                             float *out) {                                                             \
        __m512 acc[R][T];                                                                              \
        for (int r = 0; r < R; ++r)                                                                    \
            for (int t = 0; t < T; ++t) acc[r][t] = _mm512_setzero_ps();                               \
        int64_t k = 0;                                                                                 \
        for (; k + 32 <= K; k += 32) {                                                                 \
            __m512bh xv[T];                                                                            \
            for (int t = 0; t < T; ++t) xv[t] = (__m512bh)_mm512_loadu_si512(x + t * ldx + k);         \
            for (int r = 0; r < R; ++r) {                                                              \
                __m512bh wv = (__m512bh)_mm512_loadu_si512(w + r * ldw + k);                           \
                for (int t = 0; t < T; ++t) acc[r][t] = _mm512_dpbf16_ps(acc[r][t], wv, xv[t]);        \
            }                                                                                          \
        }                                                                                              \
        if (k < K) {                                                                                   \
            const __mmask32 m = (__mmask32)((1ull << (K - k)) - 1);                                    \
            __m512bh xv[T];                                                                            \
            for (int t = 0; t < T; ++t) xv[t] = (__m512bh)_mm512_maskz_loadu_epi16(m, x + t * ldx + k); \
            for (int r = 0; r < R; ++r) {                                                              \
                __m512bh wv = (__m512bh)_mm512_maskz_loadu_epi16(m, w + r * ldw + k);                  \
                for (int t = 0; t < T; ++t) acc[r][t] = _mm512_dpbf16_ps(acc[r][t], wv, xv[t]);        \
            }                                                                                          \
        }                                                                                              \
        for (int r = 0; r < R; ++r)                                                                    \
            for (int t = 0; t < T; ++t) out[t * R + r] = _mm512_reduce_add_ps(acc[r][t]);              \
    }
DP_KERNEL(4, 1)
DP_KERNEL(4, 2)
DP_KERNEL(4, 3)
DP_KERNEL(4, 4)
DP_KERNEL(1, 1)
DP_KERNEL(1, 2)
DP_KERNEL(1, 3)
DP_KERNEL(1, 4)
typedef void (*dp_fn)(const uint16_t *, int64_t, int64_t, const uint16_t *, int64_t, float *);
static const dp_fn DP4[5] = {0, dp_4_1, dp_4_2, dp_4_3, dp_4_4};
static const dp_fn DP1[5] = {0, dp_1_1, dp_1_2, dp_1_3, dp_1_4};

static void linear_dp(const uint16_t *x, int64_t n, int64_t K, int64_t ldx, const uint16_t *w, int64_t N,
                      int64_t ldw, uint16_t *y, int64_t ldy, int threads) {
    const int64_t block = 16; /* rows per scheduling unit, a multiple of 4 */
    const int64_t blocks = (N + block - 1) / block;
#pragma omp parallel for schedule(static) num_threads(threads)
    for (int64_t bi = 0; bi < blocks; ++bi) {
        const int64_t r1 = (bi + 1) * block < N ? (bi + 1) * block : N;
        for (int64_t r = bi * block; r < r1;) {
            const int R = r + 4 <= r1 ? 4 : 1;
            for (int64_t t0 = 0; t0 < n; t0 += 4) {
                const int T = (int)(n - t0 < 4 ? n - t0 : 4);
                float out[16];
                (R == 4 ? DP4 : DP1)[T](x + t0 * ldx, ldx, K, w + r * ldw, ldw, out);
                for (int t = 0; t < T; ++t)
                    for (int i = 0; i < R; ++i) y[(t0 + t) * ldy + r + i] = f32_to_bf16(out[t * R + i]);
            }
            r += R;
        }
    }
}
#endif

/* x: n rows of K bf16 (row stride ldx), w: N rows of K bf16 (row stride ldw), y: n rows of N bf16 (stride ldy).
 * Returns 0, or -1 when the float32 copy of x could not be allocated. */
int toolkit_linear_bf16(const uint16_t *x, int64_t n, int64_t K, int64_t ldx, const uint16_t *w, int64_t N,
                        int64_t ldw, uint16_t *y, int64_t ldy, int threads) {
#ifdef HAVE_DPBF16
    linear_dp(x, n, K, ldx, w, N, ldw, y, ldy, threads);
    return 0;
#else
    return linear_widen(x, n, K, ldx, w, N, ldw, y, ldy, threads);
#endif
}
