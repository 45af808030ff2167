"""A ``moe`` run record as ``format_table`` reads it, and the settings a ``moe`` command line makes, for tests of
the command."""


def run_record(**overrides) -> dict:
    """A decode run of 8 layers at 14 of 64 experts on a GPU; keyword arguments replace its fields."""
    record = {"preset": "p", "layers": 8, "device": "cuda", "gpu_experts": 14, "total_experts": 64, "scheme": "ours",
              "policy": "static", "routing": "uniform", "cpu_threads": 15, "mode": "greedy", "num_beams": 1,
              "batch_size": 1, "prompt_tokens": 16, "new_tokens": 64, "prefill_ms": 300.0,
              "decode_ms": {"median": 61.2, "p90": 66.0}, "decode_tokens_per_s": 16.3, "end_to_end_ms": 4300.0,
              "cpu_expert_calls": 300, "engine": {}}
    record.update(overrides)
    return record


def moe_settings(*args: str):
    """The ``MoESettings`` that ``python -m toolkit moe ARGS`` runs with."""
    import argparse

    from toolkit.cli.moe import register, settings_from_args

    parser = argparse.ArgumentParser()
    register(parser.add_subparsers())
    return settings_from_args(parser.parse_args(["moe", *args]))
