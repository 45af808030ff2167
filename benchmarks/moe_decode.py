"""MoE offload speed (issue 7): our engine against the peer schemes on Mixtral-8x7B dimensions, with the roofline.

One device call (hard budget ``--budget-s``, default 450 s including the model build), saving
OUT/moe_decode.json after every configuration so an interruption keeps what was measured:

1. build ``mixtral-8x7b`` x 8 layers in bf16 (experts in pinned host memory), calibrate the cost model
   (saved next to the results), measure the ceilings (GPU read, host read with the CPU threads, pinned H2D);
2. two routings, replayed identically for every scheme (the router restarts before each run):
   ``uniform`` (each token picks 2 distinct experts uniformly at random, seeded) and ``trace``
   (``toolkit.moe.traces.synthetic_mixtral``: real Mixtral popularity and locality; placement from the
   real routing counts, as Fiddler profiles offline);
3. at the 22% budget (14 of 64 experts) every scheme of ``toolkit.moe.baselines``: batch-1 decode of 64
   tokens after a 16-token prompt (copy-on-demand: 16), a 512-token prefill, beam width 4 (ours,
   fiddler-serial, all-gpu), and a logits check against all-gpu; per run the roofline bound from the
   experts the run really read, and measured / bound;
4. a budget sweep for ours (0, 8, 24, 32, 48, 64), then ablations (ours without the split, without
   the worker thread).

Prints a table and whether each target of the issue is met (ratios from this one run).

  PYTHONPATH=. python benchmarks/moe_decode.py --out data/gpu                    # GPU, ~5 min
  PYTHONPATH=. python benchmarks/moe_decode.py --quick --device cpu --out /tmp/x  # CPU smoke test, < 1 min
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch

from toolkit.env import resolve_device
from toolkit.errors import ToolkitError
from toolkit.moe import generation as G
from toolkit.moe import roofline as R
from toolkit.moe.baselines import get_baseline
from toolkit.moe.costs import calibrate
from toolkit.moe.presets import build_moe, from_name
from toolkit.results import provenance, save_json

BUDGET_S = 450.0
SCHEMES = ("all-gpu", "ours", "fiddler-serial", "lru-copy", "copy-on-demand")  # most important first
BEAM_SCHEMES = ("all-gpu", "ours", "fiddler-serial")
# seconds a configuration may take on the GPU (conservative): skipped when less than this is left
EST_S = {"all-gpu": 15, "ours": 20, "fiddler-serial": 40, "lru-copy": 20, "copy-on-demand": 45, "sweep": 12,
         "ablation": 15}


# -- routing -----------------------------------------------------------------------------------------

def uniform_trace(n_tokens: int, n_layers: int, n_experts: int, top_k: int, seed: int = 0):
    """A trace in which every token picks ``top_k`` distinct experts uniformly at random."""
    from toolkit.moe.traces import Trace

    rng = np.random.default_rng(seed)
    experts = np.argsort(rng.random((n_tokens, n_layers, n_experts)), axis=-1)[..., :top_k]  # [N, L, K]
    w = np.sort(rng.random((n_tokens, n_layers, top_k)), axis=-1)[..., ::-1]  # [N, L, K] largest first
    w = (w / w.sum(-1, keepdims=True)).astype(np.float32)
    return Trace(experts, w, np.arange(n_tokens), np.ones(n_tokens), {"n_experts": n_experts,
                                                                      "source": f"uniform random, seed {seed}"})


def make_routings(preset, n_tokens: int) -> tuple[dict, dict]:
    """name -> (router, popularity [L, E] or None), and what each is (for the record)."""
    try:
        from toolkit.moe.traces import TraceRouter, real_popularity, synthetic_mixtral
    except Exception as e:  # traces belong to another issue: run without them, say why
        return {"model-router": (None, None)}, {"model-router": f"toolkit.moe.traces not importable ({e}); "
                                                                f"the model's own random router"}
    out, info = {}, {}
    uni = uniform_trace(n_tokens, preset.layers, preset.experts, preset.top_k)
    out["uniform"] = (TraceRouter(uni), None)  # no profile: placement spread evenly over layers
    info["uniform"] = uni.meta["source"]
    if preset.experts == 8 and preset.top_k == 2 and preset.layers <= 32:
        try:
            tr = synthetic_mixtral(n_layers=preset.layers, n_sequences=max(2, -(-n_tokens // 384)))
            out["trace"] = (TraceRouter(tr), real_popularity()[: preset.layers].astype(np.float64))
            info["trace"] = tr.meta["source"]
        except Exception as e:
            info["trace"] = f"not available: {type(e).__name__}: {e}"
    else:
        info["trace"] = f"synthetic Mixtral trace needs 8 experts, top-2 ({preset.name} has {preset.experts})"
    return out, info


# -- measurements --------------------------------------------------------------------------------------

class Bench:
    """The fixed parts of every measurement: model, prompts, ceilings, clock."""

    def __init__(self, model, preset, device, ceilings, args):
        self.model, self.preset, self.device, self.ceilings, self.args = model, preset, device, ceilings, args
        self.expert_bytes = preset.expert_bytes()
        self.dtype_bytes = torch.empty((), dtype=preset.dtype).element_size()
        self.sync = G.cuda_synchronizer(device)
        V = preset.vocab
        self.ids, self.mask = G.random_prompts(V, args.prompt_tokens, seed=0)
        self.long_ids = G.random_prompts(V, args.prefill_tokens, seed=1)[0].to(device)
        self.probe_ids = G.random_prompts(V, 8, seed=2)[0].to(device)

    def dense(self, kv_tokens: int, sequences: int = 1) -> int:
        return R.dense_bytes(self.model.config, self.dtype_bytes, kv_tokens, sequences)

    @torch.no_grad()
    def probe(self, off, router) -> torch.Tensor:
        """Logits of a short prompt [8, V] (float32) under the replayed routing."""
        _reset(router)
        return off.model(input_ids=self.probe_ids, use_cache=False).logits[0].float()

    def decode(self, off, router, tokens: int, beams: int = 1) -> dict:
        """Warm-up, then batch-1 generation of ``tokens`` (beam width ``beams``); timings, hits and the bound."""
        kw = dict(num_beams=beams, ignore_eos=True)
        _reset(router)
        G.generate(off, self.ids, self.mask, max_new_tokens=2, **kw)
        _reset(router)
        res = G.generate(off, self.ids, self.mask, max_new_tokens=tokens, **kw)
        reads = R.reads_from_stats(off.stats, "decode")
        bound = R.decode_bound(reads, self.expert_bytes, self.ceilings,
                               self.dense(self.args.prompt_tokens + tokens // 2, beams))
        d = res.decode_ms
        return {"tokens": tokens, "beams": beams, "steps_per_s": 1e3 / d["mean"] if d["mean"] else math.nan,
                "tokens_per_s": res.decode_tokens_per_s, "mean_ms": d["mean"], "median_ms": d["median"],
                "p90_ms": d["p90"], "samples_ms": d["samples"], "prefill_ms": res.prefill_ms,
                "hit_rate": off.stats.hit_rate("decode"), "reads": reads.to_dict(), "bound": bound.to_dict(),
                "measured_over_bound": bound.ratio(d["mean"]), "stats": _stats(off),
                "sequences": [list(s) for s in res.sequences]}

    @torch.no_grad()
    def prefill(self, off, router, repeats: int, warm_tokens: int) -> dict:
        """A ``prefill_tokens`` prompt through the model (no KV cache kept): ms, hits and the bound."""
        def once(ids):
            _reset(router)
            off.reset_stats()
            self.sync()
            t0 = time.perf_counter()
            off.model(input_ids=ids, use_cache=False, logits_to_keep=1)
            self.sync()
            return (time.perf_counter() - t0) * 1e3

        once(self.long_ids[:, :warm_tokens])  # kernels, pageable clones
        samples = [once(self.long_ids) for _ in range(repeats)]
        reads = R.reads_from_stats(off.stats, "prefill")
        bound = R.prefill_bound(reads, self.expert_bytes, self.ceilings, self.dense(self.args.prefill_tokens))
        ms = float(np.median(samples))
        return {"tokens": self.args.prefill_tokens, "ms": ms, "samples_ms": samples,
                "hit_rate": off.stats.hit_rate("prefill"), "reads": reads.to_dict(), "bound": bound.to_dict(),
                "measured_over_bound": bound.ratio(ms), "stats": _stats(off)}


def _reset(router) -> None:
    if router is not None:
        router.reset()


def _stats(off) -> dict:
    s = off.stats
    return {"cpu_expert_calls": s.cpu_expert_calls, "copy_expert_calls": s.copy_expert_calls,
            "split_expert_calls": s.split_expert_calls, "gpu_expert_calls": s.gpu_expert_calls,
            "bytes_copied": s.bytes_copied, "cpu_tokens": s.cpu_tokens}


def check(got: torch.Tensor, ref: torch.Tensor | None, tol_rel: float) -> dict | None:
    if ref is None:
        return None
    diff = float((got - ref).abs().max())
    scale = float(ref.abs().max())
    return {"max_abs_diff": diff, "max_abs_logit": scale, "rel": diff / scale if scale else math.nan,
            "argmax_agreement": float((got.argmax(-1) == ref.argmax(-1)).float().mean()), "tolerance_rel": tol_rel,
            "pass": diff <= tol_rel * scale}


# -- the run ---------------------------------------------------------------------------------------------

def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="data/gpu")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--quick", action="store_true", help="tiny model, few tokens: a smoke test")
    ap.add_argument("--preset", default=None, help="default mixtral-8x7b (tiny-mixtral with --quick)")
    ap.add_argument("--layers", type=int, default=None, help="default 8 (2 with --quick)")
    ap.add_argument("--budget", type=float, default=0.22, help="GPU expert budget for the comparison (fraction)")
    ap.add_argument("--prompt-tokens", type=int, default=16)
    ap.add_argument("--new-tokens", type=int, default=None, help="decode tokens (default 64, 8 with --quick)")
    ap.add_argument("--prefill-tokens", type=int, default=None, help="default 512 (32 with --quick)")
    ap.add_argument("--beams", type=int, default=4)
    ap.add_argument("--beam-tokens", type=int, default=None, help="default 16 (3 with --quick)")
    ap.add_argument("--threads", type=int, default=None, help="CPU expert threads (default: physical cores - 1)")
    ap.add_argument("--budget-s", type=float, default=BUDGET_S, help="hard time budget of the whole run")
    args = ap.parse_args(argv)

    t_start = time.perf_counter()
    device = resolve_device(args.device)
    quick = args.quick
    preset = from_name(args.preset or ("tiny-mixtral" if quick else "mixtral-8x7b"),
                       args.layers if args.layers is not None else (2 if quick else 8))
    args.new_tokens = args.new_tokens or (8 if quick else 64)
    args.prefill_tokens = args.prefill_tokens or (32 if quick else 512)
    args.beam_tokens = args.beam_tokens or (3 if quick else 16)
    if quick and device == "cpu":  # tiny tensors on a shared CI machine: extra intra-op threads only contend
        torch.set_num_threads(1)
        args.threads = args.threads or 1
    total = preset.layers * preset.experts
    budget = int(round(args.budget * total))
    sweep = sorted({min(total, int(round(f * total))) for f in (0, 0.125, 0.375, 0.5, 0.75, 1.0)} - {budget})

    out_dir = Path(args.out)
    path = out_dir / "moe_decode.json"
    record = {
        "benchmark": "moe_decode", "status": "running", "provenance": provenance(device),
        "settings": {"preset": preset.name, "layers": preset.layers, "experts_per_layer": preset.experts,
                     "total_experts": total, "budget": budget, "budget_fraction": args.budget, "sweep": sweep,
                     "dtype": str(preset.dtype).removeprefix("torch."), "expert_bytes": preset.expert_bytes(),
                     "prompt_tokens": args.prompt_tokens, "new_tokens": args.new_tokens,
                     "prefill_tokens": args.prefill_tokens, "beams": args.beams, "beam_tokens": args.beam_tokens,
                     "quick": quick, "budget_s": args.budget_s},
        "cost_model": None, "ceilings": None, "routings": {}, "runs": [], "targets": {},
    }

    def save(status=None):
        if status:
            record["status"] = status
        record["elapsed_s"] = time.perf_counter() - t_start
        save_json(record, path)

    def log(msg):
        print(f"[moe_decode {time.perf_counter() - t_start:6.1f}s] {msg}", file=sys.stderr, flush=True)

    save()
    try:
        model = build_moe(preset, device=device, expert_device="cpu", seed=0)
        record["settings"]["build_s"] = time.perf_counter() - t_start
        log(f"built {preset.name} x{preset.layers} layers ({total} experts in host memory)")
        cm = calibrate(preset.hidden, preset.intermediate, preset.dtype, device, threads=args.threads,
                       path=out_dir / "moe_decode_costs.json", repeats=3 if quick else 5)
        record["cost_model"], record["cost_model_summary"] = cm.to_dict(), cm.summary()
        log(cm.summary())
        try:
            ceilings = R.Ceilings.from_cost_model(cm)
            measured = R.measure_ceilings(device, cm.cpu_threads, nbytes=(64 << 20) if quick else (1 << 30))
            # the GPU read ceiling is measured directly; host and H2D as the engine's calibration saw them
            ceilings = dataclasses.replace(ceilings, gpu_gbs=measured.gpu_gbs, source="calibration + measured GPU")
            record["ceilings_measured"] = measured.to_dict()
        except ToolkitError:  # a CPU-only calibration has no host bandwidth: measure all three
            ceilings = R.measure_ceilings(device, cm.cpu_threads, nbytes=(64 << 20) if quick else (1 << 30))
        record["ceilings"] = ceilings.to_dict()
        log(f"ceilings: GPU {ceilings.gpu_gbs:.0f} GB/s, host {ceilings.host_gbs:.1f} GB/s, "
            f"H2D {ceilings.h2d_gbs:.1f} GB/s")
        routings, info = make_routings(preset, 8192 if not quick else 1024)
        record["routings"] = info
        bench = Bench(model, preset, device, ceilings, args)
        save()

        refs = {}  # routing -> all-gpu probe logits
        tol_rel = 1e-4 if preset.dtype == torch.float32 else 0.02

        def run(kind, scheme, routing, k, est, decode=True, prefill=True, beam=False):
            left = args.budget_s - (time.perf_counter() - t_start)
            entry = {"kind": kind, "scheme": scheme.name, "routing": routing, "budget": k}
            if left < (1 if quick else est):
                entry["skipped"] = f"time budget ({left:.0f} s left)"
                record["runs"].append(entry)
                save()
                log(f"{kind} {scheme.name} {routing} k={k}: skipped, {left:.0f} s left")
                return
            router, popularity = routings[routing]
            t = time.perf_counter()
            try:
                off = scheme.offload(model, k, device=device, popularity=popularity, cost_model=cm, routing=router,
                                     cpu_threads=cm.cpu_threads)
            except ToolkitError as e:  # e.g. all-gpu does not fit
                entry["error"] = str(e)
                record["runs"].append(entry)
                save()
                log(f"{scheme.name}: {e}")
                return
            try:
                entry["engine"] = {k2: v for k2, v in off.to_dict().items() if k2 not in ("cost_model", "stats")}
                logits = bench.probe(off, router)
                if scheme.name == "all-gpu":
                    refs[routing] = logits
                entry["check"] = check(logits, refs.get(routing), tol_rel)
                if decode:
                    n = min(args.new_tokens, scheme.token_cap or args.new_tokens) if not quick else args.new_tokens
                    entry["decode"] = bench.decode(off, router, n)
                if prefill:
                    slow = scheme.serial or scheme.pageable_copies
                    entry["prefill"] = bench.prefill(off, router, repeats=1 if slow or quick else 3,
                                                     warm_tokens=min(64, args.prefill_tokens) if slow
                                                     else args.prefill_tokens)
                if beam:
                    entry["beam"] = bench.decode(off, router, args.beam_tokens, beams=args.beams)
            except ToolkitError as e:
                entry["error"] = str(e)
            finally:
                off.restore()
                del off
                gc.collect()
            entry["seconds"] = time.perf_counter() - t
            record["runs"].append(entry)
            save()
            log(_line(entry))

        # 1. every scheme at the comparison budget, under each routing
        for routing in routings:
            for name in SCHEMES:
                run("compare", get_baseline(name), routing, total if name == "all-gpu" else budget, EST_S[name],
                    beam=name in BEAM_SCHEMES)
        # 2. the budget sweep for ours
        ours = get_baseline("ours")
        for routing in routings:
            for k in sweep:
                run("sweep", ours, routing, k, EST_S["sweep"])
        # 3. ablations of ours at the comparison budget
        first = next(iter(routings))
        for variant, change in (("ours-nosplit", {"split": False}), ("ours-inline", {"overlap": False})):
            run("ablation", dataclasses.replace(ours, name=variant, **change), first, budget, EST_S["ablation"])
        record["targets"], record["ratios"] = targets(record), ratios(record)
        save("complete")
    except KeyboardInterrupt:
        record["targets"], record["ratios"] = targets(record), ratios(record)
        save("interrupted")
        print_summary(record)
        return 130
    except Exception as e:
        record["targets"], record["ratios"] = targets(record), ratios(record)
        save(f"error: {type(e).__name__}: {e}")
        raise
    print_summary(record)
    print(f"wrote {path}")
    return 0


# -- targets and summary --------------------------------------------------------------------------------

def _find(record, kind, scheme, routing):
    for r in record["runs"]:
        if r["kind"] == kind and r["scheme"] == scheme and r["routing"] == routing and "skipped" not in r \
                and "error" not in r:
            return r
    return None


def targets(record) -> dict:
    """The issue's targets per routing, from this run's ratios (None where a run is missing)."""
    out = {}
    for routing in record.get("routings", {}):
        ours, fid, cod = (_find(record, "compare", s, routing) for s in ("ours", "fiddler-serial", "copy-on-demand"))
        t = {}

        def ratio(a, b, key, sub):
            if a and b and sub in a and sub in b and b[sub][key] and a[sub][key]:
                return a[sub][key] / b[sub][key]
            return None

        def add(name, value, goal, higher=True, t=t):
            met = None if value is None else (value >= goal if higher else value <= goal)
            t[name] = {"value": value, "goal": goal, "met": met}

        add("decode tok/s vs copy-on-demand", ratio(ours, cod, "tokens_per_s", "decode"), 10.0)
        add("decode tok/s vs fiddler-serial", ratio(ours, fid, "tokens_per_s", "decode"), 2.0)
        add("decode measured/bound", ours["decode"]["measured_over_bound"] if ours and "decode" in ours else None,
            1 / 0.7, higher=False)
        pre = (fid["prefill"]["ms"] / ours["prefill"]["ms"]) if ours and fid and "prefill" in ours \
            and "prefill" in fid else None
        add("prefill speed-up vs fiddler-serial (pageable)", pre, 5.0)
        add("prefill measured/bound", ours["prefill"]["measured_over_bound"] if ours and "prefill" in ours else None,
            1 / 0.7, higher=False)
        add("beam steps/s vs fiddler-serial", ratio(ours, fid, "steps_per_s", "beam"), 2.0)
        if fid and ours and "decode" in fid and "decode" in ours:  # what limits the fiddler ratio on this machine
            t["ceiling of decode speed-up vs fiddler-serial (fiddler ms / ours' bound)"] = \
                fid["decode"]["mean_ms"] / ours["decode"]["bound"]["ms"]
        out[routing] = t
    return out


def _ratio(record, entry, other: str, phase: str = "decode", key: str = "tokens_per_s"):
    """This run's speed over another scheme's at the comparison budget, same routing (None if missing)."""
    base = _find(record, "compare", other, entry["routing"])
    a, b = (entry.get(phase) or {}).get(key), ((base or {}).get(phase) or {}).get(key)
    return a / b if a and b else None


def ratios(record) -> dict:
    """Per routing and run label: decode tok/s, prefill speed and beam steps/s over copy-on-demand and fiddler-serial."""
    out = {}
    for e in record["runs"]:
        if "skipped" in e or "error" in e:
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


def _line(e) -> str:
    if "skipped" in e or "error" in e:
        return f"{e['kind']} {e['scheme']} {e['routing']} k={e['budget']}: {e.get('skipped') or e.get('error')}"
    d, p, b = e.get("decode") or {}, e.get("prefill") or {}, e.get("beam") or {}
    return (f"{e['kind']} {e['scheme']} {e['routing']} k={e['budget']}: decode {_f(d.get('tokens_per_s'))} tok/s "
            f"(x{_f(d.get('measured_over_bound'))} bound), prefill {_f(p.get('ms'), '.0f')} ms "
            f"(x{_f(p.get('measured_over_bound'))}), beam {_f(b.get('steps_per_s'))} steps/s, "
            f"check {'-' if not e.get('check') else ('ok' if e['check']['pass'] else 'FAIL')} "
            f"({e.get('seconds', 0):.0f} s)")


def print_summary(record: dict) -> None:
    s = record["settings"]
    print(f"\n{s['preset']} x{s['layers']} layers, {s['total_experts']} experts, {s['dtype']}, budget {s['budget']} "
          f"GPU experts; decode {s['new_tokens']} tokens after {s['prompt_tokens']}, prefill {s['prefill_tokens']}, "
          f"beam {s['beams']}; status {record['status']}")
    if record.get("cost_model_summary"):
        print(record["cost_model_summary"])
    c = record.get("ceilings")
    if c:
        print(f"ceilings: GPU {c['gpu_gbs']:.0f} GB/s, host {c['host_gbs']:.1f} GB/s, H2D {c['h2d_gbs']:.1f} GB/s")
    head = (f"{'kind':<8} {'routing':<8} {'scheme':<15} {'k':>3} {'hit':>5} {'tok/s':>7} {'p50 ms':>7} {'p90 ms':>7} "
            f"{'bound':>6} {'x bnd':>5} {'vs cod':>6} {'vs fid':>6} {'prefill':>8} {'bound':>6} {'x bnd':>5} "
            f"{'beam st/s':>9} {'check':>5}")
    print(head)
    for e in record["runs"]:
        if "skipped" in e or "error" in e:
            print(f"{e['kind']:<8} {e['routing']:<8} {e['scheme']:<15} {e['budget']:>3}  "
                  f"{e.get('skipped') or e.get('error')}")
            continue
        d, p, b = e.get("decode") or {}, e.get("prefill") or {}, e.get("beam") or {}
        ck = e.get("check")
        print(f"{e['kind']:<8} {e['routing']:<8} {e['scheme']:<15} {e['budget']:>3} {_f(d.get('hit_rate')):>5} "
              f"{_f(d.get('tokens_per_s')):>7} {_f(d.get('median_ms')):>7} {_f(d.get('p90_ms')):>7} "
              f"{_f((d.get('bound') or {}).get('ms')):>6} {_f(d.get('measured_over_bound')):>5} "
              f"{_f(_ratio(record, e, 'copy-on-demand')):>6} {_f(_ratio(record, e, 'fiddler-serial')):>6} "
              f"{_f(p.get('ms'), '.1f'):>8} {_f((p.get('bound') or {}).get('ms'), '.1f'):>6} "
              f"{_f(p.get('measured_over_bound')):>5} {_f(b.get('steps_per_s')):>9} "
              f"{'-' if not ck else ('ok' if ck['pass'] else 'FAIL'):>5}")
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
