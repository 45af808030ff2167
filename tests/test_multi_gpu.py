"""Resident experts over several devices: on the CPU as two tiers of one kind, the same bookkeeping and row routing."""

import numpy as np
import pytest
import torch

from toolkit.errors import ToolkitError
from toolkit.moe.costs import CostModel
from toolkit.moe.memory import plan_devices, split_budget
from toolkit.moe.offload import assign_devices, offload
from toolkit.moe.presets import build_moe, moe_blocks
from toolkit.moe.run import MoESession, MoESettings, cache_keyword, output_cache, resolve_settings

CPU_ALWAYS = CostModel.fixed(cpu=(1.0, 0.0), gpu=(0.01, 0.0), copy_ms=100.0)  # copies never pay
COPY_ALWAYS = CostModel.fixed(cpu=(100.0, 0.0), gpu=(0.01, 0.0), copy_ms=1.0)  # CPU never pays
GiB = 2**30


@pytest.fixture(scope="module")
def mixtral():
    return build_moe("tiny-mixtral", seed=0)  # 2 layers x 8 experts, top-2, float32


@torch.no_grad()
def greedy(model, ids, steps=3):
    """Logits [B, S or 1, V] of a prefill and ``steps`` greedy decode steps with the KV cache, and the chosen ids."""
    out = model(input_ids=ids, use_cache=True)
    logits, past, chosen = [out.logits], output_cache(out), []
    for _ in range(steps):
        tok = logits[-1][:, -1].argmax(-1, keepdim=True)  # [B, 1]
        chosen.append(tok)
        out = model(input_ids=tok, use_cache=True, **{cache_keyword(model): past})
        logits.append(out.logits)
        past = output_cache(out)
    return logits, torch.cat(chosen, dim=1)


def max_diff(a, b):
    return max((x - y).abs().max().item() for x, y in zip(a, b))


def test_assign_devices_spreads_each_layers_popular_experts():
    resident = np.ones((2, 8), dtype=bool)
    ranking = np.array([[0, 1, 2, 3, 4, 5, 6, 7], [7, 6, 5, 4, 3, 2, 1, 0]], dtype=float)
    tiers = assign_devices(resident, [8, 8], ranking)
    assert tiers[0].tolist() == [1, 0, 1, 0, 1, 0, 1, 0]  # expert 7 (busiest) first, on device 0
    assert tiers[1].tolist() == [0, 1, 0, 1, 0, 1, 0, 1]
    assert np.bincount(tiers.ravel()).tolist() == [8, 8]
    # a full device is skipped; non-resident experts stay -1
    partial = np.zeros((2, 8), dtype=bool)
    partial[:, :3] = True
    tiers = assign_devices(partial, [1, 5])
    assert np.bincount(tiers[tiers >= 0]).tolist() == [1, 5] and (tiers[:, 3:] == -1).all()
    with pytest.raises(ToolkitError, match="shares"):
        assign_devices(partial, [1, 1])


def test_split_budget_even_then_capped():
    assert split_budget(10, [100, 100]) == [5, 5]
    assert split_budget(11, [100, 100]) == [5, 6]  # the remainder to the later device (the first holds the dense part)
    assert split_budget(10, [2, 100, 100]) == [2, 4, 4]
    assert split_budget(10, [2, 3, 100]) == [2, 3, 5]
    with pytest.raises(ToolkitError, match="do not fit"):
        split_budget(10, [2, 3, 4])


