"""Reward backprop (AlignProp, DRaFT-K/LV, ReFL, LeapAlign) and the differentiable-sampling core.

What must hold:

* Gradients are correct: on a 2-step tiny SD3 (real classes, float64) every method's loss gradient w.r.t. the LoRA
  weights matches central finite differences. Truncated methods define their gradient with the no-grad part of the
  chain held fixed, so the finite differences pin every no-grad denoiser call to the unperturbed weights; the
  straight-through connectors are checked by value, and LeapAlign's nested-term discount is exactly linear in its
  scale. Checkpointing changes no gradient.
* Gradient accounting: LeapAlign's updates reach the first third of the trajectory (non-zero, logged by the
  trainer); AlignProp with truncation K=1 reaches none of it (exactly 0).
* Learning (slow): each method raises a differentiable reward; on the shapes world the verifier accuracy does not
  collapse.
"""

from __future__ import annotations

import contextlib
import json
import math

import pytest
import torch

from flowalign import diff_sampling as ds
from flowalign.config import ConfigError, load_config
from flowalign.methods import METHODS, TrainState
from flowalign.pipelines import tiny
from flowalign.pipelines.base import ADAPTERS
from flowalign.pipelines.shapes import ShapesAdapter, build_pipeline
from flowalign.trainer import apply_lora, build_reward, lora_settings, weights_swapped

PROMPTS = ["a red cat", "a blue dog"]
SHAPES_PROMPTS = ["a red circle left of a blue square", "two green triangles"]


def make_cfg(method: str, options: dict | None = None, *overrides: str, steps: int = 2, family: str = "shapes",
             reward: dict | None = None, prompts: list[str] | None = None, **sample):
    shapes = family == "shapes"
    d = {
        "model": {"adapter": family, "path": "" if shapes else tiny.cached(family),
                  "kwargs": {} if shapes else dict(tiny.RESOLUTION[family]), "lora": {"rank": 2}},
        "sample": {"prompts": prompts or (SHAPES_PROMPTS if shapes else PROMPTS), "prompts_per_round": 2, "group_size": 1, "batch_size": 2,
                   "num_steps": steps, "kernel": "ode", "noise_level": 0.0, "guidance": 1.0, **sample},
        "reward": {"weights": reward or {"color_target": 1.0}},
        "train": {"method": method, "method_options": options or {}, "updates_per_iteration": 1},
        "log": {"progress": False}, "checkpoint": {"save_final": False}, "ema": {"enabled": False},
    }
    return load_config(d, list(overrides))


class ShapesF64(ShapesAdapter):
    """The shapes adapter with a decode that keeps float64 (the shipped one computes in float32, ``x.float()``).

    The flow-family gradient checks run on the shapes transformer (SD3Transformer2DModel without qk-norm): the tiny
    SD3's ``qk_norm="rms_norm"`` computes its variance in float32 even for float64 inputs (diffusers ``RMSNorm``),
    which leaves ~1e-8 noise in every output -- too coarse for finite differences.
    """

    def decode(self, x):
        return (x / 2 + 0.5).clamp(0, 1)


_F64: dict[str, tuple] = {}


def f64_adapter(family: str):
    """Tiny ``family`` pipeline in float64 with LoRA (rank 2) whose B matrices are non-zero, so every LoRA weight
    has a gradient (built once per module run)."""
    if family not in _F64:
        if family == "shapes":
            pipe = build_pipeline(seed=0, num_layers=1, width=32, heads=2, text_hidden=32)
            adapter = ShapesF64(pipe.to(torch.float64))
        else:
            adapter = ADAPTERS.get(family).from_pretrained(tiny.cached(family), torch_dtype=torch.float64,
                                                           **tiny.RESOLUTION[family])
        module = adapter.trainable_module()
        with torch.random.fork_rng():
            torch.manual_seed(0)
            apply_lora(module, lora_settings(make_cfg("alignprop", family=family), adapter))
            module.to(torch.float64)
            for n, p in module.named_parameters():
                if "lora_B" in n:
                    torch.nn.init.normal_(p, std=0.2)
        params = [p for p in module.parameters() if p.requires_grad]
        assert params and all(p.dtype == torch.float64 for p in params)
        _F64[family] = (adapter, params)
    return _F64[family]


