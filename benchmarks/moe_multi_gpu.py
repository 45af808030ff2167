"""MoE offload on two GPUs against one: the same per-GPU expert budget, twice the resident experts.

One device call (hard budget ``--budget-s``, default 420 s including the model build), saving
OUT/moe_multi_gpu.json after every measurement so an interruption keeps what was measured:

1. check the host memory (``check_host_memory``) and that two CUDA GPUs are visible; otherwise the record
   says why (status "skipped") and nothing is built;
2. build ``mixtral-8x7b`` x 8 layers in bf16 once (experts in pinned host memory) through
   ``toolkit.moe.run.MoESession``; the two-GPU sessions are ``session.with_settings(gpus=2)`` on the same
   built model (no rebuild); calibrate the cost model (saved next to the results; with the peer hop of
   token rows between the two GPUs) and measure the ceilings;
3. two configurations, each GPU holding what a 24 GB card holds beside the dense part (``--per-gpu``, 14
   of 64 experts at 8 layers, 56 of 256 at 32: the record's ``card_24gb`` gives the bytes): ``1-gpu``, 14
   experts resident on one GPU; ``2-gpu``, 28 resident, 14 on each (``MoESettings(gpus=2)``: the resident
   experts split evenly over the GPUs, ``toolkit.moe.memory.split_budget``; each layer's busiest ones
   alternate between them, ``assign_devices``). The dense part and the KV cache stay on the first GPU; a
   resident expert's token rows travel to its GPU and back; a missed expert is computed on the CPU or
   copied to either GPU, each over its own host link into its own two staging slots (the cost model picks
   which). ``--configs`` adds ablations, each the engine with one switch changed: ``2-gpu-one-link``, the
   same two GPUs, every copy to the first (the one-GPU engine's copy path), which shows what the second
   link buys; ``1-gpu-nocontention`` and ``2-gpu-nocontention``, the layers planned with each path's speed
   alone instead of the calibrated contention of CPU experts and copies for host memory;
   ``2-gpu-nolookahead``, a prefill layer's copies started only once its routing is known instead of
   while the previous layer computes;
4. two routings, replayed identically for both configurations: ``uniform`` (each token picks 2 distinct
   experts at random, seeded) and ``trace`` (the synthetic Mixtral trace: real popularity and locality,
   placement from its routing counts); uniform first, trace while the budget lasts;
5. each configuration is measured ``--rounds`` times (default 3), alternating 1-gpu, 2-gpu, 1-gpu, ...,
   after ``--warm-rounds`` (default 1) whole rounds of each whose figures are recorded (``warm_rounds``)
   but left out of the medians: after a 90 GB build the host kept speeding up for minutes. A round is
   ``session.run`` (warm-up generations as long as the measured one until two agree within
   5%, the routing replayed, then batch-1 decode of 64 tokens after a 16-token prompt) and a 512-token
   prefill (``session.measure_prefill``). Round 1 of 2-gpu checks its logits against 1-gpu's
   (``session.probe_logits``, the same routing replayed). The CPU-expert schedule is fixed
   (``--schedule``, default inline, the same for both configurations so only the second GPU differs;
   "auto" measures the candidates in each configuration's round 1, ~1 minute each);
6. per run the roofline bound (``toolkit.moe.roofline``: the bytes of the experts the run really read from
   host memory over the host ceiling, the resident and dense bytes over GPU bandwidth) and
   ``fraction_of_bound`` = bound / measured (the target: >= 0.85). With two GPUs the bound keeps the
   single-GPU arithmetic (resident reads summed, not split over the GPUs): they are ~1% of it.
   Per run the experts each GPU holds and the token rows each computed (``devices``), and where every
   resident expert lives (``expert_devices``, [L, E], -1: host only).

A configuration's record holds its median round (decode tokens/s decides which) and per measure the
rounds' median, min, max and spread; ``"anomalous": true`` when the rounds differ by more than 10%.

``--full-model``: all 32 layers, 56 of 256 experts per GPU, trace routing, 32 decode tokens, one
prefill sample per round, written to OUT/moe_multi_gpu_full.json (~90 GB of pinned host memory, checked
before building; the build takes minutes, so run it as its own device call, default budget 560 s).

  PYTHONPATH=. python benchmarks/moe_multi_gpu.py --out data/gpu                    # 2 GPUs, ~6-7 min
  PYTHONPATH=. python benchmarks/moe_multi_gpu.py --full-model --out data/gpu       # 2 GPUs, ~9 min
  PYTHONPATH=. python benchmarks/moe_multi_gpu.py --quick --device cpu --out /tmp/x  # CPU smoke test, two CPU tiers
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import inspect
import math
import sys
import time
import traceback
from pathlib import Path

import numpy as np
import torch

from toolkit.env import resolve_device
from toolkit.errors import ToolkitError
from toolkit.formatting import fmt, pct
from toolkit.moe import roofline as R
from toolkit.moe.baselines import get_baseline
from toolkit.moe.costs import calibrate
from toolkit.moe.memory import check_host_memory
from toolkit.moe.presets import from_name
from toolkit.moe.run import ANOMALY_SPREAD, MoESession, MoESettings, logits_check, summarize_rounds
from toolkit.moe.run import BENCHMARK_ROUTINGS as ROUTINGS  # record label -> MoESettings.routing
from toolkit.moe.schedule import SCHEDULE_CHOICES
from toolkit.results import RunRecord, provenance

BUDGET_S = 420.0
FULL_BUDGET_S = 560.0
TARGET = 0.85  # bound / measured each run should reach
CARD_BYTES = 24 * 2**30  # the card whose memory limits each GPU's share
CARD_MARGIN = 2**30  # what offload() keeps free on a GPU
# seconds of one round (decode with its warm-up, prefill) at 8 layers and 64 tokens, before a round was
# measured; scaled with layers and tokens. Later rounds use the configuration's own last round.
EST_S = {1: 30.0, 2: 25.0}
# an ablation of the engine -> what it changes in scheme "ours"
ABLATIONS = {"one-link": {"spread_copies": False},  # several GPUs, but every missed expert copied to the first
             "nocontention": {"contention": False},  # planned as if CPU experts and copies did not slow each other
             "nolookahead": {"lookahead": False}}  # a prefill layer's copies wait for its routing
CONFIGS = {"1-gpu": (1, None), "2-gpu": (2, None), "2-gpu-one-link": (2, "one-link"),
           "1-gpu-nocontention": (1, "nocontention"), "2-gpu-nocontention": (2, "nocontention"),
           "2-gpu-nolookahead": (2, "nolookahead")}  # name -> (gpus, ablation)


@dataclasses.dataclass
class Config:
    """One measured configuration: 1 or 2 GPUs, each holding ``per_gpu`` resident experts, under a routing."""

    gpus: int
    per_gpu: int
    routing: str  # record label: uniform | trace
    est_s: float
    schedule: str  # the CPU-expert schedule; "auto" is replaced by round 1's pick
    ablation: str | None = None  # an ``ABLATIONS`` name: the engine with that one switch changed

    @property
    def name(self) -> str:
        return f"{self.gpus}-gpu" + (f"-{self.ablation}" if self.ablation else "")

    @property
    def scheme(self):
        """The engine's scheme: ours, or ours with the ablation's switch changed."""
        return dataclasses.replace(get_baseline("ours"), **ABLATIONS.get(self.ablation, {}))

    @property
    def budget(self) -> int:
        return self.gpus * self.per_gpu

    @property
    def label(self) -> str:
        return f"{self.name} {self.routing} k={self.budget}"


class Bench:
    """The fixed parts of every measurement: the sessions per (routing, gpus), the ceilings, the arguments."""

    def __init__(self, sessions: dict, ceilings, args):
        self.sessions, self.ceilings, self.args = sessions, ceilings, args
        first = next(iter(sessions.values()))
        self.preset, self.model, self.cuda = first.preset, first.model, first.device.startswith("cuda")
        sizes = R.ModelBytes.of(first)
        self.expert_bytes, self.dtype_bytes, self.dense = sizes.expert_bytes, sizes.dtype_bytes, sizes.dense

    def decode(self, session, cfg: Config) -> dict:
        """``session.run``: warm-up, then batch-1 generation; timings, hits, where the rows went, the bound."""
        a = self.args
        r = session.run(cfg.budget, new_tokens=a.new_tokens, schedule=cfg.schedule, scheme=cfg.scheme)
        g, d = r.generation, r.generation.decode_ms
        reads = R.reads_from_stats(r.stats, "decode")
        bound = R.decode_bound(reads, self.expert_bytes, self.ceilings, self.dense(a.prompt_tokens + a.new_tokens // 2))
        return {"tokens": a.new_tokens, "tokens_per_s": g.decode_tokens_per_s, "mean_ms": d["mean"],
                "median_ms": d["median"], "p90_ms": d["p90"], "samples_ms": d["samples"], "prefill_ms": r.prefill_ms,
                "hit_rate": r.stats.hit_rate("decode"), "reads": reads.to_dict(), "bound": bound.to_dict(),
                "measured_over_bound": bound.ratio(d["mean"]), "fraction_of_bound": _fraction(bound, d["mean"]),
                "warmup": r.warmup, "schedule": r.schedule, "warnings": r.warnings,
                "devices": per_device(r.engine.get("devices"), r.engine["gpu_experts"], r.engine["device"], r.stats),
                "engine": {k: v for k, v in r.engine.items() if k not in ("devices", "expert_devices")}}

    def prefill(self, session, engine) -> dict:
        """``session.measure_prefill``: a long prompt, no KV cache kept; ms, hits, rows per device, the bound."""
        a = self.args
        p = session.measure_prefill(engine, a.prefill_tokens, repeats=a.prefill_repeats)
        reads = R.reads_from_stats(p.stats, "prefill")
        bound = R.prefill_bound(reads, self.expert_bytes, self.ceilings, self.dense(a.prefill_tokens))
        devices = engine.devices_dict() if engine.spread else None
        return {**p.to_dict(), "reads": reads.to_dict(), "bound": bound.to_dict(),
                "measured_over_bound": bound.ratio(p.ms), "fraction_of_bound": _fraction(bound, p.ms),
                "devices": per_device(devices, engine.gpu_experts, str(engine.device), p.stats),  # the last pass
                "expert_devices": engine.expert_devices.tolist()}

    def card(self, cfg: Config) -> dict:
        """Bytes each GPU of a configuration holds (estimate: experts and two copy slots, the others' only when
        misses are copied to every GPU; the first also the dense part and the KV cache) against a 24 GB card less
        offload()'s 1 GiB margin."""
        a = self.args
        experts = cfg.per_gpu * self.expert_bytes
        slots = 2 * self.expert_bytes
        emb = self.preset.vocab * self.preset.hidden * self.dtype_bytes  # dense_bytes leaves the embedding out
        first = experts + self.dense(a.prompt_tokens + a.new_tokens) + emb + slots
        need = [first] + [experts + (slots if cfg.scheme.spread_copies else 0)] * (cfg.gpus - 1)
        return {"card_bytes": CARD_BYTES, "margin_bytes": CARD_MARGIN, "bytes_per_gpu": need,
                "fits": all(n <= CARD_BYTES - CARD_MARGIN for n in need)}


