"""Batched rollouts with per-step log-probabilities.

``sample`` draws ``group_size`` trajectories for each prompt (prompt-major order: prompt 0's group, then
prompt 1's, ...), all prompts in one batch (micro-batched by ``batch_size`` for the denoiser), and returns a flat
``Trajectory``. Every random draw comes from the given ``torch.Generator``; per-step noise is drawn for the whole
batch at once, so the result does not depend on ``batch_size``.

``recompute_log_probs`` re-evaluates stored transitions under the current weights: with unchanged weights it
returns the stored log-probs exactly (ratio == 1), for any micro-batch split.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields, replace
from typing import Sequence

import torch
from torch import Tensor

from flowalign import sde, solvers
from flowalign.registry import check_choice
from flowalign.schedules import StepPlan, make_plan

from flowalign.adapter import Adapter, Cond, deterministic_kernel


@dataclass
class Trajectory:
    """A flat batch of ``B`` sampled chains of ``N`` transitions.

    ``latents[:, i]`` is the state before transition ``i`` and ``latents[:, i + 1]`` after it, so
    ``latents`` has ``N + 1`` entries per sample (the first is the initial noise).
    """

    latents: Tensor  # [B, N+1, *latent]
    log_probs: Tensor  # [B, N] fp32, 0 at ODE steps
    sigmas: Tensor  # [N+1]
    sde_mask: Tensor  # bool [N]
    train_mask: Tensor  # bool [N]
    prompt_idx: Tensor  # long [B], index into `prompts`
    prompts: list[str]  # the unique prompts of this round
    cond: Cond | None = None  # per-sample conditioning [B, ...]
    images: Tensor | None = None  # [B, C, H, W] (video [B, T, C, H, W]) in [0, 1]
    kernel: str = "flow_sde"
    noise_level: float = 0.7
    guidance: float = 1.0
    reduction: str = "mean"
    density: str = "gaussian"
    nfe: int = 0
    extras: dict = field(default_factory=dict)

    def __len__(self) -> int:
        return self.latents.shape[0]

    @property
    def num_steps(self) -> int:
        return self.log_probs.shape[1]

    @property
    def sample_prompts(self) -> list[str]:
        return [self.prompts[int(i)] for i in self.prompt_idx]

    def kernel_at(self, i: int, prediction_type: str = "flow") -> tuple[str, float]:
        """The (kernel, noise_level) used for transition ``i``."""
        if bool(self.sde_mask[i]):
            return self.kernel, self.noise_level
        return deterministic_kernel(prediction_type)

    def index(self, idx) -> "Trajectory":
        """Rows ``idx`` of every per-sample field."""
        idx = torch.as_tensor(idx, dtype=torch.long) if not isinstance(idx, slice) else idx
        per_sample = {"latents", "log_probs", "prompt_idx", "images"}
        kw = {f.name: getattr(self, f.name)[idx] for f in fields(self)
              if f.name in per_sample and getattr(self, f.name) is not None}
        if self.cond is not None:
            kw["cond"] = self.cond.index(idx)
        if "means" in self.extras:  # per-sample step means (return_means)
            kw["extras"] = {**self.extras, "means": self.extras["means"][idx]}
        return replace(self, **kw)


def _chunks(n: int, batch_size: int | None):
    bs = batch_size or n
    return [slice(i, min(i + bs, n)) for i in range(0, n, bs)]


def _schedule(sigmas: Tensor) -> Tensor:
    """An adapter's sigmas on the CPU: float64 kept (epsilon adapters, see ``flowalign.sde`` ``FP64_KERNELS``),
    anything else as fp32."""
    return sigmas.cpu() if sigmas.dtype == torch.float64 else sigmas.float().cpu()


@torch.no_grad()
def sample(adapter: Adapter, prompts: Sequence[str], group_size: int = 1, num_steps: int = 10,
           kernel: str = "flow_sde", noise_level: float = 0.7, plan: StepPlan | None = None,
           guidance: float = 1.0, generator: torch.Generator | None = None, same_noise: bool = False,
           batch_size: int | None = None, negative_prompt: str = "", reduction: str = "mean",
           density: str = "gaussian", decode: bool = True, cond: Cond | None = None, ode_solver: str = "euler",
           post_compress: float = 1.0, return_means: bool = False) -> Trajectory:
    """Sample ``group_size`` chains per prompt and record every transition's log-prob.

    ``plan`` (default: every step SDE, first 99% trained) says which steps use ``kernel``; others use the
    deterministic kernel (Euler ODE for flow models, DDIM eta=0 for epsilon models). ``same_noise`` shares the
    initial noise within a group (DanceGRPO/BranchGRPO); otherwise every sample draws its own.
    ``cond`` may carry pre-computed per-prompt conditioning (one row per prompt).
    ``ode_solver="dpm2"`` / ``post_compress < 1`` (MixGRPO-Flash, ``flowalign.solvers``): the deterministic steps
    after the last SDE step use DPM-Solver++(2M) on a coarser subset of the grid; the trajectory then has fewer
    steps (its ``sigmas`` and masks say which), with every step up to the end of the window unchanged.
    ``return_means`` keeps each SDE step's fp32 Gaussian mean in ``extras["means"]`` ``[B, N, *latent]`` (0 at ODE
    steps): GRPO-Guard re-centres the ratio with it (``flowalign.losses.ratio_norm``).
    """
    prompts = Adapter.check_prompts(prompts)
    if not isinstance(group_size, int) or group_size < 1:
        raise ValueError(f"group_size must be a positive integer, got {group_size!r}")
    if not isinstance(num_steps, int) or num_steps < 1:
        raise ValueError(f"num_steps must be a positive integer, got {num_steps!r}")
    sde.validate(kernel, noise_level, reduction, density)
    if batch_size is not None and batch_size < 1:
        raise ValueError(f"batch_size must be >= 1 or None, got {batch_size}")
    plan = plan or make_plan("all", num_steps)
    if plan.num_steps != num_steps:
        raise ValueError(f"plan has {plan.num_steps} steps but num_steps={num_steps}")

    P, G = len(prompts), group_size
    B = P * G
    prompt_cond = cond if cond is not None else adapter.encode(prompts, negative=[negative_prompt] * P
                                                               if guidance != 1.0 else None)
    if prompt_cond.batch_size != P:
        raise ValueError(f"cond has batch {prompt_cond.batch_size} but there are {P} prompts")
    cond_b = prompt_cond.repeat_interleave(G)
    sigmas = _schedule(adapter.sigmas(num_steps))
    if sigmas.shape != (num_steps + 1,):
        raise ValueError(f"{type(adapter).__name__}.sigmas({num_steps}) must return num_steps + 1 = {num_steps + 1} "
                         f"levels, got shape {tuple(sigmas.shape)}")
    sde_mask, train_mask = plan.sde.clone(), plan.train & plan.sde
    check_choice("ode_solver", ode_solver, solvers.SOLVERS)
    last_sde = int(plan.sde.nonzero().max()) if plan.sde.any() else -1
    if ode_solver != "euler" or post_compress != 1.0:
        if adapter.prediction_type != "flow":
            raise ValueError(f"ode_solver={ode_solver!r} / post_compress need a flow model")
        sigmas = solvers.compress_tail(sigmas, last_sde, post_compress)
        sde_mask, train_mask = sde_mask[: len(sigmas) - 1], train_mask[: len(sigmas) - 1]
        num_steps = len(sigmas) - 1

    if same_noise:
        x = adapter.init_noise(P, generator).repeat_interleave(G, dim=0)
    else:
        x = adapter.init_noise(B, generator)
    latents = torch.empty((B, num_steps + 1, *x.shape[1:]), dtype=x.dtype, device=x.device)
    latents[:, 0] = x
    log_probs = torch.zeros(B, num_steps, dtype=torch.float32, device=x.device)
    means = torch.zeros((B, num_steps, *x.shape[1:]), dtype=torch.float32, device=x.device) if return_means else None
    det_kernel, det_level = deterministic_kernel(adapter.prediction_type)
    chunks = _chunks(B, batch_size)
    nfe = 0
    prev_x0 = torch.empty(x.shape, dtype=torch.float32, device=x.device) if ode_solver == "dpm2" else None
    for i in range(num_steps):
        stochastic = bool(sde_mask[i])
        k, a = (kernel, noise_level) if stochastic else (det_kernel, det_level)
        noise = torch.randn(x.shape, generator=generator, device=x.device, dtype=torch.float32) if stochastic else None
        nxt = torch.empty_like(x)
        for sl in chunks:
            out = adapter.predict(x[sl], sigmas[i], cond_b.index(sl), guidance)
            nfe += 1
            if prev_x0 is not None and i > last_sde:  # MixGRPO-Flash: multistep ODE after the window
                nxt[sl], x0 = solvers.dpm2_step(x[sl], out, sigmas[i], sigmas[i + 1],
                                                prev_x0[sl] if i > 0 else None, sigmas[i - 1] if i > 0 else None)
                prev_x0[sl] = x0
                continue
            if prev_x0 is not None:
                prev_x0[sl] = x[sl].float() - float(sigmas[i]) * out.float()
            st = sde.step(k, x[sl], out, sigmas[i], sigmas[i + 1], a,
                          noise=noise[sl] if noise is not None else torch.zeros_like(x[sl], dtype=torch.float32),
                          reduction=reduction, density=density)
            nxt[sl] = st.x_next
            if stochastic:
                log_probs[sl, i] = st.log_prob
                if means is not None:
                    means[sl, i] = st.mean
        x = nxt
        latents[:, i + 1] = x

    images = None
    if decode:
        images = torch.cat([adapter.decode(x[sl]) for sl in chunks])
    return Trajectory(
        latents=latents, log_probs=log_probs, sigmas=sigmas, sde_mask=sde_mask,
        train_mask=train_mask, prompt_idx=torch.arange(P).repeat_interleave(G), prompts=prompts,
        cond=cond_b, images=images, kernel=kernel, noise_level=float(noise_level), guidance=float(guidance),
        reduction=reduction, density=density, nfe=nfe,
        extras={"branch_steps": list(plan.branch_steps), **({"means": means} if means is not None else {})},
    )


def step_log_prob(adapter: Adapter, traj: Trajectory, i: int, rows=None, guidance: float | None = None) -> sde.StepOut:
    """Log-prob of stored transition ``i`` for ``rows`` under the adapter's current weights (with grad)."""
    if rows is None or (isinstance(rows, slice) and rows == slice(None)):
        rows, cond = slice(None), traj.cond
    else:  # index only the two latents this step needs (Trajectory.index would copy every step's latents)
        rows = rows if isinstance(rows, slice) else torch.as_tensor(rows, dtype=torch.long)
        cond = traj.cond.index(rows) if traj.cond is not None else None
    k, a = traj.kernel_at(i, adapter.prediction_type)
    x, x_next = traj.latents[rows, i], traj.latents[rows, i + 1]
    out = adapter.predict(x, traj.sigmas[i], cond, traj.guidance if guidance is None else guidance)
    return sde.log_prob_of(k, x, x_next, out, traj.sigmas[i], traj.sigmas[i + 1], a,
                           reduction=traj.reduction, density=traj.density)


@torch.no_grad()
def recompute_log_probs(adapter: Adapter, traj: Trajectory, batch_size: int | None = None) -> Tensor:
    """Log-probs ``[B, N]`` of every stored SDE transition under the current weights (0 at ODE steps)."""
    out = torch.zeros_like(traj.log_probs)
    for i in range(traj.num_steps):
        if not bool(traj.sde_mask[i]):
            continue
        for sl in _chunks(len(traj), batch_size):
            out[sl, i] = step_log_prob(adapter, traj, i, rows=torch.arange(len(traj))[sl]).log_prob
    return out

from flowalign.tree import RolloutTree, sample_tree  # noqa: E402,F401  (BranchGRPO trees; tree.py imports no rollout)
