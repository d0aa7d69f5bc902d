"""Train/rollout consistency tools: ``flowalign doctor`` and the deterministic mode.

``flowalign doctor RECIPE [key=value ...]`` loads the recipe's model through its adapter and runs the port-a-model
checklist (flow_grpo README "How to Support Other Models"; reference survey §1.7) on it, printing a pass/fail
table; the exit code is 1 when a check fails:

1. **ode_parity** -- sampling through the adapter with the deterministic kernel (Euler ODE; DDIM eta=0 for epsilon
   models) and a seed reproduces the diffusers pipeline's own ``__call__`` (final latents, max abs diff).
2. **ratio_one** -- the SDE log-probs of a rollout (denoiser in eval mode, no grad, one batch) recomputed as the
   trainer does (train mode, grad on, other micro-batch splits): ``max |exp(logp_train - logp_rollout) - 1|``.
3. **kl_zero** -- with fresh LoRA layers injected as the trainer does, ``KL(policy || reference)`` at the stored
   transitions is 0; **lora_toggle** then perturbs the LoRA weights and checks that the KL moves (so the reference
   really is the LoRA-disabled model and the KL check is not vacuous).
4. **batch_invariance** -- the denoiser's output for a row does not depend on the other rows of its batch
   (``predict`` on the whole batch vs row by row).

Tolerances follow the model dtype (fp32 defaults: 1e-4 parity, 1e-6 ratio, 1e-5 batch) and are flags.

``set_deterministic(True)`` (config ``deterministic: true``) selects deterministic kernels: the same input then
gives the same bits in rollout and training forwards on GPU (cuDNN/cuBLAS otherwise pick algorithms per shape).
"""

from __future__ import annotations

import argparse
import math
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from flowalign import sde
from flowalign.adapter import Adapter, adapter_from_config, deterministic_kernel, resolve_dtype
from flowalign.determinism import restore_determinism, set_deterministic  # noqa: F401  (public here too)
from flowalign.rollout import Trajectory, sample, step_log_prob
from flowalign.schedules import make_plan

#: per model dtype: (ode_parity, ratio_one, batch_invariance) tolerances
TOLERANCES = {torch.float32: (1e-4, 1e-6, 1e-5), torch.float16: (5e-2, 1e-3, 1e-2),
              torch.bfloat16: (1e-1, 5e-3, 5e-2)}
FALLBACK_PROMPTS = ["a red circle", "two blue squares left of a green triangle", "a photo of a cat"]


# ----------------------------------------------------------------------------------------------- checks
@dataclass
class Check:
    """One row of the doctor's table: the measured ``value`` passes when ``value <= tol`` (or ``>`` for
    ``must_exceed``)."""

    name: str
    value: float
    tol: float
    detail: str = ""
    must_exceed: bool = False
    error: str | None = None

    @property
    def passed(self) -> bool:
        if self.error is not None or not math.isfinite(self.value):
            return False
        return self.value > self.tol if self.must_exceed else self.value <= self.tol


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


@torch.no_grad()
def check_ode_parity(adapter: Adapter, prompts: Sequence[str], num_steps: int, guidance: float, tol: float,
                     seed: int = 0) -> Check:
    """Final latents of the adapter's deterministic chain vs the pipeline's ``__call__`` (same seed; the
    pipeline's arguments from the adapter's ``pipeline_call_kwargs``)."""
    kernel, level = deterministic_kernel(adapter.prediction_type)
    traj = sample(adapter, list(prompts), num_steps=num_steps, kernel=kernel, noise_level=level,
                  plan=make_plan("all", num_steps, fraction=1.0), guidance=guidance, generator=_gen(seed),
                  decode=False)
    adapter.pipe.set_progress_bar_config(disable=True)
    ref = adapter.pipe(prompt=list(prompts), num_inference_steps=num_steps, generator=_gen(seed), output_type="latent",
                       return_dict=False, **adapter.pipeline_call_kwargs(guidance))[0]
    ours = traj.latents[:, -1]
    if tuple(ref.shape) != tuple(ours.shape):
        return Check("ode_parity", math.inf, tol, error=f"shape {tuple(ours.shape)} vs pipeline {tuple(ref.shape)}")
    diff = (ours.float() - ref.to(ours.device).float()).abs().max().item()
    moved = (ours.float() - traj.latents[:, 0].float()).abs().max().item()
    return Check("ode_parity", diff, tol, f"max |adapter - pipeline| of final latents ({kernel}, {num_steps} steps, "
                                          f"chain moved {moved:.3g})")


