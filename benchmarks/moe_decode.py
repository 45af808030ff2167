"""MoE offload speed: our engine against the peer schemes on Mixtral-8x7B dimensions, with the roofline.

One device call (hard budget ``--budget-s``, default 450 s including the model build), saving
OUT/moe_decode.json after every measurement so an interruption keeps what was measured:

1. build ``mixtral-8x7b`` x 8 layers in bf16 (experts in pinned host memory) through
   ``toolkit.moe.run.MoESession``, the path ``python -m toolkit moe`` takes, with its defaults; the
   session calibrates the cost model as the CLI's does (after the build, the per-machine cache; a copy
   is saved next to the results) and the benchmark measures the ceilings (GPU read, host read with the
   CPU threads, pinned H2D);
2. two routings, replayed identically for every scheme (the router restarts before each run):
   ``uniform`` (``MoESettings(routing="uniform")``: each token picks 2 distinct experts uniformly at
   random, seeded) and ``trace`` (``routing="synthetic-mixtral"``: real Mixtral popularity and
   locality; placement from the trace's routing counts, as Fiddler profiles offline);
3. configurations, in three groups: at the 22% budget (14 of 64 experts) every scheme of
   ``toolkit.moe.baselines`` and ``hf-eager`` (transformers' eager ``generate`` on the unmodified model,
   every expert on the GPU, the same routing replayed: ``session.run_unmodified``) under both routings
   (``compare``); a budget sweep of ours (0, 8, 24, 32, 48, 64; ``sweep``; with ``--quick`` only the
   ends, under the trace); ours with its schedule fixed rather than measured: no split (``ours-nosplit``,
   the worker thread on a GPU) and inline, no worker thread (``ours-inline``); ours and all-gpu with the
   dense part of decode steps eager instead of replayed from CUDA graphs (``ours-eager``, its schedule the
   engine's default; ``all-gpu-eager``); ours without the next layer's copies started during a prefill
   layer (``ours-nolookahead``); ours planning each layer with the CPU experts' and copies' speeds
   alone instead of the calibrated contention between them (``ours-nocontention``); ours with its CPU
   experts on torch's matmul instead of the calibrated few-token kernel (``ours-torchgemv``); all-gpu with its
   experts through the per-expert path and its routing sync instead of the sync-free grouped GEMMs
   (``all-gpu-sync``); all-gpu with a graph per layer part and the router eager between them instead of
   each decode step replayed as one graph of every layer (``all-gpu-layers``); all-gpu with torch's small
   ops (RMSNorms, the experts' activation, weighting, sum and counts) instead of the fused Triton kernels
   (``all-gpu-unfused``); ours with its missed experts served layer by layer from Python instead of its
   one-token decode passes captured whole (``ours-per-layer``, ``toolkit.moe.graph_pass``); and ours with the engine's
   default schedule (``ours-default``), which differs from each ours variant by that variant's one
   switch and alternates with them (``ablation``);
4. each configuration is measured ``--rounds`` times (default 3), round-robin within its group (round
   1 of every configuration, then round 2, ...), so a slow spell of the machine hits all alike. A round
   is ``session.run`` for batch-1 decode of 64 tokens after a 16-token prompt (copy-on-demand: 16),
   a 512-token prefill (``session.measure_prefill``), and beam width 4 (compare: ours, fiddler-serial,
   all-gpu, hf-eager); each ``session.run`` warms up until decode steps are steady and replays the routing.
   Round 1 also checks the logits against all-gpu (``session.probe_logits``), and both against the
   unmodified model computed in float32 (``session.probe_exact``, bf16 models: is a run as close to the
   exact result as all-gpu is, ``check.exact``). Per run the roofline
   bound from the experts the run really read, and measured / bound;
   the host's ceiling is measured again before each group and after every round (``costs.HostPaths``:
   both paths at once and a plain read, as the calibration measured them, ~0.5 s; on the lent hosts it
   moved by 10-22 GB/s between calibrations minutes apart), each round's bounds are taken again at the
   mean of the measurements just before and after it (``bound_beside``, ``measured_over_bound_beside``)
   and the targets judge decode and prefill at that ceiling; ``host_ceiling.probes`` holds every
   measurement;
5. the schedule of ours (worker thread or inline, split or not) is chosen by ``session.run`` as in the
   CLI: round 1 measures the candidates during its warm-up (``toolkit.moe.schedule``), later rounds,
   its prefill and its beam run the schedule round 1 picked. Each configuration's record holds round
   1's ``schedule`` (picked, the candidates' ms per step) and each round's decode the schedule it ran;
6. a scheme that copies from pageable memory clones the experts it copies in host memory: it is
   skipped, with the numbers in its record, when host memory cannot hold a clone of every expert.

``--full-model``: Mixtral-8x7B with all 32 layers, 56 of 256 experts on the GPU (``--budget
56/256``), decode only (the compare group under the trace routing, 32 tokens), written to
OUT/moe_decode_full.json. The experts take ~90 GB of pinned host memory: the host memory is checked
before building, and a host without it gets a record saying so (status "skipped") instead of a run.

A configuration's record holds its median round (decode tokens/s decides which) and, per measure,
the rounds' median, min, max and spread (ratios between schemes, and the table's prefill ms and beam
steps/s, take each measure's own median); ``"anomalous": true`` (with ``anomaly_reason``) when the
rounds disagree by more than 10% of their median, so figures can leave it out.

Prints a table and whether each target is met (ratios from this one run).

  PYTHONPATH=. python benchmarks/moe_decode.py --out data/gpu                    # GPU
  PYTHONPATH=. python benchmarks/moe_decode.py --full-model --out data/gpu       # GPU, all 32 layers
  PYTHONPATH=. python benchmarks/moe_decode.py --quick --device cpu --out /tmp/x  # CPU smoke test, ~30 s
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import math
import statistics
import sys
import time
from pathlib import Path

import torch

from toolkit.env import resolve_device
from toolkit.errors import ToolkitError
from toolkit.moe import roofline as R
from toolkit.moe.baselines import Baseline, get_baseline
from toolkit.moe.costs import HostPaths, save_cost_model
from toolkit.moe.memory import check_host_memory, host_memory_needed
from toolkit.moe.presets import from_name
from toolkit.moe.run import ANOMALY_SPREAD, MoESession, MoESettings, check_word, logits_check, summarize_rounds
from toolkit.moe.run import BENCHMARK_ROUTINGS as ROUTINGS  # record label -> MoESettings.routing
from toolkit.moe.schedule import SCHEDULED_SCHEMES
from toolkit.results import RunRecord, provenance

BUDGET_S = 450.0
# share of the roofline bound each phase should reach (bound / measured): decode at batch 1, the full model's
# decode, and a 512-token prefill
DECODE_OF_BOUND, FULL_MODEL_DECODE_OF_BOUND, PREFILL_OF_BOUND = 0.9, 0.85, 0.85
SCHEMES = ("all-gpu", "hf-eager", "ours", "fiddler-serial", "lru-copy", "copy-on-demand")  # most important first
BEAM_SCHEMES = ("all-gpu", "hf-eager", "ours", "fiddler-serial")
# transformers' eager generate on the unmodified model, every expert on the GPU (session.run_unmodified); the
# Baseline only names and places it: it runs no engine
HF_EAGER = Baseline("hf-eager", "transformers eager generate on the unmodified model, every expert on the GPU",
                    "all", "makespan")
# --full-model: Mixtral-8x7B whole, 56 of its 256 experts on the GPU, decode only
FULL_MODEL = {"preset": "mixtral-8x7b", "layers": 32, "budget": "56/256", "new_tokens": 32, "groups": "compare",
              "routings": "trace"}
# "ours-default": ours with the engine's default schedule (a variant's schedule is not measured either), so that
# each variant alternates in its group with a reference that differs from it by its one switch
ABLATIONS = ("ours-default", "ours-per-layer", "ours-nosplit", "ours-inline", "ours-eager", "ours-nolookahead", "ours-nocontention",
             "ours-torchgemv", "all-gpu-eager", "all-gpu-sync", "all-gpu-layers", "all-gpu-unfused")
GROUPS = ("compare", "sweep", "ablation")
# seconds one round of a configuration may take on the GPU (conservative): skipped when less than this is left;
# later rounds use the configuration's own first round instead. Round 1 of ours measures its candidate schedules.
EST_S = {"all-gpu": 15, "hf-eager": 15, "ours": 60, "fiddler-serial": 40, "lru-copy": 20, "copy-on-demand": 45,
         "sweep": 40, "ablation": 15}


@dataclasses.dataclass
class Config:
    """One measured configuration: a scheme at a budget under a routing, and what to measure."""

    kind: str  # compare | sweep | ablation
    scheme: object  # toolkit.moe.baselines.Baseline
    routing: str  # record label: uniform | trace
    budget: int
    est_s: float
    beam: bool = False
    schedule: str | None = None  # ours: the schedule round 1 picked, run by later rounds (None: choose it)

    @property
    def label(self) -> str:
        return f"{self.kind} {self.scheme.name} {self.routing} k={self.budget}"


class Bench:
    """The fixed parts of every measurement: one session per routing on one model, the ceilings, the args."""

    def __init__(self, sessions: dict, ceilings, args, paths=None, probes: list | None = None, clock=None):
        self.sessions, self.ceilings, self.args = sessions, ceilings, args
        first = next(iter(sessions.values()))
        self.preset, self.model, self.cuda = first.preset, first.model, first.device.startswith("cuda")
        sizes = R.ModelBytes.of(first)
        self.expert_bytes, self.dense = sizes.expert_bytes, sizes.dense
        self.paths = paths  # HostPaths: the host's ceiling measured again between rounds (None: not measured)
        self.probes = probes if probes is not None else []  # every measurement of it, in order
        self.clock = clock or time.perf_counter
        self.exact_probes = {}  # routing -> the float32 logits probe (``exact``), None where it could not be made
        self.exact_why_not = {}  # routing -> why not

    def host_ceiling_now(self, after: str) -> dict | None:
        """The host's ceiling measured now (``HostPaths.measure``), recorded in ``probes`` with what it follows;
        None without a probe."""
        if self.paths is None:
            return None
        t = self.clock()
        probe = {"after": after, **self.paths.measure()}
        probe["seconds"] = self.clock() - t
        self.probes.append(probe)
        return probe

    def exact(self, session, routing: str):
        """The logits probe of the unmodified model computed in float32 (``session.probe_exact``), once per routing;
        None for a float32 model (it would be the reference itself)."""
        import torch

        if self.preset.dtype == torch.float32:
            return None
        if routing not in self.exact_probes:
            try:
                self.exact_probes[routing] = session.probe_exact()
            except (ToolkitError, torch.OutOfMemoryError) as e:  # the unmodified model does not fit: no reference
                self.exact_probes[routing], self.exact_why_not[routing] = None, str(e).splitlines()[0]
        return self.exact_probes[routing]

    def decode(self, session, cfg: Config, tokens: int, beams: int = 1) -> dict:
        """``session.run``: warm-up, then batch-1 generation of ``tokens`` (beam width ``beams``); timings and the bound.

        hf-eager: ``session.run_unmodified`` (no engine, so no expert counters and no bound).
        """
        if cfg.scheme.name == HF_EAGER.name:
            r = session.run_unmodified(new_tokens=tokens, beams=beams)
        else:
            r = session.run(cfg.budget, scheme=cfg.scheme, new_tokens=tokens, beams=beams, schedule=cfg.schedule)
        g = r.generation
        d = g.decode_ms
        out = {"tokens": tokens, "beams": beams, "steps_per_s": 1e3 / d["mean"] if d["mean"] else math.nan,
               "tokens_per_s": g.decode_tokens_per_s, "mean_ms": d["mean"], "median_ms": d["median"],
               "p90_ms": d["p90"], "samples_ms": d["samples"], "prefill_ms": r.prefill_ms,
               "hit_rate": 1.0, "reads": None, "bound": None, "measured_over_bound": None, "stats": None,
               "warmup": r.warmup, "schedule": r.schedule, "engine": r.engine,
               "stop_check_deferred": g.stop_check_deferred,
               "sequences": [list(s) for s in g.sequences]}
        if r.stats is not None:
            reads = R.reads_from_stats(r.stats, "decode")
            bound = R.decode_bound(reads, self.expert_bytes, self.ceilings,
                                   self.dense(self.args.prompt_tokens + tokens // 2, beams))
            out.update(hit_rate=r.stats.hit_rate("decode"), reads=reads.to_dict(), bound=bound.to_dict(),
                       measured_over_bound=bound.ratio(d["mean"]), stats=_stats(r.stats))
        return out

    def prefill(self, session, target, slow: bool) -> dict:
        """``session.measure_prefill``: a ``prefill_tokens`` prompt, no KV cache kept; ms, hits and the bound."""
        a = self.args
        repeats = 1 if slow or a.quick else 3
        warm = min(64, a.prefill_tokens) if slow else a.prefill_tokens  # the pageable clones, not a whole prefill
        p = session.measure_prefill(target, a.prefill_tokens, repeats=repeats, warm_tokens=warm)
        if p.stats is None:  # the unmodified model: every expert on the device, no counters
            return {**p.to_dict(), "hit_rate": 1.0, "reads": None, "bound": None, "measured_over_bound": None,
                    "stats": None}
        reads = R.reads_from_stats(p.stats, "prefill")
        bound = R.prefill_bound(reads, self.expert_bytes, self.ceilings, self.dense(a.prefill_tokens))
        return {**p.to_dict(), "reads": reads.to_dict(), "bound": bound.to_dict(),
                "measured_over_bound": bound.ratio(p.ms), "stats": _stats(p.stats)}

    def cannot_run(self, cfg: Config) -> str | None:
        """Why a configuration cannot run on this host, or None: a pageable-copy scheme clones the experts it
        copies into ordinary host memory, next to the pinned ones; it needs room for a clone of every expert."""
        if not (self.cuda and cfg.scheme.pageable_copies):
            return None
        import psutil

        need = host_memory_needed(self.preset, "cuda")["experts"]
        available = psutil.virtual_memory().available
        if need <= 0.9 * available:
            return None
        return (f"host memory: {cfg.scheme.name} copies from pageable memory and may clone all experts, "
                f"{need / 1e9:.1f} GB, but {available / 1e9:.1f} GB is available")


def _stats(s) -> dict:
    return {"cpu_expert_calls": s.cpu_expert_calls, "copy_expert_calls": s.copy_expert_calls,
            "split_expert_calls": s.split_expert_calls, "gpu_expert_calls": s.gpu_expert_calls,
            "bytes_copied": s.bytes_copied, "cpu_tokens": s.cpu_tokens}


def measure_round(bench: Bench, cfg: Config, first: bool, refs: dict, tol_rel: float) -> dict:
    """One round of a configuration: decode, prefill (and the logits check in round 1), beam."""
    a, session, scheme = bench.args, bench.sessions[cfg.routing], cfg.scheme
    out = {}
    n = a.new_tokens if a.quick else min(a.new_tokens, scheme.token_cap or a.new_tokens)
    out["decode"] = bench.decode(session, cfg, n)
    if scheme.name in SCHEDULED_SCHEMES and cfg.schedule is None:  # later rounds, prefill, beam: round 1's pick
        cfg.schedule = out["decode"]["schedule"]["picked"]
    unmodified = scheme.name == HF_EAGER.name
    exact = bench.exact(session, cfg.routing) if first else None  # before an engine is built (offload installs it)
    place = session.unmodified() if unmodified else session.offload(cfg.budget, scheme=scheme, schedule=cfg.schedule)
    with place as target:
        if first:
            logits = session.probe_logits(target)
            if scheme.name == "all-gpu":
                refs[cfg.routing] = logits
            ref = refs.get(cfg.routing)
            out["check"] = None if ref is None else logits_check(logits, ref, tol_rel, exact=exact)
            if out["check"] is not None and cfg.routing in bench.exact_why_not:
                out["check"]["exact_why_not"] = bench.exact_why_not[cfg.routing]
        if not bench.args.no_prefill:
            out["prefill"] = bench.prefill(session, target, slow=scheme.serial or scheme.pageable_copies)
    if cfg.beam:
        out["beam"] = bench.decode(session, cfg, a.beam_tokens, beams=a.beams)
    return out


# the figure of each measure whose rounds are compared: (record part, key)
MEASURES = (("decode", "tokens_per_s"), ("prefill", "ms"), ("beam", "steps_per_s"))


def run_group(configs: list[Config], bench: Bench, record: dict, save, log, deadline, refs, tol_rel) -> None:
    """Every configuration of a group ``--rounds`` times, round-robin; the record updated after each round."""
    a = bench.args
    entries, rounds, seconds = {}, {id(c): [] for c in configs}, {}
    before = bench.host_ceiling_now(after=f"the start of the {configs[0].kind} group") if configs else None
    for i in range(a.rounds):
        for cfg in configs:
            entry = entries.get(id(cfg))
            if entry is not None and ("error" in entry or "skipped" in entry):
                continue
            why = bench.cannot_run(cfg) if entry is None else None
            if why:
                entry = entries[id(cfg)] = {**_entry(cfg), "skipped": why}
                record["runs"].append(entry)
                save()
                log(f"{cfg.label}: skipped, {why}")
                continue
            est = cfg.est_s if id(cfg) not in seconds else 1.1 * seconds[id(cfg)]
            left = deadline()
            if left < (1 if a.quick else est):
                if entry is None:
                    entry = entries[id(cfg)] = _entry(cfg)
                    entry["skipped"] = f"time budget ({left:.0f} s left)"
                    record["runs"].append(entry)
                else:
                    entry["rounds_skipped"] = entry.get("rounds_skipped", 0) + 1
                save()
                log(f"{cfg.label} round {i + 1}: skipped, {left:.0f} s left")
                continue
            if entry is None:
                entry = entries[id(cfg)] = _entry(cfg)
                record["runs"].append(entry)
            t = time.perf_counter()
            try:
                r = measure_round(bench, cfg, first=i == 0, refs=refs, tol_rel=tol_rel)
            except ToolkitError as e:  # e.g. all-gpu does not fit
                entry["error"] = str(e)
                save()
                log(f"{cfg.label}: {e}")
                continue
            finally:
                if bench.cuda:
                    gc.collect()  # drop the restored engine's host copies before the next one pins its own
            seconds[id(cfg)] = time.perf_counter() - t
            after = bench.host_ceiling_now(after=f"{cfg.label} round {i + 1}")
            if before is not None and after is not None:
                judge_beside(r, bench.ceilings, before["host_gbs"], after["host_gbs"])
            before = after
            if "check" in r:
                entry["check"] = r.pop("check")
            entry["engine"] = r["decode"].pop("engine")
            schedule = r["decode"]["schedule"]
            entry.setdefault("schedule", schedule)  # round 1's choice: picked, and the candidates' ms per step
            r["decode"]["schedule"] = schedule["picked"]
            rounds[id(cfg)].append(r)
            summarize_rounds(entry, rounds[id(cfg)], MEASURES)
            entry["seconds"] = entry.get("seconds", 0.0) + seconds[id(cfg)]
            save()
            log(f"round {i + 1}: {_line(entry)}")


def judge_beside(round_record: dict, ceilings, before_gbs: float, after_gbs: float) -> None:
    """A round's bounds again with the host's ceiling measured beside it, in place.

    The run's ``ceilings`` take the host ceiling from the calibration, made
    minutes earlier; on the lent H200 hosts that ceiling has moved by 10-22
    GB/s between two calibrations minutes apart. Each part of the round with
    a bound (decode, prefill, beam) gets ``host_ceiling_beside`` (the mean of
    the measurements just before and just after the round, and both),
    ``bound_beside`` and ``measured_over_bound_beside``.
    """
    gbs = (before_gbs + after_gbs) / 2
    beside = dataclasses.replace(ceilings, host_gbs=gbs, source=f"{ceilings.source}; host measured beside the round")
    for part in ("decode", "prefill", "beam"):
        rec = round_record.get(part)
        if not rec or not rec.get("bound") or not rec.get("measured_over_bound"):
            continue
        old = rec["bound"]
        bound = R.pass_bound(old["missed_bytes"], old["resident_bytes"], old["dense_bytes"], beside)
        measured_ms = rec["measured_over_bound"] * old["ms"]
        rec.update(host_ceiling_beside={"gbs": gbs, "before": before_gbs, "after": after_gbs},
                   bound_beside=bound.to_dict(), measured_over_bound_beside=bound.ratio(measured_ms))


def _entry(cfg: Config) -> dict:
    return {"kind": cfg.kind, "scheme": cfg.scheme.name, "routing": cfg.routing, "budget": cfg.budget}


# -- the run ---------------------------------------------------------------------------------------------

def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="data/gpu")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--quick", action="store_true", help="tiny model, few tokens: a smoke test")
    ap.add_argument("--preset", default=None, help="default mixtral-8x7b (tiny-mixtral with --quick)")
    ap.add_argument("--layers", type=int, default=None, help="default 8 (2 with --quick, 32 with --full-model)")
    ap.add_argument("--budget", type=budget_arg, default=None,
                    help="GPU expert budget for the comparison: a fraction of all experts, or K/N for K of the "
                         "model's N experts (default 0.22; 56/256 with --full-model)")
    ap.add_argument("--full-model", action="store_true",
                    help="Mixtral-8x7B with all 32 layers, 56 of 256 experts on the GPU, decode only, written to "
                         "moe_decode_full.json (~90 GB of pinned host memory, checked before building)")
    ap.add_argument("--prompt-tokens", type=int, default=MoESettings.prompt_tokens)
    ap.add_argument("--new-tokens", type=int, default=None,
                    help="decode tokens (default 64, 8 with --quick, 32 with --full-model)")
    ap.add_argument("--prefill-tokens", type=int, default=None, help="default 512 (32 with --quick)")
    ap.add_argument("--beams", type=int, default=4)
    ap.add_argument("--beam-tokens", type=int, default=None, help="default 16 (3 with --quick)")
    ap.add_argument("--threads", type=int, default=None, help="CPU expert threads (default: physical cores - 1)")
    ap.add_argument("--rounds", type=int, default=3, help="measurements of each configuration, round-robin")
    ap.add_argument("--budget-s", type=float, default=BUDGET_S, help="hard time budget of the whole run")
    ap.add_argument("--schemes", default=",".join(SCHEMES),
                    help="comma-separated schemes of the comparison group (default: all)")
    ap.add_argument("--ablations", default=",".join(ABLATIONS),
                    help="comma-separated variants of the ablation group (default: all)")
    ap.add_argument("--routings", default=None,
                    help="comma-separated routings: uniform, trace (default both; trace with --full-model)")
    ap.add_argument("--groups", default=None,
                    help="comma-separated groups to run: compare, sweep, ablation (default all; compare with "
                         "--full-model)")
    ap.add_argument("--no-prefill", action="store_true", help="skip the long-prompt prefill measurement")
    ap.add_argument("--no-beam", action="store_true", help="skip the beam-search measurement")
    ap.add_argument("--no-huge-pages", dest="huge_pages", action="store_false",
                    help="the experts' pinned host memory (and the calibration's) on 4 KiB pages, as torch pins it")
    args = ap.parse_args(argv)
    if args.rounds < 1:
        ap.error("--rounds must be >= 1")
    for option, known in (("schemes", SCHEMES), ("ablations", ABLATIONS), ("routings", tuple(ROUTINGS)),
                          ("groups", GROUPS)):
        value = getattr(args, option)
        unknown = [x for x in (value or "").split(",") if x not in known]
        if value is not None and unknown:  # a misspelt name would silently measure nothing
            ap.error(f"--{option}: unknown {', '.join(map(repr, unknown))}; choose from {', '.join(known)}")
    q = args.quick
    if args.full_model:
        if q:
            ap.error("--full-model and --quick exclude each other")
        for key, value in FULL_MODEL.items():
            if getattr(args, key) is None:
                setattr(args, key, value)
        args.no_prefill = args.no_beam = True  # decode only
    args.budget = args.budget or "0.22"
    args.routings = args.routings or "uniform,trace"
    args.groups = args.groups or ",".join(GROUPS)
    args.new_tokens = args.new_tokens or (8 if q else 64)
    args.prefill_tokens = args.prefill_tokens or (32 if q else 512)
    args.beam_tokens = args.beam_tokens or (3 if q else 16)
    return args


def budget_arg(text: str) -> str:
    """--budget: a fraction in [0, 1] ("0.22") or K/N ("56/256"); checked against the model in ``resolve_budget``."""
    try:
        parts = [float(x) for x in str(text).split("/")]
    except ValueError:
        parts = []
    if not (len(parts) == 1 and 0 <= parts[0] <= 1 or len(parts) == 2 and 0 <= parts[0] <= parts[1]
            and all(x.is_integer() for x in parts)):
        raise argparse.ArgumentTypeError(f"expected a fraction in [0, 1] or K/N experts, got {text!r}")
    return str(text)


def resolve_budget(text: str, total: int) -> int:
    """The comparison's GPU expert count: a fraction of ``total``, or K of K/N (N must be ``total``)."""
    if "/" in text:
        k, n = (int(float(x)) for x in text.split("/"))
        if n != total:
            raise SystemExit(f"moe_decode: --budget {text}: the model has {total} experts, not {n}")
        return k
    return int(round(float(text) * total))


