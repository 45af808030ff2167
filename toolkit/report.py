"""The main job: run the default experiments on this machine, save results and figures, write a summary.

``run_report(out, device)`` runs the experiments of ``toolkit.experiments``
in order (timing, batch, moe, simulation) with the ``toolkit.settings``
preset for the device. Each experiment saves ``OUT/<name>.json`` as it goes
(partial results while it runs, with ``"complete": false``) so an interrupted
run keeps what it measured; its figures go to ``OUT/figures/*.{png,pdf}``
right after it. ``summary.md`` embeds the figures and the headline numbers,
and lists the recorded GPU results found in ``data/gpu/`` (labelled with their
device and date). A failing experiment is recorded in the summary and the
others still run.
"""

from __future__ import annotations

import os
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from . import plots
from .errors import ToolkitError
from .experiments import EXPERIMENTS, ExperimentResult
from .formatting import fmt, pct
from .interrupts import caused_by_interrupt
from .recorded import recorded_complete, recorded_date, recorded_device, recorded_results
from .results import atomic_write, check_writable, save_json
from .settings import Settings, settings_for


@dataclass
class Run:
    """State of one report run: where things go, what was saved, what failed."""

    out: Path
    device: str
    settings: Settings
    progress: bool = True
    command: str | None = None
    results: dict = field(default_factory=dict)  # experiment -> saved record
    figures: list = field(default_factory=list)  # (experiment, stem, caption)
    errors: dict = field(default_factory=dict)  # experiment -> one-line error
    seconds: dict = field(default_factory=dict)

    def save(self, name: str, record: dict) -> None:
        """Keep ``record`` as experiment ``name``'s result and write it to ``OUT/<name>.json``."""
        self.results[name] = record
        save_json(record, self.out / f"{name}.json")

    def figure(self, experiment: str, fig, stem: str, caption: str) -> None:
        """Save ``fig`` as ``OUT/figures/<stem>.{pdf,png}``; the summary shows it under ``experiment``."""
        plots.save(fig, self.out / "figures" / stem)
        self.figures.append((experiment, stem, caption))

    def keep(self, result: ExperimentResult) -> None:
        """Save an experiment's final record and every figure."""
        self.save(result.name, result.record)
        for f in result.figures:
            self.figure(result.name, f.figure, f.stem, f.caption)

    def bar(self, **kw):
        from tqdm.auto import tqdm

        return tqdm(disable=not self.progress, leave=False, **kw)


def run_experiment(run: Run, name: str) -> None:
    """One experiment of ``EXPERIMENTS``, its partial records saved as they come, its result kept."""
    result = EXPERIMENTS[name](run.settings, run.device, progress=run.progress, command=run.command,
                               on_update=lambda record: run.save(name, record))
    run.keep(result)


def run_report(out: str | os.PathLike = "report", device: str = "auto", quick: bool = False,
               experiments: list[str] | None = None, progress: bool = True, recorded: str | os.PathLike | None = None,
               settings: Settings | None = None, command: str | None = None) -> Run:
    """Run the default experiments, save JSON and figures under ``out``, write ``out/summary.md``.

    ``recorded``: the folder of recorded GPU results to list (default
    ``data/gpu``). An experiment that fails is recorded (``run.errors``) and the
    others still run; Ctrl-C stops the run after writing the summary of what
    was measured.
    """
    from .env import resolve_device

    names = list(EXPERIMENTS) if experiments is None else list(experiments)
    if not names:
        raise ToolkitError(f"no experiment named; choose from {', '.join(EXPERIMENTS)} (or None for all)")
    unknown = [n for n in names if n not in EXPERIMENTS]
    if unknown:
        raise ToolkitError(f"unknown experiment(s) {', '.join(unknown)}; choose from {', '.join(EXPERIMENTS)}")
    check_writable(out, "report folder", folder=True)  # before minutes of measuring, not after
    device = resolve_device(device)
    run = Run(Path(out), device, settings or settings_for(device, quick), progress, command)
    try:
        run.out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ToolkitError(f"cannot make the report folder {run.out}: {e.strerror or e}") from None
    try:
        for name in run.bar(iterable=names, desc="report", unit="experiment"):
            t0 = time.perf_counter()
            try:
                run_experiment(run, name)
            except Exception as e:  # keep going: one broken experiment should not lose the others
                if caused_by_interrupt(e):  # Ctrl-C inside compiled code: stop, do not record a failure
                    raise KeyboardInterrupt from None
                run.errors[name] = f"{type(e).__name__}: {e}".splitlines()[0][:300]
                with atomic_write(run.out / f"{name}.error.txt") as f:
                    f.write(traceback.format_exc())
            finally:
                run.seconds[name] = time.perf_counter() - t0
    finally:  # also on Ctrl-C: the summary of what was measured
        write_summary(run, recorded_results(recorded))
    return run


