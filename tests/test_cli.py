"""The console and the CLI: every `--help` exits 0, `--version`, the `list` commands, the start-up summary and the
progress bar of a time budget."""

from __future__ import annotations

from importlib import metadata

import pytest

from flowalign.cli import COMMANDS, main

NESTED = [["rewards", "list"], ["rewards", "serve"], ["methods", "list"], ["recipes", "list"], ["label", "serve"],
          ["label", "sample"]]


def _exit_code(argv: list[str]) -> int:
    try:
        return int(main(argv) or 0)
    except SystemExit as e:  # argparse's --help exits through SystemExit
        return int(e.code or 0)


@pytest.mark.parametrize("argv", [[c] for c in sorted(COMMANDS)] + NESTED, ids=" ".join)
def test_every_help_exits_zero(argv, capsys):
    assert _exit_code([*argv, "--help"]) == 0
    out = capsys.readouterr().out
    assert "usage:" in out.lower(), out[:200]


def test_top_level_help_and_version(capsys):
    assert _exit_code(["--help"]) == 0 and _exit_code(["-h"]) == 0
    out = capsys.readouterr().out
    assert all(name in out for name in COMMANDS)
    assert _exit_code([]) == 2  # no command is a usage error
    capsys.readouterr()
    assert _exit_code(["--version"]) == 0
    assert capsys.readouterr().out.strip() == f"flowalign {metadata.version('flowalign')}"


def test_rewards_and_methods_list_every_registered_name(capsys):
    import flowalign.rewards  # noqa: F401
    from flowalign.methods import METHODS
    from flowalign.rewards.base import REWARDS

    assert _exit_code(["rewards"]) == 0 and _exit_code(["rewards", "list"]) == 0
    out = capsys.readouterr().out
    listed = {line.split()[0] for line in out.splitlines() if line and not line.startswith("use ")}
    assert set(REWARDS.names()) <= listed and "pickscore" in listed
    assert "image, differentiable" in out.split("\npickscore", 1)[1].splitlines()[0]
    assert _exit_code(["methods", "list"]) == 0
    out = capsys.readouterr().out
    rows = {line.split()[0]: line.split()[1] for line in out.splitlines() if line and not line.startswith("options")}
    assert set(METHODS.names()) <= set(rows) and rows["dpo"] == "offline" and rows["flow_grpo"] == "online"
    assert _exit_code(["methods", "lsit"]) == 2  # a typo is a usage error, not a silent list


def test_summary_names_model_params_method_rewards_samples_policy_output():
    from flowalign.config import load_config
    from flowalign.console import summary

    cfg = load_config("sd35_pickscore")
    text = summary(cfg, trainable=1_234_567, total=2_000_000_000, world_size=8)
    for want in ("sd3 from stabilityai/stable-diffusion-3.5-medium (float16)",
                 "1.23M of 2.00B parameters (0.06%, LoRA r32)",
                 "flow_grpo (lr 0.0003", "pickscore x 1", "1152 per iteration = 48 prompts x 24 (8 processes)",
                 "kernel flow_sde, noise level 0.7, log-prob density", "outputs/sd35_pickscore",
                 "budget     100000 iterations\n"):
        assert want in text, (want, text)
    assert f"density {cfg.sample.density}, reduction {cfg.sample.reduction}" in text
    shapes = summary(load_config("shapes_flow_grpo"), trainable=10, total=10)
    assert "60 iterations or 10 minutes (whichever comes first)" in shapes and "(100.00%, full fine-tune)" in shapes


def test_time_budget_bar_counts_minutes_not_iterations(monkeypatch):
    from flowalign import console

    clock = [1000.0]
    monkeypatch.setattr(console.time, "time", lambda: clock[0])
    bar = console.RunBar(max_iterations=100_000, max_minutes=2.0, enabled=False)
    assert (bar.total, bar.unit) == (2.0, "min")
    clock[0] += 30
    bar.update(3)
    assert bar.n == pytest.approx(0.5) and bar.postfix["it"] == "3/100000"
    clock[0] += 600  # past the budget: the bar stops at its total
    bar.update(9)
    assert bar.n == pytest.approx(2.0)
    bar.close()
    it_bar = console.RunBar(max_iterations=50, max_minutes=None, iteration=10, enabled=False)
    it_bar.update(11)
    assert (it_bar.total, it_bar.unit, it_bar.n) == (50, "it", 11)
