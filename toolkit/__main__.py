"""`python -m toolkit <command>`: parse, call the library, print a table or JSON.

Each command lives in ``toolkit/cli/<command>.py`` and exposes
``register(subparsers)``, which adds its parser and sets ``func(args) -> int``.
A ``ToolkitError`` (bad input, impossible request) becomes one line on stderr
and exit code 2; a warning is one line too (``warning: ...``). Ctrl-C anywhere
exits 130 with one line, ``interrupted``: a command saves what it measured
before the interrupt reaches here (``toolkit.interrupts`` makes sure it
does reach here), and the process then ends at once, without waiting for
helper threads.
"""

from __future__ import annotations

import argparse
import importlib
import os
import signal
import sys
import warnings

from .errors import ToolkitError

COMMANDS = ["latency", "pitfalls", "compare", "throughput", "moe", "calibrate", "simulate", "profile", "report", "sweep"]


class _Parser(argparse.ArgumentParser):
    """argparse that reports a usage error as one line and exit code 2."""

    def error(self, message):  # noqa: D401 - argparse API
        sys.stderr.write(f"{self.prog}: error: {message}\n")
        raise SystemExit(2)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="python -m toolkit", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    sub.required = True
    for name in COMMANDS:
        importlib.import_module(f".cli.{name}", __package__).register(sub)
    return parser


def _one_line_warning(message, category, filename, lineno, file=None, line=None) -> None:
    """``warnings.showwarning`` for the CLI: ``warning: <message>`` on one line, without the source file and line."""
    from tqdm.auto import tqdm

    text = " ".join(str(message).split()) or category.__name__  # a multi-line message joined, not cut
    tqdm.write(f"warning: {text}", file=file or sys.stderr)  # on its own line, above any progress bar


def main(argv: list[str] | None = None) -> int:
    from .interrupts import unraisable_interrupts

    try:
        with unraisable_interrupts(), warnings.catch_warnings():
            warnings.showwarning = _one_line_warning
            args = build_parser().parse_args(argv)
            return int(args.func(args) or 0)
    except ToolkitError as e:
        sys.stderr.write(f"error: {e}\n")
        return 2
    except KeyboardInterrupt:
        sys.stderr.write("interrupted\n")
        return 130


def _exit(code: int) -> None:
    """Leave the process: on an interrupt at once (helper threads and exit hooks could hold it for seconds)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the command is over: a late Ctrl-C must not become a traceback
    if code == 130:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(130)
    sys.exit(code)


if __name__ == "__main__":
    try:
        _exit(main())
    except KeyboardInterrupt:  # between the command's end and _exit
        os._exit(130)
