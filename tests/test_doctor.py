"""``flowalign doctor``: the port-a-model checklist, and the deterministic mode.

What must hold: on a correct adapter every row passes and the exit code is 0; a deliberately broken adapter (wrong
scheduler shift, a denoiser that mixes rows, LoRA layers that do not start at the reference) fails the matching row
loudly (FAIL row, names on stderr, exit code 1); ``set_deterministic`` flips torch's switches and restores them.
"""

from __future__ import annotations

import math

import pytest
import torch

from flowalign import doctor
from flowalign.pipelines import load_adapter, tiny

RECIPE = """\
model: {adapter: sd3, path: PATH, kwargs: {height: 32, width: 32}, lora: {rank: 4}}
sample: {prompts: [a red cat, a blue dog], num_steps: 4, guidance: 4.5, batch_size: 4}
reward: {weights: {redness: 1.0}}
"""
ROWS = ("ode_parity", "ratio_one", "kl_zero", "lora_toggle", "batch_invariance")


@pytest.fixture()
def recipe(tmp_path):
    path = tmp_path / "doctor.yaml"
    path.write_text(RECIPE.replace("PATH", tiny.cached("sd3")))
    return str(path)


@pytest.fixture()
def sd3():
    return load_adapter("sd3", tiny.cached("sd3"), **tiny.RESOLUTION["sd3"])


def _rows(out: str) -> dict[str, str]:
    rows = {}
    for line in out.splitlines():
        parts = line.split()
        if parts and parts[0] in ROWS:
            rows[parts[0]] = parts[1]
    return rows


def test_doctor_passes_on_a_correct_adapter(recipe, capsys):
    from flowalign.cli import COMMANDS, main

    assert "doctor" in COMMANDS
    rc = main(["doctor", recipe, "sample.num_steps=3"])
    out = capsys.readouterr().out
    assert rc == 0, out
    assert _rows(out) == dict.fromkeys(ROWS, "PASS") and "all checks passed" in out
    assert "log-prob density gaussian, reduction mean" in out  # the density in use is printed


