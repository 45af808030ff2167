"""A decode step as one graph of every layer: when it is taken, what it hands out, and that it changes no result.

On CPU the capture backend re-runs the captured function on each replay (``EagerCapture``), so these tests
check the bookkeeping (what is captured, replayed and handed out, the trace's position) and the results;
the GPU test at the end checks the same on CUDA graphs.
"""


import pytest
import torch
from toy_layers import Layer, static_cache

from toolkit.errors import ToolkitError
from toolkit.moe import generation as G
from toolkit.moe.costs import CostModel
from toolkit.moe.graphs import DecodeGraphs, EagerCapture, cache_keyword, graphs_line
from toolkit.moe.offload import offload
from toolkit.moe.presets import build_moe
from toolkit.moe.prompts import random_prompts
from toolkit.moe.replay import TraceRouter
from toolkit.moe.synthetic import synthetic_mixtral, uniform_trace

CM = CostModel.fixed(cpu=(0.0, 1.0), gpu=(0.01, 0.0), copy_ms=3.0)


# ------------------------------------------------------------------ the trace's rows set on the device

def _passes(router, tokens, explicit):
    """Route passes of ``tokens`` rows each through 2 layers -> [(index, weights)] per pass and layer.

    explicit: each pass is begun and ended around its layers (as a whole step is), and a "replayed" pass calls
    no ``route`` at all between the two (as a replay makes none) and returns None.
    """
    out = []
    for n, mode in tokens:
        hidden = torch.zeros(n, 4)
        if explicit:
            router.begin_pass(n, hidden.device)
        if mode == "replayed" and explicit:
            out.append(None)
        else:
            out.append([tuple(t.clone() for t in router.route(layer, hidden, "decode")) for layer in range(2)])
        if explicit:
            router.end_pass()
    return out


def test_begun_passes_route_the_same_rows_as_passes_found_by_layer_order_and_wrap_around():
    trace = uniform_trace(7, n_layers=2, n_experts=8, top_k=2, seed=1)  # 7 rows: the passes below wrap around
    tokens = [(6, "routed"), (2, "routed"), (2, "replayed"), (2, "routed"), (6, "routed"), (2, "routed")]
    inferred = _passes(TraceRouter(trace, batch_size=2), tokens, explicit=False)
    begun_router = TraceRouter(trace, batch_size=2)
    begun = _passes(begun_router, tokens, explicit=True)
    for g, (a, b) in enumerate(zip(inferred, begun)):
        if b is None:
            continue
        for layer in range(2):
            assert torch.equal(a[layer][0], b[layer][0]) and torch.equal(a[layer][1], b[layer][1]), (g, layer)
    assert begun_router.passes == len(tokens)
    # after begun passes, a pass found by layer order (no begin) starts at the right row
    mixed = TraceRouter(trace, batch_size=2)
    _passes(mixed, tokens[:3], explicit=True)
    rest = _passes(mixed, tokens[3:], explicit=False)
    assert all(torch.equal(x[0], y[0]) for a, b in zip(inferred[3:], rest) for x, y in zip(a, b))


def test_a_begun_pass_refuses_a_layer_with_another_number_of_rows():
    router = TraceRouter(uniform_trace(8, n_layers=2, n_experts=8, top_k=2))
    router.begin_pass(1, torch.device("cpu"))
    with pytest.raises(ToolkitError, match="begun for 1"):
        router.route(0, torch.zeros(3, 4), "decode")


# ------------------------------------------------------------------ the engine: every expert resident

@pytest.fixture(scope="module")
def model():
    return build_moe("tiny-mixtral", seed=0)


