"""Device rules: ``infer_device`` (which device a callable runs on) and the measurements that use it.

No GPU needed: a tensor subclass reports a CUDA device, and the "has this process used CUDA" fallback is
monkeypatched.
"""

import pytest
import torch

from toolkit.env import infer_device, is_cuda


class CudaLooking(torch.Tensor):
    """A CPU tensor that says it lives on cuda:1 (what ``infer_device`` reads), so the rule runs on any machine."""

    @property
    def device(self):
        return torch.device("cuda:1")


def cuda_looking(*shape) -> torch.Tensor:
    return torch.zeros(*shape).as_subclass(CudaLooking)


class Owner:
    """A callable that declares where it runs, as ``BenchModel`` and the offload engine do."""

    def __init__(self, device):
        self.device = device

    def __call__(self, *args):
        return None

    def step(self, *args):
        return None


class OnCuda(torch.nn.Module):
    """A module whose first parameter is on cuda:1."""

    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(cuda_looking(2), requires_grad=False)

    def forward(self, x):
        return x


@pytest.fixture
def cuda_unused(monkeypatch):
    """A process that has not touched the GPU (whether or not one exists)."""
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: False)


def test_is_cuda():
    assert is_cuda("cuda") and is_cuda("cuda:1") and is_cuda(torch.device("cuda", 0))
    assert not is_cuda("cpu") and not is_cuda(torch.device("meta"))


def test_explicit_device_wins_and_is_returned_as_given():
    assert infer_device(Owner("cuda:1"), (cuda_looking(2),), device="cpu") == "cpu"
    assert infer_device(lambda x: x, (torch.zeros(2),), device="cuda:2") == "cuda:2"
    assert infer_device(lambda: None, (), device=torch.device("cuda", 3)) == "cuda:3"


@pytest.mark.parametrize("declared,expected", [
    ("cuda", "cuda"), ("cuda:1", "cuda:1"), (torch.device("cuda", 2), "cuda:2"),
    ("cpu", "cpu"), (torch.device("cpu"), "cpu"), ("meta", "cpu"), ("mps", "cpu"),  # not CUDA: the CPU
])
def test_device_attribute(declared, expected):
    assert infer_device(Owner(declared)) == expected


def test_the_callable_beats_its_arguments():
    """A model on the GPU fed CPU token ids runs on the GPU (it moves them); a CPU model's work stays on the CPU."""
    assert infer_device(Owner("cuda:1"), (torch.zeros(2),)) == "cuda:1"
    assert infer_device(Owner("cpu"), (cuda_looking(2),)) == "cpu"
    assert infer_device(OnCuda(), (torch.zeros(2),)) == "cuda:1"
    assert infer_device(torch.nn.Linear(2, 2), (cuda_looking(2),)) == "cpu"


def test_wrapped_module_and_bound_method_speak_for_the_callable():
    class Wrapper:
        module = OnCuda()

        def __call__(self, x):
            return x

    assert infer_device(Wrapper(), (torch.zeros(2),)) == "cuda:1"  # .module, as BenchModel wraps its nn.Module
    assert infer_device(OnCuda().forward, (torch.zeros(2),)) == "cuda:1"  # a bound method of a module
    assert infer_device(Owner("cuda:1").step, (torch.zeros(2),)) == "cuda:1"  # of an object with .device
    assert infer_device(cuda_looking(2).sum) == "cuda:1"  # of a tensor


def test_module_without_parameters_falls_through_to_arguments(cuda_unused):
    assert infer_device(torch.nn.ReLU(), (cuda_looking(2),)) == "cuda:1"
    assert infer_device(torch.nn.ReLU(), (torch.zeros(2),)) == "cpu"


def test_arguments_any_cuda_tensor_means_cuda(cuda_unused):
    assert infer_device(lambda *a: None, (3, torch.zeros(2), cuda_looking(2))) == "cuda:1"
    assert infer_device(lambda *a: None, ("text", torch.zeros(2))) == "cpu"


@pytest.mark.parametrize("available,initialized,expected", [
    (True, True, "cuda"),  # the process already uses the GPU: a closure probably does too
    (True, False, "cpu"),
    (False, False, "cpu"),
])
def test_no_evidence_leans_to_cuda_once_the_process_uses_it(monkeypatch, available, initialized, expected):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: available)
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: initialized)
    assert infer_device(lambda: None) == expected
    assert infer_device(lambda x: None, ("not a tensor",)) == expected


# ------------------------------------------------------------------- every measurement uses the rule


def test_measure_latency_uses_the_rule():
    from toolkit.timing import measure_latency

    r = measure_latency(Owner("cpu"), cuda_looking(2), min_warmup=1, max_warmup=2, warmup_window=1, min_samples=1,
                        max_samples=3, max_time_s=0.2, detect_sync=False)
    assert r.device == "cpu"  # the callable's own device, not its (CUDA-looking) argument's


def test_profile_uses_the_rule():
    from toolkit.profiling import profile

    r = profile(Owner("cpu"), cuda_looking(2), wait=0, warmup=1, active=1, baseline=False)
    assert r.device == "cpu"


def test_measure_throughput_uses_the_rule():
    from toolkit.throughput import measure_throughput

    seen = []

    class FakeStamps:
        def __init__(self, device):
            seen.append(device)
            self.n = 0

        def mark(self):
            self.n += 1

        def intervals_s(self):
            return [0.5] * (self.n - 1)

    r = measure_throughput(Owner("cuda:3"), 4, 2, make_input=lambda b: torch.zeros(b), warmup=1, with_env=False,
                           stamps=FakeStamps)
    assert seen == ["cuda:3", "cuda:3"] and r.device == "cuda:3" and r.samples_per_s == 8.0


def _cache_tree(root, entries):
    for name, level, size in entries:
        d = root / name
        d.mkdir(parents=True)
        (d / "level").write_text(f"{level}\n")
        (d / "size").write_text(f"{size}\n")
    return str(root)


def test_cache_bytes_reads_the_last_level_from_sysfs(tmp_path):
    from toolkit.env import cache_bytes

    root = _cache_tree(tmp_path / "cache", [("index0", 1, "48K"), ("index1", 1, "32K"), ("index2", 2, "2048K"),
                                            ("index3", 3, "307200K")])
    assert cache_bytes(root) == 300 << 20
    assert cache_bytes(_cache_tree(tmp_path / "l2", [("index0", 1, "32K"), ("index2", 2, "1M")])) == 1 << 20
    assert cache_bytes(str(tmp_path / "missing")) is None  # not Linux, or no sysfs
    assert cache_bytes(_cache_tree(tmp_path / "odd", [("index0", 1, "lots")])) is None
