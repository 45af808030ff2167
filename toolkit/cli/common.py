"""Argument types and output helpers shared by the CLI commands."""

from __future__ import annotations

import argparse
import json
import re
import sys
from collections.abc import Callable

from ..results import to_jsonable

_UNITS = {"": 1, "B": 1, "K": 1e3, "KB": 1e3, "M": 1e6, "MB": 1e6, "G": 1e9, "GB": 1e9, "T": 1e12, "TB": 1e12,
          "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}


def parse_bytes(text: str) -> int:
    """'4GiB', '512MB', '1e9' -> bytes; raises argparse.ArgumentTypeError."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:e[0-9]+)?)\s*([A-Za-z]*)\s*", str(text))
    unit = m.group(2).upper() if m else None
    if not m or unit not in _UNITS:
        raise argparse.ArgumentTypeError(f"cannot parse memory size {text!r} (examples: 4GiB, 512MB, 1000000)")
    value = float(m.group(1)) * _UNITS[unit]
    if value <= 0:
        raise argparse.ArgumentTypeError(f"memory size must be positive, got {text!r}")
    return int(value)


def int_at_least(minimum: int) -> Callable[[str], int]:
    """An argparse ``type`` for integers >= ``minimum``; a bad value is one clear usage error naming the bound."""

    def parse(text: str) -> int:
        try:
            v = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if v < minimum:
            raise argparse.ArgumentTypeError(f"must be >= {minimum}, got {v}")
        return v

    parse.__name__ = f"int >= {minimum}"
    return parse


positive_int = int_at_least(1)  # counts: batch sizes, layers, repeats, threads
nonnegative_int = int_at_least(0)  # counts that may be zero: warm-up steps, GPU experts


def add_device_argument(parser: argparse.ArgumentParser) -> None:
    """``--device``: the one spelling every command accepts (``env.resolve_device`` reads it)."""
    parser.add_argument("--device", default="auto", help="auto (default), cpu or cuda[:N]")


def print_json(obj) -> None:
    """``obj`` as indented JSON on stdout (NaN -> null, dataclasses and frames via ``results.to_jsonable``)."""
    json.dump(to_jsonable(obj), sys.stdout, indent=1)
    sys.stdout.write("\n")
