"""The CPU experts' few-token bf16 kernel: torch's results, its build and fallback, and where the engine uses it."""

import platform

import pytest
import torch
import torch.nn.functional as F

from toolkit.errors import ToolkitError
from toolkit.moe import cpu_gemv
from toolkit.moe.costs import CostModel, kernel_tokens

needs_kernel = pytest.mark.skipif(not cpu_gemv.usable(), reason=f"no CPU kernel here: {cpu_gemv.why_not()}")


def reference(x, w):
    """float32 products and sums, rounded once to bf16: what the kernel computes up to summation order."""
    return (x.float() @ w.float().T).to(torch.bfloat16)


def tolerance(x, w, ref):
    """How far the kernel may be from ``reference``: summation order differs, so one bf16 unit in the last place,
    plus float32 rounding of the terms' magnitude."""
    return ref.float().abs() * 2 ** -7 + (x.float().abs() @ w.float().abs().T) * 2 ** -18


@needs_kernel
@pytest.mark.parametrize("n,k,rows", [(1, 4096, 300), (2, 64, 7), (3, 4100, 37), (4, 33, 5), (5, 96, 17),
                                      (16, 300, 99), (1, 7, 3)])
def test_kernel_equals_float32_products_rounded_to_bf16(n, k, rows):
    g = torch.Generator().manual_seed(n * 1000 + k)
    x = torch.randn(n, k, generator=g).bfloat16()
    w = torch.randn(rows, k, generator=g).bfloat16()
    got = cpu_gemv.linear(x, w)
    ref = reference(x, w)
    assert got.dtype == torch.bfloat16 and got.shape == (n, rows)
    tol = tolerance(x, w, ref)
    assert ((got.float() - ref.float()).abs() <= tol).all()
    assert (got == ref).float().mean() > 0.97


@needs_kernel
def test_kernel_reads_row_slices_and_strided_inputs_as_the_engine_passes_them():
    g = torch.Generator().manual_seed(0)
    gate_up = torch.randn(2 * 48, 64, generator=g).bfloat16()  # [2I, D]
    x = torch.randn(6, 64, generator=g).bfloat16()[1:5]  # rows of a bigger batch
    lo, hi = 10, 40
    assert torch.equal(cpu_gemv.linear(x, gate_up[lo:hi]), cpu_gemv.linear(x.clone(), gate_up[lo:hi].clone()))
    xt = torch.randn(64, 3, generator=g).bfloat16().T  # unit stride along the wrong dimension
    assert torch.equal(cpu_gemv.linear(xt, gate_up), cpu_gemv.linear(xt.contiguous(), gate_up))
    assert cpu_gemv.linear(x[:0], gate_up).shape == (0, 96)


@needs_kernel
def test_kernel_runs_on_the_callers_torch_threads():
    x, w = torch.ones(1, 256).bfloat16(), torch.ones(64, 256).bfloat16()
    old = torch.get_num_threads()
    try:
        for n in (1, 2):
            torch.set_num_threads(n)
            assert torch.equal(cpu_gemv.linear(x, w), torch.full((1, 64), 256.0).bfloat16())
    finally:
        torch.set_num_threads(old)


def test_kernel_refuses_what_it_does_not_compute():
    with pytest.raises(ValueError, match="bf16 CPU tensors"):
        cpu_gemv.linear(torch.ones(1, 8), torch.ones(4, 8))
    with pytest.raises(ValueError, match="do not fit"):
        cpu_gemv.linear(torch.ones(1, 8).bfloat16(), torch.ones(4, 9).bfloat16())


def test_without_a_compiler_the_kernel_says_why_and_callers_keep_torch(monkeypatch):
    monkeypatch.setattr(cpu_gemv, "_compiler", lambda: None)
    cpu_gemv._library.cache_clear()
    try:
        assert not cpu_gemv.usable()
        assert "no C compiler" in cpu_gemv.why_not()
        assert cpu_gemv.linear_up_to(8) is F.linear
        with pytest.raises(RuntimeError, match="cannot run here: no C compiler"):
            cpu_gemv.linear(torch.ones(1, 8).bfloat16(), torch.ones(4, 8).bfloat16())
    finally:
        cpu_gemv._library.cache_clear()