def main(argv=None) -> int:
    args = parse_args(argv)
    t_start = time.perf_counter()
    device = resolve_device(args.device)
    quick = args.quick
    preset = from_name(args.preset or ("tiny-mixtral" if quick else "mixtral-8x7b"),
                       args.layers if args.layers is not None else (2 if quick else 8))
    if quick and device == "cpu":  # tiny tensors on a shared CI machine: extra intra-op threads only contend
        torch.set_num_threads(1)
        args.threads = args.threads or 1
    total = preset.layers * preset.experts
    budget = resolve_budget(args.budget, total)
    fractions = (0, 1.0) if quick else (0, 0.125, 0.375, 0.5, 0.75, 1.0)  # quick: the ends of the curve
    sweep = sorted({min(total, int(round(f * total))) for f in fractions} - {budget})

    out_dir = Path(args.out)
    path = out_dir / ("moe_decode_full.json" if args.full_model else "moe_decode.json")
    record = {
        "benchmark": "moe_decode", "status": "running", "provenance": provenance(device),
        "settings": {"preset": preset.name, "layers": preset.layers, "experts_per_layer": preset.experts,
                     "total_experts": total, "budget": budget, "budget_fraction": budget / total, "sweep": sweep,
                     "full_model": args.full_model, "groups": args.groups, "routings": args.routings,
                     "prefill": not args.no_prefill, "beam": not args.no_beam,
                     "dtype": str(preset.dtype).removeprefix("torch."), "expert_bytes": preset.expert_bytes(),
                     "prompt_tokens": args.prompt_tokens, "new_tokens": args.new_tokens,
                     "prefill_tokens": args.prefill_tokens, "beams": args.beams, "beam_tokens": args.beam_tokens,
                     "rounds": args.rounds, "anomaly_spread": ANOMALY_SPREAD, "quick": quick,
                     "budget_s": args.budget_s},
        "cost_model": None, "ceilings": None, "routings": {}, "runs": [], "targets": {},
    }

    run = RunRecord("moe_decode", path, record, start=t_start)
    save, log = run.save, run.log

    def finish(status):
        record["targets"], record["ratios"] = targets(record), ratios(record)
        save(status)

    save()
    try:  # the experts in (pinned) host memory: a model that cannot fit is a record, not a swapping host
        record["settings"]["host_memory"] = check_host_memory(preset, device)
    except ToolkitError as e:
        record["skipped"] = str(e)
        log(f"skipped: {e}")
        finish("skipped: host memory")
        print_summary(record)
        return 0
    try:
        settings = MoESettings(preset=preset.name, layers=preset.layers, gpu_experts=budget,
                               routing=ROUTINGS["uniform"], threads=args.threads, prompt_tokens=args.prompt_tokens,
                               new_tokens=args.new_tokens, device=device, huge_pages=args.huge_pages)
        # the session calibrates as the CLI's does: after the build, from the per-machine cache, so both
        # plan every layer from the same cost model; a copy is kept next to the results
        first = MoESession(settings)
        cm = first.cost_model
        save_cost_model(cm, out_dir / "moe_decode_costs.json")
        record["cost_model"], record["cost_model_summary"] = cm.to_dict(), cm.summary()
        log(cm.summary())
        sessions = {"uniform": first}
        if (preset.experts, preset.top_k) == (8, 2):
            sessions["trace"] = first.with_settings(routing=ROUTINGS["trace"])
        else:
            record["routings"]["trace"] = f"synthetic Mixtral trace needs 8 experts, top-2 ({preset.name} has " \
                                          f"{preset.experts})"
        sessions = {k: v for k, v in sessions.items() if k in args.routings.split(",")}
        for label, s in sessions.items():
            record["routings"][label] = s.trace.meta.get("source", s.routing_name)
        record["settings"]["build_s"] = run.elapsed_s
        record["settings"]["session"] = settings.to_dict()
        log(f"built {preset.name} x{preset.layers} layers ({total} experts in host memory)")
        ceilings = measure(cm, device, quick, record)
        log(f"ceilings: GPU {ceilings.gpu_gbs:.0f} GB/s, host {ceilings.host_gbs:.1f} GB/s, "
            f"H2D {ceilings.h2d_gbs:.1f} GB/s")
        paths, why = host_paths(cm, device)
        record["host_ceiling"] = {"probes": [], "why_not": why}
        bench = Bench(sessions, ceilings, args, paths=paths, probes=record["host_ceiling"]["probes"])
        save()

        refs = {}  # routing -> all-gpu probe logits
        tol_rel = 1e-4 if preset.dtype == torch.float32 else 0.02
        ours = get_baseline("ours")
        groups = [
            [Config("compare", HF_EAGER if name == HF_EAGER.name else get_baseline(name), routing,
                    total if name in ("all-gpu", HF_EAGER.name) else budget, EST_S[name],
                    beam=name in BEAM_SCHEMES and not args.no_beam)
             for routing in sessions for name in SCHEMES if name in args.schemes.split(",")],
            [Config("sweep", ours, routing, k, EST_S["sweep"]) for routing in list(sessions)[-1 if quick else 0:]
             for k in sweep],
            [Config("ablation", dataclasses.replace(base, name=variant, **change),
                    "uniform" if "uniform" in sessions else next(iter(sessions)), k, EST_S["ablation"])
             for base, variant, change, k in ((ours, "ours-default", {}, budget),
                                              (ours, "ours-per-layer", {"graph_misses": False}, budget),
                                              (ours, "ours-nosplit", {"split": False}, budget),
                                              (ours, "ours-inline", {"overlap": False}, budget),
                                              (ours, "ours-eager", {"graphs": False}, budget),
                                              (ours, "ours-nolookahead", {"lookahead": False}, budget),
                                              (ours, "ours-nocontention", {"contention": False}, budget),
                                              (ours, "ours-torchgemv", {"cpu_kernel": False}, budget),
                                              (get_baseline("all-gpu"), "all-gpu-eager", {"graphs": False}, total),
                                              (get_baseline("all-gpu"), "all-gpu-sync", {"sync_free": False}, total),
                                              (get_baseline("all-gpu"), "all-gpu-layers", {"whole_step": False},
                                               total),
                                              (get_baseline("all-gpu"), "all-gpu-unfused", {"fused": False}, total))
             if variant in args.ablations.split(",")],
        ]
        deadline = lambda: args.budget_s - run.elapsed_s  # noqa: E731
        wanted = args.groups.split(",")
        groups = [g for name, g in zip(GROUPS, groups) if name in wanted]
        for configs in groups:
            run_group(configs, bench, record, save, log, deadline, refs, tol_rel)
        finish("complete")
    except KeyboardInterrupt:
        finish("interrupted")
        print_summary(record)
        return 130
    except Exception as e:
        finish(f"error: {type(e).__name__}: {e}")
        raise
    print_summary(record)
    print(f"wrote {path}")
    return 0


