"""Sweeps: a grid of one measurement, one job per point, one result file per point, through submitit.

A paper figure is a grid: models x batch sizes x dtypes, or GPU expert budgets
x policies x routings. ``SweepSpec`` names the measurement (``latency``,
``throughput``, ``moe``, ``simulate``), the arguments held fixed and the axes
to vary; its points are the cartesian product of the axes. Each point calls
the same library function, with the same defaults, as the command of that name
(a ``moe`` point is ``toolkit.moe.run.run_moe(MoESettings(...))``, the run of
``python -m toolkit moe``; a ``latency`` point is
``toolkit.timing.measure_model_latency``, the run of ``python -m toolkit latency``).

``run_sweep(spec, out_dir, executor=...)`` runs the points:

- ``"local"`` (default): one process per point, through submitit's local
  executor. With GPUs, each process sees one GPU (``CUDA_VISIBLE_DEVICES``)
  and a GPU runs one point at a time: two measurements sharing a GPU time each
  other, which is why fractional-GPU schedulers are out. Concurrent processes
  also get disjoint CPU cores, so the CPU side of one point (CPU experts, the
  host thread driving the GPU) does not slow its neighbour. Without a GPU,
  ``parallel`` processes at a time (default 1: CPU timings run alone).
- ``"slurm"``: one Slurm job array, one task per point, each holding whole
  GPUs (``gpus_per_job``), at most ``array_parallelism`` running at once.
- ``"inline"``: one point after the other in this process (notebooks, tests,
  debugging).

Layout of ``out_dir``::

    sweep.json                 the spec, its point ids and the command that ran it
    points/<id>.json           a finished point: axes, arguments, headline metrics, full result, provenance
    points/<id>.error.json     a failed point: its error and traceback (the other points go on)
    jobs/                      submitit's pickles and each job's stdout/stderr

A point's id is derived from its arguments (defaults filled in), so running a
sweep again skips the finished points and retries the failed ones, and growing
an axis measures only the new points. ``load_sweep(out_dir)`` reads the files
back as a DataFrame, one row per point.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime as _dt
import hashlib
import inspect
import itertools
import json
import os
import re
import shlex
import shutil
import socket
import sys
import time
import traceback
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import Any

from .errors import ToolkitError

KINDS = ("latency", "throughput", "moe", "simulate")
EXECUTORS = ("local", "slurm", "inline")
LOCAL_TIME_LIMIT_MIN = 7 * 24 * 60  # submitit's local executor kills a job after its time limit (default 2 min)
CRASH_GRACE_S = 10.0  # a finished job's files may show up late on a network file system


# ---------------------------------------------------------------------------------------------------------------
# Kinds: what one point of each measurement takes and does


@dataclass(frozen=True)
class Param:
    """One argument of a measurement: its name, default and type (``"int | None"``, as annotated)."""

    name: str
    default: Any
    annotation: str

    def parse(self, text: str) -> Any:
        """A command-line string as this argument's type: ``"8"`` -> 8, ``"none"`` -> None, ``"true"`` -> True."""
        t = text.strip()
        types = _types(self.annotation)
        if "None" in types and t.lower() in ("none", "null"):
            return None
        if "bool" in types and t.lower() in ("true", "yes", "on", "1", "false", "no", "off", "0"):
            return t.lower() in ("true", "yes", "on", "1")
        for name, convert in (("int", int), ("float", float)):
            if name in types:
                with contextlib.suppress(ValueError):
                    return convert(t)
        if ("str" in types or not types) and t:
            return t
        raise ToolkitError(f"{self.name}: expected {self.annotation}, got {text!r}")

    def check(self, value: Any) -> Any:
        """``value`` if it has this argument's type (numpy scalars become Python ones); else a ToolkitError."""
        if hasattr(value, "item") and not isinstance(value, (str, bytes)):
            value = value.item()
        types = _types(self.annotation)
        ok = (not types
              or (value is None and "None" in types)
              or (isinstance(value, bool) and "bool" in types)
              or (isinstance(value, int) and not isinstance(value, bool) and ("int" in types or "float" in types))
              or (isinstance(value, float) and "float" in types)
              or (isinstance(value, str) and "str" in types))
        if not ok:
            raise ToolkitError(f"{self.name} must be {self.annotation}, got {value!r}")
        return value


def _types(annotation: str) -> set[str]:
    """{'int', 'None'} for 'int | None'; empty when the annotation says nothing checkable."""
    names = {a.strip() for a in str(annotation).split("|")}
    return names if names <= {"int", "float", "str", "bool", "None"} else set()


