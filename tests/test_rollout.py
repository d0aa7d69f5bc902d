"""Rollouts (flowalign.rollout): ratio == 1 on recomputation for every kernel, batch split and latent dtype;
prompt-major grouping, shared initial noise, batch-size invariance, NFE accounting, ``Trajectory.index``, bad input.

Two toy adapters (``tests.toy``): the exact Gaussian-mixture denoiser (element-wise, so bitwise batch-invariant)
and a small MLP (a real network: on CPU its fp32 matmuls differ in the last bit between batch sizes, so
"identical" is checked to 1e-6 there and bitwise on the mixture).
"""

from __future__ import annotations

import pytest
import torch

from flowalign.adapter import Cond
from flowalign.rollout import Trajectory, recompute_log_probs, sample, step_log_prob
from flowalign.schedules import make_plan
from tests.toy import GaussianMixtureAdapter, TinyFlowAdapter

torch.set_num_threads(1)

PROMPTS = ["a red circle", "two blue squares left of a green triangle", "x"]


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def mlp(prediction_type: str = "flow", dtype=torch.float32) -> TinyFlowAdapter:
    return TinyFlowAdapter.build(seed=0, prediction_type=prediction_type, dtype=dtype)


def gmm(prediction_type: str = "flow", dtype=torch.float32) -> GaussianMixtureAdapter:
    return GaussianMixtureAdapter.default(prediction_type=prediction_type, prompt_offset=1.0, latent_dtype=dtype)


