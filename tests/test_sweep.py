"""Sweeps (toolkit.sweep, `python -m toolkit sweep`): the grid, one file per point, the three executors, the frame.

The Slurm path runs against stand-in sbatch/srun/sacct/scancel scripts that run each array task on this
machine, so submitit's submission file, its array job ids and its sacct polling are really exercised.
"""

import json
import sys
from pathlib import Path

import pytest

import toolkit.sweep as sweep
from toolkit.__main__ import build_parser, main
from toolkit.errors import ToolkitError
from toolkit.sweep import SweepSpec, load_sweep, run_sweep

TINY_MOE = {"preset": "tiny-mixtral", "layers": 2, "prompt_tokens": 4, "new_tokens": 4, "warmup_tokens": 0,
            "device": "cpu"}


def cli(capsys, *args):
    try:
        rc = main(list(args))
    except SystemExit as e:  # argparse usage errors
        rc = e.code
    out = capsys.readouterr()
    return rc, out.out, out.err


@pytest.fixture
def bad_trace(tmp_path):
    """A trace file that exists (so the grid is accepted) but cannot be read (so its points fail when run)."""
    path = tmp_path / "corrupt.npz"
    path.write_bytes(b"not a zip file")
    return str(path)


# ------------------------------------------------------------------------------------------------ the grid


def test_grid_points_typed_values_and_stable_ids():
    spec = SweepSpec.from_strings("moe", ["preset=tiny-mixtral", "layers=2"],
                                  ["gpu-experts=0,8,auto", "policy=lru,static-popularity"])
    points = spec.check()
    assert [p.axes for p in points[:3]] == [{"gpu_experts": 0, "policy": "lru"},
                                            {"gpu_experts": 0, "policy": "static-popularity"},
                                            {"gpu_experts": 8, "policy": "lru"}]
    assert points[-1].axes == {"gpu_experts": "auto", "policy": "static-popularity"}
    assert points[0].args["layers"] == 2 and points[0].args["new_tokens"] == 32  # the command's default
    ids = [p.id for p in points]
    assert len(set(ids)) == 6 and ids[0].startswith("gpu_experts-0_policy-lru-")
    # stable: the digest is that of the arguments (fixed or on an axis); growing an axis keeps the old ids
    again = SweepSpec("moe", {"preset": "tiny-mixtral", "layers": 2, "policy": "lru"}, {"gpu_experts": [0, 8, 16]})
    assert again.points()[0].id == "gpu_experts-0-" + ids[0].rsplit("-", 1)[1]
    grown = SweepSpec.from_strings("moe", ["preset=tiny-mixtral", "layers=2"],
                                   ["gpu_experts=0,8,auto,16", "policy=lru,static-popularity"])
    assert set(ids) < {p.id for p in grown.points()}
    other = SweepSpec.from_strings("moe", ["preset=tiny-mixtral", "layers=2", "seed=1"], ["gpu_experts=0"])
    assert other.points()[0].id.split("-")[-1] != points[0].id.split("-")[-1]
    assert SweepSpec.from_dict(json.loads(json.dumps(spec.to_dict()))) == spec
    assert "--grid gpu_experts=0,8,auto" in spec.command_line()


@pytest.mark.parametrize("kind,fixed,grid,message", [
    ("moe", ["nope=1"], [], "unknown argument 'nope' for a moe sweep"),
    ("moe", ["layers=x"], [], "layers: expected int | None, got 'x'"),
    ("moe", ["layers=2"], ["layers=3"], "layers is given twice"),
    ("moe", ["layers=2"], ["gpu_experts=0,99"], "gpu_experts 99 is more than the model has"),
    ("moe", [], ["policy=lru,,lfu"], "empty value"),
    ("simulate", [], ["policy=lru,fifo"], "unknown policy 'fifo'"),
    ("simulate", ["trace=missing.npz"], [], "trace 'missing.npz' not found"),
    ("latency", ["model=nope"], [], "unknown model 'nope'"),
    ("latency", ["device=tpu"], [], "unknown device 'tpu'"),
    ("throughput", ["min_batch=8", "max_batch=4"], [], "batch bounds reversed"),
])
def test_bad_grid_is_refused_before_anything_runs(capsys, tmp_path, kind, fixed, grid, message):
    args = [a for f in fixed for a in ("--set", f)] + [a for g in grid for a in ("--grid", g)]
    rc, out, err = cli(capsys, "sweep", kind, *args, "--out", str(tmp_path / "s"), "--executor", "inline")
    assert rc == 2 and message in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "s").exists()