@dataclass(frozen=True)
class Kind:
    """A measurement a sweep can run: its arguments, a cheap check, one run, and the numbers a figure needs."""

    name: str
    params: tuple[Param, ...]
    check: Callable[[dict], None]  # ToolkitError for arguments the run would reject; builds nothing
    run: Callable[[dict], tuple[dict, str | None]]  # arguments -> (JSON record, device it ran on)
    metrics: Callable[[dict], dict]  # record -> headline numbers (the columns of load_sweep)
    uses_device: bool  # has a `device` argument: a point whose device is not "cpu" wants a GPU

    @property
    def defaults(self) -> dict:
        return {p.name: p.default for p in self.params}

    def param(self, name: str) -> Param:
        for p in self.params:
            if p.name == name:
                return p
        raise ToolkitError(f"unknown argument {name!r} for a {self.name} sweep; its arguments: "
                           f"{', '.join(p.name for p in self.params)}")


def _signature_params(fn: Callable, skip: Sequence[str] = ()) -> tuple[Param, ...]:
    return tuple(Param(n, p.default, str(p.annotation)) for n, p in inspect.signature(fn).parameters.items()
                 if n not in skip)


def get_kind(name: str) -> Kind:
    """The measurement called ``name`` (one of ``KINDS``)."""
    if name not in KINDS:
        raise ToolkitError(f"unknown measurement {name!r}; choose one of: {', '.join(KINDS)}")
    return _kind(name)


@cache
def _kind(name: str) -> Kind:
    return {"latency": _latency_kind, "throughput": _throughput_kind, "moe": _moe_kind,
            "simulate": _simulate_kind}[name]()


def _latency_kind() -> Kind:
    from .timing import check_model_latency, measure_model_latency

    def check(a):
        check_model_latency(a["model"], a["batch_size"], a["dtype"], a["threads"], a["max_time_s"],
                            a["target_rel_ci"])
        _check_device(a["device"])

    def run(a):
        import warnings

        from .timing import LatencyWarning

        with warnings.catch_warnings():
            warnings.simplefilter("ignore", LatencyWarning)  # kept in the record's "warnings"
            r = measure_model_latency(**a)
        return {"model": a["model"], "batch_size": a["batch_size"], "dtype": a["dtype"], **r.to_dict()}, r.device

    def metrics(r):
        lo, hi = r["ci95_ms"]
        return {"median_ms": r["median_ms"], "ci95_low_ms": lo, "ci95_high_ms": hi, "p90_ms": r["p90_ms"],
                "n_samples": r["n_samples"], "n_warnings": len(r["warnings"])}

    return Kind("latency", _signature_params(measure_model_latency), check, run, metrics, uses_device=True)


def _throughput_kind() -> Kind:
    from .throughput import check_model_throughput, measure_model_throughput

    def check(a):
        check_model_throughput(a["model"], a["dtype"], a["min_batch"], a["max_batch"], a["n_batches"],
                               a["max_time_s"], a["curve_step"], a["tolerance"], a["verify"])
        _check_device(a["device"])

    def run(a):
        r = measure_model_throughput(**a)
        return r.to_dict(), r.device

    def metrics(r):
        opt = r["optimal"]
        return {"max_batch_size": r["max_batch_size"], "optimal_batch_size": r["optimal_batch_size"],
                "optimal_samples_per_s": opt["optimal_samples_per_s"], "best_batch_size": r["best_batch_size"],
                "best_samples_per_s": opt["best_samples_per_s"]}

    params = _signature_params(measure_model_throughput, skip=("progress",))  # a job's log is no terminal
    return Kind("throughput", params, check, run, metrics, uses_device=True)


def _moe_kind() -> Kind:
    from .moe.run import MoESettings, resolve_settings, run_moe

    def check(a):
        from .moe.presets import from_name

        s = resolve_settings(MoESettings(**a))
        preset = from_name(s.preset, s.layers)
        total = preset.layers * preset.experts
        if isinstance(s.gpu_experts, int) and s.gpu_experts > total:
            raise ToolkitError(f"gpu_experts {s.gpu_experts} is more than the model has: {preset.layers} layers x "
                               f"{preset.experts} experts = {total}")
        if s.routing not in ("auto", "model", "uniform"):
            _check_trace(s.routing, "routing")
        for name in ("placement", "calibration"):
            path = getattr(s, name)
            if path is not None and not Path(path).is_file():
                raise ToolkitError(f"{name} file not found: {path}")
        _check_device(s.device)

    def run(a):
        r = run_moe(MoESettings(**a))
        return r.to_dict(), r.device

    def metrics(r):
        hr = r.get("hit_rate") or {}
        return {"decode_tokens_per_s": r["decode_tokens_per_s"], "decode_ms": (r["decode_ms"] or {}).get("median"),
                "prefill_ms": r["prefill_ms"], "end_to_end_ms": r["end_to_end_ms"],
                "hit_rate_decode": hr.get("decode"), "hit_rate_prefill": hr.get("prefill"),
                "gpu_experts_used": r["gpu_experts"], "bytes_copied": r["bytes_copied"]}

    params = tuple(Param(f.name, f.default, str(f.type)) for f in dataclasses.fields(MoESettings))
    return Kind("moe", params, check, run, metrics, uses_device=True)