@pytest.mark.parametrize("routing", ["model", "trace"])
def test_whole_steps_give_the_ids_stats_and_trace_position_of_graphs_per_layer(model, routing):
    ids, mask = random_prompts(model.config.vocab_size, [5, 9, 7], seed=2)
    kw = dict(max_new_tokens=8, ignore_eos=True)
    trace = synthetic_mixtral(n_sequences=2, prompt_len=9, decode_len=40, n_layers=2, seed=4)
    got = {}
    for whole in (True, False):
        router = TraceRouter(trace, batch_size=3) if routing == "trace" else None
        off = offload(model, gpu_experts="all", device="cpu", cost_model=CM, graphs=True, routing=router,
                      whole_step=whole)
        try:
            assert off.whole_step_ready() == whole
            runs = [G.generate(off, ids, mask, **kw) for _ in range(2)]
            beams = G.generate(off, ids, mask, num_beams=2, **kw)
            got[whole] = dict(ids=[r.sequences for r in runs], beams=beams.sequences, stats=off.stats.to_dict(),
                              graphs=off.graphs.to_dict(),
                              position=None if router is None else (router.position, router.passes))
        finally:
            off.restore()
    assert got[True]["ids"] == got[False]["ids"] and got[True]["beams"] == got[False]["beams"]
    assert got[True]["stats"] == got[False]["stats"]  # counted on the device inside the replays as well
    assert got[True]["position"] == got[False]["position"]  # replays advance the trace as layer calls do
    g = got[True]["graphs"]
    # generate's decode inputs keep their shapes, so each whole step is the decoder's whole forward
    assert g["model_captures"] == 2 and g["model_replays"] == 5 + 7 + 6  # greedy (1 watched, 1 captured), greedy, beams
    assert g["step_captures"] == 0 and g["model_reason"] is None
    assert got[False]["graphs"]["step_captures"] == got[False]["graphs"]["model_captures"] == 0
    assert "whole decoder forwards (embedding to final norm one graph): 2 captured, 18 replays" in graphs_line(g)


def test_a_recorder_sees_every_layer_so_no_step_is_whole_while_it_is_attached(model):
    from toolkit.moe.replay import record

    ids, mask = random_prompts(model.config.vocab_size, [6], seed=1)
    off = offload(model, gpu_experts="all", device="cpu", cost_model=CM, graphs=True)
    try:
        with record(off) as rec:
            G.generate(off, ids, mask, max_new_tokens=5, ignore_eos=True)
        assert off.graphs.step_captures == 0
        assert len(rec.to_trace().experts) == 6 + 4  # the prompt's rows and one per decode step
    finally:
        off.restore()


def test_a_growing_two_d_mask_keeps_the_decoder_eager_and_makes_the_layers_one_graph(model):
    """Called with a 2-D mask one column longer each step (not what generate passes with a static cache), the
    decoder's inputs change shape, so its forward runs eagerly and only the layers are replayed as one graph."""
    from transformers import StaticCache

    ids, _ = random_prompts(model.config.vocab_size, [12], seed=5)

    @torch.no_grad()
    def steps(cache):
        kv = {cache_keyword(model): cache}  # the name this transformers release gives the KV cache
        model(input_ids=ids[:, :5], attention_mask=torch.ones(1, 5, dtype=torch.long), use_cache=True, **kv)
        return [model(input_ids=ids[:, 5 + t:6 + t], attention_mask=torch.ones(1, 6 + t, dtype=torch.long),
                      use_cache=True, **kv).logits.clone() for t in range(5)]

    ref = steps(StaticCache(config=model.config, max_cache_len=256))
    off = offload(model, gpu_experts="all", device="cpu", cost_model=CM, graphs=True)
    try:
        got = steps(off.graphs.static_cache(model.config, 1, 32))
        d = off.graphs.to_dict()
    finally:
        off.restore()
    assert all(torch.allclose(a, b) for a, b in zip(ref, got))
    assert d["model_captures"] == 0 and (d["step_captures"], d["step_replays"]) == (1, 3)


# ------------------------------------------------------------------ the bookkeeping, on toy layers

class Owner:
    def __init__(self):
        self.ready, self.begun, self.ended = True, 0, 0

    def whole_step_ready(self, rows=None):
        return self.ready

    def begin_step(self, hidden_states):
        self.begun += 1

    def end_step(self):
        self.ended += 1


def _expected(x, bias, scale, n):
    out = []
    for _ in range(n):
        x = (x + x * scale + bias) * 2  # residual + mlp(normed), both the same here
        out.append(x)
    return out