# ---------------------------------------------------------------- the summary


def _table(rows: list[dict]) -> list[str]:
    if not rows:
        return []
    cols = list(rows[0])
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(str(r.get(c, "")) for c in cols) + " |" for r in rows]
    return lines + [""]


def headlines(run: Run) -> dict[str, list[str]]:
    """One or two sentences and a small table per experiment, from the saved records (partial ones too)."""
    out: dict[str, list[str]] = {}
    for name, fn in (("timing", _timing_lines), ("batch", _batch_lines), ("moe", _moe_lines),
                     ("simulation", _simulation_lines)):
        rec = run.results.get(name)
        try:
            lines = fn(rec) if rec else []
        except (KeyError, TypeError, ValueError, IndexError):  # a partial record: no headline yet
            lines = []
        if lines:
            out[name] = lines
    return out


def _timing_lines(t: dict) -> list[str]:
    lat = t["latency"]
    lo, hi = lat["ci95_ms"]
    lines = [f"**{t['model']}**, batch 1: median **{fmt(lat['median_ms'])} ms** (95% CI {fmt(lo)}-{fmt(hi)}"
             f" ms, {lat['n_samples']} samples, p99 {fmt(lat['p99_ms'])} ms); warm-up took "
             f"{lat['warmup']['count']} calls, the first {fmt(lat['warmup']['first_call_ms'])} ms.", ""]
    warned = list(dict.fromkeys([*(lat.get("warnings") or []), *(t.get("audit_warnings") or [])]))
    lines += [f"> **warning:** {w}" for w in warned] + ([""] if warned else [])
    def error(r) -> str:
        if r["relative_error"] is None and "not applicable" in str(r.get("note") or ""):
            return str(r["note"])  # GPU-only mistakes on a CPU
        return pct(r["relative_error"]) + (" (unreliable)" if r.get("reliable") is False else "")

    return lines + _table([{"mistake": plots.PITFALL_LABELS.get(r["pitfall"], r["pitfall"]),
                            "naive (ms)": fmt(r["naive_ms"]), "correct (ms)": fmt(r["correct_ms"]),
                            "error": error(r)} for r in t["audit"]])


def _batch_lines(b: dict) -> list[str]:
    o, srch = b["optimal"], b["search"]
    bound = " (search bound)" if srch.get("bounded") else ""
    return [f"**{b['model']}**: largest batch that fits **{srch['max_batch_size']}**{bound} "
            f"({len(srch['probes'])} probes); optimal batch **{o['optimal_batch_size']}** at "
            f"{fmt(o['optimal_samples_per_s'], ',.0f')} samples/s; the largest batch reaches "
            f"{fmt(100 * o['largest_vs_best'], '.0f')}% of the best throughput.", ""]