def check_ratio_one(adapter: Adapter, prompts: Sequence[str], num_steps: int, kernel: str, noise_level: float,
                    guidance: float, tol: float, seed: int = 1) -> tuple[Check, Trajectory]:
    """Rollout (eval mode, one batch) vs training recomputation (train mode, grad on, batch 1 and halves)."""
    module = adapter.trainable_module()
    was_training = module.training
    module.eval()
    traj = sample(adapter, list(prompts), group_size=2, num_steps=num_steps, kernel=kernel, noise_level=noise_level,
                  guidance=guidance, generator=_gen(seed), decode=False)
    module.train()
    worst, n = 0.0, len(traj)
    try:
        for i in traj.train_mask.nonzero().flatten().tolist():
            for split in (1, max(1, n // 2)):
                for start in range(0, n, split):
                    rows = torch.arange(start, min(start + split, n))
                    with torch.enable_grad():
                        lp = step_log_prob(adapter, traj, i, rows=rows).log_prob.detach()
                    ratio = torch.exp(lp.float() - traj.log_probs[rows, i].float().to(lp.device))
                    worst = max(worst, (ratio - 1).abs().max().item())
    finally:
        module.train(was_training)
    return Check("ratio_one", worst, tol, f"max |ratio - 1| over {int(traj.train_mask.sum())} trained steps, "
                                          f"{n} rows, splits 1 and {max(1, n // 2)} ({kernel}, a={noise_level})"), traj


@torch.no_grad()
def check_kl_zero(adapter: Adapter, traj: Trajectory, lora: dict[str, Any] | None = None) -> tuple[Check, Check]:
    """Inject LoRA as the trainer does; KL(policy || LoRA-disabled reference) must be 0, and must move once the
    LoRA weights are perturbed."""
    from flowalign.losses import gaussian_kl
    from flowalign.lora import apply_lora, lora_disabled, tuner_layers

    module = adapter.trainable_module()
    targets = (lora or {}).get("target_modules") or list(adapter.lora_target_modules)
    if not tuner_layers(module):
        apply_lora(module, {"r": 4, "lora_alpha": 4, "target_modules": targets, "init_lora_weights": "gaussian",
                            **(lora or {})})
    layers = tuner_layers(module)

    def kl_max() -> float:
        worst = 0.0
        k, a = traj.kernel, traj.noise_level
        for i in traj.train_mask.nonzero().flatten().tolist():
            x, s0, s1 = traj.latents[:, i], traj.sigmas[i], traj.sigmas[i + 1]
            out = adapter.predict(x, s0, traj.cond, traj.guidance)
            with lora_disabled(module, layers):
                ref = adapter.predict(x, s0, traj.cond, traj.guidance)
            m, std = sde.mean_std(k, x, out, s0, s1, a)
            m_ref, _ = sde.mean_std(k, x, ref, s0, s1, a)
            worst = max(worst, gaussian_kl(m, m_ref, std, s1 - s0, form="exact").abs().max().item())
        return worst

    zero = kl_max()
    lora_b = [p for n, p in module.named_parameters() if "lora_B" in n]
    saved = [p.detach().clone() for p in lora_b]
    g = _gen(7)
    for p in lora_b:
        p.add_(0.02 * torch.randn(p.shape, generator=g).to(p.device, p.dtype))
    try:
        moved = kl_max()
    finally:
        for p, s in zip(lora_b, saved):
            p.copy_(s)
    return (Check("kl_zero", zero, 0.0, f"max KL(policy || reference) at step 0 over {len(layers)} LoRA layers"),
            Check("lora_toggle", moved, 0.0, "KL after perturbing lora_B by 0.02 N(0,1) (must be > 0)",
                  must_exceed=True))


@torch.no_grad()
def check_batch_invariance(adapter: Adapter, prompts: Sequence[str], num_steps: int, guidance: float, tol: float,
                           seed: int = 2) -> Check:
    """``predict`` on a batch vs each row alone, at a mid-schedule noise level."""
    n = len(prompts)
    x = adapter.init_noise(n, _gen(seed))
    cond = adapter.encode(list(prompts), negative="" if guidance != 1.0 else None)
    sigma = adapter.sigmas(num_steps)[num_steps // 2]
    full = adapter.predict(x, sigma, cond, guidance)
    single = torch.cat([adapter.predict(x[i: i + 1], sigma, cond.index(slice(i, i + 1)), guidance)
                        for i in range(n)])
    diff = (full.float() - single.float()).abs().max().item()
    return Check("batch_invariance", diff, tol, f"max |predict(batch of {n}) - predict(row by row)|")


def run_checks(adapter: Adapter, prompts: Sequence[str], num_steps: int = 4, kernel: str | None = None,
               noise_level: float | None = None, guidance: float = 1.0, tolerances: tuple | None = None,
               lora: dict[str, Any] | None = None) -> list[Check]:
    """Every check of the checklist (module docstring) on ``adapter``; a check that raises is a failed row."""
    tol_parity, tol_ratio, tol_batch = tolerances or TOLERANCES.get(adapter.dtype, TOLERANCES[torch.float32])
    kernel = kernel or adapter.default_kernel
    if noise_level is None:
        noise_level = 1.0 if kernel == "ddim" else 0.7
    if not sde.is_stochastic(kernel, noise_level):
        kernel, noise_level = adapter.default_kernel, 1.0 if adapter.default_kernel == "ddim" else 0.7
    checks: list[Check] = []

    def guarded(name: str, fn, *args):
        try:
            return fn(*args)
        except Exception as e:  # noqa: BLE001 - the doctor reports every failure as a row
            checks.append(Check(name, math.inf, 0.0, error=f"{type(e).__name__}: {e}"))
            return None

    res = guarded("ode_parity", check_ode_parity, adapter, prompts, num_steps, guidance, tol_parity)
    if res is not None:
        checks.append(res)
    res = guarded("ratio_one", check_ratio_one, adapter, prompts, num_steps, kernel, noise_level, guidance,
                  tol_ratio)
    if res is not None:
        checks.append(res[0])
        kl = guarded("kl_zero", check_kl_zero, adapter, res[1], lora)
        if kl is not None:
            checks.extend(kl)
    res = guarded("batch_invariance", check_batch_invariance, adapter, prompts, num_steps, guidance, tol_batch)
    if res is not None:
        checks.append(res)
    return checks


def format_table(checks: Sequence[Check]) -> str:
    """A fixed-width pass/fail table."""
    rows = [("check", "result", "value", "tolerance", "detail")]
    for c in checks:
        tol = f"> {c.tol:.1e}" if c.must_exceed else f"<= {c.tol:.1e}"
        rows.append((c.name, "PASS" if c.passed else "FAIL", f"{c.value:.3e}", tol, c.error or c.detail))
    widths = [max(len(r[k]) for r in rows) for k in range(4)]
    lines = ["  ".join(r[k].ljust(widths[k]) for k in range(4)) + "  " + r[4] for r in rows]
    lines.insert(1, "-" * len(lines[0]))
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------- CLI
def doctor_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="flowalign doctor",
                                description="Port-a-model checklist on the recipe's model (pass/fail table).")
    p.add_argument("recipe", help="YAML recipe (its model section is loaded; sample.* sets kernel/steps/guidance)")
    p.add_argument("overrides", nargs="*", help="dotted overrides key=value, e.g. model.path=/my/pipeline")
    p.add_argument("--prompts", type=int, default=2, help="how many of the recipe's prompts to use (default 2)")
    p.add_argument("--steps", type=int, default=None, help="denoising steps (default: min(sample.num_steps, 6))")
    p.add_argument("--tol-parity", type=float, default=None, help="ode_parity tolerance (default by dtype)")
    p.add_argument("--tol-ratio", type=float, default=None, help="ratio_one tolerance (default by dtype)")
    p.add_argument("--tol-batch", type=float, default=None, help="batch_invariance tolerance (default by dtype)")
    p.add_argument("--deterministic", action="store_true", help="run with deterministic kernels")
    return p


def doctor_main(argv: Sequence[str] | None = None) -> int:
    from flowalign.config import ConfigError, load_config
    from flowalign.data import load_prompts
    from flowalign.lora import lora_settings

    args = doctor_parser().parse_intermixed_args(argv)
    try:
        cfg = load_config(args.recipe, list(args.overrides), validate=False)
    except ConfigError as e:
        print(f"config error: {e}", file=sys.stderr)
        return 2
    if args.deterministic or cfg.deterministic:
        set_deterministic(True)
    try:
        prompts = load_prompts(cfg.sample.prompts)[0] or FALLBACK_PROMPTS
    except (ConfigError, OSError):
        prompts = FALLBACK_PROMPTS
    prompts = (prompts * args.prompts)[: max(1, args.prompts)]
    device = "cpu" if cfg.cpu or not torch.cuda.is_available() else "cuda"
    adapter = adapter_from_config(cfg, device)
    dtype = resolve_dtype(cfg.model.dtype)
    default = TOLERANCES.get(dtype, TOLERANCES[torch.float32])
    tols = tuple(d if v is None else v for d, v in zip(default, (args.tol_parity, args.tol_ratio, args.tol_batch)))
    steps = args.steps or min(cfg.sample.num_steps, 6)
    s = cfg.sample
    lora = None
    if cfg.model.lora.enabled:
        lora = lora_settings(cfg, adapter)
        lora["init_lora_weights"] = "gaussian"  # B = 0: the step-0 policy is the reference
    checks = run_checks(adapter, prompts, num_steps=steps, kernel=s.kernel, noise_level=s.noise_level,
                        guidance=s.guidance, tolerances=tols, lora=lora)
    print(f"flowalign doctor: {cfg.model.adapter} from {cfg.model.path} ({cfg.model.dtype}, {device}), "
          f"{len(prompts)} prompts, {steps} steps, guidance {s.guidance}; policy: kernel {s.kernel} "
          f"(noise level {s.noise_level}), log-prob density {s.density}, reduction {s.reduction}")
    print(format_table(checks))
    failed = [c.name for c in checks if not c.passed]
    if failed:
        print(f"FAILED: {', '.join(failed)}", file=sys.stderr)
        return 1
    print("all checks passed")
    return 0