@torch.no_grad()
def test_after_one_watched_step_every_step_is_one_graph_and_the_layers_get_its_outputs():
    owner = Owner()
    graphs = DecodeGraphs([Layer(), Layer(), Layer()], EagerCapture(), owner=owner).install()
    cache = static_cache()
    for step in range(4):
        x, bias = torch.full((1, 1, 2), float(step)), torch.full((1, 1, 2), 1.0 + step)
        h = x
        for layer in graphs.layers:
            h = layer(h, bias=bias, scale=2, cache=cache)
        assert torch.equal(h, _expected(x, bias, 2, 3)[-1]), step
    assert (graphs.captures, graphs.step_captures, graphs.step_replays) == (3, 1, 2)
    assert owner.begun == owner.ended == 3
    # a layer called with something else than the previous layer's output, after a whole step ran: refused
    x = torch.ones(1, 1, 2)
    graphs.layers[0](x, bias=x, scale=2, cache=cache)
    with pytest.raises(ToolkitError, match="graphs=False"):
        graphs.layers[1](x, bias=x, scale=2, cache=cache)
    # the owner says no (a recorder attached, say): layer by layer again
    owner.ready = False
    h = x
    for layer in graphs.layers:
        h = layer(h, bias=x, scale=2, cache=cache)
    assert torch.equal(h, _expected(x, x, 2, 3)[-1]) and graphs.step_replays == 3


@torch.no_grad()
def test_layers_called_with_their_own_arguments_or_hooked_never_make_a_whole_step():
    graphs = DecodeGraphs([Layer(), Layer()], EagerCapture(), owner=Owner()).install()
    cache = static_cache()
    for _ in range(3):  # each layer its own bias (as models whose layers differ in their attention mask)
        x = torch.ones(1, 1, 2)
        h = graphs.layers[0](x, bias=torch.zeros(1, 1, 2), scale=2, cache=cache)
        graphs.layers[1](h, bias=torch.ones(1, 1, 2), scale=2, cache=cache)
    assert graphs.step_captures == 0 and "layer 1 is not called with layer 0's output" in graphs.step_reason
    assert "never whole steps" in graphs_line(graphs.to_dict())

    hooked = DecodeGraphs([Layer(), Layer()], EagerCapture(), owner=Owner()).install()
    seen = []
    handle = hooked.layers[1].register_forward_hook(lambda m, a, out: seen.append(out))
    for _ in range(3):
        x = torch.ones(1, 1, 2)
        hooked.layers[1](hooked.layers[0](x, bias=x, scale=2, cache=cache), bias=x, scale=2, cache=cache)
    assert hooked.step_captures == 0 and len(seen) == 3 and hooked.step_reason is None
    handle.remove()
    for _ in range(3):
        x = torch.ones(1, 1, 2)
        hooked.layers[1](hooked.layers[0](x, bias=x, scale=2, cache=cache), bias=x, scale=2, cache=cache)
    assert (hooked.step_captures, hooked.step_replays) == (1, 1)


# ------------------------------------------------------------------ on the GPU

@pytest.mark.gpu
def test_gpu_whole_steps_equal_graphs_per_layer_with_a_trace_replayed():
    """On CUDA in bf16 with every expert resident and a trace replayed: decode steps replay as one CUDA graph
    (the decoder's whole forward), and ids, stats and the trace's position equal those of the graphs per layer
    part; called with a 2-D mask that grows each step, the layers alone are the graph, with the same logits."""
    gpu_model = build_moe("tiny-mixtral", device="cuda", dtype=torch.bfloat16, seed=0)
    ids, mask = random_prompts(gpu_model.config.vocab_size, [5, 9, 7], seed=2)
    trace = synthetic_mixtral(n_sequences=2, prompt_len=9, decode_len=40, n_layers=2, seed=4)
    got = {}
    for whole in (True, False):
        router = TraceRouter(trace, batch_size=3)
        off = offload(gpu_model, gpu_experts="all", device="cuda", cost_model=CM, routing=router, whole_step=whole)
        try:
            runs = [G.generate(off, ids, mask, max_new_tokens=8, ignore_eos=True) for _ in range(2)]
            beams = G.generate(off, ids, mask, num_beams=2, max_new_tokens=8, ignore_eos=True)
            stats, position = off.stats.to_dict(), (router.position, router.passes)
            cache = off.graphs.static_cache(gpu_model.config, 3, 32)
            x = ids.to("cuda")  # 3 rows, as the trace is replayed for 3 sequences
            kv = {cache_keyword(gpu_model): cache}
            with torch.no_grad():  # a 2-D mask that grows: the decoder eager, the layers one graph
                off.model(input_ids=x[:, :4], attention_mask=torch.ones(3, 4, dtype=torch.long, device="cuda"),
                          use_cache=True, **kv)
                logits = [off.model(input_ids=x[:, 4 + t:5 + t], use_cache=True, **kv,
                                    attention_mask=torch.ones(3, 5 + t, dtype=torch.long, device="cuda")).logits.float()
                          for t in range(4)]
            got[whole] = dict(ids=[r.sequences for r in runs], beams=beams.sequences, stats=stats,
                              graphs=off.graphs.to_dict(), position=position, logits=logits)
        finally:
            off.restore()
    assert got[True]["ids"] == got[False]["ids"] and got[True]["beams"] == got[False]["beams"]
    assert got[True]["stats"] == got[False]["stats"] and got[True]["position"] == got[False]["position"]
    g = got[True]["graphs"]
    assert g["model_captures"] == 2 and g["model_replays"] == 5 + 7 + 6 and g["model_reason"] is None
    assert g["step_captures"] == 1 and g["step_replays"] == 3  # the 2-D steps: a new cache, captured once
    assert got[False]["graphs"]["model_captures"] == got[False]["graphs"]["step_captures"] == 0
    assert all(torch.allclose(a, b, atol=1e-2, rtol=1e-2) for a, b in zip(got[True]["logits"], got[False]["logits"]))


