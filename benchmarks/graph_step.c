/* The CPU's share of one layer's missed experts for one token, as a CUDA host function
 * (benchmarks/graph_step.py captures it into the step's CUDA graph).
 *
 * The routing and the activations arrive in pinned memory by copies earlier in the stream. For each of the
 * token's K experts that is not resident, intermediate units [k, I) are computed here (gate and up rows
 * [k, I) and [I + k, 2I), SiLU, then the down projection's columns [k, I)) and summed with their routing
 * weights into y; units [0, k) are the GPU's, read in place from the same pinned weights. Each linear layer
 * goes through the toolkit's CPU kernel (toolkit/moe/cpu_gemv.c, its entry point passed in as ``lin``). */
#include <math.h>
#include <stdint.h>
#include <string.h>
#include <time.h>

typedef int (*linear_fn)(const uint16_t *, int64_t, int64_t, int64_t, const uint16_t *, int64_t, int64_t,
                         uint16_t *, int64_t, int, int);

typedef struct {
    linear_fn lin;           /* toolkit_linear_bf16_path */
    const int64_t *sel;      /* [K] the token's experts (pinned) */
    const uint16_t *wts;     /* [K] their routing weights, bf16 (pinned) */
    const uint16_t *x;       /* [D] the token's activations, bf16 (pinned) */
    const uint8_t *resident; /* [E] 1: the GPU computes all of that expert */
    const uint16_t *gate_up; /* [E, 2I, D] the layer's experts in host memory */
    const uint16_t *down;    /* [E, D, I] */
    int64_t K, E, D, I, k;   /* k: units [0, k) of a missed expert are the GPU's; read when the node runs */
    uint16_t *h;             /* [2 (I - k)] scratch */
    uint16_t *act;           /* [I - k] scratch */
    uint16_t *yk;            /* [D] scratch */
    float *acc;              /* [D] scratch */
    uint16_t *y;             /* [D] the CPU's sum, bf16 (pinned: copied to the GPU after this node) */
    int threads;
    double busy_s;   /* seconds spent in here, summed over calls */
    int64_t calls;   /* calls */
    int64_t experts; /* missed experts whose share was computed, summed over calls */
} share_job;

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

void graph_step_cpu_share(void *arg) {
    share_job *j = (share_job *)arg;
    struct timespec t0, t1;
    clock_gettime(CLOCK_MONOTONIC, &t0);
    const int64_t D = j->D, I = j->I, k = j->k, n = I - k;
    for (int64_t d = 0; d < D; ++d) j->acc[d] = 0.f;
    for (int64_t s = 0; s < j->K; ++s) {
        const int64_t e = j->sel[s];
        if (e < 0 || e >= j->E || j->resident[e] || n <= 0) continue;
        const uint16_t *gu = j->gate_up + e * 2 * I * D, *dn = j->down + e * D * I;
        j->lin(j->x, 1, D, D, gu + k * D, n, D, j->h, n, j->threads, 0);           /* gate rows [k, I) */
        j->lin(j->x, 1, D, D, gu + (I + k) * D, n, D, j->h + n, n, j->threads, 0); /* up rows [I + k, 2I) */
        for (int64_t i = 0; i < n; ++i) {
            const float g = bf16_to_f32(j->h[i]), u = bf16_to_f32(j->h[n + i]);
            const float a = bf16_to_f32(f32_to_bf16(g / (1.f + expf(-g)))); /* SiLU rounded to bf16, as torch */
            j->act[i] = f32_to_bf16(a * u);
        }
        j->lin(j->act, 1, n, n, dn + k, D, I, j->yk, D, j->threads, 0); /* down columns [k, I) */
        const float w = bf16_to_f32(j->wts[s]);
        for (int64_t d = 0; d < D; ++d) j->acc[d] += w * bf16_to_f32(j->yk[d]);
        j->experts += 1;
    }
    for (int64_t d = 0; d < D; ++d) j->y[d] = f32_to_bf16(j->acc[d]);
    clock_gettime(CLOCK_MONOTONIC, &t1);
    j->busy_s += (double)(t1.tv_sec - t0.tv_sec) + 1e-9 * (double)(t1.tv_nsec - t0.tv_nsec);
    j->calls += 1;
}