def per_device(devices, gpu_experts: int, device: str, stats) -> list[dict]:
    """Experts held and token rows computed per device; one device computes every resident row (the hits)."""
    if devices:
        return devices
    rows = int(sum(int(np.asarray(h).sum()) for h in stats.hits.values()))
    return [{"device": device, "experts": int(gpu_experts), "rows": rows}]


def _fraction(bound, measured_ms: float) -> float:
    """bound / measured: the share of the roofline a run reaches (1 at the bound)."""
    return bound.ms / measured_ms if measured_ms and measured_ms > 0 else math.nan


def measure_round(bench: Bench, cfg: Config, first: bool, refs: dict, tol_rel: float) -> dict:
    """One round of a configuration: decode, then prefill (and the logits check in round 1) on a fresh engine."""
    session = bench.sessions[(cfg.routing, cfg.gpus)]
    out = {"decode": bench.decode(session, cfg)}
    if cfg.schedule == "auto":  # later rounds and the prefill run the schedule round 1 picked
        cfg.schedule = out["decode"]["schedule"]["picked"]
    with session.offload(cfg.budget, schedule=cfg.schedule, scheme=cfg.scheme) as engine:
        if first:
            logits = session.probe_logits(engine)
            if cfg.name == "1-gpu":
                refs[cfg.routing] = logits
            elif cfg.routing in refs:
                out["check"] = {**logits_check(logits, refs[cfg.routing], tol_rel), "against": "1-gpu"}
        out["prefill"] = bench.prefill(session, engine)
    return out


