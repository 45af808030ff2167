"""Roofline arithmetic with hand numbers, reads counted from traces and from engine runs, ceilings."""

import numpy as np
import pytest
import torch

from toolkit.errors import ToolkitError
from toolkit.moe import roofline as R
from toolkit.moe.costs import CostModel
from toolkit.moe.presets import from_name, make_config
from toolkit.moe.run import cache_keyword, output_cache

EXPERT = 3 * 4096 * 14336 * 2  # one Mixtral-8x7B expert in bf16: 352,321,536 bytes
H200 = R.Ceilings(gpu_gbs=4124.0, host_gbs=90.0, h2d_gbs=55.0)  # ../shared/data/device-ceilings/h200.json


def prompt(batch, tokens, seed=0):
    return torch.randint(3, 256, (batch, tokens), generator=torch.Generator().manual_seed(seed))


def test_prefill_bound_of_the_issue():
    # 50 missed experts read once from host memory at 90 GB/s: ~0.2 s at 8 layers
    b = R.pass_bound(50 * EXPERT, 0, 0, H200)
    assert b.ms == pytest.approx(50 * EXPERT / 90e9 * 1e3) == pytest.approx(195.73, abs=0.01)
    assert b.host_ms == b.ms and b.gpu_experts_ms == b.dense_ms == 0
    assert b.ratio(250.0) == pytest.approx(250.0 / 195.73, rel=1e-4)
    assert b.meets(250.0) and not b.meets(290.0)  # 1 / 0.7 = 1.43 x the bound


def test_decode_bound_sums_host_gpu_and_dense_terms():
    reads = R.ExpertReads(passes=4, missed=50, resident=14)  # per pass: 12.5 missed, 3.5 resident
    b = R.decode_bound(reads, EXPERT, H200, dense_bytes=1e9)
    host = 12.5 * EXPERT / 90e9 * 1e3
    gpu = 3.5 * EXPERT / 4124e9 * 1e3
    dense = 1e9 / 4124e9 * 1e3
    assert (b.host_ms, b.gpu_experts_ms, b.dense_ms) == pytest.approx((host, gpu, dense))
    assert b.ms == pytest.approx(host + gpu + dense) == pytest.approx(48.93 + 0.30 + 0.24, abs=0.01)
    assert b.missed_bytes == 12.5 * EXPERT and b.to_dict()["dense_bytes"] == 1e9
    with pytest.raises(ToolkitError, match="no forward passes"):
        R.decode_bound(R.ExpertReads(0, 0, 0), EXPERT, H200)


def test_host_ceiling_is_the_faster_of_cpu_read_and_pinned_copy():
    assert H200.miss_gbs == 90.0
    slow_cpu = R.Ceilings(gpu_gbs=2000, host_gbs=10, h2d_gbs=25)  # one CPU thread reads slower than a copy
    assert slow_cpu.miss_gbs == 25 and R.pass_bound(25e9, 0, 0, slow_cpu).ms == pytest.approx(1000.0)
    with pytest.raises(ToolkitError, match="positive"):
        R.Ceilings(gpu_gbs=0, host_gbs=1, h2d_gbs=1)
    with pytest.raises(ToolkitError, match=">= 0"):
        R.pass_bound(-1, 0, 0, H200)


def test_ceilings_from_cost_model_and_device_record():
    cm = CostModel(cpu_tokens=(1, 8), cpu_ms=(7.2, 7.5), gpu_tokens=(1, 8), gpu_ms=(0.115, 0.114), copy_ms=6.4,
                   dtype="bfloat16", cpu_dtype="bfloat16", expert_bytes=EXPERT, host_bandwidth_gbs=86.0, cpu_threads=15)
    c = R.Ceilings.from_cost_model(cm)
    assert c.h2d_gbs == pytest.approx(EXPERT / 6.4e-3 / 1e9) == pytest.approx(55.05, abs=0.01)
    assert c.gpu_gbs == pytest.approx(EXPERT / 0.115e-3 / 1e9) and c.host_gbs == 86.0 and c.cpu_threads == 15
    assert R.Ceilings.from_cost_model(cm, gpu_gbs=4000).gpu_gbs == 4000
    with pytest.raises(ToolkitError, match="host bandwidth"):
        R.Ceilings.from_cost_model(CostModel.fixed())
    doc = {"hw": {"gpu": "NVIDIA H200"}, "hbm_copy": {"GBps_rw": 4124.07}, "cpu_dram": {"read_GBps": 85.96, "threads": 16},
           "pcie": {"h2d_pinned": {"GBps": 55.13}}}
    d = R.Ceilings.from_device_ceilings(doc)
    assert (d.gpu_gbs, d.host_gbs, d.h2d_gbs, d.cpu_threads) == (4124.07, 85.96, 55.13, 16)
    assert R.Ceilings.from_dict(d.to_dict()) == d
    with pytest.raises(ToolkitError, match="device-ceilings"):
        R.Ceilings.from_device_ceilings({"pcie": {}})


