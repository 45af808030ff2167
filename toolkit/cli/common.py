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
    if not value < 2**60:  # also infinity ('1e999'): no machine has an exabyte, and rlimits end at 2^63
        raise argparse.ArgumentTypeError(f"memory size {text!r} is too large (at most 1 EiB)")
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


class HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """Every command's help: descriptions as written, and each option's default shown as "(default: X)".

    The default is added unless the help text already says what it is (it
    mentions "default", as when it depends on the device) or there is nothing
    to show (no default, an on/off flag, an empty list).
    """

    def _get_help_string(self, action):
        text = action.help or ""
        nothing = action.default is None or action.default is False or action.default in ([], "", argparse.SUPPRESS)
        if "default" in text.lower() or nothing:
            return text
        if not action.option_strings and action.nargs not in (argparse.OPTIONAL, argparse.ZERO_OR_MORE):
            return text
        return f"{text} (default: %(default)s)"


def plural(n: int, word: str, many: str | None = None) -> str:
    """'1 layer', '2 layers' (``many``: the irregular plural)."""
    return f"{n} {word if n == 1 else many or word + 's'}"


def text_table(header: list[str], rows: list[list[str]], right: set[int] = frozenset()) -> str:
    """Rows of strings as aligned columns under ``header``; columns whose index is in ``right`` align right."""
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]

    def line(cells) -> str:
        return "  ".join(str(c).rjust(w) if i in right else str(c).ljust(w)
                         for i, (c, w) in enumerate(zip(cells, widths))).rstrip()

    return "\n".join([line(header), *(line(r) for r in rows)])


def progress_bar(**kwargs):
    """A tqdm bar on stderr (stdout stays clean for --json); it is gone when the command finishes.

    Callers update it between measurements, never inside a timed region.
    """
    from tqdm.auto import tqdm

    return tqdm(file=sys.stderr, leave=False, dynamic_ncols=True, **kwargs)


def status(message: str) -> None:
    """One line on stderr saying what runs now and how long it may take (before a measurement, never inside one)."""
    sys.stderr.write(message.rstrip() + "\n")
    sys.stderr.flush()


def add_device_argument(parser: argparse.ArgumentParser) -> None:
    """``--device``: the one spelling every command accepts (``env.resolve_device`` reads it)."""
    parser.add_argument("--device", default="auto",
                        help="auto (default: the GPU if there is one, else the CPU), cpu or cuda[:N]")


def print_json(obj) -> None:
    """``obj`` as indented JSON on stdout (NaN -> null, dataclasses and frames via ``results.to_jsonable``)."""
    json.dump(to_jsonable(obj), sys.stdout, indent=1)
    sys.stdout.write("\n")