@pytest.mark.parametrize("gpu_experts,cost,overlap,serial", [
    (10, CPU_ALWAYS, False, False), (10, COPY_ALWAYS, True, False), (16, CPU_ALWAYS, False, False),
    (7, CPU_ALWAYS, False, True),
])
def test_two_cpu_tiers_equal_the_unoffloaded_model(mixtral, gpu_experts, cost, overlap, serial):
    ids = torch.randint(3, 256, (3, 9), generator=torch.Generator().manual_seed(1))
    ref, ref_ids = greedy(mixtral, ids)
    off = offload(mixtral, gpu_experts, device="cpu", devices=["cpu", "cpu"], cost_model=cost, overlap=overlap,
                  serial=serial)
    try:
        got, got_ids = greedy(mixtral, ids)
        assert max_diff(ref, got) < 1e-4
        assert torch.equal(ref_ids, got_ids)
        d = off.to_dict()
        shares = [gpu_experts // 2, gpu_experts - gpu_experts // 2]
        assert [x["experts"] for x in d["devices"]] == shares
        tiers = np.array(d["expert_devices"])
        assert (np.array(d["placement"]) == (tiers >= 0)).all()
        assert np.bincount(tiers[tiers >= 0], minlength=2).tolist() == shares
        for layer, mod in enumerate(off.experts):  # each resident expert sits where the record says
            assert {e: t for e, t in mod.tier.items()} == {int(e): int(tiers[layer, e]) for e in np.flatnonzero(tiers[layer] >= 0)}
        hits = int(sum(off.stats.hits[p].sum() for p in off.stats.hits))
        rows = [x["rows"] for x in d["devices"]]
        assert sum(rows) == hits and all(r > 0 for r in rows)  # every hit row was computed on its device
    finally:
        off.restore()
    assert max_diff(ref, greedy(mixtral, ids)[0]) == 0  # restored exactly


def test_one_device_is_the_one_device_engine(mixtral):
    ids = torch.randint(3, 256, (2, 6), generator=torch.Generator().manual_seed(2))
    with offload(mixtral, 5, device="cpu", cost_model=CPU_ALWAYS) as off:
        plain = greedy(mixtral, ids)[0]
        record = off.to_dict()
    with offload(mixtral, 5, device="cpu", devices=["cpu"], cost_model=CPU_ALWAYS) as off:
        one = greedy(mixtral, ids)[0]
        assert not off.spread and off.devices == [torch.device("cpu")]
        assert all(not mod.tier for mod in off.experts)
        assert off.to_dict().keys() == record.keys() and "devices" not in record
    assert all(torch.equal(a, b) for a, b in zip(plain, one))


def test_resident_rows_really_move_to_the_experts_device(mixtral, monkeypatch):
    """The second tier's experts get their rows through ``.to(its device)``: count the transfers."""
    off = offload(mixtral, 16, device="cpu", devices=["cpu", "cpu"], cost_model=CPU_ALWAYS)
    try:
        calls = []
        orig = off.experts[0]._spread_experts

        def spy(p, resident_used, out):
            calls.append(sorted(off.experts[0].tier[int(e)] for e in resident_used))
            return orig(p, resident_used, out)

        monkeypatch.setattr(off.experts[0], "_spread_experts", spy)
        mixtral(torch.randint(3, 256, (1, 12)))
        assert calls and set(calls[0]) == {0, 1}  # one layer pass used experts of both devices
    finally:
        off.restore()


@pytest.mark.parametrize("kwargs,match", [
    (dict(devices=["cpu", "cuda:0"]), "devices"),
    (dict(devices="cpu"), "devices must be a non-empty list"),
    (dict(devices=[]), "devices must be a non-empty list"),
    (dict(devices=["cpu", "cpu"], devices_budget=[1, 1]), "devices_budget: 4 GPU experts do not fit"),
    (dict(devices=["cpu", "cpu"], devices_budget=[2.5, 3]), "devices_budget"),
    (dict(devices=["cpu", "cpu"], devices_budget=[4]), "devices_budget"),
    (dict(devices=["cpu", "cpu"], policy="lru"), "static placement"),
])
def test_bad_device_requests_raise(mixtral, kwargs, match):
    with pytest.raises(ToolkitError, match=match):
        offload(mixtral, 4, device="cpu", cost_model=CPU_ALWAYS, **kwargs)
    assert not any(type(b.experts).__name__ == "OffloadedExperts" for b in moe_blocks(mixtral))


def test_devices_budget_caps_the_shares(mixtral):
    with offload(mixtral, 6, device="cpu", devices=["cpu", "cpu"], devices_budget=[1, 9], cost_model=CPU_ALWAYS) as off:
        assert [x["experts"] for x in off.devices_dict()] == [1, 5]


def test_plan_devices_puts_kv_and_staging_on_the_first_only(mixtral):
    free = {"cpu": (40 * GiB, 80 * GiB)}
    plans = plan_devices(mixtral, 16, 32, ["cpu", "cpu"], copy_slots=2, safety_bytes=0, mem_info=lambda d: free[d])
    first, second = plans
    assert first.kv_cache_bytes > 0 and first.staging_bytes == 2 * first.expert_bytes
    assert second.kv_cache_bytes == 0 and second.staging_bytes == 0
    assert second.activation_bytes < first.activation_bytes
    assert second.max_gpu_experts == first.total_experts  # plenty of room: every expert fits
    small = {"cpu": (first.activation_bytes + first.kv_cache_bytes + 5 * first.expert_bytes, 80 * GiB)}
    caps = [p.max_gpu_experts for p in plan_devices(mixtral, 16, 32, ["cpu", "cpu"], safety_bytes=0,
                                                    mem_info=lambda d: small[d])]
    assert caps[0] == 3 and caps[1] > caps[0]  # the first also holds 2 staging slots, the KV cache, activations


def test_settings_gpus_checked_and_a_cpu_session_runs_on_two_tiers(mixtral):
    with pytest.raises(ToolkitError, match="gpus"):
        resolve_settings(gpus=0)
    with pytest.raises(ToolkitError, match="several GPUs need CUDA"):
        MoESession(MoESettings(device="cpu", gpus=2), model=mixtral, cost_model=CPU_ALWAYS)
    session = MoESession(MoESettings(device="cpu", gpus=2, gpu_experts=8, routing="model"), model=mixtral,
                         cost_model=CPU_ALWAYS, devices=["cpu", "cpu"])
    with session.offload() as engine:
        assert [x["experts"] for x in engine.to_dict()["devices"]] == [4, 4]


@pytest.mark.parametrize("gpus, message", [("2", "several GPUs need CUDA"), ("0", "--gpus")])
def test_cli_gpus_on_a_cpu_is_one_line_exit_2(capsys, tmp_path, monkeypatch, gpus, message):
    from toolkit.__main__ import main

    monkeypatch.setenv("TOOLKIT_CACHE_DIR", str(tmp_path / "cache"))
    try:
        code = main(["moe", "--preset", "tiny-mixtral", "--device", "cpu", "--warmup", "0", "--gpus", gpus])
    except SystemExit as e:  # argparse usage errors
        code = e.code
    err = capsys.readouterr().err
    assert code == 2 and len(err.strip().splitlines()) == 1 and message in err, err


def test_cli_gpus_reaches_the_settings():
    import argparse

    from toolkit.cli import moe as cli

    parser = argparse.ArgumentParser()
    cli.register(parser.add_subparsers())
    assert cli.settings_from_args(parser.parse_args(["moe", "--gpus", "2"])).gpus == 2
    assert cli.settings_from_args(parser.parse_args(["moe"])).gpus is None


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.device_count() < 2, reason="needs two CUDA devices")
def test_two_cuda_devices_equal_the_unoffloaded_model():
    model = build_moe("tiny-mixtral", seed=0, device="cuda:0")  # float32: differences are summation order only
    ids = torch.randint(3, 256, (3, 9), generator=torch.Generator().manual_seed(1)).to("cuda:0")
    ref, ref_ids = greedy(model, ids)
    with offload(model, 10, device="cuda:0", devices=["cuda:0", "cuda:1"], cost_model=CPU_ALWAYS) as off:
        got, got_ids = greedy(model, ids)
        assert max_diff(ref, got) < 1e-4 and torch.equal(ref_ids, got_ids)
        d = off.to_dict()
        assert [x["device"] for x in d["devices"]] == ["cuda:0", "cuda:1"]
        assert [x["experts"] for x in d["devices"]] == [5, 5] and all(x["rows"] > 0 for x in d["devices"])
        mod = off.experts[0]
        assert {mod.gpu[e][0].device.index for e in mod.gpu} == {0, 1}  # weights stay on their devices
    assert max_diff(ref, greedy(model, ids)[0]) == 0


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.device_count() < 2, reason="needs two CUDA devices")
@pytest.mark.parametrize("overlap", [False, True])
def test_copies_to_both_cuda_devices_equal_the_unoffloaded_model(overlap):
    """Misses copied over both GPUs' links (side streams, staging slots, rows to the second GPU and back)."""
    model = build_moe("tiny-mixtral", seed=0, device="cuda:0")
    ids = torch.randint(3, 256, (3, 9), generator=torch.Generator().manual_seed(1)).to("cuda:0")
    ref, ref_ids = greedy(model, ids, steps=6)
    with offload(model, 4, device="cuda:0", devices=["cuda:0", "cuda:1"], cost_model=COPY_ALWAYS, copy_slots=1,
                 overlap=overlap) as off:
        for _ in range(2):  # the second time, each slot's copy waits for its previous expert's compute
            got, got_ids = greedy(model, ids, steps=6)
            assert max_diff(ref, got) < 1e-4 and torch.equal(ref_ids, got_ids)
        copies = [x["copies"] for x in off.devices_dict()]
        assert all(c > 0 for c in copies), copies
        assert off._slots_on[1][0].gate_up.device == torch.device("cuda:1")
        assert off.stats.lookahead_copies > 0  # the prefill's next-layer copies, over both links
    assert max_diff(ref, greedy(model, ids)[0]) == 0


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.device_count() < 2, reason="needs two CUDA devices")
def test_a_run_on_two_gpus_records_where_each_expert_lives():
    from toolkit.moe.run import run_moe

    r = run_moe(preset="tiny-mixtral", device="cuda", gpus=2, gpu_experts=10, new_tokens=4, warmup_tokens=0)
    devices = r.engine["devices"]
    assert [x["device"] for x in devices] == ["cuda:0", "cuda:1"] and sum(x["experts"] for x in devices) == 10
    assert np.bincount(np.ravel(r.engine["expert_devices"]) + 1, minlength=3)[1:].tolist() == [x["experts"] for x in devices]


