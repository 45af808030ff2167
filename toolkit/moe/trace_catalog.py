"""Traces by name or path: the built-in synthetic traces, the files in ``data/traces/``, any ``.npz``.

Every entry point that takes a trace (``simulate``, ``TraceRouter``, the CLI, the report) accepts
what ``load_trace`` accepts, so a name means the same trace everywhere. It sits above both the
format (``toolkit.moe.traces``) and the generator (``toolkit.moe.synthetic``) because the built-in
names are generated, not stored.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

from ..errors import ToolkitError
from .synthetic import synthetic_mixtral
from .traces import DATA_DIR, Trace, read_trace

TRACES_DIR = DATA_DIR / "traces"
TRACE_NAMES = ("synthetic-mixtral", "synthetic-mixtral-instruct")


def load_trace(source) -> Trace:
    """A trace by name (``synthetic-mixtral``, ``synthetic-mixtral-instruct``, a file in data/traces/) or path."""
    if isinstance(source, Trace):
        return source
    name = str(source)
    if name in TRACE_NAMES:
        return named_trace(name)
    path = Path(name)
    if not path.exists() and (TRACES_DIR / f"{name}.npz").exists():
        path = TRACES_DIR / f"{name}.npz"
    if not path.exists():
        raise ToolkitError(f"trace {name!r} not found: give a .npz path or one of {', '.join(TRACE_NAMES)}")
    return read_trace(path)


@lru_cache(maxsize=4)
def named_trace(name: str) -> Trace:
    """The named default traces, generated deterministically (seed 0) and cached; read-only arrays."""
    if name == "synthetic-mixtral":
        trace = synthetic_mixtral()
    elif name == "synthetic-mixtral-instruct":
        trace = synthetic_mixtral(model="instruct")
    else:
        raise ToolkitError(f"unknown trace name {name!r}; choose one of {', '.join(TRACE_NAMES)}")
    trace.meta["name"] = name
    for a in (trace.experts, trace.weights, trace.step, trace.phase, trace.seq):
        a.setflags(write=False)
    return trace
