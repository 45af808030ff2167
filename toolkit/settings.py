"""Where the toolkit's data lives, smoke mode, and the experiment presets per device.

``Settings`` is what the report's experiments run (the notebooks run the same
ones): one preset per device kind (CPU, CUDA) and mode (full, quick). The CPU
default finishes in a few minutes on a 2-core machine, quick in about one;
``TOOLKIT_SMOKE=1`` makes the notebooks pick the quick preset (CI).

This module imports nothing heavy and nothing else of the toolkit, so any
module (the trace loader included) can ask it where ``data/`` is.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

MiB = 2**20


def data_dir() -> Path:
    """The repository's ``data/`` folder; ``$TOOLKIT_DATA_DIR`` overrides it (read at each call)."""
    override = os.environ.get("TOOLKIT_DATA_DIR")
    return Path(override) if override else Path(__file__).resolve().parents[1] / "data"


def cache_dir() -> Path:
    """The per-machine cache folder (calibrations, built kernels): ``$TOOLKIT_CACHE_DIR`` or ``~/.cache/toolkit``."""
    return Path(os.environ.get("TOOLKIT_CACHE_DIR") or Path.home() / ".cache" / "toolkit")


def smoke_mode() -> bool:
    """True when TOOLKIT_SMOKE=1: notebooks use their smallest settings (CI)."""
    return os.environ.get("TOOLKIT_SMOKE", "").strip().lower() in ("1", "true", "yes")


@dataclass(frozen=True)
class Settings:
    """What the experiments run; one preset per (device kind, quick) in ``SETTINGS``."""

    latency_model: str = "tiny-resnet"
    audit_time_s: float = 2.0
    batch_model: str = "tiny-resnet"
    batch_max_memory: int | None = None  # the trial process's memory limit (bytes); None = what is available
    # CPU: the limit is the trial process's own footprint plus this much, so a torch build that already holds
    # a few hundred MB (a CUDA build does) cannot make "batch of 1 does not fit" fail the report
    batch_headroom: int | None = 64 * MiB
    batch_max: int | None = None  # upper bound of the search (None: until out of memory)
    curve_step: int = 4  # throughput curve at 1, step, step^2, ..., max
    curve_batches: int = 5
    curve_time_s: float = 0.5  # per point, timed region
    moe_preset: str = "tiny-mixtral"
    moe_layers: int = 4
    moe_fractions: tuple[float, ...] = (0.0, 0.25, 0.5, 0.75, 1.0)  # share of experts on the GPU
    moe_policy: str = "static-popularity"
    prompt_tokens: int = 32
    new_tokens: int = 16
    sim_policies: tuple[str, ...] = ("static-uniform", "static-popularity", "lru", "lfu", "belady")
    sim_budgets: tuple[int, ...] = (0, 32, 64, 96, 128, 160, 192, 224, 256)
    sim_heatmap_budget: int = 64


SETTINGS = {
    ("cpu", False): Settings(),
    ("cpu", True): Settings(audit_time_s=0.5, batch_max_memory=None, batch_max=64, curve_batches=3,
                            curve_time_s=0.2, moe_layers=2, moe_fractions=(0.0, 0.5, 1.0), prompt_tokens=16,
                            new_tokens=8,
                            sim_policies=("static-popularity", "lru", "lfu", "belady"),
                            sim_budgets=(0, 64, 128, 192, 256)),
    ("cuda", False): Settings(latency_model="resnet-50", audit_time_s=5.0, batch_model="resnet-50",
                              batch_max_memory=None, curve_step=2, curve_batches=20, curve_time_s=2.0,
                              moe_preset="mixtral-8x7b", moe_layers=2, prompt_tokens=128, new_tokens=32),
    ("cuda", True): Settings(latency_model="resnet-50", audit_time_s=1.0, batch_model="resnet-50",
                             batch_max_memory=None, batch_max=256, curve_step=4, curve_batches=5,
                             curve_time_s=0.5, moe_layers=2, moe_fractions=(0.0, 0.5, 1.0), new_tokens=8,
                             sim_policies=("static-popularity", "lru", "belady"),
                             sim_budgets=(0, 64, 128, 192, 256)),
}


def settings_for(device: str, quick: bool = False) -> Settings:
    """The preset for a device ("cpu", "cuda", "cuda:1", ...) and mode."""
    return SETTINGS[("cuda" if str(device).startswith("cuda") else "cpu", bool(quick))]


__all__ = ["data_dir", "smoke_mode", "Settings", "SETTINGS", "settings_for"]
