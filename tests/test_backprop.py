"""Reward backprop (AlignProp, DRaFT-K/LV, ReFL, LeapAlign) and the differentiable-sampling core.

What must hold:

* Gradients are correct: on tiny real-class models in float64 (the shapes world's SD3 transformer, 2-4 steps; tiny
  SD1.5 with its VAE and DDIM) every method's loss gradient w.r.t. the LoRA weights matches central finite
  differences. Truncated methods define their gradient with the no-grad part of the
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
import time
from pathlib import Path

import pytest
import torch

import flowalign.shapes as W
from flowalign import diff_sampling as ds
from flowalign.config import ConfigError, load_config
from flowalign.methods import METHODS, Method, TrainState
from flowalign.methods.base import generator
from flowalign.pipelines import tiny
from flowalign.adapter import ADAPTERS
from flowalign.pipelines.shapes import ShapesAdapter, build_pipeline
from flowalign.rewards.base import get_reward
from flowalign.rewards.tiny import save_tiny_aesthetic
from flowalign.trainer import Trainer, apply_lora, build_reward, lora_settings, weights_swapped

PROMPTS = ["a red cat", "a blue dog"]
SHAPES_PROMPTS = ["a red circle left of a blue square", "two green triangles"]


def make_cfg(method: str, options: dict | None = None, *overrides: str, steps: int = 2, family: str = "shapes",
             reward: dict | None = None, prompts: list[str] | None = None, **sample):
    shapes = family == "shapes"
    d = {
        "model": {"adapter": family, "path": "" if shapes else tiny.cached(family),
                  "kwargs": {} if shapes else dict(tiny.RESOLUTION[family]), "lora": {"rank": 2}},
        "sample": {"prompts": prompts or (SHAPES_PROMPTS if shapes else PROMPTS), "prompts_per_round": 2,
                   "group_size": 1, "batch_size": 2, "num_steps": steps, "kernel": "ode", "noise_level": 0.0, "guidance": 1.0, **sample},
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

        def loss_at(sign: float, d: list[torch.Tensor] = d) -> float:
            with torch.no_grad():
                for p, t0, di in zip(params, theta0, d):
                    p.copy_(t0 + sign * eps * di)
            with no_grad_calls_pinned(method.adapter, params, theta0):
                return float(method.loss(batch)[0].detach())

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


def test_checkpointing_changes_no_gradient():
    adapter, params = f64_adapter("shapes")
    grads = []
    for ckpt in (True, False):
        cfg = make_cfg("alignprop", {"truncation": "none", "checkpoint": ckpt, "checkpoint_decode": ckpt}, steps=3)
        method, batch = method_and_batch(cfg, adapter)
        grads.append(torch.cat([g.flatten() for g in autograd_grad(method, batch, params)]))
    assert grads[0].abs().max() > 0
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-12, atol=1e-15)


def test_leapalign_nested_term_is_discounted_linearly_not_dropped():
    """g(a) = g_direct + a g_nested: the scale a of the gradient through the network input at j is exactly linear,
    and the nested term is not zero (a = 0 would drop it, as DRTune does)."""
    adapter, params = f64_adapter("shapes")
    g = {}
    for a in (0.0, 0.3, 1.0):
        method, batch = method_and_batch(make_cfg("leapalign", {"nested_scale": a}, steps=4), adapter)
        g[a] = torch.cat([x.flatten() for x in autograd_grad(method, batch, params)])
    nested = g[1.0] - g[0.0]
    assert nested.norm() > 1e-3 * g[1.0].norm()
    torch.testing.assert_close(g[0.3], 0.7 * g[0.0] + 0.3 * g[1.0], rtol=1e-9, atol=1e-14)


def _plain_sample_images(method, batch):
    """Images of the plain no-grad ODE chain from the batch's own noise (what the straight-through reward sees)."""
    a, d = method.adapter, batch.data
    x = torch.cat([a.init_noise(1, generator(method.cfg.seed, "noise", d["iteration"], int(r))) for r in d["rows"]])
    cond = a.encode([method.engine.prompts[int(p)] for p in d["pids"]])
    with torch.no_grad():
        return a.decode(ds.integrate(a, x, cond, a.sigmas(method.cfg.sample.num_steps)).x)