MEASURES = (("decode", "tokens_per_s"), ("prefill", "ms"))  # the figure of each measure whose rounds are compared


def _entry(cfg: Config, bench: Bench) -> dict:
    return {"config": cfg.name, "gpus": cfg.gpus, "routing": cfg.routing, "budget": cfg.budget,
            "per_gpu_experts": cfg.per_gpu, "card_24gb": bench.card(cfg)}


def record_round(entry: dict, r: dict) -> None:
    """Move a round's engine facts into the entry: round 1's check and schedule, the devices of the last round."""
    if "check" in r:
        entry["check"] = r.pop("check")
    entry["engine"] = r["decode"].pop("engine")
    entry["devices"] = r["decode"].pop("devices")  # the measured generation, its prompt included
    entry["prefill_devices"] = r["prefill"].pop("devices")
    entry["expert_devices"] = r["prefill"].pop("expert_devices")
    schedule = r["decode"]["schedule"]
    entry.setdefault("schedule", schedule)
    r["decode"]["schedule"] = schedule["picked"]


def warm_record(r: dict) -> dict:
    """What a warm round keeps: its figures (not in the medians), so a machine still speeding up shows."""
    return {"decode_tokens_per_s": r["decode"]["tokens_per_s"], "decode_median_ms": r["decode"]["median_ms"],
            "prefill_ms": r["prefill"]["ms"]}


