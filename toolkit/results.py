"""Result values on disk: JSON conversion, provenance and atomic saving.

Every measurement is written with ``save_json``, which writes to a temporary
file and renames it, so an interrupted run never leaves a half-written file
(and never destroys the previous one).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import sys
import tempfile
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


def save_json(obj: Any, path: str | os.PathLike) -> Path:
    """Write ``obj`` as indented JSON atomically (temp file + rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(to_jsonable(obj), f, indent=1, sort_keys=False)
            f.write("\n")
        os.chmod(tmp, 0o644)  # mkstemp creates 0600; results are meant to be shared
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    return path


def load_json(path: str | os.PathLike) -> Any:
    """Read a JSON file, turning a missing or corrupt file into a ToolkitError."""
    from .errors import ToolkitError

    path = Path(path)
    try:
        with open(path) as f:
            return json.load(f)
    except FileNotFoundError:
        raise ToolkitError(f"file not found: {path}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ToolkitError(f"{path} is not valid JSON ({e})") from None

