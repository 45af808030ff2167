"""Numbers as text for tables and read-outs, with one rule for what is missing.

A value that was not measured (None), or could not be (NaN, an infinite
ratio), is shown as ``MISSING`` ("n/a") everywhere: in the report's summary,
the CLI's tables and the widgets' read-outs. Blank cells or "nan" would read
as a measured zero or a bug.
"""

from __future__ import annotations

import math
import numbers

MISSING = "n/a"


def is_missing(x) -> bool:
    """True for None, NaN and +-inf (numpy scalars included)."""
    if x is None:
        return True
    if isinstance(x, numbers.Real) and not isinstance(x, bool):
        return not math.isfinite(float(x))
    return False


def fmt(x, spec: str = ".3g") -> str:
    """``format(x, spec)``, or "n/a" when ``x`` is missing."""
    return MISSING if is_missing(x) else format(x, spec)


def pct(x, spec: str = "+.0f") -> str:
    """A fraction as a percentage (0.25 -> "+25%"), or "n/a" when missing."""
    return MISSING if is_missing(x) else f"{format(100 * x, spec)}%"


__all__ = ["MISSING", "is_missing", "fmt", "pct"]
