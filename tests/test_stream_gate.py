"""Running ahead of the CPU experts: the gate the GPU (or, on the CPU, the host) waits at, and the engine's use of it."""

import threading
import time

import pytest
import torch
from test_offload import CPU_ALWAYS, LENT, max_diff, padded_batch, prefill_and_decode

from toolkit.moe.offload import _Gated, offload
from toolkit.moe.presets import build_moe
from toolkit.moe.stream_gate import HostGate, StreamGate, gate_for
from toolkit.moe.timeline import HostTimeline


@pytest.fixture(scope="module")
def mixtral():
    return build_moe("tiny-mixtral", seed=0)


def test_a_host_gate_holds_its_waiters_until_their_ticket_is_opened():
    gate = HostGate()
    first, second = gate.ticket(), gate.ticket()
    assert (first, second) == (1, 2)
    passed = []
    waiter = threading.Thread(target=lambda: (gate.wait(second), passed.append(second)))
    waiter.start()
    gate.open(first)
    time.sleep(0.05)
    assert passed == []  # the first ticket does not let the second through
    gate.open(second)
    waiter.join(5)
    assert passed == [second]
    gate.wait(first)  # an opened ticket never blocks again
    gate.ticket()
    gate.open_all()
    gate.wait(3)


def test_the_gate_for_a_device():
    assert type(gate_for(torch.device("cpu"))) is HostGate
    if not torch.cuda.is_available():
        from toolkit.moe.stream_gate import unavailable_reason

        dev = torch.device("cuda", 0)
        assert gate_for(dev) is None and unavailable_reason(dev)  # no CUDA here: none, and why


@pytest.mark.parametrize("gpu_experts,cost", [(0, CPU_ALWAYS), (5, CPU_ALWAYS), (5, LENT)])
def test_running_ahead_gives_the_unmodified_models_logits(mixtral, gpu_experts, cost):
    """With the worker thread, small passes queue the CPU experts' results behind the gate; the same logits with
    and without it, and nothing left pending once a forward returns."""
    ids, mask = padded_batch(lengths=(7,))
    ref = prefill_and_decode(mixtral, ids, mask, steps=6)
    for run_ahead in (True, False):
        off = offload(mixtral, gpu_experts, device="cpu", cost_model=cost, overlap=True, run_ahead=run_ahead)
        gated = []
        submit = off.experts[0]._start_cpu

        def spy(*a, submit=submit, gated=gated):
            job = submit(*a)
            gated.append(isinstance(job, _Gated))
            return job

        off.experts[0]._start_cpu = spy
        try:
            got = prefill_and_decode(mixtral, ids, mask, steps=6)
            assert max_diff(ref, got) < 1e-4
            assert off.pending is None
            assert off.to_dict()["run_ahead"] is run_ahead
            # the prefill's first layer (7 tokens: a small pass) and every decode step's, gated when on
            assert gated and all(g is run_ahead for g in gated)
            if cost is LENT:
                assert off.stats.split_expert_calls > 0
        finally:
            off.restore()


def test_inline_and_serial_engines_never_run_ahead(mixtral):
    off = offload(mixtral, 0, device="cpu", cost_model=CPU_ALWAYS, overlap=False)
    try:
        assert off.to_dict()["run_ahead"] is False  # inline: the host computes the CPU experts itself
        off.set_schedule(True, False)
        assert off.run_ahead is True
    finally:
        off.restore()
    off = offload(mixtral, 0, device="cpu", cost_model=CPU_ALWAYS, serial=True)
    try:
        assert off.gate is None and off.run_ahead is False
    finally:
        off.restore()


def test_a_failing_cpu_job_opens_its_gate_and_its_error_reaches_the_caller(mixtral):
    """The worker opens the gate even when the job raises (nothing may wait for ever), and the forward raises the
    job's error rather than returning what the GPU computed from unwritten buffers."""
    ids, mask = padded_batch(lengths=(5,))
    off = offload(mixtral, 0, device="cpu", cost_model=CPU_ALWAYS, overlap=True)
    mod = off.experts[-1]
    real = mod._cpu_job

    def broken(*job):
        raise RuntimeError("CPU expert failed")

    try:
        mod._cpu_job = broken
        with pytest.raises(RuntimeError, match="CPU expert failed"), torch.no_grad():
            off(input_ids=ids, attention_mask=mask)
        assert off.pending is None
        mod._cpu_job = real  # the engine goes on: the next forward is not blocked nor handed the old error
        with torch.no_grad():
            got = off(input_ids=ids, attention_mask=mask).logits
        off.restore()
        with torch.no_grad():
            ref = mixtral(input_ids=ids, attention_mask=mask).logits
        assert (got - ref).abs().max() < 1e-4
    finally:
        off.restore()