def _simulate_kind() -> Kind:
    # the defaults of `python -m toolkit simulate` (tests/test_sweep.py checks that they agree)
    params = (Param("trace", "synthetic-mixtral", "str"), Param("policy", "lru", "str"),
              Param("gpu_experts", 64, "int"))

    def check(a):
        from .moe.policies import POLICY_NAMES

        if a["policy"] not in POLICY_NAMES:
            raise ToolkitError(f"unknown policy {a['policy']!r}; choose one of: {', '.join(POLICY_NAMES)}")
        if a["gpu_experts"] < 0:
            raise ToolkitError(f"gpu_experts must be >= 0, got {a['gpu_experts']}")
        _check_trace(a["trace"], "trace")

    def run(a):
        from .moe.simulate import simulate

        return simulate(a["trace"], a["policy"], a["gpu_experts"]).to_dict(), None

    def metrics(r):
        hr = r["hit_rate"]
        return {"hit_rate": hr["total"], "hit_rate_prefill": hr["prefill"], "hit_rate_decode": hr["decode"],
                "expert_loads": r["expert_loads"], "bytes_copied": r["bytes_copied"]}

    return Kind("simulate", params, check, run, metrics, uses_device=False)


def _check_device(device: str) -> None:
    """Spelling only: whether a GPU exists is for the machine that runs the point to say."""
    if not re.fullmatch(r"auto|cpu|cuda(:\d+)?", str(device).lower()):
        raise ToolkitError(f"unknown device {device!r}: use auto, cpu or cuda[:N]")


def _check_trace(source: str, name: str) -> None:
    from .moe.trace_catalog import TRACE_NAMES, TRACES_DIR

    if source in TRACE_NAMES or Path(source).is_file() or (TRACES_DIR / f"{source}.npz").is_file():
        return
    raise ToolkitError(f"{name}: trace {source!r} not found: give a .npz path or one of {', '.join(TRACE_NAMES)}")


# ---------------------------------------------------------------------------------------------------------------
# The grid


@dataclass(frozen=True)
class Point:
    """One grid point: every argument of the call (defaults filled in), the axis values that pick it, its id."""

    kind: str
    id: str
    args: dict
    axes: dict

    @property
    def label(self) -> str:
        return ", ".join(f"{k}={v}" for k, v in self.axes.items()) or self.kind


def point_id(kind: str, args: Mapping, axes: Mapping) -> str:
    """A file-safe id: the axis values (readable) and a hash of every argument (unique and stable)."""
    blob = json.dumps({"kind": kind, "args": dict(args)}, sort_keys=True, default=str)
    digest = hashlib.sha1(blob.encode()).hexdigest()[:10]
    label = "_".join(f"{k}-{v}" for k, v in axes.items()) or kind
    label = re.sub(r"[^A-Za-z0-9_.+-]+", "-", label)[:80].strip("-.")
    return f"{label}-{digest}"


