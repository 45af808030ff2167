"""The benchmark scripts for tests (``benchmarks/`` is a folder of scripts, not a package): imported as modules,
or run in a fresh process as on the GPU machine."""

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BENCHMARKS = ROOT / "benchmarks"


def load_benchmark(name: str):
    """``benchmarks/<name>.py`` imported as the module ``bench_<name>``; its folder is on the path, as when the
    script runs, so it finds the modules beside it."""
    if str(BENCHMARKS) not in sys.path:
        sys.path.append(str(BENCHMARKS))
    spec = importlib.util.spec_from_file_location(f"bench_{name}", BENCHMARKS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the class is made
    spec.loader.exec_module(module)
    return module


def run_benchmark(name: str, out: Path, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    """``python benchmarks/<name>.py --out OUT ARGS`` in a fresh process from the repository root, offline, as on
    the GPU machine (its output captured as text)."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    return subprocess.run([sys.executable, str(BENCHMARKS / f"{name}.py"), "--out", str(out), *args],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