def test_a_forward_that_fails_after_running_ahead_leaves_nothing_behind(mixtral):
    """A forward interrupted between layers (here: the second layer's router) leaves its first layer's job
    pending; the next forward settles it first and runs normally."""
    ids, mask = padded_batch(lengths=(5,))
    off = offload(mixtral, 0, device="cpu", cost_model=CPU_ALWAYS, overlap=True)
    router = off._blocks[1].gate

    class Interrupt(Exception):
        pass

    def fail(module, args):
        raise Interrupt

    hook = router.register_forward_pre_hook(fail)
    try:
        with pytest.raises(Interrupt), torch.no_grad():
            off(input_ids=ids, attention_mask=mask)
        assert off.pending is not None  # the first layer's job, never settled by the failed forward
        hook.remove()
        with torch.no_grad():
            off(input_ids=ids, attention_mask=mask)
        assert off.pending is None
    finally:
        hook.remove()
        off.restore()


# -- on the GPU ------------------------------------------------------------------------------------

@pytest.mark.gpu
def test_a_stream_gate_holds_the_gpu_not_the_host():
    dev = torch.device("cuda", 0)
    gate = gate_for(dev)
    assert isinstance(gate, StreamGate)
    x = torch.ones(1 << 20, device=dev)
    y = torch.empty(1 << 20, device=dev)
    host = torch.full((1 << 20,), 7.0, pin_memory=True)
    done = torch.cuda.Event()
    ticket = gate.ticket()
    t0 = time.perf_counter()
    gate.wait(ticket)
    y.copy_(host, non_blocking=True)  # queued behind the gate: reads the buffer as it is when the gate opens
    y.add_(x)
    done.record()
    queued_s = time.perf_counter() - t0
    time.sleep(0.01)
    assert not done.query()  # the GPU waits ...
    assert queued_s < 0.005  # ... the host did not
    host.fill_(41.0)  # written before the gate opens: what the copy must see
    gate.open(ticket)
    done.synchronize()
    assert torch.all(y == 42.0)


@pytest.mark.gpu
@pytest.mark.parametrize("cost", [CPU_ALWAYS, LENT])
def test_running_ahead_on_cuda_equals_the_unoffloaded_model_and_leaves_layers_early(cost):
    """float32, CPU experts in the worker: the logits with the gate equal the unoffloaded model's, and the host
    leaves decode layers before their CPU experts end (it really ran ahead)."""
    model = build_moe("tiny-mixtral", seed=0, device="cuda")
    ids, mask = padded_batch(lengths=(7,))
    ids, mask = ids.cuda(), mask.cuda()
    ref = prefill_and_decode(model, ids, mask, steps=6)
    off = offload(model, 0, device="cuda", cost_model=cost, overlap=True, graphs=False)
    for mod in off.experts:  # tiny experts end at once: make each CPU job last long enough to be run ahead of
        job = mod._cpu_job
        mod._cpu_job = lambda *a, job=job: (time.sleep(0.003), job(*a))[1]
    try:
        assert isinstance(off.gate, StreamGate) and off.to_dict()["run_ahead"] is True
        tl = off.timeline = HostTimeline()
        for _ in range(2):
            got = prefill_and_decode(model, ids, mask, steps=6)
            assert max_diff(ref, got) < 1e-4
        marks = {}
        for what, layer, t in tl.events:
            marks.setdefault((what, layer), []).append(t)
        early = sum(exit_ < end for layer in range(off.n_layers)
                    for exit_, end in zip(marks[("exit", layer)], marks[("cpu_end", layer)]))
        assert early > 0
    finally:
        off.restore()


def test_the_moe_table_says_whether_the_host_ran_ahead():
    from moe_records import run_record

    from toolkit.cli.moe import format_table

    def line(engine):
        lines = format_table(run_record(engine=engine)).splitlines()
        return next((x for x in lines if x.startswith("  run ahead")), None)

    assert "on: a decode layer's CPU results reach the GPU behind a gate" in line({"run_ahead": True})
    off = line({"run_ahead": "no gate: a queued wait did not hold the stream back"})
    assert "off (no gate: a queued wait did not hold the stream back)" in off
    assert line({"run_ahead": False}) is None and line({}) is None  # inline or serial: nothing to say