@dataclass(frozen=True)
class SweepSpec:
    """A measurement, the arguments held fixed, and the axes whose cartesian product is the grid.

    >>> SweepSpec("simulate", fixed={"trace": "synthetic-mixtral"},
    ...           axes={"policy": ["lru", "static-popularity"], "gpu_experts": [0, 64, 128]})

    Unknown argument names and values of the wrong type are refused here;
    ``check()`` also asks the measurement whether it would accept every point
    (a model name, a budget, a trace file), still without building anything.
    """

    kind: str
    fixed: Mapping[str, Any] = field(default_factory=dict)
    axes: Mapping[str, Sequence] = field(default_factory=dict)

    def __post_init__(self):
        kind = get_kind(self.kind)
        fixed = {n: kind.param(n).check(v) for n, v in dict(self.fixed).items()}
        axes = {}
        for n, values in dict(self.axes).items():
            if hasattr(values, "tolist") and not isinstance(values, (str, bytes)):
                values = values.tolist()  # a numpy array
            values = [values] if isinstance(values, (str, bytes)) or not isinstance(values, Sequence) else values
            p = kind.param(n)
            if n in fixed:
                raise ToolkitError(f"{n} is both fixed and an axis")
            if not values:
                raise ToolkitError(f"axis {n} has no values")
            checked = tuple(p.check(v) for v in values)
            dup = [v for i, v in enumerate(checked) if v in checked[:i]]
            if dup:
                raise ToolkitError(f"axis {n} repeats the value {dup[0]!r}")
            axes[n] = checked
        object.__setattr__(self, "fixed", fixed)
        object.__setattr__(self, "axes", axes)

    @classmethod
    def from_strings(cls, kind: str, fixed: Sequence[str] = (), grid: Sequence[str] = ()) -> SweepSpec:
        """From the command line's ``NAME=VALUE`` (fixed) and ``NAME=V1,V2,...`` (axes), values typed per argument."""
        k = get_kind(kind)
        out: dict[str, dict] = {"fixed": {}, "axes": {}}
        for what, items in (("fixed", fixed), ("axes", grid)):
            for text in items:
                name, sep, value = str(text).partition("=")
                name = name.strip().replace("-", "_")
                if not sep or not name:
                    raise ToolkitError(f"expected NAME=VALUE{',VALUE...' if what == 'axes' else ''}, got {text!r}")
                if name in out["fixed"] or name in out["axes"]:
                    raise ToolkitError(f"{name} is given twice")
                p = k.param(name)
                if what == "fixed":
                    out["fixed"][name] = p.parse(value)
                else:
                    parts = value.split(",")
                    if any(not v.strip() for v in parts):
                        raise ToolkitError(f"axis {name}: empty value in {value!r}")
                    out["axes"][name] = [p.parse(v) for v in parts]
        return cls(kind, out["fixed"], out["axes"])

    @classmethod
    def from_dict(cls, d: Mapping) -> SweepSpec:
        """Inverse of ``to_dict`` (also reads a sweep directory's ``sweep.json``)."""
        try:
            return cls(d["kind"], d.get("fixed") or {}, d.get("axes") or {})
        except (KeyError, TypeError, AttributeError) as e:
            raise ToolkitError(f"not a sweep spec ({type(e).__name__}: {e}); expected kind, fixed and axes") from None

    def to_dict(self) -> dict:
        return {"kind": self.kind, "fixed": dict(self.fixed), "axes": {n: list(v) for n, v in self.axes.items()}}

    def points(self) -> list[Point]:
        """The grid, first axis outermost."""
        base = {**get_kind(self.kind).defaults, **self.fixed}
        names = list(self.axes)
        out = []
        for combo in itertools.product(*self.axes.values()):
            axes = dict(zip(names, combo))
            args = {**base, **axes}
            out.append(Point(self.kind, point_id(self.kind, args, axes), args, axes))
        return out

    def check(self) -> list[Point]:
        """Every point, each checked by its measurement (ToolkitError naming the point and the argument)."""
        kind = get_kind(self.kind)
        points = self.points()
        for p in points:
            try:
                kind.check(dict(p.args))
            except ToolkitError as e:
                raise ToolkitError(f"{e} (point {p.label})" if p.axes else str(e)) from None
        return points

    def command_line(self) -> str:
        """The ``python -m toolkit sweep`` command that runs this grid (recorded as each point's provenance)."""
        def text(v):
            return "none" if v is None else str(v).lower() if isinstance(v, bool) else str(v)

        parts = ["python", "-m", "toolkit", "sweep", self.kind]
        for n, v in self.fixed.items():
            parts += ["--set", f"{n}={text(v)}"]
        for n, vs in self.axes.items():
            parts += ["--grid", f"{n}={','.join(text(v) for v in vs)}"]
        return shlex.join(parts)


def example_spec(smoke: bool = True) -> SweepSpec:
    """GPU expert budget x policy for the offloaded MoE engine: a figure-sized grid for notebooks and examples.

    ``smoke``: tiny-mixtral with 2 layers and a few tokens (8 points, seconds on
    a laptop, inline); otherwise Mixtral-8x7B with random weights over budgets
    from 0 to every expert on the GPU (one H100/H200-class GPU per point).
    """
    policies = ["static-popularity", "lru"]
    if smoke:
        return SweepSpec("moe", fixed={"preset": "tiny-mixtral", "layers": 2, "prompt_tokens": 8, "new_tokens": 8,
                                       "warmup_tokens": 2},
                         axes={"gpu_experts": [0, 4, 8, 16], "policy": policies})
    return SweepSpec("moe", fixed={"preset": "mixtral-8x7b"},
                     axes={"gpu_experts": [0, 32, 64, 96, 128, 192, 256], "policy": [*policies, "lfu"]})


# ---------------------------------------------------------------------------------------------------------------
# One point, in the process that measures it