def test_uniform_reads_closed_form():
    # 1 of 8 experts resident, top-2 of 8 uniform, one token: each expert used with probability 1/4
    r = R.uniform_reads([1], n_experts=8, top_k=2)
    assert (r.missed, r.resident, r.passes) == pytest.approx((1.75, 0.25, 1))
    # Mixtral at the 22% budget (14 of 64: six layers hold 2, two hold 1): 12.5 missed reads per token
    r = R.uniform_reads([2, 2, 2, 2, 2, 2, 1, 1], 8, 2, passes=10)
    assert r.missed_per_pass == pytest.approx(6 * 1.5 + 2 * 1.75) == pytest.approx(12.5)
    assert R.decode_bound(r, EXPERT, H200).host_ms == pytest.approx(48.9, abs=0.1)
    # a 512-token prefill touches every expert: 50 missed reads
    assert R.uniform_reads([2, 2, 2, 2, 2, 2, 1, 1], 8, 2, tokens=512).missed == pytest.approx(50.0)
    with pytest.raises(ToolkitError):
        R.uniform_reads([9], 8, 2)


class HandTrace:
    """A trace of 3 passes over 2 layers, 4 experts, top-2 (duck-types toolkit.moe.traces.Trace)."""

    n_layers, n_experts = 2, 4

    def __init__(self):
        # pass 0 (prefill): tokens 0-1; pass 1, 2 (decode): one token each
        self.experts = np.array([[[0, 1], [2, 3]],
                                 [[0, 2], [2, 3]],
                                 [[3, 1], [0, 1]],
                                 [[0, 1], [2, 0]]])  # [N=4, L=2, K=2]
        self.phase = np.array([0, 0, 1, 1])
        self._starts = np.array([0, 2, 3, 4])

    def step_starts(self):
        return self._starts


def test_reads_from_a_trace_count_each_used_expert_once_per_pass():
    trace = HandTrace()
    resident = np.zeros((2, 4), dtype=bool)
    resident[0, 0] = resident[1, 2] = True
    # pass 0: layer 0 uses {0, 1, 2} (0 resident), layer 1 uses {2, 3} (2 resident)
    # pass 1: layer 0 {1, 3}, layer 1 {0, 1}; pass 2: layer 0 {0, 1} (0 resident), layer 1 {0, 2} (2 resident)
    assert R.reads_from_trace(trace, resident) == R.ExpertReads(passes=3, missed=3 + 4 + 2, resident=4)
    assert R.reads_from_trace(trace, resident, phase="prefill") == R.ExpertReads(1, missed=3, resident=2)
    assert R.reads_from_trace(trace, resident, phase="decode") == R.ExpertReads(2, missed=6, resident=2)
    with pytest.raises(ToolkitError, match="residency"):
        R.reads_from_trace(trace, np.zeros((3, 4), dtype=bool))
    with pytest.raises(ToolkitError, match="budget"):
        R.reads_from_trace(trace, policy=object())


def test_reads_from_a_trace_under_a_caching_policy():
    from toolkit.moe.policies import LRU

    trace = HandTrace()
    # LRU, one slot per layer, starting from experts 0 (layer 0) and 0 (layer 1) (uniform start)
    reads = R.reads_from_trace(trace, policy=LRU(), budget=2)
    # layer 0: pass 0 {0,1,2}: 0 hits; keeps the most recent miss. pass 1 {1,3}: ...; total hits counted by LRU
    pol = LRU()
    pol.reset(2, 2, 4)
    hits = sum(int(np.sum(pol.step(layer, np.unique(trace.experts[a:b, layer]))[0]))
               for a, b in zip(trace._starts[:-1], trace._starts[1:]) for layer in range(2))
    assert reads.resident == hits and reads.missed == 13 - hits and reads.passes == 3


