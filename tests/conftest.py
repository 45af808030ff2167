import os
import tempfile

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("MPLBACKEND", "Agg")
# without a GPU, Triton kernels run in Triton's interpreter (read when triton is first imported)
if not os.path.exists("/dev/nvidia0") and not os.environ.get("CUDA_VISIBLE_DEVICES"):
    os.environ.setdefault("TRITON_INTERPRET", "1")
# calibrations made by tests must not land in (or be read from) the user's cache
os.environ.setdefault("TOOLKIT_CACHE_DIR", tempfile.mkdtemp(prefix="toolkit-cache-"))


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One intra-op thread in every test module (a test that changes it is undone at the module's end).

    CI has 2 cores shared with the test runner: on tiny tensors OpenMP's spinning threads make ops
    10x slower, and one thread keeps results deterministic.
    """
    import torch

    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


@pytest.fixture
def calibration(tmp_path):
    """A fixed cost model file (no measuring in tests): CPU experts cost n ms, a copy 3 ms."""
    from toolkit.moe.costs import CostModel, save_cost_model

    path = tmp_path / "costs.json"
    save_cost_model(CostModel.fixed(cpu=(0.0, 1.0), gpu=(0.01, 0.0), copy_ms=3.0, key="test"), path)
    return str(path)


def pytest_collection_modifyitems(config, items):
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (run on the device machine)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