def test_cli_usage_errors(capsys, tmp_path):
    rc, _, err = cli(capsys, "sweep", "nosuchkind", "--out", str(tmp_path))
    assert rc == 2 and "invalid choice: 'nosuchkind'" in err and len(err.strip().splitlines()) == 1
    rc, _, err = cli(capsys, "sweep", "simulate", "--grid", "gpu_experts")
    assert rc == 2 and "expected NAME=VALUE" in err
    rc, _, err = cli(capsys, "sweep", "simulate", "--grid", "gpu_experts=0,64")
    assert rc == 2 and "--out DIR is required" in err
    with pytest.raises(ToolkitError, match="unknown executor 'ray'"):
        run_sweep(SweepSpec("simulate"), tmp_path / "s", executor="ray")


@pytest.mark.parametrize("kind,renamed", [
    ("latency", {"target_rel_ci": "target_ci"}),
    ("throughput", {}),
    ("moe", {"warmup_tokens": "warmup"}),
    ("simulate", {}),
])
def test_each_kind_has_the_commands_defaults(kind, renamed):
    cli_defaults = vars(build_parser().parse_args([kind]))
    params = sweep.get_kind(kind).params
    compared = [p.name for p in params if renamed.get(p.name, p.name) in cli_defaults]
    for p in params:
        if p.name in compared:
            assert p.default == cli_defaults[renamed.get(p.name, p.name)], p.name
    assert len(compared) >= min(len(params) - 2, 3), compared  # the comparison is not vacuous


# ------------------------------------------------------------------------------------------------ inline


def test_inline_failed_point_recorded_others_go_on_rerun_skips(tmp_path, bad_trace):
    spec = SweepSpec("simulate", axes={"trace": ["synthetic-mixtral", bad_trace], "gpu_experts": [0, 64]})
    seen = []
    result = run_sweep(spec, tmp_path, executor="inline", on_point=lambda p, s: seen.append((p.axes, s)))
    assert [s for _, s in seen] == ["ok", "ok", "error", "error"]
    assert result.count("ok") == 2 and len(result.failed) == 2
    points = spec.points()
    error = json.loads((tmp_path / "points" / f"{points[2].id}.error.json").read_text())
    assert error["status"] == "error" and "not a valid trace file" in error["error"] and error["traceback"]
    done = json.loads((tmp_path / "points" / f"{points[1].id}.json").read_text())
    assert done["metrics"]["hit_rate"] > 0 and done["result"]["gpu_experts"] == 64
    assert done["provenance"]["command"].startswith("python -m toolkit sweep simulate --grid trace=")
    assert done["provenance"]["torch"] and done["job"]["executor"] == "inline"

    # again: the finished points are skipped (files untouched), the failed ones run again
    stamp = (tmp_path / "points" / f"{points[1].id}.json").stat().st_mtime_ns
    seen.clear()
    again = run_sweep(spec, tmp_path, executor="inline", on_point=lambda p, s: seen.append((p.axes, s)))
    assert again.count("skipped") == 2 and [a["trace"] for a, _ in seen] == [bad_trace, bad_trace]
    assert (tmp_path / "points" / f"{points[1].id}.json").stat().st_mtime_ns == stamp

    frame = load_sweep(tmp_path)
    assert list(frame["status"]) == ["ok", "ok", "error", "error"]
    assert list(frame["gpu_experts"]) == [0, 64, 0, 64] and frame.attrs["axes"] == ["trace", "gpu_experts"]
    assert frame.loc[1, "hit_rate"] > frame.loc[0, "hit_rate"] == 0
    assert frame["error"].isna().tolist() == [True, True, False, False]
    assert {"hit_rate_decode", "expert_loads", "seconds"} <= set(frame.columns)


def test_inline_moe_and_latency(tmp_path):
    moe = SweepSpec("moe", fixed=TINY_MOE, axes={"gpu_experts": [0, 16]})
    run_sweep(moe, tmp_path / "moe", executor="inline")
    frame = load_sweep(tmp_path / "moe")
    assert list(frame["status"]) == ["ok", "ok"] and (frame["decode_tokens_per_s"] > 0).all()
    assert list(frame["gpu_experts_used"]) == [0, 16] and list(frame["hit_rate_decode"]) == [0.0, 1.0]
    record = json.loads(next((tmp_path / "moe" / "points").glob("gpu_experts-16-*.json")).read_text())
    assert record["result"]["settings"]["layers"] == 2 and record["result"]["new_tokens"] == 4

    lat = SweepSpec("latency", fixed={"model": "tiny-gpt2", "device": "cpu", "max_time_s": 0.05},
                    axes={"batch_size": [1, 2]})
    run_sweep(lat, tmp_path / "lat", executor="inline")
    frame = load_sweep(tmp_path / "lat")
    assert list(frame["status"]) == ["ok", "ok"] and (frame["median_ms"] > 0).all()
    assert (frame["ci95_low_ms"] <= frame["median_ms"]).all() and (frame["n_samples"] >= 10).all()


