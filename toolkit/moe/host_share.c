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

/* acc [D] += w * (intermediate units [k, I) of the expert gu [2I, D], dn [D, I] at the token x [D]).
 * Scratch: h [2 (I - k)], act [I - k], yk [D]. */
static void expert_units(linear_fn lin, const uint16_t *x, const uint16_t *gu, const uint16_t *dn, int64_t D,
                         int64_t I, int64_t k, float w, uint16_t *h, uint16_t *act, uint16_t *yk, float *acc,
                         int threads) {
    const int64_t n = I - k;
    if (k == 0) {
        lin(x, 1, D, D, gu, 2 * I, D, h, 2 * I, threads, 0); /* gate and up rows lie together: one pass */
    } else {
        lin(x, 1, D, D, gu + k * D, n, D, h, n, threads, 0);           /* gate rows [k, I) */
        lin(x, 1, D, D, gu + (I + k) * D, n, D, h + n, n, threads, 0); /* up rows [I + k, 2I) */
    }
#pragma omp parallel for schedule(static) num_threads(threads) /* ~47 us an expert on one thread */
    for (int64_t i = 0; i < n; ++i) {
        const float g = bf16_to_f32(h[i]), u = bf16_to_f32(h[n + i]);
        act[i] = f32_to_bf16(bf16_to_f32(f32_to_bf16(g / (1.f + expf(-g)))) * u);
    }
    lin(act, 1, n, n, dn + k, D, I, yk, D, threads, 0); /* down columns [k, I) */
    for (int64_t d = 0; d < D; ++d) acc[d] += w * bf16_to_f32(yk[d]);
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
    uint16_t *h;             /* [2 (I - k)] scratch */
    uint16_t *act;           /* [I - k] scratch */
    uint16_t *yk;            /* [D] scratch */
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
    for (int64_t s = 0; s < j->K; ++s) {
        const int64_t e = j->sel[s];
        if (e < 0 || e >= j->E || j->resident[e]) continue;
        j->experts += 1;
        if (k < I)  /* else the GPU computes all of it */
            expert_units(j->lin, j->x, j->gate_up + e * 2 * I * D, j->down + e * D * I, D, I, k, j->wts[s], j->h,
                         j->act, j->yk, j->acc, j->threads);
    }
    for (int64_t d = 0; d < D; ++d) j->y[d] = f32_to_bf16(j->acc[d]);
    j->busy_s += seconds() - t0;
    if (j->stamps && j->stamp_cap > 0) {
        const int64_t at = 2 * (j->calls % j->stamp_cap);
        j->stamps[at] = wall0;
        j->stamps[at + 1] = seconds_of(CLOCK_REALTIME);
    }
    j->calls += 1;
}