@pytest.mark.parametrize("method_name,options", [("leapalign", {}), ("refl", {"endpoint_faithful": True})])
def test_straight_through_reward_sees_the_true_sample(method_name, options):
    adapter, _ = f64_adapter("shapes")
    method, batch = method_and_batch(make_cfg(method_name, options, steps=5), adapter)
    seen = {}
    orig = method.reward_fn.components["color_target"].score
    method.reward_fn.components["color_target"].score = lambda imgs, *a: (seen.setdefault("x", imgs), orig(imgs, *a))[1]
    loss, metrics = method.loss(batch)
    torch.testing.assert_close(seen["x"], _plain_sample_images(method, batch), rtol=0, atol=1e-12)
    assert seen["x"].requires_grad and loss.requires_grad
    if method_name == "leapalign":  # consistency weights: 1 / (max(d_j, tau) + max(d_0, tau)) <= 1 / (2 tau)
        assert float(metrics["leap_k"]) < float(metrics["leap_j"])
        assert 0 < float(metrics["leap_weight"]) <= 1 / (2 * 0.1) + 1e-12


def _shapes_trainer(tmp_path, method: str, options: dict, steps: int = 6, **over):

    pipe = build_pipeline(seed=0, num_layers=2, width=64, heads=2)
    cfg = make_cfg(method, options, f"output_dir={tmp_path / method}", "max_iterations=1", "model.lora.rank=4",
                   "sample.prompts_per_round=4", "sample.group_size=2", "train.updates_per_iteration=2",
                   steps=steps, reward={"shapes_proxy": 1.0, "shapes_geneval": 0.0}, **over)
    return Trainer(cfg, adapter=ShapesAdapter(pipe))


def test_leapalign_reaches_the_first_third_alignprop_k1_does_not(tmp_path):
    """Logged gradient norms per third of a 6-step trajectory: LeapAlign's updates reach steps 0-1, AlignProp with
    truncation K=1 only ever touches the last step (exactly zero elsewhere)."""
    logged = {}
    for method, options in (("leapalign", {"draw": "sample"}), ("alignprop", {"truncation": "fixed", "k": 1})):
        tr = _shapes_trainer(tmp_path, method, options)
        rec = tr.step()
        assert rec["num_updates"] == 2 and rec["grad_norm"] > 0
        line = json.loads((tmp_path / method / "metrics.jsonl").read_text().splitlines()[-1])
        logged[method] = {k: line[k] for k in line if k.startswith("grad/")}
        print(method, logged[method])
    la, ap = logged["leapalign"], logged["alignprop"]
    assert la["grad/latent_first_third"] > 0 and la["grad/out_first_third"] > 0
    assert ap["grad/latent_first_third"] == 0.0 and ap["grad/out_first_third"] == 0.0
    assert ap["grad/latent_mid_third"] == 0.0 and ap["grad/out_mid_third"] == 0.0
    assert ap["grad/latent_last_third"] > 0 and ap["grad/out_last_third"] > 0


def test_peak_memory_counts_live_tensor_bytes():
    def work():
        a = torch.ones(1 << 18)  # 1 MiB of float32
        b = a * 2  # +1 MiB
        del a
        c = b + 1  # +1 MiB while b lives: peak 2 MiB
        return c.sum()

    res = ds.measure(work)
    assert res["peak_mb"] == pytest.approx(2.0, abs=0.01)
    x = torch.ones(1 << 18)
    assert ds.measure(lambda: x.t().mul_(2))["peak_mb"] < 0.01  # views and in-place ops allocate nothing


def test_leapalign_memory_is_flat_in_steps_full_chain_is_not():
    def peak(method: str, options: dict, steps: int) -> float:
        adapter, _ = f64_adapter("shapes")
        method_, batch = method_and_batch(make_cfg(method, options, steps=steps), adapter)
        return ds.measure(lambda: method_.loss(batch)[0].backward())["peak_mb"]

    full = [peak("alignprop", {"truncation": "none", "checkpoint": False}, n) for n in (4, 12)]
    leap = [peak("leapalign", {}, n) for n in (4, 12)]
    print("full chain", full, "leapalign", leap)
    assert full[1] > 2 * full[0]
    assert leap[1] <= 1.1 * leap[0] and leap[1] < 0.35 * full[1]