def run_group(configs: list[Config], bench: Bench, record: dict, save, log, deadline, refs, tol_rel) -> bool:
    """``--warm-rounds`` then ``--rounds`` of every configuration, alternating; False when the time budget ran out.

    A warm round is a whole round whose figures are kept in the entry's ``warm_rounds`` and left out
    of the medians: after a model of tens of GB is built, the host kept speeding up for minutes (the
    32-layer rounds read 2.7, 3.6 and 4.4 tok/s), longer than one run's warm-up generations notice.
    """
    a = bench.args
    entries = {id(c): _entry(c, bench) for c in configs}
    record["runs"].extend(entries.values())
    rounds, seconds = {id(c): [] for c in configs}, {}
    for i in range(-a.warm_rounds, a.rounds):  # i < 0: a warm round
        need = sum(1.1 * seconds[id(c)] if id(c) in seconds else c.est_s for c in configs)
        left = deadline()
        if left < (1 if a.quick else need):
            if i < 0:  # no time to warm: the measured rounds, as many as fit
                log(f"{configs[0].routing}: warm round skipped, {left:.0f} s left, ~{need:.0f} s needed")
                continue
            for c in configs:
                e = entries[id(c)]
                e["rounds_skipped"] = a.rounds - i
                if not rounds[id(c)]:
                    e["skipped"] = f"time budget ({left:.0f} s left, a round of both needs ~{need:.0f} s)"
            save()
            log(f"{configs[0].routing}: rounds {i + 1}-{a.rounds} skipped, {left:.0f} s left, ~{need:.0f} s needed")
            return False
        for cfg in configs:
            entry = entries[id(cfg)]
            if "error" in entry:
                continue
            t = time.perf_counter()
            r = failure = None
            try:
                r = measure_round(bench, cfg, first=i == 0, refs=refs, tol_rel=tol_rel)
            except Exception as err:  # a configuration that fails (does not fit, a device error) leaves the others
                failure = (f"{type(err).__name__}: {err}", traceback.format_exc(limit=8))
            # outside the except block: its traceback no longer holds the engine's tensors
            if bench.cuda:
                gc.collect()  # drop the restored engine's tensors before the next one places its own
                torch.cuda.empty_cache()
            if failure is not None:
                entry["error"], entry["traceback"] = failure
                save()
                log(f"{cfg.label}: {failure[0]}")
                continue
            seconds[id(cfg)] = time.perf_counter() - t
            if i < 0:
                if isinstance(r["decode"].get("schedule"), dict):  # an "auto" schedule is chosen in the first round
                    entry.setdefault("schedule", r["decode"]["schedule"])
                entry.setdefault("warm_rounds", []).append(warm_record(r))
                entry["seconds"] = entry.get("seconds", 0.0) + seconds[id(cfg)]
                save()
                log(f"warm round: {cfg.label}: decode {r['decode']['tokens_per_s']:.2f} tok/s, "
                    f"prefill {r['prefill']['ms']:.0f} ms (not in the medians)")
                continue
            record_round(entry, r)
            rounds[id(cfg)].append(r)
            summarize_rounds(entry, rounds[id(cfg)], MEASURES)
            entry["seconds"] = entry.get("seconds", 0.0) + seconds[id(cfg)]
            save()
            log(f"round {i + 1}: {_line(entry)}")
    return True


# -- building --------------------------------------------------------------------------------------------

def why_not_two_gpus(device: str, cuda_count: int, quick: bool) -> str | None:
    """Why this host cannot run the comparison (None: it can). A CPU runs it only as the --quick smoke test."""
    if device == "cpu":
        return None if quick else ("needs two CUDA GPUs; the device is the CPU (--quick --device cpu runs the "
                                   "same code on two CPU tiers)")
    if cuda_count < 2:
        return f"needs two CUDA GPUs; this host has {cuda_count} visible"
    return None


def calibrate_costs(preset, device: str, args):
    """The cost model, saved next to the results; on two GPUs with the peer hop of rows between them where
    the library measures it (``calibrate(..., devices=...)``), so the engine's plan counts that hop."""
    kw = {}
    if device.startswith("cuda") and "devices" in inspect.signature(calibrate).parameters:
        first = torch.device(device).index
        first = torch.cuda.current_device() if first is None else first
        other = next(i for i in range(torch.cuda.device_count()) if i != first)
        kw["devices"] = [f"cuda:{first}", f"cuda:{other}"]  # as MoESession(gpus=2) places them
    return calibrate(preset.hidden, preset.intermediate, preset.dtype, device, threads=args.threads,
                     path=Path(args.out) / "moe_multi_gpu_costs.json", repeats=3 if args.quick else 5, **kw)