@contextlib.contextmanager
def no_grad_calls_pinned(adapter, params, theta0):
    """Inside: denoiser calls made under no_grad use ``theta0`` -- the weights the truncated gradient holds fixed."""
    orig = adapter.predict

    def predict(*args, **kwargs):
        if torch.is_grad_enabled():
            return orig(*args, **kwargs)
        with weights_swapped(params, theta0):
            return orig(*args, **kwargs)

    adapter.predict = predict
    try:
        yield
    finally:
        del adapter.predict


def method_and_batch(cfg, adapter):
    reward = build_reward(cfg).to(dtype=torch.float64)
    method = METHODS.get(cfg.train.method)(cfg, adapter, reward)
    col = method.collect(TrainState())
    assert len(col.batches) == 1 and len(col.batches[0].data["rows"]) == 2
    return method, col.batches[0]


def autograd_grad(method, batch, params) -> list[torch.Tensor]:
    for p in params:
        p.grad = None
    loss, _ = method.loss(batch)
    loss.backward()
    return [p.grad.clone() if p.grad is not None else torch.zeros_like(p) for p in params]


def fd_check(method, batch, params, directions: int = 2, eps: float = 1e-4) -> list[tuple[float, float]]:
    """``[(autograd, finite difference)]`` of the directional derivative along random unit directions."""
    theta0 = [p.detach().clone() for p in params]
    grads = autograd_grad(method, batch, params)
    gen = torch.Generator().manual_seed(1)
    out = []
    for _ in range(directions):
        d = [torch.randn(p.shape, generator=gen, dtype=p.dtype) for p in params]
        norm = math.sqrt(sum(float((x * x).sum()) for x in d))
        d = [x / norm for x in d]

        def loss_at(sign: float) -> float:
            with torch.no_grad():
                for p, t0, di in zip(params, theta0, d):
                    p.copy_(t0 + sign * eps * di)
            with no_grad_calls_pinned(method.adapter, params, theta0):
                return float(method.loss(batch)[0])

        fd = (loss_at(1.0) - loss_at(-1.0)) / (2 * eps)
        with torch.no_grad():
            for p, t0 in zip(params, theta0):
                p.copy_(t0)
        out.append((sum(float((g * di).sum()) for g, di in zip(grads, d)), fd))
    return out


LEAP_PLAIN = {"connector": "leap", "reward_input": "leap", "weighting": "none", "nested_scale": 1.0}
FD_CASES = {  # name: (family, method, method_options, sample overrides incl. num_steps)
    "alignprop_full_chain_cfg": ("shapes", "alignprop", {"truncation": "none"}, {"guidance": 3.0}),
    "alignprop_full_chain_no_checkpoint": ("shapes", "alignprop", {"truncation": "none", "checkpoint": False}, {}),
    "alignprop_k2_of_3_flow_sde": ("shapes", "alignprop", {"truncation": "fixed", "k": 2},
                                   {"kernel": "flow_sde", "noise_level": 0.7, "num_steps": 3}),
    "draft_k1": ("shapes", "draft", {}, {}),
    "draft_lv": ("shapes", "draft_lv", {"lv_samples": 2}, {}),
    "refl_first_step": ("shapes", "refl", {"step_range": [0.0, 0.5]}, {}),
    "leapalign_4_steps": ("shapes", "leapalign", {**LEAP_PLAIN, "draw": "sample"}, {"num_steps": 4}),
    "alignprop_sd15_ddim": ("sd15", "alignprop", {"truncation": "none"}, {"kernel": "ddim"}),
    "leapalign_sd15_ddim": ("sd15", "leapalign", LEAP_PLAIN, {"kernel": "ddim", "num_steps": 3}),
}


@pytest.mark.parametrize("case", list(FD_CASES))
def test_gradient_matches_finite_differences_float64(case):
    family, method_name, options, sample = FD_CASES[case]
    adapter, params = f64_adapter(family)
    steps = sample.pop("num_steps", 2)
    method, batch = method_and_batch(make_cfg(method_name, options, family=family, steps=steps, **sample), adapter)
    pairs = fd_check(method, batch, params)
    print(case, pairs)
    for an, fd in pairs:
        assert abs(an) > 1e-6, f"{case}: vanishing directional derivative {an}"
        assert abs(an - fd) <= 1e-6 * abs(an), f"{case}: autograd {an!r} vs finite differences {fd!r}"
