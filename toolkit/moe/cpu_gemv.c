/* bf16 linear layer on the CPU for CPU experts: y[t, r] = sum_k x[t, k] * w[r, k], accumulated in float32.
 *
 * Built by toolkit/moe/cpu_gemv.py with the machine's C compiler (-O3 -march=native -fopenmp) and
 * called through ctypes. The vector path reads every weight row from memory once for up to 4 tokens. With
 * AVX512-BF16 (Xeon since Cooper Lake, AMD since Zen 4) one instruction multiplies 32 bf16 pairs
 * and adds them into float32 lanes, 4 weight rows at a time sharing each load of x; elsewhere bf16
 * widens to float32 by a 16-bit shift and feeds fused multiply-adds. Rows are split over OpenMP
 * threads (torch's own runtime, loaded before this library). Results round to nearest even, as
 * torch rounds float32 to bf16. Passes of many tokens take AMX tiles where the CPU has them (below).
 */
#include <stdint.h>
#include <string.h>
#include <stdlib.h>
#ifdef _OPENMP
#include <omp.h>
#endif
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

/* The vector path of this build: bf16 dot products, or bf16 widened to float32. */
static int linear_vec(const uint16_t *x, int64_t n, int64_t K, int64_t ldx, const uint16_t *w, int64_t N,
                      int64_t ldw, uint16_t *y, int64_t ldy, int threads) {
#ifdef HAVE_DPBF16
    linear_dp(x, n, K, ldx, w, N, ldw, y, ldy, threads);
    return 0;
#else
    return linear_widen(x, n, K, ldx, w, N, ldw, y, ldy, threads);
#endif
}

/* ---- AMX: tile matrix multiplies for passes of many tokens (Xeon since Sapphire Rapids) ----
 *
 * One TDPBF16PS multiplies a 16 x 32 bf16 tile by a 32 x 16 one into 16 x 16 float32 sums, 16 times the work
 * of a vector instruction. The weights are tile A as they lie (16 rows of 32 bf16, row stride ldw: no
 * repacked copy of the expert); the activations, small, are repacked once per call into tile B's
 * pair-interleaved layout (for each pair of k, 16 tokens x 2 bf16), zero-padded to 16 tokens. Each thread
 * takes a contiguous run of 16-row blocks and keeps two blocks x two token groups in four accumulator tiles.
 * Rows beyond the last whole block of 16 take the vector path.
 * On the one-H200 host (16-core Xeon) a Mixtral expert at 8 or 16 tokens streams near the read rate (3.3-4.2
 * ms, where the vector path takes 5.3 and 9.3); from 32 tokens the time grows again (10.6 ms at 128, torch's
 * matmul 12.6), far from the tile units' peak, and blockings that copy the weights into tile order were no
 * faster (data/gpu/amx_probes_h200.json, benchmarks/PERF_NOTES.md), nor were weights prepacked once into tile
 * order (11.6 ms) or oneDNN's GEMM on its own prepacked layout (16.3 ms; data/gpu/amx_pack_probe_h200.json).
 * The kernel asks Linux for the tile state once per process (arch_prctl); refused, it keeps the vector path.
 * TOOLKIT_AMX_EMULATE builds the same blocking over plain-C tiles, so the tests check its indexing on any CPU. */
#if defined(TOOLKIT_AMX_EMULATE)
#define HAVE_AMX 1
typedef struct { uint8_t d[16][64]; } emu_tile;
static __thread emu_tile emu[8];
static void emu_load(int t, const void *p, int64_t stride) {
    for (int r = 0; r < 16; ++r) memcpy(emu[t].d[r], (const uint8_t *)p + r * stride, 64);
}
static void emu_store(int t, void *p, int64_t stride) {
    for (int r = 0; r < 16; ++r) memcpy((uint8_t *)p + r * stride, emu[t].d[r], 64);
}
static void emu_dp(int c, int a, int b) { /* c[m][j] += sum_k a[m][k] * b[k / 2][2 j + k % 2], k < 32 */
    for (int m = 0; m < 16; ++m)
        for (int j = 0; j < 16; ++j) {
            float acc;
            memcpy(&acc, &emu[c].d[m][4 * j], 4);
            for (int k = 0; k < 16; ++k) {
                uint16_t a0, a1, b0, b1;
                memcpy(&a0, &emu[a].d[m][4 * k], 2);
                memcpy(&a1, &emu[a].d[m][4 * k + 2], 2);
                memcpy(&b0, &emu[b].d[k][4 * j], 2);
                memcpy(&b1, &emu[b].d[k][4 * j + 2], 2);
                acc += bf16_to_f32(a0) * bf16_to_f32(b0) + bf16_to_f32(a1) * bf16_to_f32(b1);
            }
            memcpy(&emu[c].d[m][4 * j], &acc, 4);
        }
}
#define TILE_CONFIG() ((void)0)
#define TILE_RELEASE() ((void)0)
#define TILE_ZERO(t) memset(emu[t].d, 0, sizeof emu[t].d)
#define TILE_LOAD(t, p, stride) emu_load(t, p, stride)
#define TILE_STORE(t, p, stride) emu_store(t, p, stride)
#define TILE_DP(c, a, b) emu_dp(c, a, b)
static int amx_ready(void) { return 1; }
#elif defined(__AMX_TILE__) && defined(__AMX_BF16__) && defined(__linux__)
#define HAVE_AMX 1
#include <sys/syscall.h>
#include <unistd.h>
typedef struct {
    uint8_t palette, start_row, reserved[14];
    uint16_t colsb[16];
    uint8_t rows[16];
} __attribute__((packed)) tile_config;
static void tile_config_load(void) {
    tile_config c;
    memset(&c, 0, sizeof c);
    c.palette = 1;
    for (int t = 0; t < 8; ++t) { c.rows[t] = 16; c.colsb[t] = 64; } /* every tile 16 rows of 64 bytes */
    _tile_loadconfig(&c);
}
#define TILE_CONFIG() tile_config_load()
#define TILE_RELEASE() _tile_release()
#define TILE_ZERO(t) _tile_zero(t)
#define TILE_LOAD(t, p, stride) _tile_loadd(t, p, stride)
#define TILE_STORE(t, p, stride) _tile_stored(t, p, stride)
#define TILE_DP(c, a, b) _tile_dpbf16ps(c, a, b)
static int amx_state; /* 0 not asked yet, 1 granted, -1 refused */
static int amx_ready(void) {
    if (!amx_state) /* ARCH_REQ_XCOMP_PERM for XFEATURE_XTILEDATA; a benign race: every caller asks the same */
        amx_state = syscall(SYS_arch_prctl, 0x1023, 18) == 0 ? 1 : -1;
    return amx_state > 0;
}
#endif

