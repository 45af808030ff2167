import os
import tempfile

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("MPLBACKEND", "Agg")
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


def pytest_collection_modifyitems(config, items):
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (run on the device machine)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
