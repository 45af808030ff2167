"""The experts' host memory (``toolkit.moe.host_memory``): huge pages where the OS grants them, torch's allocation
where not, the same tensor either way."""

import pytest
import torch

from toolkit.moe import host_memory


@pytest.fixture
def switch():
    yield host_memory.set_enabled
    host_memory.set_enabled(True)


def test_a_large_tensor_lies_on_its_own_aligned_mapping_and_holds_what_is_written(switch):
    if host_memory.why_not():
        pytest.skip(f"no huge pages here: {host_memory.why_not()}")
    t = host_memory.empty((3, 1 << 20), torch.bfloat16, pin=False)  # 6 MiB
    assert t.shape == (3, 1 << 20) and t.dtype == torch.bfloat16 and t.is_contiguous()
    assert t.data_ptr() % host_memory.HUGE_PAGE == 0 and int(t.abs().sum()) == 0  # zeroed when touched
    t.fill_(1.5)
    view = t[1]
    del t
    assert float(view.float().mean()) == 1.5  # a view keeps the mapping alive
    frac = host_memory.huge_fraction(view)
    assert frac is None or 0.0 <= frac <= 1.0
    copy = host_memory.copy_of(view, pin=False)
    assert torch.equal(copy, view) and copy.data_ptr() != view.data_ptr()


def test_small_tensors_and_a_switched_off_allocator_use_torchs_memory(switch, monkeypatch):
    def no_mapping(*a, **k):
        raise AssertionError("mapped memory for a tensor torch should allocate")

    monkeypatch.setattr(host_memory, "_Mapping", no_mapping)
    small = host_memory.empty((4, 4), torch.float32, pin=False)  # under 2 MiB
    assert small.shape == (4, 4) and small.dtype == torch.float32
    switch(False)
    assert host_memory.why_not() == "switched off" and not host_memory.enabled()
    big = host_memory.empty((1 << 21,), torch.float32, pin=False)
    assert big.shape == (1 << 21,)


def test_no_transparent_huge_pages_is_a_reason(switch, monkeypatch, tmp_path):
    never = tmp_path / "enabled"
    never.write_text("always madvise [never]\n")
    monkeypatch.setattr(host_memory, "_THP", never)
    assert "off on this machine" in host_memory.why_not()
    monkeypatch.setattr(host_memory, "_THP", tmp_path / "missing")
    assert "no transparent huge pages" in host_memory.why_not()
    t = host_memory.empty((1 << 21,), torch.float32, pin=False)
    assert t.numel() == 1 << 21  # torch's allocation


def test_the_record_says_where_the_host_tier_lies():
    d = host_memory.describe(torch.zeros(4))
    assert set(d) == {"pinned", "huge_pages", "reason"} and d["pinned"] is False
    assert host_memory.describe(None)["reason"] == "no host tier"


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (run on the device machine)")
def test_gpu_pinned_huge_pages_copy_asynchronously_and_are_freed():
    if host_memory.why_not():
        pytest.skip(f"no huge pages here: {host_memory.why_not()}")
    t = host_memory.empty((64, 1 << 16), torch.bfloat16)  # 8 MiB
    assert t.is_pinned() and host_memory.describe(t)["pinned"]
    t.uniform_(-1, 1)
    d = t.to("cuda", non_blocking=True)
    torch.cuda.synchronize()
    assert torch.equal(d.cpu(), t)
    del t, d  # unregistered and unmapped: a new one registers the same way
    again = host_memory.empty((64, 1 << 16), torch.bfloat16)
    assert again.is_pinned()


def test_the_cli_says_where_the_host_tier_lies():
    from toolkit.cli.moe import _host_memory_line

    assert _host_memory_line({"pinned": True, "huge_pages": 0.998, "reason": None}) == \
        "page-locked, 100% on 2 MiB pages"
    assert _host_memory_line({"pinned": True, "huge_pages": 0.0, "reason": "switched off"}) == \
        "page-locked, on 4 KiB pages (switched off)"
    assert "granted no huge pages" in _host_memory_line({"pinned": True, "huge_pages": 0.0, "reason": None})
    assert _host_memory_line({"pinned": False, "huge_pages": None, "reason": "not page-locked"}) == ""
    assert _host_memory_line(None) == ""


def test_the_moe_command_has_the_switch_and_the_session_sets_it(switch):
    from moe_records import moe_settings

    from toolkit.moe.run import MoESession

    assert moe_settings().huge_pages is True
    off = moe_settings("--no-huge-pages", "--preset", "tiny-mixtral", "--device", "cpu", "--gpu-experts", "4",
                       "--routing", "model")
    assert off.huge_pages is False
    with MoESession(off) as session:
        assert host_memory.why_not() == "switched off"  # before the model and the calibration were allocated
        with session.offload() as engine:
            assert engine.to_dict()["host_memory"]["pinned"] is False  # a CPU engine pins nothing
