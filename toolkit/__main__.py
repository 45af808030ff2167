"""`python -m toolkit <command>`: parse, call the library, print a table or JSON.

Each command lives in ``toolkit/cli/<command>.py`` and exposes
``register(subparsers)``, which adds its parser and sets ``func(args) -> int``.
A ``ToolkitError`` (bad input, impossible request) becomes one line on stderr
and exit code 2; an interrupted run exits 130 after the command has saved
what it measured.
"""

from __future__ import annotations

import argparse
import importlib
import sys

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


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except ToolkitError as e:
        sys.stderr.write(f"error: {e}\n")
        return 2
    except KeyboardInterrupt:
        sys.stderr.write("interrupted\n")
        return 130


if __name__ == "__main__":
    sys.exit(main())
