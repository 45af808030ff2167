/* The CPU's share of a decode pass's missed experts, as a CUDA host function (cuLaunchHostFunc).
 *
 * A captured decode step (toolkit/moe/graph_pass.py) serves each missed expert in two parts at once: intermediate
 * units [0, k) on the GPU, copied into a staging slot, and units [k, I) here, on the CPU, reading the expert's
 * weights where they lie in host memory. The token's routing and activations reach pinned memory by copies earlier
 * in the stream; this function reads them when it runs, so one captured graph serves any routing.
 *
 * For each of the token's K experts that is not resident: gate rows [k, I) and up rows [I + k, 2I) at x, SiLU of
 * gate times up, the down projection's columns [k, I), times the routing weight, summed over the experts in float32
 * and rounded once to bf16 into y. bf16 in, SiLU and each projection rounded to bf16 as torch rounds them. Each
 * linear layer goes through the toolkit's CPU kernel (cpu_gemv.c, its entry point passed in as ``lin``). */
#include <math.h>
#include <stdint.h>
#include <string.h>
#include <time.h>
#include <omp.h>

#define TOOLKIT_MAX_TOP_K 64 /* experts a token may pick (graph_pass.py checks it) */

typedef int (*linear_fn)(const uint16_t *, int64_t, int64_t, int64_t, const uint16_t *, int64_t, int64_t,
                         uint16_t *, int64_t, int, int);

static inline float bf16_to_f32(uint16_t h) {
    uint32_t u = (uint32_t)h << 16;
    float f;
    memcpy(&f, &u, 4);
    return f;
}

static inline uint16_t f32_to_bf16(float f) { /* round to nearest even; the values are finite */
    uint32_t u;
    memcpy(&u, &f, 4);
    u += 0x7fffu + ((u >> 16) & 1u);
    return (uint16_t)(u >> 16);
}

static double seconds_of(clockid_t clock) {
    struct timespec t;
    clock_gettime(clock, &t);
    return (double)t.tv_sec + 1e-9 * (double)t.tv_nsec;
}

static double seconds(void) { return seconds_of(CLOCK_MONOTONIC); }

/* Intermediate units [k, I) of each missed expert m (M of them: gate_up[m] [2I, D], down[m] [D, I], weights w[m])
 * at the token x [D], summed into acc [D] in the order of m, all in one parallel region: every thread takes a run of
 * the M * 2 (I - k) gate and up rows, then of the SiLU, then a run of the D down rows of every expert. The threads
 * fork once a call rather than four times an expert (two missed experts' shares, called directly on the one-H200
 * host: 4.86 against 5.52 ms, 20 alternating calls; the captured step took the same time either way,
 * data/gpu/host_share_one_region_h200.json). Each run of rows goes through lin on the calling thread (a nested
 * region of one thread). Scratch: h [M * 2 (I - k)], act [M * (I - k)], yk [M * D]. */
static void experts_in_one_region(linear_fn lin, const uint16_t *x, const uint16_t *const *gu,
                                  const uint16_t *const *dn, const float *w, int64_t M, int64_t D, int64_t I,
                                  int64_t k, uint16_t *h, uint16_t *act, uint16_t *yk, float *acc, int threads) {
    const int64_t n = I - k, rows = M * 2 * n, block = 16;
#pragma omp parallel num_threads(threads)
    {
        const int64_t t = omp_get_thread_num(), T = omp_get_num_threads();
        /* gate rows [k, I) then up rows [I + k, 2I) of expert 0, then of expert 1, ...: a run of whole blocks */
        const int64_t blocks = (rows + block - 1) / block;
        int64_t v = block * (blocks * t / T);
        const int64_t v1 = block * (blocks * (t + 1) / T) < rows ? block * (blocks * (t + 1) / T) : rows;
        while (v < v1) {
            const int64_t m = v / (2 * n), j = v % (2 * n), up = j >= n;
            const int64_t end_of_part = m * 2 * n + (up ? 2 * n : n);
            const int64_t r = (v1 < end_of_part ? v1 : end_of_part) - v;
            const int64_t row = up ? I + k + (j - n) : k + j;
            lin(x, 1, D, D, gu[m] + row * D, r, D, h + v, r, 1, 0);
            v += r;
        }
#pragma omp barrier
#pragma omp for schedule(static)
        for (int64_t i = 0; i < M * n; ++i) {
            const int64_t m = i / n, u = i % n;
            const float g = bf16_to_f32(h[m * 2 * n + u]), up = bf16_to_f32(h[m * 2 * n + n + u]);
            act[i] = f32_to_bf16(bf16_to_f32(f32_to_bf16(g / (1.f + expf(-g)))) * up);
        }
        /* the implicit barrier of the loop: every act is ready. Down rows [d0, d1) of every expert, then their sum */
        const int64_t dblocks = (D + block - 1) / block;
        const int64_t d0 = block * (dblocks * t / T);
        const int64_t d1 = block * (dblocks * (t + 1) / T) < D ? block * (dblocks * (t + 1) / T) : D;
        if (d1 > d0) {
            for (int64_t m = 0; m < M; ++m)
                lin(act + m * n, 1, n, n, dn[m] + d0 * I + k, d1 - d0, I, yk + m * D + d0, d1 - d0, 1, 0);
            for (int64_t d = d0; d < d1; ++d)
                for (int64_t m = 0; m < M; ++m) acc[d] += w[m] * bf16_to_f32(yk[m * D + d]);
        }
    }
}

