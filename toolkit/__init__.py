"""toolkit: measure deep-learning inference correctly and run MoE models that do not fit on the GPU.

The public API is re-exported here and imported lazily, so ``import toolkit``
stays cheap and a notebook only pays for what it uses.
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

# public name -> module that defines it
_EXPORTS = {
    "ToolkitError": "errors",
    "environment": "env",
    "save_json": "results",
    "load_json": "results",
    "measure_latency": "timing",
    "LatencyResult": "timing",
    "compare": "timing",
    "Comparison": "timing",
    "warning_lines": "timing",
    "infer_device": "env",
    "audit": "pitfalls",
    "build_model": "models",
    "find_max_batch_size": "throughput",
    "measure_throughput": "throughput",
    "throughput_curve": "throughput",
    "find_optimal_batch_size": "throughput",
    "profile": "profiling",
    "build_moe": "moe.presets",
    "offload": "moe.offload",
    "calibrate": "moe.costs",
    "CostModel": "moe.costs",
    "plan_memory": "moe.memory",
    "generate": "moe.generation",
    "simulate": "moe.simulate",
    "run_report": "report",
    "paper_figures": "paper",
    "run_moe": "moe.run",
    "MoESettings": "moe.run",
    "MoESession": "moe.run",
    "run_sweep": "sweep",
    "load_sweep": "sweep",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'toolkit' has no attribute {name!r}")
    return getattr(importlib.import_module(f".{module}", __name__), name)


def __dir__():
    return sorted(list(globals()) + __all__)
