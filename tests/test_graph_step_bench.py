"""The graph-driven step's pieces on a CPU: the GPU's share (Triton kernels in the interpreter) and the CPU's
share (the host function) add up to every expert computed whole, at any split; bad arguments are one line."""

import ctypes
import os

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from benchmark_scripts import load_benchmark, run_benchmark

from toolkit.moe import cpu_gemv

gs = load_benchmark("graph_step")


def triton_runs() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1"


@pytest.mark.skipif(not (cpu_gemv.usable() and triton_runs()), reason="needs the CPU kernel and Triton")
@pytest.mark.parametrize("k", [0, 32, 80, 96])
def test_the_gpu_and_cpu_shares_add_up_to_whole_experts(k):
    import triton

    torch.manual_seed(0)
    D, inter, K = 64, 96, 3
    lib = gs.library()
    gate_up_share, down_share = gs.kernels()
    resident = np.array([False, True, False, False])
    lay = gs.Layer(resident, torch.device("cpu"), threads=2, hidden=D, inter=inter, top_k=K, pin=False)
    x = torch.randn(D, dtype=torch.bfloat16)
    sel = torch.tensor([1, 2, 0])  # one resident expert, two missed
    w = torch.tensor([0.5, 0.3, 0.2], dtype=torch.bfloat16)

    gate_up_share[(K, triton.cdiv(inter, 16))](x, sel, lay.slot, lay.dev_gate_up, lay.gate_up, lay.act, D, inter, k,
                                               BN=16, BK=32)
    down_share[(K, triton.cdiv(D, 16))](lay.act, sel, lay.slot, lay.dev_down, lay.down, lay.ys, D, inter, k,
                                        BD=16, BJ=32)
    y_gpu = (lay.ys.to(torch.bfloat16).float() * w.float()[:, None]).sum(0)
    lay.sel_h.copy_(sel)
    lay.w_h.copy_(w)
    lay.x_h.copy_(x)
    lay.job.k = k
    lib.toolkit_host_share(ctypes.byref(lay.job))
    got = y_gpu + lay.y_h.float()

    want = torch.zeros(D)
    for s in range(K):
        e = int(sel[s])
        h = F.linear(x.float(), lay.gate_up[e].float())
        want += float(w[s]) * F.linear(F.silu(h[:inter]) * h[inter:], lay.down[e].float())
    assert float((got - want).norm() / want.norm()) < 0.03
    assert lay.job.experts == 2  # the missed experts served (with k = I the GPU computes all of them)
    assert float(lay.y_h.float().abs().sum()) > 0 or k == inter  # the CPU's share, none when the GPU has it all


@pytest.mark.skipif(not cpu_gemv.usable(), reason="needs the CPU kernel")
@pytest.mark.parametrize("k", [16, 48])
def test_copied_gpu_units_and_the_cpu_share_add_up_to_whole_experts(k):
    """The copy mode: each missed expert's units [0, k) staged into its slot (stale weights in the others),
    computed there, plus the CPU's units [k, I) and the resident expert whole, give every expert whole."""
    torch.manual_seed(0)
    D, inter, K = 64, 96, 3
    lib = gs.library()
    resident = np.array([False, True, False, False])
    lay = gs.Layer(resident, torch.device("cpu"), threads=2, hidden=D, inter=inter, top_k=K, pin=False,
                   transposed_down=True)
    assert torch.equal(lay.down_t, lay.down.transpose(1, 2)) and lay.missed_ids == [0, 2, 3]
    x = torch.randn(D, dtype=torch.bfloat16)
    sel = torch.tensor([1, 2, 0])  # one resident expert, two missed
    w = torch.tensor([0.5, 0.3, 0.2], dtype=torch.bfloat16)
    stage_gu = torch.randn(K, 2 * k, D).to(torch.bfloat16)  # stale weights from an earlier layer
    stage_dt = torch.randn(K, k, D).to(torch.bfloat16)

    missed = gs.stage_missed(lay, sel, k, stage_gu, stage_dt)
    staged = gs.staged_share(x, stage_gu, stage_dt, missed, k)
    assert missed.tolist() == [False, True, True]
    assert torch.equal(staged[0], torch.zeros(D))  # the resident expert's slot counts for nothing
    assert torch.equal(stage_gu[2, :k], lay.gate_up[0, :k]) and torch.equal(stage_dt[1], lay.down_t[2, :k])

    lay.sel_h.copy_(sel)
    lay.w_h.copy_(w)
    lay.x_h.copy_(x)
    lay.job.k = k
    lib.toolkit_host_share(ctypes.byref(lay.job))

    def whole(e):
        h = F.linear(x.float(), lay.gate_up[e].float())
        return F.linear(F.silu(h[:inter]) * h[inter:], lay.down[e].float())

    got = (staged.to(torch.bfloat16).float() * w.float()[:, None]).sum(0) + lay.y_h.float() + float(w[0]) * whole(1)
    want = sum(float(w[s]) * whole(int(sel[s])) for s in range(K))
    assert float((got - want).norm() / want.norm()) < 0.03
    assert lay.job.experts == 2