typedef struct {
    linear_fn lin;           /* toolkit_linear_bf16_path */
    const int64_t *sel;      /* [K] the token's experts (pinned) */
    const float *wts;        /* [K] their routing weights (pinned) */
    const uint16_t *x;       /* [D] the token's activations, bf16 (pinned) */
    const uint8_t *resident; /* [E] 1: the GPU computes all of that expert */
    const uint16_t *gate_up; /* [E, 2I, D] the layer's experts in host memory */
    const uint16_t *down;    /* [E, D, I] */
    int64_t K, E, D, I, k;   /* k: units [0, k) of a missed expert are the GPU's */
    uint16_t *h;             /* [K 2I] scratch */
    uint16_t *act;           /* [K I] scratch */
    uint16_t *yk;            /* [K D] scratch */
    float *acc;              /* [D] scratch */
    uint16_t *y;             /* [D] the CPU's sum, bf16 (pinned: copied to the GPU after this function) */
    int threads;
    double busy_s;   /* seconds spent in here, summed over calls */
    int64_t calls;   /* calls */
    int64_t experts; /* missed experts whose share was computed, summed over calls */
    double *stamps;    /* NULL, or [2 stamp_cap]: each call's start and end, Unix seconds (CLOCK_REALTIME, the
                          clock a profiler's trace is on), call c at (c mod stamp_cap) */
    int64_t stamp_cap;
} share_job;

void toolkit_host_share(void *arg) {
    share_job *j = (share_job *)arg;
    const double t0 = seconds(), wall0 = j->stamps ? seconds_of(CLOCK_REALTIME) : 0.0;
    const int64_t D = j->D, I = j->I, k = j->k;
    for (int64_t d = 0; d < D; ++d) j->acc[d] = 0.f;
    const uint16_t *gu[TOOLKIT_MAX_TOP_K], *dn[TOOLKIT_MAX_TOP_K];
    float w[TOOLKIT_MAX_TOP_K];
    int64_t M = 0;
    for (int64_t s = 0; s < j->K && s < TOOLKIT_MAX_TOP_K; ++s) {
        const int64_t e = j->sel[s];
        if (e < 0 || e >= j->E || j->resident[e]) continue;
        j->experts += 1;
        gu[M] = j->gate_up + e * 2 * I * D, dn[M] = j->down + e * D * I, w[M] = j->wts[s];
        M += 1;
    }
    if (k < I && M > 0) /* else the GPU computes all of it */
        experts_in_one_region(j->lin, j->x, gu, dn, w, M, D, I, k, j->h, j->act, j->yk, j->acc, j->threads);
    for (int64_t d = 0; d < D; ++d) j->y[d] = f32_to_bf16(j->acc[d]);
    j->busy_s += seconds() - t0;
    if (j->stamps && j->stamp_cap > 0) {
        const int64_t at = 2 * (j->calls % j->stamp_cap);
        j->stamps[at] = wall0;
        j->stamps[at + 1] = seconds_of(CLOCK_REALTIME);
    }
    j->calls += 1;
}
