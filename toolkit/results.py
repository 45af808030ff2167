"""Result values on disk: JSON conversion, provenance and atomic saving.

Every result file (JSON, figures, summaries, traces) is written through
``atomic_write``: to a temporary file in the same folder, then renamed, so an
interrupted run never leaves a half-written file (and never destroys the
previous one). ``check_writable`` says, before a long run starts, that its
output could not be saved: a finished measurement must not be lost to a
folder that cannot be written. ``RunRecord`` is a benchmark run's record,
saved this way after every measurement.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any


def to_jsonable(obj: Any) -> Any:
    """Convert dataclasses, numpy/torch scalars and arrays, paths to JSON types."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        if hasattr(obj, "to_dict"):
            return to_jsonable(obj.to_dict())
        return {f.name: to_jsonable(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, dict):
        return {str(k): to_jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [to_jsonable(v) for v in obj]
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, (str, int, bool)) or obj is None:
        return obj
    if isinstance(obj, Path):
        return str(obj)
    if hasattr(obj, "tolist"):  # numpy arrays and scalars, torch tensors
        return to_jsonable(obj.tolist())
    if hasattr(obj, "item"):
        return to_jsonable(obj.item())
    return str(obj)


def provenance(device: str | None = None, command: str | None = None) -> dict:
    """The environment record plus the command line that produced a result."""
    from .env import environment

    rec = environment(device)
    rec["command"] = command if command is not None else " ".join([Path(sys.argv[0]).name, *sys.argv[1:]])
    return rec


def check_writable(path: str | os.PathLike, what: str = "output", folder: bool = False) -> Path:
    """``path`` as a Path, or a ToolkitError naming ``what`` when it could not be written.

    ``folder``: ``path`` is a folder to write into (else a file). Checked by
    writing a temporary file into the nearest folder that exists (permission
    bits alone do not say it: root, read-only mounts); missing folders below
    it are made when the result is saved.
    """
    from .errors import ToolkitError

    path = Path(path)
    if not folder and path.is_dir():
        raise ToolkitError(f"{what} {path} is a folder; give a file name")
    if folder and path.exists() and not path.is_dir():
        raise ToolkitError(f"{what} {path} is a file, not a folder")
    here = path if folder else path.parent
    here = Path(os.path.abspath(here))
    while not here.exists():
        here = here.parent
    if not here.is_dir():
        raise ToolkitError(f"{what} {path} cannot be written: {here} is a file, not a folder")
    try:
        fd, tmp = tempfile.mkstemp(dir=here, prefix=".toolkit-write-test.")
        os.close(fd)
        os.unlink(tmp)
    except OSError as e:
        raise ToolkitError(f"{what} {path} cannot be written: no write access to {here} ({e.strerror})") from None
    return path


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike, mode: str = "w"):
    """Open a temporary file next to ``path`` for writing; on success rename it to ``path`` (0644), else remove it.

    The rename is atomic: readers see the old file or the new one, never half
    of one, also when the run is interrupted. A failure to write is a
    ToolkitError naming the file.
    """
    from .errors import ToolkitError

    path = Path(path)
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        with os.fdopen(fd, mode) as f:
            yield f
        os.chmod(tmp, 0o644)  # mkstemp creates 0600; results are meant to be shared
        os.replace(tmp, path)
        tmp = None
    except OSError as e:
        raise ToolkitError(f"cannot write {path}: {e.strerror or e}") from None
    finally:
        if tmp is not None:
            with contextlib.suppress(OSError):
                os.unlink(tmp)


def save_json(obj: Any, path: str | os.PathLike) -> Path:
    """Write ``obj`` as indented JSON atomically (``atomic_write``); an unwritable path is a ToolkitError."""
    text = json.dumps(to_jsonable(obj), indent=1, sort_keys=False) + "\n"  # fails before the file is touched
    with atomic_write(path) as f:
        f.write(text)
    return Path(path)


class RunRecord:
    """The record of one measured benchmark run: a JSON-able dict, saved whole after every measurement.

    A run on a lent machine can stop at any point (its time budget, a kill, a
    device error). Saving the whole record atomically (``save_json``) after each
    measurement means the file on disk always holds everything measured so far,
    never half a file: an interrupted run keeps what it measured. Each save
    stamps ``"elapsed_s"`` (seconds since ``start``) and, when given, the
    run's ``"status"`` ("complete", "interrupted", "skipped: ...", "error: ...").

    ``record``: the dict that is saved; the run keeps filling it in place.
    ``clock``: seconds, monotonic (tests inject a fake one). ``start``: the
    clock's reading when the run began (default: now), so work done before
    the record could be built (resolving the device, provenance) counts.
    """

    def __init__(self, name: str, path: str | os.PathLike, record: dict,
                 clock: Callable[[], float] = time.perf_counter, start: float | None = None):
        self.name, self.path, self.record, self.clock = name, Path(path), record, clock
        self.start = clock() if start is None else start

    @property
    def elapsed_s(self) -> float:
        """Seconds since the run began."""
        return self.clock() - self.start

    def save(self, status: str | None = None) -> Path:
        """Set ``status`` (when given) and ``elapsed_s``, then write the record atomically to ``path``."""
        if status:
            self.record["status"] = status
        self.record["elapsed_s"] = self.elapsed_s
        return save_json(self.record, self.path)

    def log(self, msg: str) -> None:
        """One progress line on stderr, ``[name   12.3s] msg``, flushed: a benchmark script's running commentary."""
        print(f"[{self.name} {self.elapsed_s:6.1f}s] {msg}", file=sys.stderr, flush=True)

    def stopped(self, e: BaseException) -> int:
        """A run stopped by Ctrl-C (``KeyboardInterrupt``) or by what this machine cannot run (``ToolkitError``):
        saves that status with what was measured, says so in one line on stderr -> the exit code (130 or 2)."""
        if isinstance(e, KeyboardInterrupt):
            self.save("interrupted")
            print("interrupted: what was measured is in", self.path, file=sys.stderr)
            return 130
        self.save(f"error: {e}")
        print(f"error: {e}", file=sys.stderr)
        return 2


def load_json(path: str | os.PathLike) -> Any:
    """Read a JSON file, turning a missing or corrupt file into a ToolkitError."""
    from .errors import ToolkitError

    path = Path(path)
    try:
        with open(path) as f:
            return json.load(f)
    except FileNotFoundError:
        raise ToolkitError(f"file not found: {path}") from None
    except IsADirectoryError:
        raise ToolkitError(f"{path} is a folder, not a JSON file") from None
    except OSError as e:
        raise ToolkitError(f"cannot read {path}: {e.strerror or e}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ToolkitError(f"{path} is not valid JSON ({e})") from None