def host_paths(cm, device: str) -> tuple[HostPaths | None, str | None]:
    """What measures the host's ceiling again between rounds (both paths at once and a plain read, as the
    calibration did) -> (it, None), or (None, why not): it needs a CUDA device and ~3 GB of host memory."""
    if not device.startswith("cuda"):
        return None, "no GPU: both paths need copies to a device"
    try:
        return HostPaths.for_model(cm), None
    except (ToolkitError, RuntimeError) as e:  # e.g. the pinned copies do not fit beside the experts
        return None, f"{type(e).__name__}: {e}"


def measure(cm, device: str, quick: bool, record: dict):
    """The ceilings (``roofline.calibrated_ceilings``), recorded with the direct measurement beside them."""
    ceilings, measured = R.calibrated_ceilings(cm, device, nbytes=(64 << 20) if quick else (1 << 30))
    if measured is not None:
        record["ceilings_measured"] = measured.to_dict()
    record["ceilings"] = ceilings.to_dict()
    return ceilings


# -- targets and summary --------------------------------------------------------------------------------

def _find(record, kind, scheme, routing):
    for r in record["runs"]:
        if r["kind"] == kind and r["scheme"] == scheme and r["routing"] == routing and "skipped" not in r \
                and "error" not in r and "decode" in r:
            return r
    return None