@torch.no_grad()
def replay(model, trace):
    """Per sequence of the trace: a prefill of its prompt, then decode steps with the KV cache."""
    g = torch.Generator().manual_seed(0)
    starts = trace.step_starts()
    firsts = [s for s in range(trace.n_steps) if trace.phase[starts[s]] == 0] + [trace.n_steps]
    for first, end in zip(firsts, firsts[1:]):
        out = model(input_ids=torch.randint(3, 256, (1, int(starts[first + 1] - starts[first])), generator=g),
                    use_cache=True)
        for _ in range(first + 1, end):
            out = model(input_ids=out.logits[:, -1:].argmax(-1), use_cache=True,
                        **{cache_keyword(model): output_cache(out)})


@pytest.mark.parametrize("policy", ["static-popularity", "static-uniform"])
@pytest.mark.parametrize("budget,caps", [(6, [3, 5]), (9, [2, 9]), (16, [8, 8])])
def test_simulator_splits_hits_over_devices_as_the_engine_does(mixtral, policy, budget, caps):
    from toolkit.moe.policies import get_policy
    from toolkit.moe.replay import TraceRouter
    from toolkit.moe.simulate import default_popularity, simulate
    from toolkit.moe.synthetic import synthetic_mixtral

    trace = synthetic_mixtral(n_sequences=2, prompt_len=6, decode_len=3, n_layers=2, seed=5)
    sim = simulate(trace, policy, budget, devices_budget=caps)
    with offload(mixtral, budget, device="cpu", devices=["cpu", "cpu"], devices_budget=caps,
                 policy=get_policy(policy), placement=default_popularity(trace), cost_model=CPU_ALWAYS,
                 routing=TraceRouter(trace)) as off:
        replay(mixtral, trace)
        devices = off.devices_dict()
    assert [d["experts"] for d in devices] == list(sim.device_experts)
    assert [d["rows"] for d in devices] == sim.device_rows().tolist()
    assert sum(d["rows"] for d in devices) == int(sim.hits.sum())