def test_a_failed_build_is_reported_with_the_compilers_message(monkeypatch, tmp_path):
    broken_source = tmp_path / "broken.c"
    broken_source.write_text("this is not C;\n")
    monkeypatch.setattr(cpu_gemv, "SOURCE", broken_source)
    monkeypatch.setenv("TOOLKIT_CACHE_DIR", str(tmp_path / "cache"))
    cpu_gemv._library.cache_clear()
    try:
        if cpu_gemv._compiler() is None:
            pytest.skip("no C compiler here")
        assert "could not build broken.c" in cpu_gemv.why_not()
        assert not list((tmp_path / "cache").rglob("*.so"))  # nothing half-written is left to load
    finally:
        cpu_gemv._library.cache_clear()


@needs_kernel
def test_linear_up_to_takes_the_kernel_only_for_few_bf16_rows(monkeypatch):
    calls = []
    real = cpu_gemv.linear
    monkeypatch.setattr(cpu_gemv, "linear", lambda x, w: calls.append(x.shape[0]) or real(x, w))
    assert cpu_gemv.linear_up_to(0) is F.linear
    lin = cpu_gemv.linear_up_to(4)
    w = torch.ones(8, 16).bfloat16()
    for n in (1, 4, 5):
        lin(torch.ones(n, 16).bfloat16(), w)
    lin(torch.ones(1, 16), torch.ones(8, 16))  # float32: torch's
    assert calls == [1, 4] and lin.tokens == 4


def test_kernel_tokens_is_the_prefix_of_counts_where_the_kernel_won_up_to_where_the_times_cross():
    tokens, torch_ms = (1, 8, 32, 128), (7.0, 7.2, 9.0, 16.0)
    assert kernel_tokens(tokens, torch_ms, {1: 4.5, 8: 5.0}) == 8
    assert kernel_tokens(tokens, torch_ms, {1: 4.5, 8: 7.5}) == 7  # won by 2.5 at 1, lost by 0.3 at 8: cross at 7.25
    assert kernel_tokens(tokens, torch_ms, {1: 7.5, 8: 5.0}) == 0  # slower at one token: never
    assert kernel_tokens(tokens, torch_ms, {}) == 0
    # a kernel without a token limit (AMX) that won at every calibrated count takes passes of any size
    won = {1: 4.5, 8: 5.0, 32: 6.0, 128: 15.0}
    assert kernel_tokens(tokens, torch_ms, won, any_size=True) == cpu_gemv.ANY_TOKENS
    assert kernel_tokens(tokens, torch_ms, won) == 128
    assert kernel_tokens(tokens, torch_ms, {**won, 128: 17.0}, any_size=True) == 104  # 32 + 96 * 3 / 4
    # the recorded one-H200 calibration: won by 2.20 ms at 32 tokens, lost by 0.15 at 128
    assert kernel_tokens((1, 8, 32, 128), (4.74, 4.77, 7.37, 12.72), {1: 3.27, 8: 3.49, 32: 5.17, 128: 12.87}) == 121
    assert kernel_tokens(tokens, torch_ms, {1: 4.5, 8: 7.2}) == 8  # a tie at 8: the lines meet there
    assert kernel_tokens(tokens, torch_ms, {1: 7.5}, any_size=True) == 0


def test_a_kernel_for_passes_of_any_size_says_so():
    from toolkit.moe.costs import kernel_passes

    assert kernel_passes(1) == "passes of up to 1 token" and kernel_passes(8) == "passes of up to 8 tokens"
    assert kernel_passes(cpu_gemv.ANY_TOKENS) == "passes of any size"
    cm = kernel_model(cpu_kernel_tokens=cpu_gemv.ANY_TOKENS)
    assert CostModel.from_dict(cm.to_dict()) == cm
    assert "toolkit kernel for passes of any size (x1.75 torch's at n=1)" in cm.summary()
    assert cm.kernel_line() == "toolkit kernel for passes of any size (x1.75 torch's matmul at n=1)"


def kernel_model(**kw):
    kw.setdefault("cpu_ms_kernel", (4.0, None))
    kw.setdefault("cpu_kernel_tokens", 8)
    return CostModel.fixed(cpu=(4.0, 0.0), copy_ms=6.0, cpu_dtype="bfloat16", dtype="bfloat16",
                           cpu_ms_torch=(7.0, 20.0),
                           cpu_ms_by_dtype={"bfloat16": [4.0, 20.0], "float32": [8.0, 60.0]}, **kw)