def test_one_conditional_copy_per_slot_and_expert_that_may_miss():
    """Under capture each (slot, expert that may miss) pair is one conditional body; its predicate says whether
    the slot's expert is that one, and the body copies exactly that expert's units."""
    D, inter, K, k = 32, 48, 2, 16
    resident = np.array([True, False, True, False, False])
    lay = gs.Layer(resident, torch.device("cpu"), threads=1, hidden=D, inter=inter, top_k=K, pin=False,
                   transposed_down=True)
    stage_gu, stage_dt = torch.zeros(K, 2 * k, D, dtype=torch.bfloat16), torch.zeros(K, k, D, dtype=torch.bfloat16)
    calls = []

    def when(conditions):  # what a capture records: every pair, whatever this routing is
        flat = conditions.reshape(-1).tolist()

        def run(i, body):
            calls.append(flat[i])
            if flat[i]:
                body()
        return run

    missed = gs.stage_missed(lay, torch.tensor([4, 0]), k, stage_gu, stage_dt, when=when)
    assert len(calls) == K * 3 and calls.count(True) == 1
    assert missed.tolist() == [True, False]
    assert torch.equal(stage_gu[0, k:], lay.gate_up[4, inter:inter + k]) and not stage_gu[1].any()


def test_the_balanced_share_ends_the_copy_and_the_cpu_together():
    """f x copy = (1 - f) x CPU expert, each at its contended rate: a 4 ms CPU expert slowed 1.2x and a 6 ms copy
    slowed 1.1x balance at f = 4.8 / (4.8 + 6.6); without contention at 4 / 10."""
    from toolkit.moe.costs import CostModel

    cm = CostModel.fixed(cpu=(4.0, 0.0), copy_ms=6.0, cpu_contention=(1.2, 1.2), copy_contention=1.1,
                         contention_links=1, device="cuda")
    assert gs.balanced_share(cm) == round(4.8 / 11.4, 3)
    assert gs.balanced_share(CostModel.fixed(cpu=(4.0, 0.0), copy_ms=6.0)) == 0.4


def test_units_are_whole_row_blocks():
    assert gs.units(0.0) == 0 and gs.units(0.4) == 5728 and gs.units(0.4) % 16 == 0


@pytest.mark.parametrize("argv, message", [(["--fractions", "0.4,x"], "numbers or auto separated by commas"),
                                           (["--fractions", "1.0"], "below 1"),
                                           (["--resident", "65"], "0 to 64 experts"),
                                           (["--down-tiles", "100"], "power of two"),
                                           (["--modes", "read,stream"], "one or more of read, copy"),
                                           (["--fractions", "0,autumn"], "numbers or auto")])
def test_bad_arguments_are_one_line(capsys, argv, message):
    with pytest.raises(SystemExit) as e:
        gs.parse_args(argv)
    assert e.value.code == 2 and message in capsys.readouterr().err


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message of a machine without a GPU")
def test_without_a_gpu_it_says_so(tmp_path):
    proc = run_benchmark("graph_step", tmp_path)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1].startswith("error: graph_step needs a CUDA GPU")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_a_graphed_step_matches_torch_and_its_eager_self(tmp_path):
    """Two Mixtral-sized layers, the GPU's share read in place from pinned memory or copied in by conditional
    copies and the CPU's in host nodes, captured as one CUDA graph: close to torch, each replay equal to the eager
    step, every share timed."""
    import json

    proc = run_benchmark("graph_step", tmp_path, "--layers", "2", "--resident", "4", "--fractions", "0,0.4",
                         "--modes", "read,copy", "--rounds", "1", "--steps", "4", timeout=400)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rec = json.loads((tmp_path / "graph_step.json").read_text())
    assert rec["status"] == "complete"
    assert rec["copy_probe"]["plain"]["gbs"] > 0 and rec["copy_probe"]["conditional"]["gbs"] > 0
    for f in ("0.0", "0.4", "copy 0.4"):
        assert rec["checks"][f]["rel_err_vs_torch"] < 0.03
        assert rec["checks"][f]["replay_vs_eager_max_abs"] == 0.0
        assert rec["shares"][f]["step_ms"] > 0 and rec["shares"][f]["missed_per_step"] > 0