def test_hidden_states_asked_for_go_layer_by_layer_and_later_steps_are_whole_again(model):
    """transformers installs its output-capturing hooks for good at the first ``output_hidden_states`` call;
    while a call asks for them the layers run one by one (fresh outputs), and after it the steps are whole."""
    from transformers import StaticCache

    ids, _ = random_prompts(model.config.vocab_size, [12], seed=2)

    @torch.no_grad()
    def steps(cache, hidden):
        kv = {cache_keyword(model): cache}
        model(input_ids=ids[:, :5], use_cache=True, **kv)
        out = []
        for t in range(5):
            o = model(input_ids=ids[:, 5 + t:6 + t], use_cache=True, output_hidden_states=hidden, **kv)
            out.append((o.logits.clone(), o.hidden_states if hidden else None))
        return out

    ref = steps(StaticCache(config=model.config, max_cache_len=256), True)  # installs the hooks on the layers
    off = offload(model, gpu_experts="all", device="cpu", cost_model=CM, graphs=True)
    try:
        got = steps(off.graphs.static_cache(model.config, 1, 32), True)
        assert off.graphs.model_captures == off.graphs.step_captures == 0  # hidden states asked for: layer by layer
        plain = steps(off.graphs.static_cache(model.config, 1, 32), False)
        assert off.graphs.model_captures == 1 and off.graphs.model_replays == 3  # 1 step watched before
    finally:
        off.restore()
    for (lr, hr), (lg, hg), (lp, _) in zip(ref, got, plain):
        assert torch.allclose(lr, lg) and torch.allclose(lr, lp)
        assert all(torch.allclose(a, b) for a, b in zip(hr, hg))


def test_hidden_states_asked_for_by_the_config_go_layer_by_layer_too():
    """A config that comes to ask for hidden states on every call, after whole steps have run: those steps run
    layer by layer, and each step's hidden states are its own (a replay would hand back the captured step's)."""
    from transformers import StaticCache

    asking = build_moe("tiny-mixtral", seed=0)
    ids, _ = random_prompts(asking.config.vocab_size, [10], seed=6)

    @torch.no_grad()
    def steps(cache):
        kv = {cache_keyword(asking): cache}
        asking(input_ids=ids[:, :5], use_cache=True, **kv)
        outs = [asking(input_ids=ids[:, 5 + t:6 + t], use_cache=True, **kv) for t in range(4)]
        return [None if o.hidden_states is None else [h.clone() for h in o.hidden_states] for o in outs]

    off = offload(asking, gpu_experts="all", device="cpu", cost_model=CM, graphs=True)
    try:
        steps(off.graphs.static_cache(asking.config, 1, 32))
        assert off.graphs.model_captures == 1  # whole steps, the config asking for nothing
        asking.config.output_hidden_states = True
        got = steps(off.graphs.static_cache(asking.config, 1, 32))
        d = off.graphs.to_dict()
    finally:
        off.restore()
    ref = steps(StaticCache(config=asking.config, max_cache_len=256))
    assert d["model_replays"] == 2 and d["step_captures"] == 0  # no whole step once the config asks
    assert all(torch.allclose(a, b) for r, g in zip(ref, got) for a, b in zip(r, g))