def test_cost_model_keeps_the_kernels_choice_and_its_ablation():
    cm = kernel_model()
    assert CostModel.from_dict(cm.to_dict()) == cm
    torch_only = cm.without_cpu_kernel()
    assert torch_only.cpu_kernel_tokens == 0 and torch_only.cpu_ms == (7.0, 20.0)
    assert torch_only.cpu_ms_by_dtype["bfloat16"] == [7.0, 20.0] and torch_only.cpu_linear is F.linear
    assert CostModel.fixed().without_cpu_kernel() == CostModel.fixed()
    assert "toolkit kernel for passes of up to 8 tokens (x1.75 torch's at n=1)" in cm.summary()
    assert "kernel" not in torch_only.summary()
    assert CostModel.fixed(cpu_dtype="float32").cpu_linear is F.linear


@pytest.mark.parametrize("bad,match", [({"cpu_kernel_tokens": -1}, "token count"),
                                       ({"cpu_kernel_tokens": True}, "token count"),
                                       ({"cpu_ms_torch": None}, "needs cpu_ms_torch"),
                                       ({"cpu_ms_torch": [1.0]}, "cpu_ms_torch"),
                                       ({"cpu_ms_kernel": [1.0]}, "cpu_ms_kernel"),
                                       ({"cpu_ms_kernel": [-1.0, None]}, "cpu_ms_kernel")])
def test_malformed_kernel_entries_are_rejected(bad, match):
    d = {**kernel_model().to_dict(), **bad}
    with pytest.raises(ToolkitError, match=match):
        CostModel.from_dict(d)


@needs_kernel
def test_calibration_times_the_kernel_against_torch_and_records_both(tmp_path):
    from toolkit.moe.costs import calibrate

    cm = calibrate(hidden=64, intermediate=128, dtype="bfloat16", device="cpu", tokens=(1, 8, 32), repeats=2,
                   path=tmp_path / "costs.json")
    assert cm.cpu_ms_torch is not None and len(cm.cpu_ms_torch) == 3
    assert all(v > 0 for v in cm.cpu_ms_kernel[:2])
    if cpu_gemv.amx():  # AMX: offered passes of any size, so timed at every count
        assert cm.cpu_ms_kernel[2] > 0
        assert 0 <= cm.cpu_kernel_tokens <= 32 or cm.cpu_kernel_tokens == cpu_gemv.ANY_TOKENS
    else:  # offered for up to MAX_TOKENS rows: 1 and 8 of these counts
        assert cm.cpu_ms_kernel[2] is None
        assert 0 <= cm.cpu_kernel_tokens <= 8
    n = cm.cpu_kernel_tokens
    if n and cm.cpu_dtype == "bfloat16":
        assert cm.cpu_ms[0] < cm.cpu_ms_torch[0]  # where the kernel won, the plan takes its time
    assert cm.gpu_ms == tuple(cm.cpu_ms_torch)  # the CPU-only engine's "GPU" tier computes with torch
    again = calibrate(hidden=64, intermediate=128, dtype="bfloat16", device="cpu", tokens=(1, 8, 32), repeats=2,
                      path=tmp_path / "costs.json")
    assert again == cm  # cached


@needs_kernel
def test_engine_computes_cpu_experts_with_the_kernel_and_matches_torch(monkeypatch):
    from test_offload import padded_batch, prefill_and_decode

    from toolkit.moe.offload import offload
    from toolkit.moe.presets import build_moe

    # one layer: its router sees the same input either way, so only the experts' bf16 rounding can differ
    # (with two, a near-tie in the second router may flip, as any change of CPU kernel can make it)
    model = build_moe("tiny-mixtral", layers=1, seed=0, dtype=torch.bfloat16)
    ids, mask = padded_batch()
    ref = prefill_and_decode(model, ids, mask)
    calls = []
    real = cpu_gemv.linear
    monkeypatch.setattr(cpu_gemv, "linear", lambda x, w: calls.append(x.shape[0]) or real(x, w))
    for use in (True, False):
        calls.clear()
        off = offload(model, 0, device="cpu", cost_model=kernel_model(), cpu_kernel=use)
        try:
            got = prefill_and_decode(model, ids, mask, like=ref)
            assert off.options.cpu_kernel is use and off.to_dict()["cpu_kernel_tokens"] == (8 if use else 0)
        finally:
            off.restore()
        scale = max(r.float().abs().max().item() for r in ref)
        diff = max((a.float() - b.float()).abs().max().item() for a, b in zip(ref, got))
        assert diff < 0.02 * scale
        if use:  # decode passes (and prefill experts with few rows) took the kernel; never more than 8 rows
            assert calls and max(calls) <= 8
        else:
            assert not calls