#ifdef HAVE_AMX
/* tiles 0-3: sums for (row block a, token group b) = 2a + b; 4-5: weights of row blocks 0, 1; 6-7: tokens */
static void amx_store(int tile, float *c, int64_t r0, int64_t t0, int64_t n, uint16_t *y, int64_t ldy) {
    switch (tile) { /* the tile number must be a constant */
    case 0: TILE_STORE(0, c, 64); break;
    case 1: TILE_STORE(1, c, 64); break;
    case 2: TILE_STORE(2, c, 64); break;
    default: TILE_STORE(3, c, 64); break;
    }
    const int64_t tn = n - t0 < 16 ? n - t0 : 16;
    for (int64_t t = 0; t < tn; ++t)
        for (int r = 0; r < 16; ++r) y[(t0 + t) * ldy + r0 + r] = f32_to_bf16(c[r * 16 + t]);
}

/* K in chunks of KCHUNK tile columns: a row-block pair's chunk (32 rows x KCHUNK x 64 bytes) is used by every
 * token group before the next chunk; sums wait in a per-thread float32 buffer between chunks, and the next
 * tiles of x are prefetched into L1. On the one-H200 host this took a Mixtral expert at 128 tokens from 12.3
 * to 10.6 ms against one pass over K per token-group pair. Copying each chunk into tile order first (an
 * expert's rows lie a power of two apart, so a tile's 16 rows share one L1 set) was no faster: 12.7 ms with
 * the next chunk prefetched, 14.7 without, 12.1 without the copy in the same probe. */
#define KCHUNK 8

/* OP(tile, its sums buffer) for each accumulator tile a block pair and a group pair use, in linear_amx below */
#define EACH_SUM(OP) \
    do {                                                                                                           \
        OP(0, a0);                                                                                                 \
        if (two_groups) OP(1, a1);                                                                                 \
        if (two_rows) {                                                                                            \
            OP(2, a2);                                                                                             \
            if (two_groups) OP(3, a3);                                                                             \
        }                                                                                                          \
    } while (0)
#define LOAD_SUM(t, p) TILE_LOAD(t, p, 64)
#define STORE_SUM(t, p) TILE_STORE(t, p, 64)
#define STORE_OUT(t, p) amx_store(t, c, (b + (t) / 2) * 16, (g + (t) % 2) * 16, n, y, ldy) /* rows, tokens of t */

