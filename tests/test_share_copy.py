"""The GPU's share of missed experts copied into staging slots by one kernel (``toolkit.moe.share_copy``)."""

from __future__ import annotations

import os

import pytest
import torch

from toolkit.moe import share_copy

E, INTER, D = 6, 48, 32


def experts(device="cpu", pin=False):
    g = torch.Generator().manual_seed(7)
    gate_up = torch.randn(E, 2 * INTER, D, generator=g).to(torch.bfloat16)
    down = torch.randn(E, D, INTER, generator=g).to(torch.bfloat16)
    if pin:
        gate_up, down = gate_up.pin_memory(), down.pin_memory()
    return gate_up, down


def pool(slots_from: int, slots: int, device="cpu"):
    n = slots_from + slots
    return (torch.zeros(n, 2 * INTER, D, dtype=torch.bfloat16, device=device),
            torch.zeros(n, D, INTER, dtype=torch.bfloat16, device=device))


def expected(sel, pos, host_gu, host_dn, first, k, n):
    """What slot s must hold: units [0, k) of gate, up and down of its expert where it missed, zeros elsewhere."""
    gu, dn = pool(first, n - first)
    for s, e in enumerate(sel.tolist()):
        if pos[e] < 0:
            gu[first + s, :k] = host_gu[e, :k]
            gu[first + s, INTER:INTER + k] = host_gu[e, INTER:INTER + k]
            dn[first + s, :, :k] = host_dn[e, :, :k]
    return gu, dn


POS = torch.tensor([0, -1, 1, -1, -1, 2])  # experts 1, 3, 4 not resident


@pytest.mark.parametrize("sel,k", [([1, 2, 4], 16), ([3, 1, 0], 48), ([0, 5, 2], 32), ([4, 3, 1], 7)])
def test_missed_experts_land_in_their_slots_and_resident_ones_copy_nothing(sel, k):
    host_gu, host_dn = experts()
    sel = torch.tensor(sel)
    gu, dn = pool(3, 3)
    share_copy.copy_shares(sel, POS, host_gu, host_dn, gu, dn, 3, k)
    want_gu, want_dn = expected(sel, POS, host_gu, host_dn, 3, k, 6)
    assert torch.equal(gu, want_gu) and torch.equal(dn, want_dn)


def test_nothing_to_copy_and_bad_units():
    host_gu, host_dn = experts()
    gu, dn = pool(3, 2)
    share_copy.copy_shares(torch.tensor([1, 3]), POS, host_gu, host_dn, gu, dn, 3, 0)
    assert not gu.any() and not dn.any()
    with pytest.raises(ValueError, match="k must be in"):
        share_copy.copy_shares(torch.tensor([1, 3]), POS, host_gu, host_dn, gu, dn, 3, INTER + 1)


@pytest.mark.parametrize("programs,blocks", [(1, (64, 8, 16)), (3, (128, 4, 32)), (2, (4096, 8, 512))])
def test_the_kernels_copy_what_the_torch_path_copies(programs, blocks):
    """The Triton kernels in Triton's CPU interpreter: every program count and block size, ragged k."""
    pytest.importorskip("triton")
    if os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("the interpreter is for machines without a GPU (the gpu test runs the kernels themselves)")
    host_gu, host_dn = experts()
    for sel, k in (([1, 2, 4], 16), ([3, 1, 0], 48), ([4, 4, 5], 13)):
        sel = torch.tensor(sel)
        gu, dn = pool(3, 3)
        share_copy.launch(sel, POS, host_gu, host_dn, gu, dn, 3, k, programs, *blocks)
        want_gu, want_dn = expected(sel, POS, host_gu, host_dn, 3, k, 6)
        assert torch.equal(gu, want_gu) and torch.equal(dn, want_dn)


@pytest.mark.gpu
def test_gpu_copies_follow_the_routing_on_every_replay_of_a_graph():
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    host_gu, host_dn = experts(pin=True)
    pos = POS.cuda()
    sel = torch.tensor([1, 2, 4], device="cuda")
    gu, dn = pool(3, 3, "cuda")
    share_copy.copy_shares(sel, pos, host_gu, host_dn, gu, dn, 3, 16)  # compile outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        share_copy.copy_shares(sel, pos, host_gu, host_dn, gu, dn, 3, 16)
    for picks in ([1, 2, 4], [3, 1, 0], [5, 4, 3], [0, 2, 5]):
        gu.zero_(), dn.zero_()
        sel.copy_(torch.tensor(picks))
        graph.replay()
        torch.cuda.synchronize()
        want_gu, want_dn = expected(sel.cpu(), POS, host_gu, host_dn, 3, 16, 6)
        assert torch.equal(gu.cpu(), want_gu) and torch.equal(dn.cpu(), want_dn), picks