@pytest.mark.parametrize("method,options,overrides,match", [
    ("leapalign", {"nested_scal": 0.3}, [], "train.method_options.*nested_scale"),
    ("leapalign", {}, ["sample.kernel=flow_sde", "sample.noise_level=0.7"], "deterministic sampler"),
    ("leapalign", {"index_range": [3, 4]}, [], "index_range"),
    ("alignprop", {"truncation": "fixed", "k": 9}, [], r"train.method_options.k"),
    ("alignprop", {"truncation": "sometimes"}, [], "truncation"),
    ("refl", {"step_range": [0.9, 0.5]}, [], "step_range"),
    ("draft_lv", {"lv_samples": -1}, [], "lv_samples"),
    ("draft", {}, ["reward.weights={shapes_geneval: 1.0}"], "not differentiable"),
    ("alignprop", {}, ["train.num_inner_epochs=2"], "num_inner_epochs"),
])
def test_bad_options_fail_at_load_naming_the_key(method, options, overrides, match):
    with pytest.raises(ConfigError, match=match):
        make_cfg(method, options, *overrides, steps=4)


def test_every_method_is_registered_and_documents_its_options():
    for name in ("alignprop", "draft", "draft_lv", "refl", "leapalign"):
        cls = METHODS.get(name)
        assert cls.__bases__ == (Method,) and cls.name == name  # composes the engine, subclasses no method
        text = cls.describe_options()
        assert "train.method_options.objective" in text and "train.method_options.loss_scale" in text
    assert "nested_scale" in METHODS.get("leapalign").describe_options()


# ------------------------------------------------------------------------------------------------ recipes
BACKPROP_RECIPES = ["shapes_alignprop.yaml", "shapes_draft.yaml", "shapes_refl.yaml", "shapes_leapalign.yaml",
                    "sd15_alignprop_aesthetic.yaml"]


@pytest.mark.parametrize("recipe", BACKPROP_RECIPES)
def test_recipe_runs_one_step(recipe, tmp_path):
    """Each recipe, shrunk (4 steps, 2 rows), trains one step with its own method options and reward classes: the
    shipped shapes weights (random ones of the same architecture if absent), or tiny SD1.5 with a tiny aesthetic
    predictor."""
    root = Path(__file__).resolve().parents[1]
    over = ["sample.num_steps=4", "sample.prompts_per_round=2", "sample.group_size=1", "sample.batch_size=2",
            "train.batch_size=2", "eval.every=0", "max_iterations=1", "checkpoint.save_final=false",
            f"output_dir={tmp_path}", "log.progress=false", "mixed_precision=no", "model.dtype=float32"]
    adapter = None
    if recipe.startswith("shapes"):
        weights = Path(ShapesAdapter.default_weights())
        over += [f"sample.prompts={root / 'recipes/prompts/shapes_rl.txt'}",
                 f"eval.prompts={root / 'recipes/prompts/shapes_heldout.txt'}", f"model.path={weights}"]
        if not (weights / "model_index.json").exists():
            adapter = ShapesAdapter(build_pipeline(seed=0))
    else:
        clip = save_tiny_aesthetic(tmp_path / "aesthetic")
        over += ["sample.prompts=[a cat, a dog]", "eval.prompts=[a snail]", f"model.path={tiny.cached('sd15')}",
                 "model.kwargs={height: 32, width: 32}",
                 f"reward.kwargs.aesthetic={{clip_model: {clip}, head: {clip / 'sac+logos+ava1-l14-linearMSE.pth'}}}"]
    cfg = load_config(root / "recipes" / recipe, over)
    tr = Trainer(cfg, adapter=adapter)
    before = [p.detach().clone() for p in tr.params]
    rec = tr.step()
    assert rec["num_updates"] == 1 and math.isfinite(rec["loss"]) and rec["grad_norm"] > 0
    assert any(not torch.equal(a, p) for a, p in zip(before, tr.params))
    assert all(f"reward_{k}_mean" in rec for k in cfg.reward.weights)
    assert rec["grad/out_last_third"] > 0 or rec["grad/out_first_third"] > 0


# ------------------------------------------------------------------------------------------------ learning (slow)
LEARN = {  # method: (method_options, iterations); 8 samples per iteration, one optimizer step each
    "alignprop": ({}, 10),
    "draft": ({}, 10),
    "draft_lv": ({}, 15),
    "refl": ({}, 15),
    "leapalign": ({}, 10),
}


