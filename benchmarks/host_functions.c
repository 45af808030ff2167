/* CPU experts for one token as CUDA host functions (cuLaunchHostFunc), for the benchmarks that capture a decode
 * step whole as one CUDA graph: the step's CPU work then runs in stream order with no Python between layers.
 *
 * - host_nodes_layer (benchmarks/host_nodes.py): y = sum over the layer's experts of
 *   0.5 * down @ (SiLU(gate @ x) * (up @ x)).
 * - toolkit_host_share (benchmarks/graph_step.py, from toolkit/moe/host_share.c, included below): the CPU's share
 *   of the layer's missed experts, as the engine's captured decode passes compute it.
 *
 * bf16 in and out, sums in float32, SiLU rounded to bf16 before the product as torch rounds it. Each linear layer
 * goes through the toolkit's CPU kernel (toolkit/moe/cpu_gemv.c, its entry point passed in as ``lin``). Built by
 * host_functions.py with the machine's compiler (-O3 -march=native -fopenmp). */
/* bf16 conversions, seconds(), experts_in_one_region() and the share function: the toolkit's (the engine's
 * captured passes) */
#include "../toolkit/moe/host_share.c"

#define MAX_EXPERTS 8
typedef struct {
    linear_fn lin;                        /* toolkit_linear_bf16_path */
    const uint16_t *x;                    /* [D] the token's activations (pinned: a device-to-host copy writes it) */
    int n;                                /* experts this layer computes, <= MAX_EXPERTS */
    const uint16_t *gate_up[MAX_EXPERTS]; /* [2I, D] */
    const uint16_t *down[MAX_EXPERTS];    /* [D, I] */
    uint16_t *h;                          /* [n 2I] scratch */
    uint16_t *act;                        /* [n I] scratch */
    uint16_t *yk;                         /* [n D] scratch */
    float *acc;                           /* [D] scratch */
    uint16_t *y;                          /* [D] the layer's CPU result (pinned: a host-to-device copy reads it) */
    int64_t D, I;
    int threads;
    double busy_s; /* seconds spent in here, summed over calls */
    int64_t calls;
} layer_job;

void host_nodes_layer(void *arg) {
    layer_job *j = (layer_job *)arg;
    const double t0 = seconds();
    const float half[MAX_EXPERTS] = {0.5f, 0.5f, 0.5f, 0.5f, 0.5f, 0.5f, 0.5f, 0.5f};
    for (int64_t d = 0; d < j->D; ++d) j->acc[d] = 0.f;
    if (j->n > 0)
        experts_in_one_region(j->lin, j->x, j->gate_up, j->down, half, j->n, j->D, j->I, 0, j->h, j->act, j->yk,
                              j->acc, j->threads);
    for (int64_t d = 0; d < j->D; ++d) j->y[d] = f32_to_bf16(j->acc[d]);
    j->busy_s += seconds() - t0;
    j->calls += 1;
}