def test_the_moe_command_says_what_cpu_experts_multiply_with():
    from moe_records import run_record

    from toolkit.cli.moe import format_table

    def line(model):
        rows = format_table(run_record(cost_model=model.to_dict())).splitlines()
        return next(x for x in rows if x.startswith("  CPU experts multiply with"))

    assert line(kernel_model()).endswith("toolkit kernel for passes of up to 8 tokens (x1.75 torch's matmul at n=1)")
    assert line(kernel_model().without_cpu_kernel()).endswith("torch's matmul (the toolkit kernel, x1.75 torch's at "
                                                              "n=1, is switched off)")
    slower = kernel_model(cpu_ms_kernel=(8.0, None)).without_cpu_kernel()
    assert line(slower).endswith("torch's matmul (the toolkit kernel, x0.88 torch's at n=1, is slower here)")
    assert line(CostModel.fixed()).endswith("torch's matmul (float32)")


def test_the_calibration_times_kernel_and_torch_in_turn():
    from toolkit.moe.costs import _alternating_ms

    order, now = [], [0.0]
    cost = {"torch": 0.007, "kernel": 0.004}

    def run(name):
        order.append(name)
        now[0] += cost[name] * (3 if len(order) == 3 else 1)  # one slow spell, during the first timed torch call

    ms = _alternating_ms({k: (lambda k=k: run(k)) for k in cost}, repeats=3, warmup=1, clock=lambda: now[0])
    assert order == ["torch", "kernel"] * 4  # warm-up, then each repeat times both
    assert ms == pytest.approx({"torch": 7.0, "kernel": 4.0})  # medians: the slow spell does not decide


@needs_kernel
def test_the_kernel_is_built_in_the_temporary_folder_where_the_cache_cannot_hold_it(monkeypatch, tmp_path):
    not_a_folder = tmp_path / "file"
    not_a_folder.write_text("")
    monkeypatch.setenv("TOOLKIT_CACHE_DIR", str(not_a_folder))
    monkeypatch.setattr(cpu_gemv.tempfile, "gettempdir", lambda: str(tmp_path / "tmp"))
    cpu_gemv._library.cache_clear()
    try:
        assert cpu_gemv.usable()
        assert list((tmp_path / "tmp").rglob("cpu_gemv-*.so"))
    finally:
        cpu_gemv._library.cache_clear()


@pytest.mark.skipif(platform.machine() not in ("x86_64", "AMD64") or cpu_gemv._compiler() is None,
                    reason="the vector paths are x86's; needs a C compiler")
@pytest.mark.parametrize("march", ["x86-64", "haswell", "skylake-avx512", "cooperlake"])
def test_every_code_path_of_the_kernel_gives_the_same_products(march, tmp_path, monkeypatch):
    """Plain C, AVX2, AVX-512 and AVX512-BF16: whichever the machine's compiler picks must be right. A path
    this CPU cannot run is built but not called."""
    monkeypatch.setenv("TOOLKIT_CACHE_DIR", str(tmp_path))
    built = cpu_gemv._build(march)
    if isinstance(built, str):
        pytest.skip(f"this compiler cannot build -march={march}: {built[-120:]}")
    needs = {"haswell": "avx2", "skylake-avx512": "avx512f", "cooperlake": "avx512_bf16"}.get(march)
    if needs and needs not in cpu_gemv._cpu_flags().split():
        pytest.skip(f"this CPU has no {needs}")
    fn = cpu_gemv._load(built)
    g = torch.Generator().manual_seed(1)
    for n, k, rows in [(1, 4100, 37), (3, 64, 9), (5, 33, 17), (8, 7, 3)]:
        x, w = torch.randn(n, k, generator=g).bfloat16(), torch.randn(rows, k, generator=g).bfloat16()
        out = torch.empty(n, rows, dtype=torch.bfloat16)
        assert cpu_gemv._call(fn, x, w, out) == 0
        ref = reference(x, w)
        tol = tolerance(x, w, ref)
        assert ((out.float() - ref.float()).abs() <= tol).all(), (march, n, k, rows)