def _learning_setup(method: str, tmp_path):
    """The shapes world (shipped weights, shapes_proxy reward, verifier as a logged monitor) when its weights are
    present, else tiny SD3 with the redness reward."""
    options, iters = LEARN[method]
    weights = Path(ShapesAdapter.default_weights())
    common = {"sample": {"prompts_per_round": 4, "group_size": 2, "batch_size": 8, "kernel": "ode",
                         "noise_level": 0.0},
              "train": {"method": method, "method_options": options, "updates_per_iteration": 1},
              "ema": {"enabled": False}, "output_dir": str(tmp_path / method), "log": {"progress": False},
              "checkpoint": {"save_final": False}, "max_iterations": iters}
    if (weights / "model_index.json").exists():
        prompts = W.eval_prompts(W.LEVELS[1], "train", n=8, seed=0)
        cfg = {"model": {"adapter": "shapes", "path": str(weights), "lora": {"rank": 8}},
               "sample": {**common["sample"], "prompts": prompts, "num_steps": 8, "guidance": 3.0},
               "reward": {"weights": {"shapes_proxy": 1.0, "shapes_geneval": 0.0}},
               "train": {**common["train"], "lr": 1e-3}}
    else:
        prompts = ["a red cat", "a blue dog", "a green tree", "a white house"]
        cfg = {"model": {"adapter": "sd3", "path": tiny.cached("sd3"), "kwargs": dict(tiny.RESOLUTION["sd3"]),
                         "lora": {"rank": 8}},
               "sample": {**common["sample"], "prompts": prompts, "num_steps": 6, "guidance": 1.0},
               "reward": {"weights": {"redness": 1.0}}, "train": {**common["train"], "lr": 1e-2}}
    return load_config({**common, **cfg}), prompts


@pytest.mark.slow
@pytest.mark.parametrize("method", list(LEARN))
def test_method_raises_the_differentiable_reward(method, tmp_path, shared_cache):
    """A few iterations raise the reward of deterministic samples on fixed noise (paired against the start); on
    the shapes world the verifier's strict accuracy does not collapse while the proxy is optimised."""
    cfg, prompts = _learning_setup(method, tmp_path)
    s = cfg.sample
    tr = Trainer(cfg)
    shapes = cfg.model.adapter == "shapes"
    eval_prompts = [p for p in prompts for _ in range(64 // len(prompts))]
    scorers = {"proxy": get_reward("shapes_proxy"), "strict": get_reward("shapes_geneval")} if shapes else \
        {"proxy": get_reward("redness")}

    def evaluate() -> dict[str, torch.Tensor]:
        a = tr.adapter
        x = a.init_noise(len(eval_prompts), generator(999, "eval"))
        cond = a.encode(eval_prompts, negative="" if s.guidance != 1.0 else None)
        with torch.no_grad():
            images = a.decode(ds.integrate(a, x, cond, a.sigmas(s.num_steps), s.guidance).x)
        return {k: f(images, eval_prompts) for k, f in scorers.items()}

    # the untrained model's scores: the same for every method (same model, LoRA init, prompts, noise and sampler;
    # checked bit-identical over the 5 methods), so computed once per session
    d = cfg.to_dict()
    before = shared_cache.get(json.dumps({"backprop_learning_before": eval_prompts, "model": d["model"],
                                          "sample": d["sample"], "seed": cfg.seed, "scorers": sorted(scorers)},
                                         sort_keys=True), evaluate)
    cpu = time.process_time()
    hist = tr.train()
    cpu = time.process_time() - cpu
    after = evaluate()
    gain = after["proxy"] - before["proxy"]
    se = float(gain.std()) / math.sqrt(len(gain))
    print(f"{method} ({cfg.model.adapter}): reward {float(before['proxy'].mean()):.4f} -> "
          f"{float(after['proxy'].mean()):.4f} (paired gain {float(gain.mean()):.4f} +- {se:.4f})"
          + (f", strict accuracy {float(before['strict'].mean()):.3f} -> {float(after['strict'].mean()):.3f}"
             if shapes else "") + f"; training {cpu:.1f} s CPU")
    assert len(hist) == cfg.max_iterations and all(math.isfinite(h["loss"]) for h in hist)
    assert float(gain.mean()) > max(3 * se, 0.02)
    if shapes:
        assert float(after["strict"].mean()) >= float(before["strict"].mean()) - 0.15