def targets(record) -> dict:
    """The targets per routing, from this run's ratios (None where a run is missing)."""
    out = {}
    decode_share = FULL_MODEL_DECODE_OF_BOUND if (record.get("settings") or {}).get("full_model") else DECODE_OF_BOUND
    for routing in record.get("routings", {}):
        ours, fid, cod = (_find(record, "compare", s, routing) for s in ("ours", "fiddler-serial", "copy-on-demand"))
        t = {}

        def ratio(a, b, key, sub):
            x, y = _median_of(a, sub, key), _median_of(b, sub, key)
            return x / y if x and y else None

        def add(name, value, goal, higher=True, t=t):
            met = None if value is None else (value >= goal if higher else value <= goal)
            t[name] = {"value": value, "goal": goal, "met": met}

        add("decode tok/s vs copy-on-demand", ratio(ours, cod, "tokens_per_s", "decode"), 10.0)
        add("decode tok/s vs fiddler-serial", ratio(ours, fid, "tokens_per_s", "decode"), 2.0)
        add("decode measured/bound", _judged(ours, "decode"), 1 / decode_share, higher=False)
        pre = ratio(fid, ours, "ms", "prefill")  # a time: fiddler's over ours
        add("prefill speed-up vs fiddler-serial (pageable)", pre, 5.0)
        add("prefill measured/bound", _judged(ours, "prefill"), 1 / PREFILL_OF_BOUND, higher=False)
        add("beam steps/s vs fiddler-serial", ratio(ours, fid, "steps_per_s", "beam"), 2.0)
        if fid and ours and "decode" in fid and "decode" in ours:  # what limits the fiddler ratio on this machine
            t["ceiling of decode speed-up vs fiddler-serial (fiddler ms / ours' bound)"] = \
                fid["decode"]["mean_ms"] / ours["decode"]["bound"]["ms"]
        out[routing] = t
    return out


