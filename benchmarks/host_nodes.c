/* One layer's CPU experts for one token as a CUDA host function: benchmarks/host_nodes.py captures it into a
 * CUDA graph (cuLaunchHostFunc), so a replayed decode step runs its CPU experts without Python between layers.
 *
 * y = sum over the layer's experts of 0.5 * down @ (silu(gate @ x) * (up @ x)), bf16 in and out, each linear
 * layer through the toolkit's CPU kernel (toolkit/moe/cpu_gemv.c, its entry point passed in as ``lin``).
 * Built by host_nodes.py with the machine's compiler (-O3 -march=native -fopenmp). */
#include <math.h>
#include <stdint.h>
#include <string.h>
#include <time.h>

typedef int (*linear_fn)(const uint16_t *, int64_t, int64_t, int64_t, const uint16_t *, int64_t, int64_t,
                         uint16_t *, int64_t, int, int);

#define MAX_EXPERTS 8
typedef struct {
    linear_fn lin;                        /* toolkit_linear_bf16_path */
    const uint16_t *x;                    /* [D] the token's activations (pinned: a device-to-host copy writes it) */
    int n;                                /* experts this layer computes, <= MAX_EXPERTS */
    const uint16_t *gate_up[MAX_EXPERTS]; /* [2I, D] */
    const uint16_t *down[MAX_EXPERTS];    /* [D, I] */
    uint16_t *h;                          /* [2I] scratch */
    uint16_t *act;                        /* [I] scratch */
    uint16_t *yk;                         /* [D] scratch */
    float *acc;                           /* [D] scratch */
    uint16_t *y;                          /* [D] the layer's CPU result (pinned: a host-to-device copy reads it) */
    int64_t D, I;
    int threads;
    double busy_s; /* seconds spent in here, summed over calls */
    int64_t calls;
} layer_job;

static inline float bf16_to_f32(uint16_t h) {
    uint32_t u = (uint32_t)h << 16;
    float f;
    memcpy(&f, &u, 4);
    return f;
}

static inline uint16_t f32_to_bf16(float f) { /* round to nearest even; the activations are finite */
    uint32_t u;
    memcpy(&u, &f, 4);
    u += 0x7fffu + ((u >> 16) & 1u);
    return (uint16_t)(u >> 16);
}

void host_nodes_layer(void *arg) {
    layer_job *j = (layer_job *)arg;
    struct timespec t0, t1;
    clock_gettime(CLOCK_MONOTONIC, &t0);
    const int64_t D = j->D, I = j->I;
    for (int64_t d = 0; d < D; ++d) j->acc[d] = 0.f;
    for (int e = 0; e < j->n; ++e) {
        j->lin(j->x, 1, D, D, j->gate_up[e], 2 * I, D, j->h, 2 * I, j->threads, 0);
        for (int64_t i = 0; i < I; ++i) {
            const float g = bf16_to_f32(j->h[i]), u = bf16_to_f32(j->h[I + i]);
            j->act[i] = f32_to_bf16(g / (1.f + expf(-g)) * u);
        }
        j->lin(j->act, 1, I, I, j->down[e], D, I, j->yk, D, j->threads, 0);
        for (int64_t d = 0; d < D; ++d) j->acc[d] += 0.5f * bf16_to_f32(j->yk[d]);
    }
    for (int64_t d = 0; d < D; ++d) j->y[d] = f32_to_bf16(j->acc[d]);
    clock_gettime(CLOCK_MONOTONIC, &t1);
    j->busy_s += (double)(t1.tv_sec - t0.tv_sec) + 1e-9 * (double)(t1.tv_nsec - t0.tv_nsec);
    j->calls += 1;
}