def test_doctor_fails_loudly_on_a_wrong_scheduler_shift(recipe, capsys, monkeypatch):
    """The adapter's schedule built with shift 1 while the pipeline's scheduler uses SD3.5's 3: parity fails."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    from flowalign.cli import main
    from flowalign.pipelines.sd3 import SD3Adapter

    def unshifted(self, num_steps):
        sched = FlowMatchEulerDiscreteScheduler.from_config(self.pipe.scheduler.config, shift=1.0)
        sched.set_timesteps(num_steps, device="cpu")
        return sched.sigmas.clone()

    monkeypatch.setattr(SD3Adapter, "sigmas", unshifted)
    rc = main(["doctor", recipe, "sample.num_steps=3"])
    captured = capsys.readouterr()
    rows = _rows(captured.out)
    assert rc == 1
    assert rows["ode_parity"] == "FAIL" and "FAILED: ode_parity" in captured.err
    assert rows["ratio_one"] == "PASS" and rows["batch_invariance"] == "PASS"  # the other checks still run


def test_batch_dependent_denoiser_fails_batch_invariance_and_ratio(sd3, monkeypatch):
    clean = sd3.predict

    def leaky(x, sigma, cond, guidance=1.0):  # e.g. a batch statistic inside the network
        return clean(x, sigma, cond, guidance) + 1e-2 * x.mean(0, keepdim=True)

    monkeypatch.setattr(sd3, "predict", leaky)
    checks = {c.name: c for c in doctor.run_checks(sd3, ["a red cat", "a blue dog"], num_steps=3, guidance=4.5)}
    assert not checks["batch_invariance"].passed and checks["batch_invariance"].value > 1e-4
    assert not checks["ratio_one"].passed  # a training micro-batch sees other rows than the rollout did


def test_lora_that_does_not_start_at_the_reference_fails_kl_zero(sd3):
    checks = {c.name: c for c in doctor.run_checks(
        sd3, ["a red cat"], num_steps=3, guidance=1.0,
        lora={"r": 2, "lora_alpha": 2, "init_lora_weights": False,
              "target_modules": ["to_q", "to_k", "to_v", "to_out.0"]})}
    assert not checks["kl_zero"].passed and checks["kl_zero"].value > 0
    assert checks["lora_toggle"].passed and checks["ode_parity"].passed


def test_errors_become_failed_rows(sd3, monkeypatch):
    def boom(*args, **kwargs):
        raise RuntimeError("boom")

    monkeypatch.setattr(type(sd3.pipe), "__call__", boom)
    checks = {c.name: c for c in doctor.run_checks(sd3, ["a red cat"], num_steps=2, guidance=1.0)}
    bad = checks["ode_parity"]
    assert not bad.passed and "boom" in bad.error and math.isinf(bad.value)
    table = doctor.format_table(list(checks.values()))
    assert "FAIL" in table and "RuntimeError: boom" in table


def test_set_deterministic_and_restore(monkeypatch):
    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)
    before = torch.are_deterministic_algorithms_enabled(), torch.backends.cudnn.benchmark
    prev = doctor.set_deterministic(True)
    try:
        assert torch.are_deterministic_algorithms_enabled() and torch.backends.cudnn.deterministic
        assert not torch.backends.cuda.matmul.allow_tf32 and not torch.backends.cudnn.benchmark
        import os

        assert os.environ["CUBLAS_WORKSPACE_CONFIG"] == ":4096:8"
    finally:
        doctor.restore_determinism(prev)
    assert (torch.are_deterministic_algorithms_enabled(), torch.backends.cudnn.benchmark) == before


def test_config_flag_turns_deterministic_mode_on(tmp_path):
    from flowalign.config import load_config
    from flowalign.trainer import Trainer

    cfg = load_config({
        "model": {"adapter": "sd3", "path": tiny.cached("sd3"), "kwargs": dict(tiny.RESOLUTION["sd3"]),
                  "lora": {"rank": 2}},
        "sample": {"prompts": ["a red cat", "a dog"], "prompts_per_round": 2, "group_size": 2, "num_steps": 2,
                   "batch_size": 2, "guidance": 1.0},
        "train": {"train_cfg": False}, "reward": {"weights": {"redness": 1.0}}, "deterministic": True,
        "output_dir": str(tmp_path), "log": {"progress": False}, "ema": {"enabled": False},
    })
    prev = {"algorithms": torch.are_deterministic_algorithms_enabled(),
            "cudnn_deterministic": torch.backends.cudnn.deterministic,
            "cudnn_benchmark": torch.backends.cudnn.benchmark, "cudnn_tf32": torch.backends.cudnn.allow_tf32,
            "matmul_tf32": torch.backends.cuda.matmul.allow_tf32,
            "fp16_reduction": torch.backends.cuda.matmul.allow_fp16_reduced_precision_reduction,
            "bf16_reduction": torch.backends.cuda.matmul.allow_bf16_reduced_precision_reduction}
    try:
        tr = Trainer(cfg)
        assert torch.are_deterministic_algorithms_enabled()
        rec = tr.step()  # every op of a training step has a deterministic implementation
        assert math.isfinite(rec["loss"])
    finally:
        doctor.restore_determinism(prev)


@pytest.mark.parametrize("family, guidance", [("sdxl", 5.0), ("flux2", 4.0), ("qwenimage", 4.0), ("zimage", 4.0),
                                              ("hunyuan_video", 6.0)])
def test_doctor_passes_on_the_new_adapters(family, guidance):
    """Any model: the checklist runs through each adapter's own pipeline (``pipeline_call_kwargs``)."""
    adapter = load_adapter(family, tiny.cached(family), **tiny.RESOLUTION[family])
    checks = doctor.run_checks(adapter, ["a red cat", "two blue squares"], num_steps=3, guidance=guidance)
    assert [c.name for c in checks] == list(ROWS)
    assert all(c.passed for c in checks), doctor.format_table(checks)