def _judged(entry, part: str):
    """measured / bound of an entry's part, with the host ceiling measured beside its round where it was, else
    the calibration's; None where the part is missing."""
    rec = (entry or {}).get(part)
    if not rec:
        return None
    beside = rec.get("measured_over_bound_beside")
    return beside if beside is not None else rec.get("measured_over_bound")


def _median_of(entry, part: str, key: str):
    """The median over an entry's rounds of one measure (``MEASURES``: decode tokens/s, prefill ms, beam steps/s),
    else the value its median round recorded; None where the part is missing. The entry stands for its decode's
    median round, whose prefill and beam need not be their own medians."""
    rec = (entry or {}).get(part) or {}
    rounds = rec.get("rounds") or {}
    return rounds["median"] if rounds.get("median") is not None else rec.get(key)


def _ratio(record, entry, other: str, phase: str = "decode", key: str = "tokens_per_s"):
    """This run's speed over another scheme's at the comparison budget, same routing, medians over each one's
    rounds (None if missing)."""
    base = _find(record, "compare", other, entry["routing"])
    a, b = _median_of(entry, phase, key), _median_of(base, phase, key)
    return a / b if a and b else None


def ratios(record) -> dict:
    """Per routing and run label: decode tok/s, prefill speed and beam steps/s over copy-on-demand and fiddler-serial."""
    out = {}
    for e in record["runs"]:
        if "skipped" in e or "error" in e or "decode" not in e:
            continue
        label = f"{e['routing']}/{e['kind']}/{e['scheme']}/{e['budget']}"
        out[label] = {
            "decode_vs_copy_on_demand": _ratio(record, e, "copy-on-demand"),
            "decode_vs_fiddler_serial": _ratio(record, e, "fiddler-serial"),
            # prefill is a time: the speed-up is the other's ms over this run's
            "prefill_vs_fiddler_serial": (lambda r: 1 / r if r else None)(
                _ratio(record, e, "fiddler-serial", "prefill", "ms")),
            "beam_vs_fiddler_serial": _ratio(record, e, "fiddler-serial", "beam", "steps_per_s"),
        }
    return out