def test_engine_calibrates_the_peer_hop_of_its_devices(mixtral, monkeypatch):
    from toolkit.moe import costs

    asked = []

    def fake_calibrate(*args, devices=None, **kw):
        asked.append(devices)
        return CPU_ALWAYS

    monkeypatch.setattr(costs, "calibrate", fake_calibrate)
    with offload(mixtral, 4, device="cpu", devices=["cpu", "cpu"]):
        pass
    with offload(mixtral, 4, device="cpu"):
        pass
    assert asked == [["cpu", "cpu"], None]


def test_makespan_decision_waits_for_the_spread_rows(mixtral, monkeypatch):
    """The first device's busy time handed to the plan includes the other device's experts and their hop."""
    hop = CostModel.fixed(cpu=(1.0, 0.0), gpu=(0.01, 0.0), copy_ms=100.0, peer_tokens=(1, 1024),
                          peer_ms=((7.0, 7.0),))
    busy = []
    orig = CostModel.plan

    def spy(self, tokens, gpu_busy_ms=0.0, copy_busy_ms=0.0, split=True, links=1):
        busy.append(gpu_busy_ms)
        return orig(self, tokens, gpu_busy_ms, copy_busy_ms, split, links)

    monkeypatch.setattr(CostModel, "plan", spy)
    ids = torch.randint(3, 256, (1, 12), generator=torch.Generator().manual_seed(3))
    with offload(mixtral, 8, device="cpu", devices=["cpu", "cpu"], cost_model=hop):
        mixtral(ids)
    assert busy and max(busy) >= 7.0  # a pass used a second-device expert: its 7 ms hop counts
    busy.clear()
    with offload(mixtral, 8, device="cpu", devices=["cpu", "cpu"], cost_model=CPU_ALWAYS):
        mixtral(ids)
    assert busy and max(busy) < 1.0  # no peer calibration: the resident experts' compute alone