def two_gpu_session(session: MoESession) -> MoESession:
    """The same built model and cost model, resident experts over two devices (two CPU tiers on a CPU)."""
    if session.device.startswith("cuda"):
        return session.with_settings(gpus=2)
    return MoESession(session.settings.replace(gpus=2), model=session.model, cost_model=session.cost_model,
                      devices=["cpu", "cpu"])


def build_sessions(preset, cm, args, record) -> dict:
    """(routing label, gpus) -> MoESession, all on one built model."""
    settings = MoESettings(preset=preset.name, layers=preset.layers, gpu_experts=args.per_gpu,
                           routing=ROUTINGS["uniform"], threads=args.threads, prompt_tokens=args.prompt_tokens,
                           new_tokens=args.new_tokens, device=args.device_resolved)
    first = MoESession(settings, cost_model=cm)
    record["settings"]["session"] = settings.to_dict()
    one = {"uniform": first}
    if (preset.experts, preset.top_k) == (8, 2):
        one["trace"] = first.with_settings(routing=ROUTINGS["trace"])
    else:
        record["routings"]["trace"] = f"synthetic Mixtral trace needs 8 experts, top-2 ({preset.name})"
    sessions = {}
    for label in args.routings.split(","):
        if label in one:
            sessions[(label, 1)] = one[label]
            sessions[(label, 2)] = two_gpu_session(one[label])
            record["routings"][label] = one[label].trace.meta.get("source", one[label].routing_name)
    return sessions


def measure_ceilings(cm, device: str, quick: bool, record: dict):
    """The ceilings (``roofline.calibrated_ceilings``), recorded with the direct measurement beside them."""
    ceilings, measured = R.calibrated_ceilings(cm, device, nbytes=(64 << 20) if quick else (1 << 30))
    if measured is not None:
        record["ceilings_measured"] = measured.to_dict()
    record["ceilings"] = ceilings.to_dict()
    return ceilings


def gpu_facts(device: str) -> dict:
    if not device.startswith("cuda"):
        return {"count": 0, "names": []}
    n = torch.cuda.device_count()
    return {"count": n, "names": [torch.cuda.get_device_name(i) for i in range(n)],
            "memory_bytes": [torch.cuda.get_device_properties(i).total_memory for i in range(n)]}


# -- the run ---------------------------------------------------------------------------------------------

def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="data/gpu")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--quick", action="store_true", help="tiny model, few tokens: a smoke test")
    ap.add_argument("--full-model", action="store_true",
                    help="all 32 layers, 56 of 256 experts per GPU, trace routing, 32 decode tokens, written to "
                         "moe_multi_gpu_full.json (~90 GB of pinned host memory, checked before building)")
    ap.add_argument("--layers", type=int, default=None, help="default 8 (2 with --quick, 32 with --full-model)")
    ap.add_argument("--per-gpu", type=int, default=None,
                    help="resident experts per GPU (default 14; 56 with --full-model; 4 with --quick)")
    ap.add_argument("--prompt-tokens", type=int, default=MoESettings.prompt_tokens)
    ap.add_argument("--new-tokens", type=int, default=None, help="decode tokens (default 64, 32 with --full-model, "
                                                                  "8 with --quick)")
    ap.add_argument("--prefill-tokens", type=int, default=None, help="default 512 (32 with --quick)")
    ap.add_argument("--prefill-repeats", type=int, default=None, help="timed prefill passes per round (default 3; "
                                                                       "1 with --full-model or --quick)")
    ap.add_argument("--routings", default=None, help="comma-separated: uniform, trace (default both; trace with "
                                                     "--full-model)")
    ap.add_argument("--configs", default="1-gpu,2-gpu",
                    help="comma-separated, measured alternating: 1-gpu, 2-gpu (misses copied to both GPUs), "
                         "2-gpu-one-link (every copy to the first GPU, as with one), 1-gpu-nocontention and "
                         "2-gpu-nocontention (planned as if CPU experts and copies did not slow each other), "
                         "2-gpu-nolookahead (no copies before a prefill layer's routing) (default 1-gpu,2-gpu)")
    ap.add_argument("--schedule", default="inline", choices=SCHEDULE_CHOICES,
                    help="CPU-expert schedule of both configurations (auto: measured in round 1 of each)")
    ap.add_argument("--threads", type=int, default=None, help="CPU expert threads (default: physical cores - 1)")
    ap.add_argument("--rounds", type=int, default=3, help="measurements of each configuration, alternating")
    ap.add_argument("--warm-rounds", type=int, default=1,
                    help="whole rounds of each configuration before the measured ones, kept in the record but not "
                         "in the medians (default 1)")
    ap.add_argument("--budget-s", type=float, default=None,
                    help=f"hard time budget of the whole run (default {BUDGET_S:.0f}; {FULL_BUDGET_S:.0f} with "
                         "--full-model)")
    args = ap.parse_args(argv)
    if args.rounds < 1:
        ap.error("--rounds must be >= 1")
    if args.warm_rounds < 0:
        ap.error("--warm-rounds must be >= 0")
    unknown = [x for x in args.routings.split(",") if x not in ROUTINGS] if args.routings else []
    if unknown:  # nothing would be measured, and the build would have been for nothing
        ap.error(f"--routings: unknown {', '.join(map(repr, unknown))}; choose from {', '.join(ROUTINGS)}")
    configs = [x for x in args.configs.split(",") if x]
    unknown = [x for x in configs if x not in CONFIGS]
    if unknown or not configs:
        ap.error(f"--configs: unknown {', '.join(map(repr, unknown)) or 'none given'}; choose from {', '.join(CONFIGS)}")
    args.configs = list(dict.fromkeys(configs))
    q, full = args.quick, args.full_model
    if q and full:
        ap.error("--full-model and --quick exclude each other")
    args.layers = args.layers or (2 if q else 32 if full else 8)
    args.per_gpu = args.per_gpu if args.per_gpu is not None else (4 if q else 56 if full else 14)
    args.new_tokens = args.new_tokens or (8 if q else 32 if full else 64)
    args.prefill_tokens = args.prefill_tokens or (32 if q else 512)
    args.prefill_repeats = args.prefill_repeats or (1 if q or full else 3)
    args.routings = args.routings or ("trace" if full else "uniform,trace")
    args.budget_s = args.budget_s or (FULL_BUDGET_S if full else BUDGET_S)
    return args