def _f(x, spec=".2f") -> str:
    return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else format(x, spec)


def _spread(part: dict) -> str:
    s = (part or {}).get("rounds") or {}
    return "-" if s.get("spread") is None else f"{100 * s['spread']:.0f}%"


def _line(e) -> str:
    if "skipped" in e or "error" in e:
        return f"{e['kind']} {e['scheme']} {e['routing']} k={e['budget']}: {e.get('skipped') or e.get('error')}"
    d, p, b = e.get("decode") or {}, e.get("prefill") or {}, e.get("beam") or {}
    return (f"{e['kind']} {e['scheme']} {e['routing']} k={e['budget']}: decode {_f(d.get('tokens_per_s'))} tok/s "
            f"(x{_f(d.get('measured_over_bound'))} bound{_beside(d)}, spread {_spread(d)}), prefill "
            f"{_f(p.get('ms'), '.0f')} ms (x{_f(p.get('measured_over_bound'))}{_beside(p)}), beam "
            f"{_f(b.get('steps_per_s'))} steps/s, "
            f"check {check_word(e.get('check'))}{_exact(e.get('check'))}, "
            f"schedule {_schedule(e)}{', ANOMALOUS' if e.get('anomalous') else ''} ({e.get('seconds', 0):.0f} s)")


def _exact(check: dict | None) -> str:
    """' (float32: 0.0123 of the largest logit, all-gpu 0.0110)', or '' without the float32 probe."""
    x = (check or {}).get("exact")
    return "" if not x else f" (float32: {x['rel']:.4f} of the largest logit, all-gpu {x['reference_rel']:.4f})"