def point_path(out_dir: str | os.PathLike, pid: str, error: bool = False) -> Path:
    return Path(out_dir) / "points" / (f"{pid}.error.json" if error else f"{pid}.json")


def point_status(out_dir: str | os.PathLike, pid: str) -> str | None:
    """'ok' (finished), 'error' (failed) or None (not run yet)."""
    if point_path(out_dir, pid).exists():
        return "ok"
    return "error" if point_path(out_dir, pid, error=True).exists() else None


def run_point(point: Point, out_dir: str, command: str | None = None, gpu: str | None = None,
              cpus: Sequence[int] | None = None) -> str:
    """Measure one point in this process and write its result file, or its error file; returns 'ok' or 'error'.

    What a job runs. ``gpu``: the one GPU this process may see (set before CUDA
    starts); ``cpus``: the cores it may use, with as many torch threads.
    An exception becomes the error file; an interrupt propagates (nothing written).
    """
    from .results import save_json

    if gpu is not None:
        os.environ["CUDA_VISIBLE_DEVICES"] = str(gpu)
    if cpus:
        pin_process(cpus)
    kind = get_kind(point.kind)
    started = time.time()
    record = device = metrics = failure = None
    try:
        record, device = kind.run(dict(point.args))
        metrics = kind.metrics(record)
    except Exception as e:  # the point failed, the sweep goes on
        failure = (f"{type(e).__name__}: {e}", traceback.format_exc())
    # outside the except block: the traceback's frames (and any tensors they hold) are gone
    head = {"id": point.id, "kind": point.kind, "axes": point.axes, "args": point.args,
            "seconds": time.time() - started, "started": _iso(started), "finished": _iso(time.time()),
            "job": _job_info(gpu, cpus)}
    if failure is not None:
        save_json({**head, "status": "error", "error": failure[0], "traceback": failure[1],
                   "provenance": _provenance(None, command)}, point_path(out_dir, point.id, error=True))
        return "error"
    save_json({**head, "status": "ok", "metrics": metrics, "result": record,
               "provenance": _provenance(device, command)}, point_path(out_dir, point.id))
    point_path(out_dir, point.id, error=True).unlink(missing_ok=True)
    return "ok"


def pin_process(cpus: Sequence[int]) -> None:
    """Run this process on ``cpus`` only, with one torch thread per CPU."""
    import torch

    os.sched_setaffinity(0, set(cpus))
    torch.set_num_threads(len(cpus))


def _iso(t: float) -> str:
    return _dt.datetime.fromtimestamp(t, _dt.timezone.utc).isoformat(timespec="milliseconds")


def _job_info(gpu, cpus) -> dict:
    info = {"executor": os.environ.get("SUBMITIT_EXECUTOR", "inline"), "job_id": None, "host": socket.gethostname(),
            "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES"), "cpus": list(cpus) if cpus else None}
    if "SUBMITIT_EXECUTOR" in os.environ:
        with contextlib.suppress(Exception):
            import submitit

            info["job_id"] = submitit.JobEnvironment().job_id
    return info


def _provenance(device, command) -> dict:
    from .results import provenance

    try:
        return provenance(device, command=command)
    except Exception as e:  # a broken environment query must not lose the measurement
        return {"command": command, "error": f"{type(e).__name__}: {e}"}


# ---------------------------------------------------------------------------------------------------------------
# Where points run on this host


@dataclass(frozen=True)
class Slot:
    """A place on this host that runs one point at a time: a GPU (or none) and, with neighbours, its own cores."""

    gpu: str | None
    cpus: tuple[int, ...] | None = None


def visible_gpus() -> list[str]:
    """This host's GPUs as ``CUDA_VISIBLE_DEVICES`` entries (respecting the one we were started with)."""
    env = os.environ.get("CUDA_VISIBLE_DEVICES")
    if env is not None:
        return [g.strip() for g in env.split(",") if g.strip() and g.strip() != "-1"]
    import torch

    return [str(i) for i in range(torch.cuda.device_count())]


def cpu_groups(n: int) -> list[tuple[int, ...]] | None:
    """This process's physical cores split into ``n`` disjoint groups of equal size, one logical CPU per core.

    Hyper-thread siblings share a core's execution units, so a group never gets
    a sibling of another group's core (nor, for steadier timings, of its own).
    Contiguous core numbers keep a group on one socket where the machine allows.
    None when there are fewer cores than groups, or where affinity cannot be set (macOS).
    """
    if not hasattr(os, "sched_setaffinity"):
        return None
    allowed = sorted(os.sched_getaffinity(0))
    seen: set[int] = set()
    cores = []
    for cpu in allowed:
        if cpu not in seen:
            seen |= _siblings(cpu) | {cpu}
            cores.append(cpu)
    if n < 1 or len(cores) < n:
        return None
    size = len(cores) // n
    return [tuple(cores[i * size:(i + 1) * size]) for i in range(n)]