def test_interrupt_keeps_finished_points_and_says_how_many(capsys, tmp_path, monkeypatch):
    real = sweep.run_point
    calls = []

    def interrupted_second(point, *args, **kwargs):
        calls.append(point.id)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(point, *args, **kwargs)

    monkeypatch.setattr(sweep, "run_point", interrupted_second)
    rc, _, err = cli(capsys, "sweep", "simulate", "--grid", "gpu_experts=0,64,128", "--executor", "inline",
                     "--out", str(tmp_path))
    assert rc == 130 and "interrupted: 1 of 3 points finished" in err
    assert list(load_sweep(tmp_path)["status"]) == ["ok", "pending", "pending"]
    monkeypatch.setattr(sweep, "run_point", real)
    rc, out, _ = cli(capsys, "sweep", "simulate", "--grid", "gpu_experts=0,64,128", "--executor", "inline",
                     "--out", str(tmp_path), "--json")
    d = json.loads(out)
    assert rc == 0 and (d["ran"], d["skipped"], d["failed"]) == (2, 1, 0)
    assert [r["status"] for r in d["rows"]] == ["ok"] * 3


def test_sweep_figure(tmp_path):
    from matplotlib.figure import Figure

    from toolkit.plots import sweep_lines

    spec = SweepSpec("simulate", axes={"gpu_experts": [0, 64, 128], "policy": ["lru", "static-popularity"]})
    run_sweep(spec, tmp_path, executor="inline")
    frame = load_sweep(tmp_path)
    fig = sweep_lines(frame, "gpu_experts", "hit_rate", hue="policy")
    assert isinstance(fig, Figure) and len(fig.axes[0].get_lines()) == 2
    assert list(fig.axes[0].get_lines()[0].get_xdata()) == [0, 64, 128]
    assert len(sweep_lines(frame, "gpu_experts", "hit_rate", where={"policy": "lru"}).axes[0].get_lines()) == 1
    with pytest.raises(ToolkitError, match="axes policy also vary"):
        sweep_lines(frame, "gpu_experts", "hit_rate")


def test_example_spec_is_a_quick_tiny_grid():
    spec = sweep.example_spec()
    points = spec.check()
    assert len(points) == 8 and spec.fixed["preset"] == "tiny-mixtral" and spec.fixed["layers"] == 2
    assert sweep.example_spec(smoke=False).fixed["preset"] == "mixtral-8x7b"


# ------------------------------------------------------------------------------------------------ local processes


def test_local_one_point_per_gpu_with_its_own_cores(tmp_path, monkeypatch):
    # two stand-in GPU ids; simulator points (quick to start) are scheduled as if they wanted a GPU
    monkeypatch.setattr(sweep, "wants_gpu", lambda point: True)
    spec = SweepSpec("simulate", axes={"gpu_experts": [0, 64, 128]})
    result = run_sweep(spec, tmp_path, executor="local", gpus=["0", "1"], poll_s=0.1)
    assert result.count("ok") == 3, load_sweep(tmp_path)["error"].tolist()
    jobs = [json.loads((tmp_path / "points" / f"{p.id}.json").read_text()) for p in spec.points()]
    by_gpu = {}
    for j in jobs:
        assert j["job"]["executor"] == "local" and j["job"]["job_id"]
        by_gpu.setdefault(j["job"]["cuda_visible_devices"], []).append((j["started"], j["finished"]))
    assert set(by_gpu) == {"0", "1"}
    for spans in by_gpu.values():  # never two points on one GPU at a time
        spans.sort()
        assert all(end <= start for (_, end), (start, _) in zip(spans, spans[1:]))
    cpus = {j["job"]["cuda_visible_devices"]: j["job"]["cpus"] for j in jobs}
    if sweep.cpu_groups(2):
        assert not set(cpus["0"]) & set(cpus["1"])
    assert (tmp_path / "jobs").is_dir() and list((tmp_path / "jobs").glob("*_log.err"))


