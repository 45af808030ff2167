"""The CLI reads well: every option has help that shows its default, and no command prints NaN, None or a traceback."""

import argparse
import re

import pytest

from toolkit.__main__ import build_parser, main

# what a reader must never see in a command's output for valid input
UNREADABLE = re.compile(r"\b(NaN|nan|None)\b|Traceback")


def subcommands() -> dict[str, argparse.ArgumentParser]:
    (sub,) = [a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction)]
    return dict(sub.choices)


def options(parser: argparse.ArgumentParser) -> list[argparse.Action]:
    return [a for a in parser._actions if not isinstance(a, argparse._HelpAction)]


def test_every_command_is_walked():
    from toolkit.__main__ import COMMANDS

    assert sorted(subcommands()) == sorted(COMMANDS)


@pytest.mark.parametrize("command", sorted(subcommands()))
def test_every_option_has_help_that_shows_its_default(command):
    parser = subcommands()[command]
    for action in options(parser):
        name = "/".join(action.option_strings) or action.dest
        assert action.help and action.help is not argparse.SUPPRESS and len(action.help) > 5, \
            f"{command} {name} has no help"
    text = parser.format_help()
    assert "(default: None)" not in text and "(default: False)" not in text and "(default: [])" not in text
    for action in options(parser):
        if action.default is None or action.default is False or action.default in ([], "") \
                or not action.option_strings:
            continue  # nothing to show: the help says what happens without it
        entry = parser._get_formatter()._format_action(action)  # the option's block in --help, defaults filled in
        assert "default" in entry, f"{command} {action.option_strings[-1]}: help hides the default {action.default!r}"


def test_help_lists_the_names_instead_of_pointing_at_code():
    from toolkit.models import MODEL_NAMES
    from toolkit.moe.presets import PRESETS

    cmds = subcommands()
    for command in ("latency", "pitfalls", "compare", "throughput", "profile"):
        text = " ".join(cmds[command].format_help().split())
        assert "MODEL_NAMES" not in text and all(name in text for name in MODEL_NAMES), command
    for command in ("moe", "calibrate"):
        text = " ".join(cmds[command].format_help().split())
        assert all(name in text for name in PRESETS) and "..." not in text, command
    moe = " ".join(cmds["moe"].format_help().split())
    assert "auto keeps every expert resident" in moe


def run_cli(capsys, *argv) -> tuple[int, str, str]:
    try:
        rc = main(list(argv))
    except SystemExit as e:
        rc = e.code
    out = capsys.readouterr()
    return rc, out.out, out.err


CPU = ["--device", "cpu"]
TIMING = ["--threads", "1", "--max-time", "0.2"]
# each command with tiny settings on a CPU; together they stay well under a minute on 2 cores
COMMANDS = {
    "latency": ["latency", "--model", "tiny-resnet", *CPU, *TIMING],
    "pitfalls": ["pitfalls", "--model", "tiny-gpt2", *CPU, *TIMING],
    "compare": ["compare", "--model", "tiny-resnet", "--a", "batch-size=1", "--b", "batch-size=2", *CPU,
                "--threads", "1", "--rounds", "2", "--round-time", "0.01"],
    "throughput": ["throughput", "--model", "tiny-resnet", *CPU, "--max-batch", "4", "--n-batches", "3",
                   "--max-time", "0.05"],
    "profile": ["profile", "--model", "tiny-resnet", *CPU, "--wait", "0", "--warmup", "1", "--active", "1"],
    "profile-moe": ["profile", "--moe", "--preset", "tiny-mixtral", "--layers", "1", "--gpu-experts", "2", *CPU,
                    "--wait", "0", "--warmup", "1", "--active", "1", "--no-baseline", "--prompt-len", "4"],
    "moe": ["moe", "--preset", "tiny-mixtral", "--layers", "2", "--new-tokens", "3", "--prompt-tokens", "4",
            "--warmup", "2", *CPU],
    "moe-offloaded": ["moe", "--preset", "tiny-mixtral", "--layers", "2", "--gpu-experts", "4", "--new-tokens", "3",
                      "--prompt-tokens", "4", "--warmup", "0", *CPU],
    "simulate": ["simulate", "--gpu-experts", "32", "--policy", "lru,static-popularity"],
    "calibrate": ["calibrate", "--preset", "tiny-mixtral", *CPU, "--tokens", "1,2", "--repeats", "1",
                  "--no-scaling"],
}


@pytest.mark.parametrize("name", sorted(COMMANDS))
def test_no_nan_none_or_traceback_for_valid_input(capsys, tmp_path, name):
    argv = COMMANDS[name] + (["--out", str(tmp_path / "calibration.json")] if name == "calibrate" else [])
    rc, out, err = run_cli(capsys, *argv)
    assert rc == 0, err
    assert out.strip()
    for stream, text in (("stdout", out), ("stderr", err)):
        bad = UNREADABLE.search(text)
        assert bad is None, f"{name} printed {bad.group(0)!r} on {stream}:\n{text}"
    assert "USDT" not in err  # torch's profiler start/stop chatter is silenced
    assert not re.search(r"\.py:\d+: \w*Warning", err)  # warnings are one line, without a source location


def test_outputs_say_what_they_mean(capsys, tmp_path):
    rc, out, _ = run_cli(capsys, *COMMANDS["pitfalls"])
    assert rc == 0 and "not applicable on CPU" in out and "no warm-up" in out and "%" in out
    assert "relative_error" not in out and "no_warmup" not in out  # plain names, percentages
    rc, out, _ = run_cli(capsys, *COMMANDS["throughput"], "--time-budget", "0.001")
    assert rc == 0 and "not measured on CPU" in out and "NOT EXACT" in out and "1 probe;" in out
    rc, out, err = run_cli(capsys, *COMMANDS["moe-offloaded"])
    assert rc == 0 and "(2 layers)" in out and "whole-expert cop" in out and "pays from n >= inf" not in out
    assert "building tiny-mixtral (2 layers, random weights)" in err and "of host memory" in err
    rc, out, _ = run_cli(capsys, *COMMANDS["calibrate"], "--out", str(tmp_path / "calibration.json"))
    assert rc == 0 and "CPU expert" in out and "GPU expert" not in out and "copied per layer" not in out