def main(argv=None, cuda_count=None) -> int:
    """``cuda_count`` (tests): the number of visible CUDA devices, instead of asking torch."""
    args = parse_args(argv)
    t_start = time.perf_counter()
    quick = args.quick
    device = args.device_resolved = resolve_device(args.device)
    preset = from_name("tiny-mixtral" if quick else "mixtral-8x7b", args.layers)
    if quick and device == "cpu":  # tiny tensors on a shared CI machine: extra intra-op threads only contend
        torch.set_num_threads(1)
        args.threads = args.threads or 1
    total = preset.layers * preset.experts
    path = Path(args.out) / ("moe_multi_gpu_full.json" if args.full_model else "moe_multi_gpu.json")
    record = {
        "benchmark": "moe_multi_gpu", "status": "running", "provenance": provenance(device), "gpus": gpu_facts(device),
        "settings": {"preset": preset.name, "layers": preset.layers, "experts_per_layer": preset.experts,
                     "total_experts": total, "per_gpu_experts": args.per_gpu, "configs": args.configs,
                     "dtype": str(preset.dtype).removeprefix("torch."), "expert_bytes": preset.expert_bytes(),
                     "full_model": args.full_model, "routings": args.routings, "schedule": args.schedule,
                     "prompt_tokens": args.prompt_tokens, "new_tokens": args.new_tokens,
                     "prefill_tokens": args.prefill_tokens, "prefill_repeats": args.prefill_repeats,
                     "rounds": args.rounds, "warm_rounds": args.warm_rounds, "anomaly_spread": ANOMALY_SPREAD,
                     "target_fraction_of_bound": TARGET,
                     "quick": quick, "budget_s": args.budget_s},
        "cost_model": None, "ceilings": None, "routings": {}, "runs": [], "comparison": {}, "targets": {},
    }

    run = RunRecord("moe_multi_gpu", path, record, start=t_start)
    save, log = run.save, run.log

    def finish(status):
        record["comparison"], record["targets"] = comparison(record), targets(record)
        save(status)

    def skip(reason, status):
        record["skipped"] = reason
        log(f"skipped: {reason}")
        finish(status)
        print_summary(record)
        return 0

    count = cuda_count if cuda_count is not None else (torch.cuda.device_count() if device.startswith("cuda") else 0)
    why = why_not_two_gpus(device, count, quick)
    if why:
        return skip(why, "skipped")
    if 2 * args.per_gpu > total:
        raise SystemExit(f"moe_multi_gpu: 2 x {args.per_gpu} experts per GPU is more than the model's {total}")
    save()
    try:  # the experts in (pinned) host memory: a model that cannot fit is a record, not a swapping host
        record["settings"]["host_memory"] = check_host_memory(preset, device)
    except ToolkitError as e:
        return skip(str(e), "skipped: host memory")
    try:
        cm = calibrate_costs(preset, device, args)
        record["cost_model"], record["cost_model_summary"] = cm.to_dict(), cm.summary()
        log(cm.summary())
        sessions = build_sessions(preset, cm, args, record)
        record["settings"]["build_s"] = run.elapsed_s
        log(f"built {preset.name} x{preset.layers} layers ({total} experts in host memory)")
        ceilings = measure_ceilings(cm, device, quick, record)
        log(f"ceilings: GPU {ceilings.gpu_gbs:.0f} GB/s, host {ceilings.host_gbs:.1f} GB/s, "
            f"H2D {ceilings.h2d_gbs:.1f} GB/s")
        bench = Bench(sessions, ceilings, args)
        save()
        scale = preset.layers / 8 * args.new_tokens / 64
        refs, tol_rel = {}, (1e-4 if preset.dtype == torch.float32 else 0.02)
        deadline = lambda: args.budget_s - run.elapsed_s  # noqa: E731
        in_time = True
        for routing in dict.fromkeys(r for r, _ in sessions):
            configs = [Config(CONFIGS[c][0], args.per_gpu, routing, EST_S[CONFIGS[c][0]] * scale, args.schedule,
                              ablation=CONFIGS[c][1]) for c in args.configs]
            if in_time:
                in_time = run_group(configs, bench, record, save, log, deadline, refs, tol_rel)
            else:  # an earlier routing used the budget up
                record["runs"] += [{**_entry(c, bench), "skipped": "time budget"} for c in configs]
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