def test_a_one_device_calibration_gains_the_peer_hop_once(tmp_path, monkeypatch):
    """``with_peer_hops``: a session that spreads its experts measures only the hop, once per machine (cached)."""
    from toolkit.moe import costs

    monkeypatch.setenv("TOOLKIT_CACHE_DIR", str(tmp_path / "cache"))
    one = costs.calibrate(64, 128, torch.float32, "cpu", threads=1, tokens=(1, 8), repeats=1)
    assert not one.peer_ms and "devices=" not in one.key
    measured = []
    real = costs._measure_peer

    def spy(*args, **kw):
        measured.append(args[2])
        return real(*args, **kw)

    monkeypatch.setattr(costs, "_measure_peer", spy)
    two = costs.with_peer_hops(one, ["cpu", "cpu"])
    assert measured == [["cpu", "cpu"]]
    assert two.peer_devices == ("cpu",) and len(two.peer_ms) == 1 and len(two.peer_ms[0]) == len(one.gpu_tokens)
    assert two.key.endswith("|devices=cpu,cpu") and two.cpu_ms == one.cpu_ms and two.copy_ms == one.copy_ms
    assert costs.with_peer_hops(one, ["cpu", "cpu"]).peer_ms == two.peer_ms  # from the cache: not measured again
    assert measured == [["cpu", "cpu"]]
    assert costs.with_peer_hops(two, ["cpu", "cpu"]) is two  # already has it
    assert costs.with_peer_hops(one, None) is one  # one device: nothing to add
    with pytest.raises(ToolkitError, match="devices"):  # one clear error, not a traceback from deep inside
        costs.with_peer_hops(one, ["cuda:1", "cpu"])