@needs_kernel
def test_the_benchmark_compares_both_sides_on_a_small_expert(tmp_path, capsys):
    import json

    from benchmark_scripts import load_benchmark

    bench = load_benchmark("cpu_gemv")
    assert bench.main(["--quick", "--tokens", "1,4", "--out", str(tmp_path)]) == 0
    doc = json.loads((tmp_path / "cpu_gemv.json").read_text())
    assert set(doc["cases"]) == {"1", "4"} and doc["provenance"]["command"].startswith("cpu_gemv.py --quick")
    for case in doc["cases"].values():
        assert case["torch_ms"] > 0 and case["kernel_ms"] > 0 and case["speedup"] == pytest.approx(
            case["torch_ms"] / case["kernel_ms"])
        assert len(case["rounds_ms"]["torch"]) == 2 and case["torch_spread"] >= 0
        assert case["max_abs_diff"] < 0.05
    assert doc["host_read_gbs"] > 0 and doc["float32_weights"]["gbs"] > 0
    with pytest.raises(SystemExit) as bad:
        bench.main(["--tokens", "one", "--quick", "--out", str(tmp_path)])
    assert bad.value.code == 2 and "--tokens takes comma-separated token counts" in capsys.readouterr().err


def test_the_host_read_benchmark_times_warm_and_cold_reads(tmp_path, capsys):
    import json

    from benchmark_scripts import load_benchmark

    bench = load_benchmark("host_read")
    assert bench.main(["--quick", "--out", str(tmp_path)]) == 0
    doc = json.loads((tmp_path / "host_read.json").read_text())
    assert doc["provenance"]["command"].startswith("host_read.py --quick")
    assert set(doc["plain_read"]) == {"4", "16"} and all(r["gbs"] > 0 for r in doc["plain_read"].values())
    sides = {"cpu_torch_warm", "cpu_torch_cold"} | ({"cpu_kernel_warm", "cpu_kernel_cold"} if cpu_gemv.usable() else set())
    if torch.cuda.is_available():  # the pinned copy, and both paths at once
        sides |= {"copy_warm", "copy_cold"}
        assert doc["both_paths"]["gbs"] > 0 and len(doc["both_paths"]["rounds"]) == 2
    assert set(doc["expert"]) == sides and all(len(r["rounds_ms"]) == 2 for r in doc["expert"].values())
    assert doc["settings"]["cold_copies"] >= 2 and doc["summary"]["cpu_warm_over_cold"]["torch"] > 0
    with pytest.raises(SystemExit) as bad:
        bench.main(["--sizes-mib", "x", "--out", str(tmp_path)])
    assert bad.value.code == 2 and "--sizes-mib takes comma-separated sizes" in capsys.readouterr().err


@pytest.mark.skipif(cpu_gemv._compiler() is None, reason="needs a C compiler")
def test_the_amx_blocking_gives_the_same_products_on_emulated_tiles(tmp_path, monkeypatch):
    """The AMX path's repacking, row blocks, token groups and tails, built over plain-C tiles so any CPU runs
    it: every shape a pass can take (tokens not a multiple of 16, rows not a multiple of 16 or 32, K over several
    chunks, more than one pair of token groups: weights copied into tile order, strides)."""
    monkeypatch.setenv("TOOLKIT_CACHE_DIR", str(tmp_path))
    built = cpu_gemv._build("native", defines=("TOOLKIT_AMX_EMULATE",))
    assert not isinstance(built, str), built
    fn = cpu_gemv._load(built)
    assert fn.amx  # the emulated tiles always "run"
    g = torch.Generator().manual_seed(3)
    for n, k, rows in [(1, 64, 16), (5, 96, 48), (17, 64, 50), (33, 128, 77), (50, 320, 70), (16, 32, 32), (40, 64, 15),
                       (3, 33, 40)]:  # last two: too few rows for a tile, K not a multiple of 32 -> vector path
        x, w = torch.randn(n + 2, k, generator=g).bfloat16()[1:n + 1], torch.randn(rows, k, generator=g).bfloat16()
        ref = reference(x, w)
        tol = tolerance(x, w, ref)
        for path in (0, 2):
            out = torch.full((n, rows), float("nan"), dtype=torch.bfloat16)
            assert cpu_gemv._call(fn, x, w, out, path) == 0
            assert ((out.float() - ref.float()).abs() <= tol).all(), (n, k, rows, path)
    # a slice of rows of a bigger weight (row stride > K) and an output with a row stride, as the engine passes
    w = torch.randn(96, 64, generator=g).bfloat16()
    x = torch.randn(20, 64, generator=g).bfloat16()
    big = torch.zeros(20, 80, dtype=torch.bfloat16)
    assert cpu_gemv._call(fn, x, w[10:74], big[:, 8:72], 2) == 0
    ref = reference(x, w[10:74])
    assert ((big[:, 8:72].float() - ref.float()).abs() <= ref.float().abs() * 2 ** -7 + 1e-3).all()
    assert (big[:, :8] == 0).all() and (big[:, 72:] == 0).all()