def test_local_cpu_processes_and_a_failing_point(tmp_path, bad_trace):
    spec = SweepSpec("simulate", axes={"trace": ["synthetic-mixtral", bad_trace]})
    result = run_sweep(spec, tmp_path, executor="local", gpus=[], parallel=2, poll_s=0.1)
    frame = load_sweep(tmp_path)
    assert result.count("ok") == 1 and list(frame["status"]) == ["ok", "error"]
    assert "not a valid trace file" in frame.loc[1, "error"] and frame.loc[0, "hit_rate"] > 0
    record = json.loads((tmp_path / "points" / f"{spec.points()[0].id}.json").read_text())
    assert record["job"]["cuda_visible_devices"] == ""  # a GPU-less slot hides the GPUs


def test_local_moe_point(tmp_path):
    spec = SweepSpec("moe", fixed=TINY_MOE, axes={"gpu_experts": [8]})
    assert run_sweep(spec, tmp_path, executor="local", poll_s=0.1).count("ok") == 1
    frame = load_sweep(tmp_path)
    assert frame.loc[0, "gpu_experts_used"] == 8 and 0 < frame.loc[0, "hit_rate_decode"] < 1


# ------------------------------------------------------------------------------------------------ Slurm, stood in

SBATCH = r'''
import os, re, subprocess, sys
from pathlib import Path
state = Path(os.environ["FAKE_SLURM_DIR"])
script = Path(sys.argv[-1])
text = script.read_text()
m = re.search(r"^#SBATCH --array=0-(\d+)%(\d+)$", text, re.M)
jid = int((state / "next_id").read_text())
(state / "next_id").write_text(str(jid + 1))
(state / f"{jid}.sbatch").write_text(text)
tasks = [f"{jid}_{i}" for i in range(int(m[1]) + 1)] if m else [str(jid)]
for t in tasks:
    (state / f"{t}.state").write_text("PENDING")
subprocess.Popen([sys.executable, str(state / "runner.py"), str(script), m[2] if m else "1", *tasks],
                 start_new_session=True, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
print(f"Submitted batch job {jid}")
'''

RUNNER = r'''
import os, subprocess, sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
state = Path(os.environ["FAKE_SLURM_DIR"])
script, parallel, tasks = sys.argv[1], int(sys.argv[2]), sys.argv[3:]
crash = os.environ.get("FAKE_SLURM_CRASH", "").split(",")

def run(task):
    f = state / f"{task}.state"
    if f.read_text() == "CANCELLED":
        return
    f.write_text("RUNNING")
    array, _, index = task.partition("_")
    env = dict(os.environ, SLURM_JOB_ID=str(int(array) * 1000 + int(index)) if index else array, SLURM_NTASKS="1",
               SLURM_JOB_NUM_NODES="1", SLURM_NODEID="0", SLURM_PROCID="0", SLURM_LOCALID="0",
               SLURM_JOB_NODELIST="fakenode")
    if index:
        env.update(SLURM_ARRAY_JOB_ID=array, SLURM_ARRAY_TASK_ID=index)
    if task in crash:  # the node dies: no result, no point file
        f.write_text("NODE_FAIL")
        return
    rc = subprocess.run(["bash", script], env=env).returncode
    if f.read_text() == "RUNNING":
        f.write_text("COMPLETED" if rc == 0 else "FAILED")

with ThreadPoolExecutor(parallel) as pool:
    list(pool.map(run, tasks))
'''

SRUN = r'''
import os, subprocess, sys
args, files = sys.argv[1:], {}
while args and args[0].startswith("--"):
    flag = args.pop(0)
    if flag in ("--output", "--error"):
        value = args.pop(0)
        for k, v in (("%A", os.environ.get("SLURM_ARRAY_JOB_ID", "")), ("%a", os.environ.get("SLURM_ARRAY_TASK_ID", "")),
                     ("%j", os.environ["SLURM_JOB_ID"]), ("%t", "0")):
            value = value.replace(k, v)
        files[flag] = value
with open(files["--output"], "a") as o, open(files.get("--error", files["--output"]), "a") as e:
    sys.exit(subprocess.run(args, stdout=o, stderr=e).returncode)
'''