# --------------------------------------------------------------------------------------------- ratio == 1
RATIO_CASES = [  # (adapter family, prediction type, kernel, noise level)
    ("mlp", "flow", "flow_sde", 0.7), ("mlp", "flow", "cps", 0.8), ("mlp", "flow", "dance", 0.3),
    ("mlp", "epsilon", "ddim", 1.0),
    ("gmm", "flow", "flow_sde", 0.7), ("gmm", "flow", "cps", 0.8), ("gmm", "flow", "dance", 0.3),
    ("gmm", "epsilon", "ddim", 1.0),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("family, ptype, kernel, level", RATIO_CASES,
                         ids=[f"{f}-{k}" for f, _, k, _ in RATIO_CASES])
def test_recomputed_log_probs_give_ratio_one_at_any_batch_split(family, ptype, kernel, level, dtype):
    """|ratio - 1| <= 1e-6 for every stored step, whatever the recomputation's micro-batching.

    The mixture denoiser is element-wise, so its recomputation is bitwise at every split, batch 1 included: the
    rollout/kernel code adds no split dependence. The MLP is a real fp32 network: a single row goes through
    BLAS's matrix-vector path, whose last-bit rounding (1e-7 in the output) the DDIM kernel's small late-step std
    amplifies to ~4e-6 in the ratio; that is the network's batch variance (flow_grpo FAQ, DanceGRPO issue #57), so
    the MLP is split into batches of 2-4.
    """
    adapter = mlp(ptype, dtype) if family == "mlp" else gmm(ptype, dtype)
    n = 6
    kw = dict(group_size=2, num_steps=n, kernel=kernel, noise_level=level, plan=make_plan("all", n, fraction=1.0),
              guidance=3.0, decode=False)
    traj = sample(adapter, PROMPTS, generator=gen(1), **kw)
    assert traj.latents.dtype == dtype and traj.log_probs.dtype == torch.float32
    assert (traj.log_probs[:, :-1] != 0).all()  # the last step of cps/ddim lands on sigma = 0 with std 0
    assert torch.isfinite(traj.log_probs).all()
    assert torch.equal(recompute_log_probs(adapter, traj), traj.log_probs)  # same split: bitwise
    for bs in ((3, 1, 4) if family == "gmm" else (3, 4, 2)):  # the rollout used one batch of 6
        new = recompute_log_probs(adapter, traj, batch_size=bs)
        assert (torch.exp(new - traj.log_probs) - 1).abs().max() <= 1e-6, bs
        if family == "gmm":
            assert torch.equal(new, traj.log_probs)
    # the other way round: rollout in micro-batches of 2, recomputation in one batch and per step with grad
    split = sample(adapter, PROMPTS, generator=gen(1), batch_size=2, **kw)
    assert (torch.exp(recompute_log_probs(adapter, split) - split.log_probs) - 1).abs().max() <= 1e-6
    rows = torch.tensor([5, 0, 3])
    with torch.enable_grad():
        lp = step_log_prob(adapter, split, 2, rows=rows).log_prob
    assert (torch.exp(lp.detach() - split.log_probs[rows, 2]) - 1).abs().max() <= 1e-6


def test_ratio_moves_when_the_weights_change():
    """The check above can fail: perturbing one weight moves every recomputed log-prob."""
    adapter = mlp()
    traj = sample(adapter, PROMPTS, group_size=2, num_steps=4, generator=gen(2), decode=False)
    with torch.no_grad():
        adapter.net.fc_out.bias.add_(1e-3)
    ratio = torch.exp(recompute_log_probs(adapter, traj) - traj.log_probs)
    assert ((ratio - 1).abs()[:, traj.sde_mask] > 1e-6).all()


def test_log_probs_are_zero_exactly_at_ode_steps_and_stochastic_steps_use_the_kernel():
    adapter = gmm()
    plan = make_plan("fraction", 8, fraction=0.5, ode_outside=True)  # SDE on steps 0-3, Euler after
    traj = sample(adapter, PROMPTS[:2], group_size=2, num_steps=8, plan=plan, generator=gen(3), decode=False)
    assert torch.equal(traj.log_probs != 0, plan.sde.expand(4, -1))
    assert traj.kernel_at(5) == ("ode", 0.0) and traj.kernel_at(1) == ("flow_sde", 0.7)
    assert traj.kernel_at(5, "epsilon") == ("ddim", 0.0)
    for i in range(4, 8):  # the deterministic steps are exactly Euler
        x, s = traj.latents[:, i], traj.sigmas
        v = adapter.predict(x, s[i], traj.cond)
        assert torch.equal(traj.latents[:, i + 1], (x.float() + v.float() * (s[i + 1] - s[i])).to(x.dtype))


# ----------------------------------------------------------------------------------------- group layout
def test_rollout_is_prompt_major_with_per_sample_conditioning():
    adapter = GaussianMixtureAdapter.default(prompt_offset=6.0)  # prompts far apart: samples land near their own
    traj = sample(adapter, PROMPTS, group_size=4, num_steps=10, kernel="ode", noise_level=0.0, generator=gen(4))
    assert traj.prompt_idx.tolist() == [0] * 4 + [1] * 4 + [2] * 4
    assert traj.sample_prompts == [p for p in PROMPTS for _ in range(4)] and traj.prompts == PROMPTS
    offsets = torch.stack([adapter.offset(p) for p in PROMPTS]).float()
    assert torch.equal(traj.cond.kwargs["offset"].float(), offsets.repeat_interleave(4, 0))
    nearest = torch.cdist(traj.latents[:, -1].float(), offsets).argmin(1)  # each sample sits by its prompt's data
    assert torch.equal(nearest, traj.prompt_idx)
    assert traj.images.shape == (12, 1, 1, 2) and 0 <= traj.images.min() and traj.images.max() <= 1
    assert traj.latents.shape == (12, 11, 2) and traj.log_probs.shape == (12, 10) and traj.sigmas.shape == (11,)


def test_same_noise_shares_the_initial_latent_within_a_group_only():
    adapter = mlp()
    shared = sample(adapter, PROMPTS, group_size=3, num_steps=4, generator=gen(5), same_noise=True, decode=False)
    x0 = shared.latents[:, 0]
    for p in range(3):
        group = x0[3 * p: 3 * p + 3]
        assert torch.equal(group, group[:1].expand_as(group))
    assert not torch.equal(x0[0], x0[3]) and not torch.equal(x0[3], x0[6])
    assert torch.equal(x0[::3], adapter.init_noise(3, gen(5)))  # one draw per prompt from the run's generator
    assert not torch.equal(shared.latents[0, -1], shared.latents[1, -1])  # the SDE still spreads the group
    own = sample(adapter, PROMPTS, group_size=3, num_steps=4, generator=gen(5), decode=False).latents[:, 0]
    assert torch.equal(own, adapter.init_noise(9, gen(5)))
    assert len({tuple(r.flatten().tolist()) for r in own}) == 9


@pytest.mark.parametrize("same_noise", [False, True])
def test_samples_do_not_depend_on_the_batch_size(same_noise):
    kw = dict(group_size=3, num_steps=5, guidance=2.0, same_noise=same_noise)
    adapter = gmm()
    full = sample(adapter, PROMPTS, generator=gen(6), **kw)
    for bs in (2, 1, 4):
        split = sample(adapter, PROMPTS, generator=gen(6), batch_size=bs, **kw)
        assert torch.equal(split.latents, full.latents) and torch.equal(split.log_probs, full.log_probs)
        # decoded per chunk: the elementwise sigmoid may round the last bit differently in a vector tail (seen on
        # AMD EPYC), so images agree to one float32 ulp of values in (0, 1)
        torch.testing.assert_close(split.images, full.images, rtol=0, atol=2 ** -23)
    net = mlp()  # a real network: equal to fp32 rounding
    a = sample(net, PROMPTS, generator=gen(6), **kw)
    b = sample(net, PROMPTS, generator=gen(6), batch_size=2, **kw)
    torch.testing.assert_close(b.latents, a.latents, rtol=0, atol=1e-6)
    torch.testing.assert_close(b.log_probs, a.log_probs, rtol=0, atol=1e-5)


def test_same_generator_reproduces_and_another_seed_differs():
    adapter = mlp()
    a, b = (sample(adapter, PROMPTS, group_size=2, num_steps=4, generator=gen(7)) for _ in range(2))
    assert torch.equal(a.latents, b.latents) and torch.equal(a.log_probs, b.log_probs)
    c = sample(adapter, PROMPTS, group_size=2, num_steps=4, generator=gen(8))
    assert not torch.equal(a.latents[:, -1], c.latents[:, -1])


# ------------------------------------------------------------------------------------------- accounting
@pytest.mark.parametrize("batch_size, calls_per_step", [(None, 1), (4, 3), (5, 2), (1, 9)])
def test_nfe_counts_denoiser_calls(batch_size, calls_per_step):
    adapter = mlp()
    traj = sample(adapter, PROMPTS, group_size=3, num_steps=7, guidance=4.0, batch_size=batch_size,
                  generator=gen(9), decode=False)
    assert traj.nfe == 7 * calls_per_step == adapter.calls  # one call per micro-batch and step; CFG inside it
    assert adapter.rows == 7 * 9
    adapter.calls = 0
    recompute_log_probs(adapter, traj, batch_size=batch_size)
    assert adapter.calls == int(traj.sde_mask.sum()) * calls_per_step


def test_trajectory_index_selects_rows_of_every_per_sample_field():
    adapter = mlp()
    traj = sample(adapter, PROMPTS, group_size=2, num_steps=4, guidance=2.0, generator=gen(10))
    for rows in ([4, 1], torch.tensor([4, 1]), slice(1, 5, 3)):
        sub = traj.index(rows)
        assert isinstance(sub, Trajectory) and len(sub) == 2
        assert torch.equal(sub.latents, traj.latents[[1, 4]] if isinstance(rows, slice) else traj.latents[[4, 1]])
        want = [1, 4] if isinstance(rows, slice) else [4, 1]
        assert torch.equal(sub.log_probs, traj.log_probs[want]) and torch.equal(sub.images, traj.images[want])
        assert sub.prompt_idx.tolist() == traj.prompt_idx[want].tolist()
        assert sub.sample_prompts == [traj.sample_prompts[i] for i in want]
        assert torch.equal(sub.cond.kwargs["emb"], traj.cond.kwargs["emb"][want])
        assert torch.equal(sub.cond.uncond["emb"], traj.cond.uncond["emb"][want])
        assert sub.sigmas is traj.sigmas and sub.prompts is traj.prompts and sub.nfe == traj.nfe
        assert torch.equal(sub.sde_mask, traj.sde_mask) and sub.guidance == 2.0
        ratio = torch.exp(recompute_log_probs(adapter, sub) - sub.log_probs)  # a sub-trajectory is self-contained
        assert (ratio - 1).abs().max() <= 1e-6


def test_precomputed_cond_is_used_as_is():
    adapter = gmm()
    cond = adapter.encode(["p", "q"])
    a = sample(adapter, ["p", "q"], group_size=2, num_steps=3, generator=gen(11), cond=cond, decode=False)
    b = sample(adapter, ["p", "q"], group_size=2, num_steps=3, generator=gen(11), decode=False)
    assert torch.equal(a.latents, b.latents)


# ---------------------------------------------------------------------------------------------- bad input
class WrongSigmas(GaussianMixtureAdapter):
    def sigmas(self, num_steps):
        return super().sigmas(num_steps)[:-1]


@pytest.mark.parametrize("kwargs, match", [
    ({"num_steps": 0}, r"num_steps must be a positive integer, got 0"),
    ({"num_steps": 2.5}, r"num_steps must be a positive integer, got 2.5"),
    ({"group_size": 0}, r"group_size must be a positive integer, got 0"),
    ({"kernel": "sde"}, r"unknown kernel 'sde'.*Registered: .*flow_sde"),
    ({"noise_level": -0.7}, r"noise_level must be a finite number >= 0, got -0.7"),
    ({"reduction": "avg"}, r"reduction='avg' is not allowed.*Allowed: mean, sum"),
    ({"batch_size": 0}, r"batch_size must be >= 1 or None, got 0"),
    ({"prompts": []}, r"prompts must be a non-empty list of strings"),
    ({"prompts": ["a", 3]}, r"prompts must be a non-empty list of strings"),
    ({"cond": Cond({"offset": torch.zeros(3, 2)})}, r"cond has batch 3 but there are 2 prompts"),
    ({"ode_solver": "rk4"}, r"ode_solver='rk4' is not allowed.*Allowed: .*euler"),
])
def test_bad_rollout_input_raises_value_errors_naming_the_argument(kwargs, match):
    kw = {"prompts": ["a", "b"], "num_steps": 3, "decode": False, **kwargs}
    with pytest.raises(ValueError, match=match):
        sample(gmm(), kw.pop("prompts"), **kw)


def test_adapter_with_a_schedule_of_the_wrong_length_is_refused():
    with pytest.raises(ValueError, match=r"WrongSigmas.sigmas\(4\) must return num_steps \+ 1 = 5 levels, got shape"):
        sample(WrongSigmas.default(), ["a"], num_steps=4, decode=False)


# ---------------------------------------------------------------------------------------- the learnable toy
def test_tiny_adapter_round_trips_takes_lora_and_trains_through_the_log_prob(tmp_path):
    """What trainer tests need from ``tests.toy.TinyFlowAdapter``: ``from_pretrained`` (also by registry name),
    peft LoRA on ``lora_target_modules``, and a gradient from a stored transition's log-prob into the LoRA weights."""
    from peft import LoraConfig, inject_adapter_in_model

    from flowalign.adapter import ADAPTERS

    adapter = mlp()
    path = adapter.save_pretrained(tmp_path / "toy")
    loaded = ADAPTERS.get("toy_mlp").from_pretrained(str(path), torch_dtype=torch.float32)
    x, cond = adapter.init_noise(2, gen(12)), adapter.encode(PROMPTS[:2], negative="")
    assert torch.equal(loaded.predict(x, 0.4, cond, 2.0), adapter.predict(x, 0.4, cond, 2.0))
    assert loaded.device == torch.device("cpu") and loaded.dtype == torch.float32
    traj = sample(loaded, PROMPTS[:2], group_size=2, num_steps=3, generator=gen(13))
    module = loaded.trainable_module()
    module.requires_grad_(False)
    inject_adapter_in_model(LoraConfig(r=loaded.lora_rank, lora_alpha=loaded.lora_alpha,
                                       target_modules=loaded.lora_target_modules), module)
    lora = [p for n, p in module.named_parameters() if "lora_" in n]
    assert len(lora) == 2 * len(loaded.lora_target_modules)
    for p in lora:
        p.requires_grad_(True)
    ratio = torch.exp(recompute_log_probs(loaded, traj) - traj.log_probs)  # LoRA B = 0: still the same policy
    assert (ratio - 1).abs().max() <= 1e-6
    with torch.enable_grad():
        step_log_prob(loaded, traj, 0).log_prob.sum().backward()
    assert all(p.grad is not None for p in lora) and any(p.grad.abs().sum() > 0 for p in lora)