def _siblings(cpu: int) -> set[int]:
    try:
        text = Path(f"/sys/devices/system/cpu/cpu{cpu}/topology/thread_siblings_list").read_text().strip()
    except OSError:
        return {cpu}
    out: set[int] = set()
    for part in text.split(","):
        lo, _, hi = part.partition("-")
        out.update(range(int(lo), int(hi or lo) + 1))
    return out


def wants_gpu(point: Point) -> bool:
    return get_kind(point.kind).uses_device and str(point.args.get("device", "auto")).lower() != "cpu"


def local_slots(points: Sequence[Point], gpus: Sequence[str], parallel: int, pin: bool = True) -> list[Slot]:
    """One slot per GPU when some point wants a GPU, plus ``parallel`` GPU-less slots when some point needs none."""
    need_gpu = bool(gpus) and any(wants_gpu(p) for p in points)
    need_cpu = not gpus or any(not wants_gpu(p) for p in points)
    slots = [Slot(str(g)) for g in gpus] if need_gpu else []
    slots += [Slot(None) for _ in range(parallel)] if need_cpu else []
    groups = cpu_groups(len(slots)) if pin and len(slots) > 1 else None
    if groups:
        slots = [dataclasses.replace(s, cpus=g) for s, g in zip(slots, groups)]
    return slots


# ---------------------------------------------------------------------------------------------------------------
# Executors: each yields (point, status) as points finish, and cancels what still runs when closed


def _inline(points, out_dir, command) -> Iterator[tuple[Point, str]]:
    for p in points:
        yield p, run_point(p, str(out_dir), command)


def _local(points, out_dir, command, slots, time_limit_min, poll_s) -> Iterator[tuple[Point, str]]:
    import submitit

    jobs_dir = Path(out_dir) / "jobs"
    executors = []
    for s in slots:
        ex = submitit.LocalExecutor(folder=jobs_dir)
        gpu = {"gpus_per_node": 1, "visible_gpus": (int(s.gpu),)} if s.gpu and s.gpu.isdigit() else {}
        ex.update_parameters(timeout_min=time_limit_min or LOCAL_TIME_LIMIT_MIN, **gpu)
        executors.append(ex)
    pending = {True: [p for p in points if wants_gpu(p) and any(s.gpu for s in slots)], False: []}
    pending[False] = [p for p in points if p not in pending[True]]
    free = list(range(len(slots)))
    running: dict[int, tuple[Any, Point]] = {}
    try:
        while pending[True] or pending[False] or running:
            for i in list(free):
                queue = pending[slots[i].gpu is not None]
                if queue:
                    p = queue.pop(0)
                    free.remove(i)
                    running[i] = (executors[i].submit(run_point, p, str(out_dir), command, slots[i].gpu,
                                                      slots[i].cpus), p)
            done = [i for i, (job, _) in running.items() if job.done()]
            for i in done:
                job, p = running.pop(i)
                free.append(i)
                yield p, _collect(job, p, out_dir)
            if not done:
                time.sleep(poll_s)
    finally:
        for job, _ in running.values():
            job.cancel(check=False)


def _slurm(points, out_dir, command, parameters, poll_s) -> Iterator[tuple[Point, str]]:
    import submitit

    ex = submitit.AutoExecutor(folder=Path(out_dir) / "jobs", cluster="slurm")
    ex.update_parameters(**parameters)
    n = len(points)
    jobs = ex.map_array(run_point, points, [str(out_dir)] * n, [command] * n)
    waiting = list(zip(jobs, points))
    try:
        while waiting:
            done = [(job, p) for job, p in waiting if job.done()]
            waiting = [w for w in waiting if w not in done]
            for job, p in done:
                yield p, _collect(job, p, out_dir)
            if not done:
                time.sleep(poll_s)
    finally:
        for job, _ in waiting:
            job.cancel(check=False)


def _collect(job, point: Point, out_dir) -> str:
    """A finished job's status; a job that died before writing either file gets an error file from here."""
    from .results import save_json

    deadline = time.time() + CRASH_GRACE_S
    while (status := point_status(out_dir, point.id)) is None and time.time() < deadline:
        time.sleep(0.5)
    if status is not None:
        return status
    state = "unknown"
    with contextlib.suppress(Exception):
        state = job.state
    log = ""
    with contextlib.suppress(Exception):
        log = (job.stderr() or "").strip()[-2000:]
    last = log.splitlines()[-1] if log else "no error output"
    save_json({"id": point.id, "kind": point.kind, "axes": point.axes, "args": point.args, "status": "error",
               "error": f"job {job.job_id} ended ({state}) without a result: {last}", "traceback": log,
               "job": {"job_id": str(job.job_id), "state": state, "stderr": str(job.paths.stderr)}},
              point_path(out_dir, point.id, error=True))
    return "error"