def _beside(part: dict) -> str:
    """', x1.23 at the host ceiling beside the round (119.0 GB/s)', or '' where it was not measured."""
    r, c = (part or {}).get("measured_over_bound_beside"), (part or {}).get("host_ceiling_beside")
    return "" if r is None else f", x{_f(r)} at the host ceiling beside the round ({c['gbs']:.1f} GB/s)"


def host_ceiling_line(record: dict) -> str | None:
    """How far the host's ceiling moved over the run: its measurements between rounds against the calibration's."""
    c, probes = record.get("ceilings") or {}, ((record.get("host_ceiling") or {}).get("probes") or [])
    if not probes:
        why = (record.get("host_ceiling") or {}).get("why_not")
        return f"host ceiling not measured between rounds: {why}" if why else None
    host = [p["host_gbs"] for p in probes]
    both = [p["both_paths_gbs"] for p in probes]
    read = [p["read_gbs"] for p in probes]
    cal = f" against the calibration's {c['host_gbs']:.1f}" if c.get("host_gbs") else ""
    return (f"host ceiling between rounds ({len(probes)} measurements): {min(host):.1f}-{max(host):.1f} GB/s "
            f"(median {statistics.median(host):.1f}){cal}; both paths {min(both):.1f}-{max(both):.1f}, plain read "
            f"{min(read):.1f}-{max(read):.1f}; decode and prefill are judged at the ceiling beside their round")