/* The rows [0, 16 * (N / 16)) by tiles; needs K a multiple of 32. -1 when a working buffer cannot be allocated. */
static int linear_amx(const uint16_t *x, int64_t n, int64_t K, int64_t ldx, const uint16_t *w, int64_t N,
                      int64_t ldw, uint16_t *y, int64_t ldy, int threads) {
    const int64_t kbs = K / 32, groups = (n + 15) / 16, blocks = N / 16;
    /* xp[(g * kbs + kb) * 512 + j * 32 + 2 t + p] = x[16 g + t][32 kb + 2 j + p]: one 1 KB tile per (g, kb) */
    uint16_t *xp = (uint16_t *)aligned_alloc(64, (size_t)(groups * kbs * 1024 > 0 ? groups * kbs * 1024 : 64));
    if (!xp) return -1;
#pragma omp parallel for schedule(static) num_threads(threads)
    for (int64_t gk = 0; gk < groups * kbs; ++gk) {
        const int64_t g = gk / kbs, kb = gk % kbs;
        uint16_t *tile = xp + gk * 512;
        for (int t = 0; t < 16; ++t) {
            const int64_t row = 16 * g + t;
            for (int j = 0; j < 16; ++j)
                for (int p = 0; p < 2; ++p)
                    tile[j * 32 + 2 * t + p] = row < n ? x[row * ldx + 32 * kb + 2 * j + p] : 0;
        }
    }
    int failed = 0;
#pragma omp parallel num_threads(threads)
    {
        float *acc = (float *)aligned_alloc(64, (size_t)(2 * groups * 1024));
        if (!acc) {
#pragma omp atomic write
            failed = 1;
        } else {
            TILE_CONFIG();
            float c[256] __attribute__((aligned(64)));
            int nt = 1, me = 0;
#ifdef _OPENMP
            nt = omp_get_num_threads();
            me = omp_get_thread_num();
#endif
            const int64_t b0 = blocks * me / nt, b1 = blocks * (me + 1) / nt;
            for (int64_t b = b0; b < b1; b += 2) {
                const int two_rows = b + 1 < b1;
                const uint16_t *wa = w + b * 16 * ldw, *wb = wa + 16 * ldw;
                for (int64_t k0 = 0; k0 < kbs; k0 += KCHUNK) {
                    const int64_t k1 = k0 + KCHUNK < kbs ? k0 + KCHUNK : kbs;
                    const int last = k1 == kbs;
                    for (int64_t g = 0; g < groups; g += 2) {
                        const int two_groups = g + 1 < groups;
                        const uint16_t *xa = xp + g * kbs * 512, *xb = xa + kbs * 512;
                        float *a0 = acc + g * 256, *a1 = a0 + 256, *a2 = acc + (groups + g) * 256, *a3 = a2 + 256;
                        if (k0 == 0) {
                            TILE_ZERO(0); TILE_ZERO(1); TILE_ZERO(2); TILE_ZERO(3);
                        } else {
                            EACH_SUM(LOAD_SUM);
                        }
                        for (int64_t kb = k0; kb < k1; ++kb) {
                            if (kb + 1 < kbs) {
                                const char *pa = (const char *)(xa + (kb + 1) * 512);
                                for (int l = 0; l < 1024; l += 64) __builtin_prefetch(pa + l, 0, 3);
                                if (two_groups) {
                                    const char *pb = (const char *)(xb + (kb + 1) * 512);
                                    for (int l = 0; l < 1024; l += 64) __builtin_prefetch(pb + l, 0, 3);
                                }
                            }
                            TILE_LOAD(4, wa + 32 * kb, ldw * 2);
                            TILE_LOAD(6, xa + kb * 512, 64);
                            TILE_DP(0, 4, 6);
                            if (two_groups) {
                                TILE_LOAD(7, xb + kb * 512, 64);
                                TILE_DP(1, 4, 7);
                            }
                            if (two_rows) {
                                TILE_LOAD(5, wb + 32 * kb, ldw * 2);
                                TILE_DP(2, 5, 6);
                                if (two_groups) TILE_DP(3, 5, 7);
                            }
                        }
                        if (last)
                            EACH_SUM(STORE_OUT); /* rounded to bf16 into y */
                        else
                            EACH_SUM(STORE_SUM);
                    }
                }
            }
            TILE_RELEASE();
        }
        free(acc);
    }
    free(xp);
    return failed ? -1 : 0;
}
#endif

/* 1 when this build has the AMX path and the process may use it (asks Linux once), else 0 */
int toolkit_amx(void) {
#ifdef HAVE_AMX
    return amx_ready();
#else
    return 0;
#endif
}

/* Passes of at least this many tokens take AMX where it runs (below it the vector path reads each row once
 * per 4 tokens from L1, and a tile pass pads tokens to 16). */
#define AMX_FROM_TOKENS 5

/* x: n rows of K bf16 (row stride ldx), w: N rows of K bf16 (row stride ldw), y: n rows of N bf16 (stride ldy).
 * path: 0 the machine's best (AMX from AMX_FROM_TOKENS tokens where it runs), 1 the vector path, 2 AMX (the
 * vector path where AMX cannot run or K is not a multiple of 32). Returns 0, or -1 when a working copy of x
 * could not be allocated. */
int toolkit_linear_bf16_path(const uint16_t *x, int64_t n, int64_t K, int64_t ldx, const uint16_t *w, int64_t N,
                             int64_t ldw, uint16_t *y, int64_t ldy, int threads, int path) {
#ifdef HAVE_AMX
    const int amx = path == 2 || (path == 0 && n >= AMX_FROM_TOKENS);
    if (amx && K % 32 == 0 && N >= 16 && amx_ready()) {
        const int64_t tiled = 16 * (N / 16);
        if (linear_amx(x, n, K, ldx, w, tiled, ldw, y, ldy, threads)) return -1;
        return tiled < N ? linear_vec(x, n, K, ldx, w + tiled * ldw, N - tiled, ldw, y + tiled, ldy, threads) : 0;
    }
#else
    (void)path;
#endif
    return linear_vec(x, n, K, ldx, w, N, ldw, y, ldy, threads);
}