# ---------------------------------------------------------------------------------------------------------------
# Running a sweep


class SweepInterrupted(KeyboardInterrupt):
    """Ctrl-C during a sweep: the points finished so far are kept; running the sweep again does the rest."""

    def __init__(self, finished: int, total: int, out_dir: Path):
        super().__init__(f"{finished} of {total} points finished")
        self.finished, self.total, self.out_dir = finished, total, out_dir


@dataclass(frozen=True)
class SweepResult:
    """What one ``run_sweep`` call did: each point's status ('ok', 'error', or 'skipped': finished before)."""

    out_dir: Path
    spec: SweepSpec
    statuses: dict = field(default_factory=dict)  # point id -> status

    def count(self, status: str) -> int:
        return sum(s == status for s in self.statuses.values())

    @property
    def failed(self) -> list[str]:
        return [pid for pid, s in self.statuses.items() if s == "error"]

    def to_dataframe(self):
        return load_sweep(self.out_dir)

    def __repr__(self) -> str:
        return (f"SweepResult({self.spec.kind}, {len(self.statuses)} points in {self.out_dir}: {self.count('ok')} ran, "
                f"{self.count('skipped')} skipped, {self.count('error')} failed)")


def run_sweep(spec: SweepSpec, out_dir: str | os.PathLike, executor: str = "local", *,
              gpus: Sequence[str] | None = None, parallel: int = 1, pin_cpus: bool = True,
              slurm_partition: str | None = None, slurm_time_min: int = 60, gpus_per_job: int | None = None,
              cpus_per_job: int | None = None, array_parallelism: int | None = None,
              slurm_options: Mapping[str, Any] | None = None, time_limit_min: float | None = None,
              command: str | None = None, progress: bool = False,
              on_point: Callable[[Point, str], None] | None = None, poll_s: float = 0.5) -> SweepResult:
    """Run every point of ``spec`` not finished in ``out_dir`` yet; one result (or error) file per point.

    Every point is checked before any is submitted (ToolkitError). ``executor``:
    "local" (one process per point on this host: ``gpus`` default all visible,
    one point per GPU at a time; without GPUs ``parallel`` processes at a time;
    ``pin_cpus`` gives concurrent processes disjoint cores), "slurm" (one job
    array: ``slurm_partition``, ``slurm_time_min``, ``gpus_per_job`` default 1
    when the points use a GPU, ``cpus_per_job``, ``array_parallelism``, and
    any other submitit ``slurm_*`` parameter in ``slurm_options``, e.g.
    ``{"slurm_account": "abc"}``), or "inline" (in this process, one after the
    other). ``time_limit_min`` caps one local point. ``on_point(point, status)``
    is called as points finish; ``progress`` shows a tqdm bar on stderr.
    Ctrl-C cancels the running points and raises ``SweepInterrupted``.
    """
    if executor not in EXECUTORS:
        raise ToolkitError(f"unknown executor {executor!r}; choose one of: {', '.join(EXECUTORS)}")
    if isinstance(parallel, bool) or not isinstance(parallel, int) or parallel < 1:
        raise ToolkitError(f"parallel must be an integer >= 1, got {parallel!r}")
    points = spec.check()
    out = Path(out_dir).absolute()
    command = command or spec.command_line()
    todo = [p for p in points if point_status(out, p.id) != "ok"]
    if executor == "slurm" and todo:
        parameters = _slurm_parameters(spec, todo, slurm_partition, slurm_time_min, gpus_per_job, cpus_per_job,
                                       array_parallelism, slurm_options)
    from .results import save_json

    save_json({**spec.to_dict(), "points": [{"id": p.id, "axes": p.axes} for p in points], "command": command},
              out / "sweep.json")
    statuses = {p.id: "skipped" for p in points if p not in todo}
    for p in todo:
        point_path(out, p.id, error=True).unlink(missing_ok=True)  # a retried point starts clean
    if not todo:
        return SweepResult(out, spec, statuses)
    if executor == "inline":
        runs = _inline(todo, out, command)
    elif executor == "local":
        slots = local_slots(todo, visible_gpus() if gpus is None else [str(g) for g in gpus], parallel, pin_cpus)
        runs = _local(todo, out, command, slots, time_limit_min, poll_s)
    else:
        runs = _slurm(todo, out, command, parameters, poll_s)
    bar = _progress_bar(len(todo), spec.kind) if progress else None
    try:
        with contextlib.closing(runs):
            for p, status in runs:
                statuses[p.id] = status
                if on_point is not None:
                    on_point(p, status)
                if bar is not None:
                    bar.update(1)
                    bar.set_postfix_str(f"{sum(s == 'error' for s in statuses.values())} failed")
    except KeyboardInterrupt:
        finished = sum(point_status(out, p.id) == "ok" for p in points)
        raise SweepInterrupted(finished, len(points), out) from None
    finally:
        if bar is not None:
            bar.close()
    return SweepResult(out, spec, statuses)