# -- comparison, targets and summary ---------------------------------------------------------------------

def _measured(record: dict, config: str, routing: str) -> dict | None:
    for e in record["runs"]:
        if e["config"] == config and e["routing"] == routing and "decode" in e:
            return e
    return None


def _median(part: dict, key: str) -> float:
    """A measure's median over its rounds (the entry's own record is the median *decode* round's)."""
    return ((part or {}).get("rounds") or {}).get("median") or part[key]


def comparison(record: dict) -> dict:
    """Per routing: two GPUs over one, decode tok/s and prefill speed (the 1-gpu ms over the 2-gpu ms), from the
    medians of each measure's rounds."""
    out = {}
    for routing in record.get("routings", {}):
        one, two = _measured(record, "1-gpu", routing), _measured(record, "2-gpu", routing)
        if not (one and two):
            continue
        out[routing] = {"decode_speedup": _median(two["decode"], "tokens_per_s") / _median(one["decode"], "tokens_per_s"),
                        "prefill_speedup": _median(one["prefill"], "ms") / _median(two["prefill"], "ms"),
                        "hit_rate_1gpu": one["decode"]["hit_rate"], "hit_rate_2gpu": two["decode"]["hit_rate"],
                        "check_pass": (two.get("check") or {}).get("pass")}
        link = _measured(record, "2-gpu-one-link", routing)
        if link:  # what copying to both GPUs buys over copying to the first only
            out[routing]["both_links_decode_speedup"] = (_median(two["decode"], "tokens_per_s")
                                                         / _median(link["decode"], "tokens_per_s"))
            out[routing]["both_links_prefill_speedup"] = _median(link["prefill"], "ms") / _median(two["prefill"], "ms")
        ahead = _measured(record, "2-gpu-nolookahead", routing)
        if ahead:  # what starting the next layer's copies early buys a two-GPU prefill
            out[routing]["lookahead_prefill_speedup"] = _median(ahead["prefill"], "ms") / _median(two["prefill"], "ms")
        for gpus, base in ((1, one), (2, two)):  # what planning with the measured contention buys
            plain = _measured(record, f"{gpus}-gpu-nocontention", routing)
            if plain:
                out[routing][f"contention_{gpus}gpu_decode_speedup"] = (_median(base["decode"], "tokens_per_s")
                                                                        / _median(plain["decode"], "tokens_per_s"))
                out[routing][f"contention_{gpus}gpu_prefill_speedup"] = (_median(plain["prefill"], "ms")
                                                                         / _median(base["prefill"], "ms"))
    return out


def targets(record: dict) -> dict:
    """Per run and phase: bound / measured >= TARGET (None where not measured)."""
    out = {}
    for e in record["runs"]:
        for phase in ("decode", "prefill"):
            part = e.get(phase) or {}
            value = part.get("fraction_of_bound")
            if phase == "prefill" and value is not None:  # the median of its rounds against that round's bound
                value = part["bound"]["ms"] / _median(part, "ms")
            ok = value is not None and math.isfinite(value)
            out[f"{e['config']} {e['routing']} {phase}"] = {"value": value if ok else None, "goal": TARGET,
                                                            "met": (value >= TARGET) if ok else None}
    return out


def _f(x, spec=".2f") -> str:  # this table's precision; a missing value reads "n/a", as everywhere
    return fmt(x, spec)


