"""An engine run in trace-replay mode reports exactly the simulator's hits for the same trace, policy and budget."""

import numpy as np
import pytest
import torch

from toolkit.moe.costs import CostModel
from toolkit.moe.offload import offload
from toolkit.moe.policies import get_policy
from toolkit.moe.presets import build_moe
from toolkit.moe.replay import TraceRouter, record
from toolkit.moe.run import cache_keyword, output_cache
from toolkit.moe.simulate import default_popularity, simulate
from toolkit.moe.synthetic import synthetic_mixtral

CPU_ALWAYS = CostModel.fixed(cpu=(1.0, 0.0), gpu=(0.01, 0.0), copy_ms=100.0)  # only the policy's copies happen


@pytest.fixture(scope="module")
def model():
    return build_moe("tiny-mixtral", seed=0)  # 2 MoE layers, 8 experts, top-2, like the trace below


@pytest.fixture(scope="module")
def trace():
    # 3 sequences: a 6-token prompt (one prefill pass) then 4 single-token decode passes each
    return synthetic_mixtral(n_sequences=3, prompt_len=6, decode_len=4, n_layers=2, seed=3)


@torch.no_grad()
def run_trace(model, trace):
    """Forward passes shaped like the trace: per sequence a prefill of its prompt, then decode steps with the KV cache."""
    g = torch.Generator().manual_seed(0)
    starts = trace.step_starts()
    seq_starts = [g_ for g_ in range(trace.n_steps) if trace.phase[starts[g_]] == 0]
    for i, first in enumerate(seq_starts):
        last = seq_starts[i + 1] if i + 1 < len(seq_starts) else trace.n_steps
        ids = torch.randint(3, 256, (1, int(starts[first + 1] - starts[first])), generator=g)
        out = model(input_ids=ids, use_cache=True)
        for _ in range(first + 1, last):
            tok = out.logits[:, -1:].argmax(-1)  # [1, 1]
            out = model(input_ids=tok, use_cache=True, **{cache_keyword(model): output_cache(out)})


@pytest.mark.parametrize("policy", ["static-popularity", "static-uniform", "lru", "lfu", "belady"])
@pytest.mark.parametrize("budget", [3, 8])
def test_engine_replay_matches_simulator(model, trace, policy, budget):
    sim = simulate(trace, policy, budget)
    off = offload(model, budget, device="cpu", policy=get_policy(policy, trace=trace),
                  placement=default_popularity(trace), cost_model=CPU_ALWAYS, routing=TraceRouter(trace))
    try:
        with record(off) as rec:
            run_trace(model, trace)
        s = off.stats
        for i, phase in enumerate(("prefill", "decode")):
            assert s.hits[phase].sum(1).tolist() == sim.hits[i].tolist(), phase
            assert s.activations[phase].sum(1).tolist() == sim.activations[i].tolist(), phase
            assert s.hit_rate(phase) == pytest.approx(sim.hit_rate(phase))
        assert s.bytes_copied == sim.n_loads * off.bytes_per_expert
    finally:
        off.restore()
    recorded = rec.to_trace()  # the engine saw exactly the trace's routing, pass by pass
    np.testing.assert_array_equal(recorded.experts, trace.experts)
    np.testing.assert_array_equal(recorded.phase, trace.phase)
    assert recorded.step_starts().tolist() == trace.step_starts().tolist()
    again = simulate(recorded, get_policy(policy, trace=recorded), budget, popularity=default_popularity(trace))
    assert again.hits.tolist() == sim.hits.tolist()