def _moe_lines(m: dict) -> list[str]:
    lines = [f"**{m['preset']}** ({m['layers']} layers x {m['experts_per_layer']} experts, routing: "
             f"{m['routing']}), {m['settings']['moe_policy']} placement:", ""]
    if not str((m.get("provenance") or {}).get("device") or "").startswith("cuda"):
        lines[0] += (" (on a CPU both tiers live in host memory: the sweep shows the engine's mechanics and hit "
                     "rates, not GPU speed-ups)")
    lines += _table([{"GPU experts": f"{r['gpu_experts']} / {m['total_experts']}",
                      "decode tok/s": fmt(r["decode_tokens_per_s"]),
                      "prefill (ms)": fmt(r["prefill_ms"]),
                      "decode median (ms)": fmt(r["decode_ms"]["median"]),
                      "decode hit rate": fmt((r.get("hit_rate") or {}).get("decode"), ".3f"),
                      "warnings": len(r.get("warnings") or ()) or ""}
                     for r in m["runs"]])
    warned = [(r["gpu_experts"], w) for r in m["runs"] for w in r.get("warnings") or ()]
    lines += [f"> **warning** ({k} GPU experts): {w}" for k, w in warned] + ([""] if warned else [])
    if m.get("profile"):
        lines += [f"Profiled decode step ({m['profile']['gpu_experts']} GPU experts): verdict "
                  f"**{m['profile']['verdict']}**.", ""]
    return lines


def _simulation_lines(sim: dict) -> list[str]:
    df = pd.DataFrame([{"policy": r["policy"], "gpu_experts": r["gpu_experts"],
                        "hit": r["hit_rate"]["decode"]} for r in sim["results"]])
    pivot = df.pivot(index="policy", columns="gpu_experts", values="hit")
    rows = [{"policy": p, **{f"{c} GPU": fmt(v, ".3f") for c, v in row.items()}} for p, row in pivot.iterrows()]
    return [f"Decode hit rate on the synthetic Mixtral-8x7B trace ({sim['trace']['tokens']} tokens):",
            "", *_table(rows)]


TITLES = {"timing": "Timing and the classic mistakes", "batch": "Batch size and throughput",
          "moe": "MoE offloading", "simulation": "Hit-rate simulation"}


def _recorded_lines(recorded: dict[str, dict]) -> list[str]:
    if not recorded:
        return ["No recorded GPU results were found in `data/gpu/`; `bash benchmarks/run_gpu.sh` on a GPU "
                "machine records them.", ""]
    rows = [{"result": f"`data/gpu/{name}.json`", "device": fmt(recorded_device(doc), "s"),
             "date": fmt(recorded_date(doc), "s"), "complete": "yes" if recorded_complete(doc) else "no"}
            for name, doc in recorded.items()]
    return ["Recorded on a GPU machine (notebook `04_paper_figures` draws their figures):", "", *_table(rows)]


def write_summary(run: Run, recorded: dict[str, dict] | None = None) -> Path:
    """Write ``summary.md``: environment, headline numbers, every figure, errors, recorded GPU results."""
    from .env import environment

    env = environment(run.device)
    heads = headlines(run)
    lines = ["# toolkit report", "",
             f"{env['timestamp']} on `{env['host']}`: {env.get('gpu') or env['cpu_model']} "
             f"({run.device}; {env['cpu_physical_cores']} CPU cores, {env['cpu_threads']} threads), "
             f"torch {env['torch']}, transformers {env['transformers']}.", "",
             f"Command: `{run.command or 'python -m toolkit report'}`", ""]
    done = [n for n in EXPERIMENTS if n in run.results or n in run.errors]
    for name in done:
        lines += [f"## {TITLES.get(name, name)}", ""]
        if name in run.errors:
            lines += [f"**Failed:** `{run.errors[name]}` (traceback in `{name}.error.txt`).", ""]
        elif not run.results[name].get("complete"):
            lines += ["**Incomplete** (interrupted): partial results below.", ""]
        lines += heads.get(name, [])
        for exp, stem, caption in run.figures:
            if exp == name:
                lines += [f"![{stem}](figures/{stem}.png)", "", f"*{caption}* ([PDF](figures/{stem}.pdf))", ""]
        seconds = f", {run.seconds[name]:.0f} s." if name in run.seconds else "."
        lines += [f"Data: [`{name}.json`]({name}.json){seconds}", ""]
    missing = [n for n in EXPERIMENTS if n not in done]
    if missing:
        lines += [f"Not run: {', '.join(missing)}.", ""]
    lines += ["## Recorded GPU results", "", *_recorded_lines(recorded or {})]
    path = run.out / "summary.md"
    with atomic_write(path) as f:
        f.write("\n".join(lines))
    return path


__all__ = ["Run", "run_experiment", "run_report", "headlines", "write_summary", "TITLES"]
