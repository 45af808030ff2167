"""Conditional nodes in a captured CUDA graph (``toolkit.moe.conditional``): each body runs on a replay
exactly when its condition, set on the GPU in that replay, holds; the host-side stand-in reads them once."""

import pytest
import torch

from toolkit.moe import conditional as cn


def test_outside_a_capture_the_conditions_are_read_on_the_host():
    ran = []
    run = cn.conditional(torch.tensor([[True, False], [False, True]]))
    for i in range(4):
        run(i, lambda i=i: ran.append(i))
    assert ran == [0, 3]


def test_the_driver_structs_have_the_c_layout():
    """``CUgraphNodeParams`` is 256 bytes with its union at byte 16; ``CUDA_CONDITIONAL_NODE_PARAMS`` is handle,
    type, size, the body graphs' pointer and the context (cuda.h, CUDA 12.4+)."""
    import ctypes

    assert ctypes.sizeof(cn._NodeParams) == 256 and cn._NodeParams.u.offset == 16
    c = cn._ConditionalParams
    assert [getattr(c, f).offset for f in ("handle", "type", "size", "phGraph_out", "ctx")] == [0, 8, 12, 16, 24]
    assert ctypes.sizeof(cn._Handles) == 8 * cn.MAX_NODES


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_bodies_run_on_a_replay_exactly_where_their_condition_holds():
    """Four conditional copies from pinned host memory and one conditional kernel, their conditions computed in
    the graph from an input; replayed with new inputs, each destination changes only where its condition held."""
    cn.prepare()  # the kernel compiled and the bodies' stream made before the capture
    n = 4
    src = torch.arange(n * 1024, dtype=torch.float32).reshape(n, 1024).pin_memory()
    dst = torch.zeros(n, 1024, device="cuda")
    picked = torch.zeros(1, dtype=torch.long, device="cuda")  # the graph's input
    count = torch.zeros((), device="cuda")
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        conditions = picked == torch.arange(n, device="cuda")
        run = cn.conditional(conditions)
        for i in range(n):
            def body(i=i):
                dst[i].copy_(src[i], non_blocking=True)
                count.add_(1)
            run(i, body)
    for choice in (2, 0, 2, 3):
        dst.zero_()
        picked.fill_(choice)
        before = float(count)
        graph.replay()
        torch.cuda.synchronize()
        assert torch.equal(dst[choice].cpu(), src[choice])
        assert not dst[[i for i in range(n) if i != choice]].any()
        assert float(count) == before + 1
