"""The two phases of generation: prefill (the whole prompt in one forward pass) and decode (one token per pass).

They are kept apart everywhere (hit rates, costs, rooflines, traces) because they stress the
experts differently: a prefill pass routes many tokens and touches most experts of a layer, a
decode pass routes one token per sequence and touches only ``top_k`` of them.
"""

from __future__ import annotations

from ..errors import ToolkitError

PHASES = ("prefill", "decode")
PREFILL, DECODE = 0, 1  # the codes a trace stores per row (``PHASES[code]`` is the name)


def phase_code(phase: str) -> int:
    """The trace code of a phase name (0 prefill, 1 decode); anything else raises ``ToolkitError``."""
    if phase not in PHASES:
        raise ToolkitError(f"phase must be one of {PHASES}, got {phase!r}")
    return PHASES.index(phase)