def test_missed_experts_are_copied_to_both_devices(mixtral):
    """Copies spread over the devices' links (each with its own slots), with outputs equal to the unoffloaded model."""
    ids = torch.randint(3, 256, (3, 9), generator=torch.Generator().manual_seed(4))
    ref, ref_ids = greedy(mixtral, ids)
    with offload(mixtral, 4, device="cpu", devices=["cpu", "cpu"], cost_model=COPY_ALWAYS, copy_slots=1) as off:
        got, got_ids = greedy(mixtral, ids)
        d = off.to_dict()
        assert len(off.copy_devices) == 2 and all(len(slots) == 1 for slots in off._slots_on)
        copies = [x["copies"] for x in d["devices"]]
    assert max_diff(ref, got) < 1e-4 and torch.equal(ref_ids, got_ids)
    assert all(c > 0 for c in copies)  # both links carried copies
    assert abs(copies[0] - copies[1]) <= sum(copies) // 2  # and shared them
    assert d["copy_devices"] == ["cpu", "cpu"]
    with offload(mixtral, 4, device="cpu", devices=["cpu", "cpu"], cost_model=COPY_ALWAYS,
                 spread_copies=False) as off:
        got = greedy(mixtral, ids)[0]
        copies = [x["copies"] for x in off.devices_dict()]
        assert len(off.copy_devices) == 1
    assert max_diff(ref, got) < 1e-4
    assert copies[0] > 0 and copies[1] == 0  # every copy to the first device
    with offload(mixtral, 4, device="cpu", devices=["cpu", "cpu"], cost_model=COPY_ALWAYS, serial=True) as off:
        assert len(off.copy_devices) == 1  # Fiddler's schedule copies to the dense part's device


def test_a_copy_to_the_second_device_computes_there(mixtral, monkeypatch):
    """A copied expert's rows go to its copy device, its results come back: count the transfers by destination."""
    import toolkit.moe.offload as offload_module

    with offload(mixtral, 4, device="cpu", devices=["cpu", "cpu"], cost_model=COPY_ALWAYS) as off:
        links = []
        orig = offload_module.OffloadedExperts._assign

        def spy(self, *args, **kwargs):
            out = orig(self, *args, **kwargs)
            links.append(out[3])
            return out

        monkeypatch.setattr(offload_module.OffloadedExperts, "_assign", spy)
        mixtral(torch.randint(3, 256, (2, 12), generator=torch.Generator().manual_seed(5)))
        assert any(link for link in links) and all(set(link.values()) <= {1} for link in links)
        assert off.device_copies[1] == sum(len(link) for link in links)


def test_the_moe_command_prints_each_devices_experts_rows_and_copies():
    from moe_records import run_record

    from toolkit.cli.moe import format_table

    devices = [{"device": "cuda:0", "experts": 14, "rows": 290, "copies": 41},
               {"device": "cuda:1", "experts": 14, "rows": 1, "copies": 1}]
    record = run_record(device="cuda:0", gpu_experts=28, engine={"devices": devices})
    line = next(x for x in format_table(record).splitlines() if x.startswith("  per device"))
    assert line.endswith("cuda:0: 14 experts, 290 resident rows, 41 copies in; "
                         "cuda:1: 14 experts, 1 resident row, 1 copy in")
    assert not any("per device" in x for x in format_table({**record, "engine": {}}).splitlines())


@pytest.mark.parametrize("lookahead", [False, True])
def test_lookahead_copies_go_over_both_links_and_keep_the_outputs(mixtral, lookahead):
    """A prefill starts the next layer's copies over every link with a free slot; each is computed where it landed."""
    ids = torch.randint(3, 256, (3, 9), generator=torch.Generator().manual_seed(6))  # 27 prefill rows: a long pass
    ref, ref_ids = greedy(mixtral, ids)
    with offload(mixtral, 4, device="cpu", devices=["cpu", "cpu"], cost_model=COPY_ALWAYS, copy_slots=1,
                 lookahead=lookahead) as off:
        got, got_ids = greedy(mixtral, ids)
        ahead = off.stats.lookahead_copies
        copies = [x["copies"] for x in off.devices_dict()]
        assert off._ahead == {} and not any(s.busy for slots in off._slots_on for s in slots)  # every slot back
    assert max_diff(ref, got) < 1e-4 and torch.equal(ref_ids, got_ids)
    assert all(c > 0 for c in copies)
    # one slot per link: the next layer gets one copy on each link ahead of its routing
    assert ahead == (2 * (len(off.experts) - 1) if lookahead else 0)