def _schedule(e) -> str:
    """The schedule a configuration ran, with the candidates round 1 measured: 'inline (overlap 70.4 ...)'."""
    s = e.get("schedule") or {}
    cands = s.get("candidates") or {}
    others = ", ".join(f"{k} {v:.1f}" for k, v in sorted(cands.items(), key=lambda kv: kv[1]))
    return f"{s.get('picked', '-')}" + (f" ({others} ms/step)" if others else "")


def print_summary(record: dict) -> None:
    s = record["settings"]
    print(f"\n{s['preset']} x{s['layers']} layers, {s['total_experts']} experts, {s['dtype']}, budget {s['budget']} "
          f"GPU experts; decode {s['new_tokens']} tokens after {s['prompt_tokens']}, prefill "
          f"{s['prefill_tokens'] if s.get('prefill', True) else 'off'}, beam {s['beams'] if s.get('beam', True) else 'off'}"
          f"; {s['rounds']} rounds each; status {record['status']}")
    if record.get("skipped"):
        print(f"skipped: {record['skipped']}")
        return
    if record.get("cost_model_summary"):
        print(record["cost_model_summary"])
    c = record.get("ceilings")
    if c:
        print(f"ceilings: GPU {c['gpu_gbs']:.0f} GB/s, host {c['host_gbs']:.1f} GB/s, H2D {c['h2d_gbs']:.1f} GB/s")
    line = host_ceiling_line(record)
    if line:
        print(line)
    head = (f"{'kind':<8} {'routing':<8} {'scheme':<15} {'k':>3} {'hit':>5} {'tok/s':>7} {'spread':>6} {'p50 ms':>7} "
            f"{'p90 ms':>7} {'bound':>6} {'x bnd':>5} {'x now':>5} {'vs cod':>6} {'vs fid':>6} {'prefill':>8} {'bound':>6} "
            f"{'x bnd':>5} {'beam st/s':>9} {'check':>5}  schedule")
    print(head)
    for e in record["runs"]:
        if "skipped" in e or "error" in e or "decode" not in e:
            print(f"{e['kind']:<8} {e['routing']:<8} {e['scheme']:<15} {e['budget']:>3}  "
                  f"{e.get('skipped') or e.get('error') or 'not measured'}")
            continue
        d, p = e.get("decode") or {}, e.get("prefill") or {}
        ck = e.get("check")
        print(f"{e['kind']:<8} {e['routing']:<8} {e['scheme']:<15} {e['budget']:>3} {_f(d.get('hit_rate')):>5} "
              f"{_f(d.get('tokens_per_s')):>7} {_spread(d):>6} {_f(d.get('median_ms')):>7} {_f(d.get('p90_ms')):>7} "
              f"{_f((d.get('bound') or {}).get('ms')):>6} {_f(d.get('measured_over_bound')):>5} "
              f"{_f(d.get('measured_over_bound_beside')):>5} "
              f"{_f(_ratio(record, e, 'copy-on-demand')):>6} {_f(_ratio(record, e, 'fiddler-serial')):>6} "
              f"{_f(_median_of(e, 'prefill', 'ms'), '.1f'):>8} {_f((p.get('bound') or {}).get('ms'), '.1f'):>6} "
              f"{_f(p.get('measured_over_bound')):>5} {_f(_median_of(e, 'beam', 'steps_per_s')):>9} "
              f"{check_word(ck):>5}  {_schedule(e)}"
              f"{'  anomalous: ' + e['anomaly_reason'] if e.get('anomalous') else ''}")
    exact = [(e, e["check"]["exact"]) for e in record["runs"] if (e.get("check") or {}).get("exact")]
    if exact:
        print(f"logits against the unmodified model computed in float32 (largest difference over the largest logit; "
              f"ok32: over the tolerance against all-gpu but at most x{exact[0][1]['factor']:g} all-gpu's distance):")
        for e, x in exact:
            print(f"  {e['routing']:<8} {e['scheme']:<15} {e['budget']:>3} {x['rel']:.4f} (all-gpu "
                  f"{x['reference_rel']:.4f}, x{x['ratio']:.2f}): {'as close' if x['pass'] else 'FURTHER'}")
    whys = {e["routing"]: e["check"]["exact_why_not"] for e in record["runs"]
            if (e.get("check") or {}).get("exact_why_not")}
    for routing, why in whys.items():
        print(f"logits against float32 ({routing} routing): not measured: {why}")
    for routing, t in (record.get("targets") or {}).items():
        print(f"targets ({routing} routing):")
        for name, v in t.items():
            if isinstance(v, dict):
                met = {True: "MET", False: "not met", None: "n/a"}[v["met"]]
                print(f"  {name:<48} {_f(v['value']):>7} (goal {'>=' if 'bound' not in name else '<='} "
                      f"{v['goal']:.2f}): {met}")
            else:
                print(f"  {name}: {_f(v)}")


if __name__ == "__main__":
    sys.exit(main())