def test_reads_from_an_engine_run_match_the_recorded_trace():
    from toolkit.moe.offload import offload
    from toolkit.moe.presets import build_moe
    from toolkit.moe.replay import record

    model = build_moe("tiny-mixtral")
    off = offload(model, 5, device="cpu", cost_model=CostModel.fixed(copy_ms=100.0))
    try:
        with torch.no_grad(), record(off) as rec:
            out = model(prompt(1, 6), use_cache=True)  # prefill, 6 tokens
            past = output_cache(out)
            for _ in range(3):  # three decode passes
                out = model(out.logits[:, -1:].argmax(-1), use_cache=True, **{cache_keyword(model): past})
                past = output_cache(out)
        trace = rec.to_trace()
        for phase in ("prefill", "decode"):
            got = R.reads_from_stats(off.stats, phase)
            assert got == R.reads_from_trace(trace, off.placement, phase=phase)
        assert R.reads_from_stats(off.stats, "decode").passes == 3
        assert R.reads_from_stats(off.stats, "decode").missed + R.reads_from_stats(off.stats, "decode").resident \
            <= 3 * 2 * 2  # at most top-2 distinct experts per layer per token
    finally:
        off.restore()
    with pytest.raises(ToolkitError, match="phase"):
        R.reads_from_stats(off.stats, "warmup")


def test_dense_bytes_of_mixtral_by_hand():
    p = from_name("mixtral-8x7b", layers=8)
    attn = 4096 * 4096 + 2 * 4096 * 1024 + 4096 * 4096  # q, k, v (8 KV heads of 128), o
    per_layer = attn + 4096 * 8 + 2 * 4096  # router, two norms
    want = (8 * per_layer + 32000 * 4096 + 4096) * 2
    assert R.dense_bytes(p) == want == R.dense_bytes(make_config(p))
    kv = 2 * 8 * 128 * 100 * 4 * 2 * 8  # keys and values: 8 KV heads x 128, 100 tokens, 4 beams, bf16, 8 layers
    assert R.dense_bytes(p, kv_tokens=100, sequences=4) == want + kv


class FakeClock:
    def __init__(self):
        self.t = 0.0

    def __call__(self):
        self.t += 0.001  # every timed region lasts exactly 1 ms
        return self.t


def test_measure_ceilings_on_cpu_with_a_fake_clock():
    c = R.measure_ceilings("cpu", threads=1, nbytes=4 << 20, repeats=3, clock=FakeClock())
    want = (4 << 20) / 1e-3 / 1e9
    assert (c.gpu_gbs, c.host_gbs, c.h2d_gbs) == pytest.approx((want, want, want))
    assert c.cpu_threads == 1 and "cpu" in c.source


@pytest.mark.gpu
def test_measure_ceilings_on_cuda_are_plausible():
    c = R.measure_ceilings("cuda", nbytes=256 << 20)
    assert c.gpu_gbs > 300 and 1 < c.h2d_gbs < 200 and c.host_gbs > 1


def test_calibrated_ceilings_take_host_and_h2d_from_the_calibration_and_measure_the_gpu():
    cm = CostModel.fixed(cpu=(5.0, 0.0), gpu=(0.1, 0.0), copy_ms=6.4, expert_bytes=352_321_536,
                         host_bandwidth_gbs=91.7, cpu_threads=1, key="lent")
    ceilings, measured = R.calibrated_ceilings(cm, "cpu", nbytes=1 << 20)
    assert ceilings.host_gbs == 91.7 and ceilings.h2d_gbs == pytest.approx(352_321_536 / 6.4e-3 / 1e9)
    assert ceilings.gpu_gbs == measured.gpu_gbs and ceilings.source == "calibration + measured GPU"
    # a calibration made without a GPU has no host bandwidth: all three measured here, no separate record
    ceilings, measured = R.calibrated_ceilings(CostModel.fixed(cpu_threads=1), "cpu", nbytes=1 << 20)
    assert measured is None and ceilings.source.startswith("measure_ceilings on cpu")


def test_model_bytes_of_a_session_count_what_dense_bytes_counts():
    from types import SimpleNamespace

    import torch

    from toolkit.moe.presets import from_name
    from toolkit.moe.roofline import ModelBytes, dense_bytes

    preset = from_name("tiny-mixtral")
    session = SimpleNamespace(preset=preset, model=SimpleNamespace(config=preset))
    sizes = ModelBytes.of(session)
    assert sizes.expert_bytes == preset.expert_bytes()
    assert sizes.dtype_bytes == torch.empty((), dtype=preset.dtype).element_size()
    assert sizes.dense(100, 4) == dense_bytes(preset, sizes.dtype_bytes, 100, 4)
    assert sizes.dense() < sizes.dense(100) < sizes.dense(100, 4)  # the KV cache reads grow with positions, sequences