SACCT = r'''
import os, sys
from pathlib import Path
state = Path(os.environ["FAKE_SLURM_DIR"])
with open(state / "sacct.calls", "a") as f:
    f.write(" ".join(sys.argv[1:]) + "\n")
print("JobID|State|NodeList")
for jid in [sys.argv[i + 1] for i, a in enumerate(sys.argv) if a == "-j"]:
    for f in sorted(state.glob(f"{jid}*.state")):
        name = f.name.removesuffix(".state")
        if name == jid or name.startswith(jid + "_"):
            print(f"{name}|{f.read_text()}|fakenode")
'''

SCANCEL = r'''
import os, sys
from pathlib import Path
for jid in sys.argv[1:]:
    f = Path(os.environ["FAKE_SLURM_DIR"]) / f"{jid}.state"
    if f.exists() and f.read_text() in ("PENDING", "RUNNING"):
        f.write_text("CANCELLED")
'''


@pytest.fixture
def fake_slurm(tmp_path, monkeypatch):
    """sbatch/srun/sacct/scancel stand-ins first on PATH; their state (job ids, task states, calls) in a folder."""
    bin_dir, state = tmp_path / "bin", tmp_path / "slurm"
    bin_dir.mkdir()
    state.mkdir()
    (state / "next_id").write_text("7100")  # ids unseen by submitit's process-wide sacct cache
    (state / "runner.py").write_text(RUNNER)
    for name, body in (("sbatch", SBATCH), ("srun", SRUN), ("sacct", SACCT), ("scancel", SCANCEL)):
        (bin_dir / name).write_text(f"#!{sys.executable}\n{body}")
        (bin_dir / name).chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}:{Path(sys.executable).parent}:/usr/bin:/bin")
    monkeypatch.setenv("FAKE_SLURM_DIR", str(state))
    monkeypatch.setattr(sweep, "CRASH_GRACE_S", 0.5)
    return state


def test_slurm_job_array_through_submitit(capsys, tmp_path, fake_slurm, monkeypatch):
    monkeypatch.setenv("FAKE_SLURM_CRASH", "7100_1")  # the second task's node dies
    spec = SweepSpec("simulate", axes={"gpu_experts": [0, 64, 128]})
    out = tmp_path / "out"
    result = run_sweep(spec, out, executor="slurm", slurm_partition="debug", slurm_time_min=7,
                       array_parallelism=2, slurm_options={"account": "lab"}, poll_s=0.1)
    assert (result.count("ok"), result.count("error")) == (2, 1)
    sbatch = (fake_slurm / "7100.sbatch").read_text()
    for line in ("#SBATCH --array=0-2%2", "#SBATCH --partition=debug", "#SBATCH --time=7", "#SBATCH --account=lab",
                 "#SBATCH --job-name=toolkit-simulate", "-m submitit.core._submit"):
        assert line in sbatch
    assert "--gpus-per-node" not in sbatch  # the simulator needs no GPU
    assert "-o JobID,State,NodeList --parsable2 -j 7100" in (fake_slurm / "sacct.calls").read_text()
    frame = load_sweep(out)
    assert list(frame["status"]) == ["ok", "error", "ok"]
    assert "job 7100_1 ended (NODE_FAIL) without a result" in frame.loc[1, "error"]
    record = json.loads((out / "points" / f"{spec.points()[2].id}.json").read_text())
    assert record["job"]["executor"] == "slurm" and record["job"]["job_id"] == "7100_2"
    assert (out / "jobs" / "7100_0_0_log.out").exists()

    # again from the command line, the node healthy: only the failed point is submitted (one job, not an array)
    monkeypatch.delenv("FAKE_SLURM_CRASH")
    rc, stdout, _ = cli(capsys, "sweep", "simulate", "--grid", "gpu_experts=0,64,128", "--out", str(out),
                        "--executor", "slurm", "--gpus-per-job", "1", "--slurm-param", "exclusive=true",
                        "--slurm-setup", "export TOOLKIT_SETUP_RAN=1", "--json")
    d = json.loads(stdout)
    assert rc == 0 and (d["skipped"], d["ran"], d["failed"]) == (2, 1, 0)
    single = (fake_slurm / "7101.sbatch").read_text()
    assert "--array" not in single and "#SBATCH --gpus-per-node=1" in single and "#SBATCH --exclusive\n" in single
    assert "export TOOLKIT_SETUP_RAN=1" in single
    assert [r["status"] for r in d["rows"]] == ["ok"] * 3


def test_slurm_without_slurm_is_refused_before_submitting(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(ToolkitError, match="executor 'slurm' needs sbatch, srun, sacct on PATH"):
        run_sweep(SweepSpec("simulate"), tmp_path / "s", executor="slurm")
    assert not (tmp_path / "s").exists()