@needs_kernel
def test_the_kernel_offers_passes_by_the_paths_it_has(monkeypatch):
    lib = cpu_gemv._library()
    assert cpu_gemv.amx() == lib.amx
    assert cpu_gemv.offered(cpu_gemv.MAX_TOKENS)
    assert cpu_gemv.offered(512) == lib.amx
    assert cpu_gemv.max_tokens() == (None if lib.amx else cpu_gemv.MAX_TOKENS)
    x, w = torch.randn(6, 64).bfloat16(), torch.randn(32, 64).bfloat16()
    for path in ("auto", "vector", "amx"):  # where AMX does not run, "amx" is the vector path
        ref = reference(x, w)
        got = cpu_gemv.linear(x, w, path=path)
        assert ((got.float() - ref.float()).abs() <= ref.float().abs() * 2 ** -7 + 1e-2).all()
    with pytest.raises(ValueError, match="path is one of auto, vector, amx"):
        cpu_gemv.linear(x, w, path="tiles")


@needs_kernel
def test_a_kernel_offered_any_pass_is_timed_at_every_count_and_may_take_them_all(tmp_path, monkeypatch):
    """Where the kernel has no token limit (AMX), the calibration times it at every count; had it won at all
    of them, CPU experts take it for passes of any size and the plan extrapolates its times."""
    from toolkit.moe import costs

    monkeypatch.setattr(cpu_gemv, "max_tokens", lambda: None)
    monkeypatch.setattr(cpu_gemv, "offered", lambda n: True)
    seen = {}

    def rigged(fns, repeats, warm, clock):  # the kernel measured faster at every count
        ms = {name: (1.0 if name == "kernel" else 2.0) for name in fns}
        seen.setdefault(tuple(fns), 0)
        seen[tuple(fns)] += 1
        return ms

    monkeypatch.setattr(costs, "_alternating_ms", rigged)
    cm = costs.calibrate(hidden=64, intermediate=128, dtype="bfloat16", device="cpu", tokens=(1, 8, 32), repeats=2,
                         path=tmp_path / "costs.json")
    assert cm.cpu_ms_kernel == (1.0, 1.0, 1.0) and cm.cpu_kernel_tokens == cpu_gemv.ANY_TOKENS
    assert cm.cpu_ms == (1.0, 1.0, 1.0) and cm.cpu_linear.tokens == cpu_gemv.ANY_TOKENS
    assert "passes of any size" in cm.summary()

    def boom(*a, **k):
        raise AssertionError("measured again")

    monkeypatch.setattr(costs, "_measure", boom)
    again = dict(hidden=64, intermediate=128, dtype="bfloat16", device="cpu", tokens=(1, 8, 32), repeats=2,
                 path=tmp_path / "costs.json")
    assert costs.calibrate(**again) == cm  # cached
    # an entry from where the kernel was offered up to 16 tokens only: measured again where it is offered more
    old = {**cm.to_dict(), "cpu_ms_kernel": [1.0, 1.0, None], "cpu_kernel_tokens": 8}
    costs.save_cost_model(CostModel.from_dict(old), tmp_path / "costs.json")
    with pytest.raises(AssertionError, match="measured again"):
        costs.calibrate(**again)
    monkeypatch.setattr(cpu_gemv, "offered", lambda n: n <= cpu_gemv.MAX_TOKENS)  # no AMX: nothing more to time
    assert costs.calibrate(**again).cpu_kernel_tokens == 8


def test_the_python_side_knows_the_c_sides_amx_threshold_and_paths():
    import re

    source = cpu_gemv.SOURCE.read_text()
    assert int(re.search(r"#define AMX_FROM_TOKENS (\d+)", source).group(1)) == cpu_gemv.AMX_FROM_TOKENS
    assert "path: 0 the machine's best" in source and "1 the vector path, 2 AMX" in source
    assert cpu_gemv.PATHS == {"auto": 0, "vector": 1, "amx": 2}