def _progress_bar(total: int, kind: str):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=f"{kind} sweep", unit="point", file=sys.stderr)


def _slurm_parameters(spec, points, partition, time_min, gpus_per_job, cpus_per_job, array_parallelism,
                      options) -> dict:
    """submitit's AutoExecutor parameters, checked before anything is submitted."""
    missing = [c for c in ("sbatch", "srun", "sacct") if shutil.which(c) is None]
    if missing:
        raise ToolkitError(f"executor 'slurm' needs {', '.join(missing)} on PATH: run the sweep on a Slurm login "
                           f"node, or use --executor local")
    if gpus_per_job is None:
        gpus_per_job = 1 if any(wants_gpu(p) for p in points) else 0
    for name, v, least in (("slurm_time_min", time_min, 1), ("gpus_per_job", gpus_per_job, 0),
                           ("cpus_per_job", cpus_per_job, 1), ("array_parallelism", array_parallelism, 1)):
        if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < least):
            raise ToolkitError(f"{name} must be an integer >= {least}, got {v!r}")
    params: dict[str, Any] = {"name": f"toolkit-{spec.kind}", "timeout_min": time_min, "nodes": 1,
                              "tasks_per_node": 1}
    if gpus_per_job:
        params["gpus_per_node"] = gpus_per_job
    if cpus_per_job:
        params["cpus_per_task"] = cpus_per_job
    if partition:
        params["slurm_partition"] = partition
    if array_parallelism:
        params["slurm_array_parallelism"] = array_parallelism
    for k, v in (options or {}).items():
        params[k if k.startswith("slurm_") else f"slurm_{k}"] = v
    return params


# ---------------------------------------------------------------------------------------------------------------
# Reading a sweep back


def load_sweep(out_dir: str | os.PathLike):
    """One row per point: id, axis values, status ('ok', 'error', 'pending'), headline metrics, error, seconds.

    The points are those of the last ``run_sweep`` into ``out_dir`` (its
    ``sweep.json``), in grid order; without one, every point file there.
    ``frame.attrs`` holds kind, axes and fixed. A metric named like an axis
    gets a ``result_`` prefix.
    """
    import pandas as pd

    from .results import load_json

    out = Path(out_dir)
    meta = load_json(out / "sweep.json") if (out / "sweep.json").exists() else None
    if meta is not None:
        entries = [(e["id"], e.get("axes") or {}) for e in meta.get("points", [])]
    else:
        ids = sorted({f.name.removesuffix(".json").removesuffix(".error")
                      for f in (out / "points").glob("*.json")}) if (out / "points").is_dir() else []
        if not ids:
            raise ToolkitError(f"{out} holds no sweep (no sweep.json and no points/*.json)")
        entries = [(pid, None) for pid in ids]
    rows, axes_names = [], list((meta or {}).get("axes", {}))
    for pid, axes in entries:
        status = point_status(out, pid) or "pending"
        rec = load_json(point_path(out, pid, error=status == "error")) if status != "pending" else {}
        axes = rec.get("axes", {}) if axes is None else axes
        if meta is None:
            axes_names += [a for a in axes if a not in axes_names]
        row = {"id": pid, **axes, "status": status}
        for k, v in (rec.get("metrics") or {}).items():
            row[f"result_{k}" if k in axes or k in ("id", "status") else k] = v
        row.update(error=rec.get("error"), seconds=rec.get("seconds"), host=(rec.get("job") or {}).get("host"))
        rows.append(row)
    frame = pd.DataFrame(rows)
    frame.attrs.update(kind=(meta or {}).get("kind") or (_kind_of(out, rows) if rows else None), axes=axes_names,
                       fixed=(meta or {}).get("fixed", {}), out_dir=str(out))
    return frame


def _kind_of(out: Path, rows: list[dict]) -> str | None:
    from .results import load_json

    for r in rows:
        if r["status"] != "pending":
            return load_json(point_path(out, r["id"], error=r["status"] == "error")).get("kind")
    return None