def _pct(x) -> str:
    return pct(x, ".0f")


def _spread(part: dict) -> str:
    s = (part or {}).get("rounds") or {}
    return "-" if s.get("spread") is None else f"{100 * s['spread']:.0f}%"


def _devices(e: dict) -> str:
    return " ".join(f"{d['experts']}e/{d['rows']}r" for d in e.get("devices") or [])


def _line(e: dict) -> str:
    d, p = e.get("decode") or {}, e.get("prefill") or {}
    return (f"{e['config']} {e['routing']} k={e['budget']}: decode {_f(d.get('tokens_per_s'))} tok/s "
            f"({_pct(d.get('fraction_of_bound'))} of bound, spread {_spread(d)}), prefill {_f(p.get('ms'), '.0f')} ms "
            f"({_pct(p.get('fraction_of_bound'))} of bound), devices {_devices(e)}"
            f"{', ANOMALOUS' if e.get('anomalous') else ''} ({e.get('seconds', 0):.0f} s)")


def print_summary(record: dict) -> None:
    s = record["settings"]
    print(f"\n{s['preset']} x{s['layers']} layers, {s['total_experts']} experts, {s['dtype']}, {s['per_gpu_experts']} "
          f"experts per GPU; decode {s['new_tokens']} tokens after {s['prompt_tokens']}, prefill "
          f"{s['prefill_tokens']}; {s['rounds']} rounds each; status {record['status']}")
    if record.get("skipped"):
        print(f"skipped: {record['skipped']}")
        return
    c = record.get("ceilings")
    if c:
        print(f"ceilings: GPU {c['gpu_gbs']:.0f} GB/s, host {c['host_gbs']:.1f} GB/s, H2D {c['h2d_gbs']:.1f} GB/s")
    print(f"{'config':<18} {'routing':<8} {'k':>3} {'hit':>5} {'tok/s':>7} {'spread':>6} {'p50 ms':>7} {'bound':>6} "
          f"{'%bnd':>5} {'prefill':>8} {'spread':>6} {'bound':>7} {'%bnd':>5} {'check':>5}  experts/rows per device")
    for e in record["runs"]:
        if "decode" not in e:
            print(f"{e['config']:<18} {e['routing']:<8} {e['budget']:>3}  {e.get('skipped') or e.get('error') or '-'}")
            continue
        d, p, ck = e["decode"], e["prefill"], e.get("check")
        print(f"{e['config']:<18} {e['routing']:<8} {e['budget']:>3} {_f(d['hit_rate']):>5} {_f(d['tokens_per_s']):>7} "
              f"{_spread(d):>6} {_f(d['median_ms']):>7} {_f(d['bound']['ms']):>6} {_pct(d['fraction_of_bound']):>5} "
              f"{_f(_median(p, 'ms'), '.1f'):>8} {_spread(p):>6} {_f(p['bound']['ms'], '.1f'):>7} "
              f"{_pct(p['bound']['ms'] / _median(p, 'ms')):>5} {'-' if not ck else ('ok' if ck['pass'] else 'FAIL'):>5}  "
              f"{_devices(e)}{'  anomalous: ' + e['anomaly_reason'] if e.get('anomalous') else ''}")
    for routing, cmp in (record.get("comparison") or {}).items():
        print(f"2 GPUs over 1 ({routing}): decode x{_f(cmp['decode_speedup'])}, prefill x{_f(cmp['prefill_speedup'])}")
        if "both_links_decode_speedup" in cmp:
            print(f"copies to both GPUs over copies to the first ({routing}): decode "
                  f"x{_f(cmp['both_links_decode_speedup'])}, prefill x{_f(cmp['both_links_prefill_speedup'])}")
        if "lookahead_prefill_speedup" in cmp:
            print(f"2 GPUs, prefill with lookahead copies over without ({routing}): "
                  f"x{_f(cmp['lookahead_prefill_speedup'])}")
        for gpus in (1, 2):
            if f"contention_{gpus}gpu_decode_speedup" in cmp:
                print(f"{gpus} GPU{'s' if gpus > 1 else ''}, planned with the contention over without ({routing}): "
                      f"decode x{_f(cmp[f'contention_{gpus}gpu_decode_speedup'])}, "
                      f"prefill x{_f(cmp[f'contention_{gpus}gpu_prefill_speedup'])}")
    print(f"targets (>= {100 * TARGET:.0f}% of bound):")
    for name, t in (record.get("targets") or {}).items():
        met = {True: "MET", False: "not met", None: "n/a"}[t["met"]]
        print(f"  {name:<36} {_pct(t['value']):>5}: {met}")


if __name__ == "__main__":
    sys.exit(main())
