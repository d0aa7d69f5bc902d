"""The preference / policy-gradient family: DDPO (a flow_grpo recipe), D3PO, Diffusion-/Flow-DPO, PRDP.

What must hold:

* The losses equal hand-computed values: the tensor functions, and D3PO's / DPO's / PRDP's ``loss(batch)`` on a
  2-pair toy whose step densities and denoising errors are written out here in plain floats.
* The gradient step raises the chosen sample's likelihood relative to the rejected one (D3PO: step log-prob;
  DPO: lower denoising error).
* DDPO's per-prompt stat tracking reproduces ddpo-pytorch's tracker and is checkpointed.
* A bad pairs file is reported in full (every bad row) before anything trains.
* On tiny real-class models (``tests/test_preference_learning.py``): each method raises its target reward (slow;
  paired test against the base model on shared noise), and the shipped recipes train one step.
"""

from __future__ import annotations

import contextlib
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from flowalign import sde
from flowalign.advantages import per_prompt
from flowalign.config import ConfigError, load_config
from flowalign.losses import clipped_log_ratio, diffusion_dpo_loss, dpo_loss, reward_difference_loss
from flowalign.methods import METHODS
from flowalign.methods.base import Batch, Runtime, TrainState
from flowalign.methods.pair_round import PairStore, candidate_pairs
from flowalign.pairs import PairsError, load_pairs
from flowalign.pipelines import tiny
from flowalign.adapter import ADAPTERS, Adapter, Cond
from flowalign.schedules import make_plan

ROOT = Path(__file__).resolve().parents[1]
PROMPTS = ["a red apple", "a red car", "a red rose", "red sky"]


def _sigmoid(z: float) -> float:
    return 1 / (1 + math.exp(-z))


# ------------------------------------------------------------------------------------------------ toy
class _Theta(nn.Module):
    def __init__(self, theta: float) -> None:
        super().__init__()
        self.theta = nn.Parameter(torch.tensor(float(theta), dtype=torch.float64))

    @property
    def device(self):
        return self.theta.device

    @property
    def dtype(self):
        return torch.float64


@ADAPTERS.register("toy_linear", overwrite=True)
class LinearToy(Adapter):
    """``v = theta x`` on float64 latents ``[B, 3, 2, 2]`` (pixel space: ``decode = x/2 + 1/2``); the reference is
    ``theta_ref`` (``reference()`` swaps it in), so every density and error has a closed form."""

    def __init__(self, theta: float = 0.5, theta_ref: float = 0.3, prediction_type: str = "flow") -> None:
        super().__init__(pipe=None)
        self.net, self.theta_ref, self.prediction_type = _Theta(theta), theta_ref, prediction_type

    @contextlib.contextmanager
    def reference(self):
        live = self.net.theta.data.clone()
        self.net.theta.data.fill_(self.theta_ref)
        try:
            yield
        finally:
            self.net.theta.data.copy_(live)

    def encode(self, prompts, negative=None):
        return Cond({"dummy": torch.zeros(len(self.check_prompts(prompts)), 1, dtype=torch.float64)})

    def init_noise(self, batch, generator=None):
        return torch.randn(batch, 3, 2, 2, generator=generator, dtype=torch.float64)

    def sigmas(self, num_steps):
        return torch.linspace(1, 0, num_steps + 1)

    def predict(self, x, sigma, cond, guidance=1.0):
        return self.net.theta * x

    def decode(self, x):
        return (x.float() / 2 + 0.5).clamp(0, 1)

    def trainable_module(self):
        return self.net


def toy_cfg(method: str, options: dict | None = None, **train):
    return load_config({
        "model": {"adapter": "toy_linear"},
        "sample": {"prompts": PROMPTS, "prompts_per_round": 2, "group_size": 2, "batch_size": 2, "num_steps": 2,
                   "kernel": "flow_sde", "noise_level": 0.7, "guidance": 1.0},
        "reward": {"weights": {"redness": 1.0}},
        "train": {"method": method, "beta": 0.5, "train_cfg": False, "method_options": options or {}, **train},
        "log": {"progress": False}})


def gauss_logpdf_mean(x_next: np.ndarray, mean: np.ndarray, std: float) -> float:
    """Mean over elements of log N(x_next; mean, std^2), in plain numpy."""
    return float(np.mean(-((x_next - mean) ** 2) / (2 * std**2) - math.log(std) - 0.5 * math.log(2 * math.pi)))


def flow_sde_mean(x: np.ndarray, theta: float, s: float, s_next: float, a: float) -> tuple[np.ndarray, float]:
    """Flow-GRPO's SDE step (arXiv 2505.05470 eq. 9) for v = theta x, written out."""
    v = theta * x
    g = a * math.sqrt(s / (1 - s))
    dt = s_next - s
    return x + (v + g**2 / (2 * s) * (x + (1 - s) * v)) * dt, g * math.sqrt(-dt)


def two_pair_store(adapter, step_sigmas=(0.8, 0.6), seed=0) -> PairStore:
    """Four rows = two pairs (0 > 1, 2 > 3) of one transition at sigma 0.8 -> 0.6."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(4, 3, 2, 2, generator=g, dtype=torch.float64)
    x_next = 0.9 * x + 0.3 * torch.randn(4, 3, 2, 2, generator=g, dtype=torch.float64)
    plan = make_plan("all", 1, fraction=1.0)
    return PairStore(latents=torch.stack([x, x_next], 1), log_probs=torch.tensor([[-1.0], [-2.0], [-1.5], [-0.5]]),
                     cond=adapter.encode(["p"] * 4), sigmas=torch.tensor(step_sigmas, dtype=torch.float64),
                     plan=plan, pairs=torch.tensor([[0, 1], [2, 3]]), target=torch.tensor([0.8, -0.3]))


# ------------------------------------------------------------------------------------------------ losses
def test_preference_losses_hand_computed():
    c, r = torch.tensor([0.2, -0.1]), torch.tensor([0.05, 0.3])
    loss, m = dpo_loss(c, r, beta=2.0)
    want = [-math.log(_sigmoid(2 * 0.15)), -math.log(_sigmoid(2 * -0.4))]
    torch.testing.assert_close(loss, torch.tensor(want))
    assert m["dpo_accuracy"] == 0.5
    ls, _ = dpo_loss(c, r, beta=2.0, label_smoothing=0.1)
    torch.testing.assert_close(ls[0], torch.tensor(-0.9 * math.log(_sigmoid(0.3)) - 0.1 * math.log(_sigmoid(-0.3))))
    # Diffusion-DPO: -log sigmoid(-beta/2 [(e_w - e_ref_w) - (e_l - e_ref_l)])
    loss, m = diffusion_dpo_loss(torch.tensor([1.0]), torch.tensor([1.2]), torch.tensor([0.9]), torch.tensor([0.8]),
                                 beta=10.0)
    torch.testing.assert_close(loss, torch.tensor([-math.log(_sigmoid(-5.0 * ((1.0 - 1.2) - (0.9 - 0.8))))]))
    # D3PO's clip: ratio in [0.9, 1.1] -> log ratio in [log 0.9, log 1.1]
    lr = clipped_log_ratio(torch.tensor([0.5, 0.0, -0.05]), torch.tensor([0.0, 0.0, 0.0]), clip=0.1)
    torch.testing.assert_close(lr, torch.tensor([math.log(1.1), 0.0, -0.05]))
    mse, _ = reward_difference_loss(torch.tensor([1.0, -2.0]), torch.tensor([0.5, 0.0]))
    torch.testing.assert_close(mse, torch.tensor([0.25, 4.0]))
    with pytest.raises(ValueError, match="beta must be > 0"):
        dpo_loss(c, r, beta=0.0)


def test_candidate_pairs():
    assert candidate_pairs(3, "all") == [(0, 1), (0, 2), (1, 2)]
    assert candidate_pairs(4, "adjacent") == [(0, 1), (2, 3)]
    assert candidate_pairs(4, "best_worst", torch.tensor([0.1, 0.9, -0.2, 0.3])) == [(1, 2)]


# ------------------------------------------------------------------------------------------------ D3PO / PRDP
def _method(name: str, options: dict | None = None, **train):
    adapter = LinearToy()
    cfg = toy_cfg(name, options, **train)
    method = METHODS.get(name)(cfg, adapter, reward_fn=None, runtime=Runtime(reference=adapter.reference))
    method._store = two_pair_store(adapter)
    return method, adapter


def _toy_log_probs(method, theta: float) -> list[float]:
    st = method._store
    x, x_next = st.latents[:, 0].numpy(), st.latents[:, 1].numpy()
    out = []
    for i in range(4):
        mean, std = flow_sde_mean(x[i], theta, 0.8, 0.6, 0.7)
        out.append(gauss_logpdf_mean(x_next[i], mean, std))
    return out


def test_d3po_loss_equals_hand_computation_on_two_pairs():
    method, _ = _method("d3po", {"ratio_clip": 0.02})
    lp, lp_ref = _toy_log_probs(method, 0.5), _toy_log_probs(method, 0.3)
    lo, hi = math.log(0.98), math.log(1.02)
    lr = [min(max(a - b, lo), hi) for a, b in zip(lp, lp_ref)]
    assert any(not lo <= a - b <= hi for a, b in zip(lp, lp_ref)), "the toy must exercise the clip"
    assert any(lo < a - b < hi for a, b in zip(lp, lp_ref)), "and an unclipped step"
    beta = 0.5
    want = (-math.log(_sigmoid(beta * (lr[0] - lr[1]))) - math.log(_sigmoid(beta * (lr[2] - lr[3])))) / 2
    loss, _ = method.loss(Batch({"pairs": torch.tensor([0, 1]), "step": 0, "weight": 0.5}))
    assert loss.item() == pytest.approx(want, rel=1e-6)  # the kernel rounds x_next to fp32 ("fp32 inside")
    # the kernel code agrees with the written-out density
    new = sde.log_prob_of("flow_sde", method._store.latents[:, 0], method._store.latents[:, 1],
                          0.5 * method._store.latents[:, 0], 0.8, 0.6, 0.7)
    np.testing.assert_allclose(new.log_prob.numpy(), lp, rtol=1e-6)


@pytest.mark.parametrize("pair", [0, 1])
def test_d3po_gradient_raises_chosen_relative_to_rejected(pair):
    method, adapter = _method("d3po", {"ratio_clip": None})
    w, lo = method._store.pairs[pair].tolist()
    before = _toy_log_probs(method, adapter.net.theta.item())
    loss, _ = method.loss(Batch({"pairs": torch.tensor([pair]), "step": 0, "weight": 1.0}))
    loss.backward()
    with torch.no_grad():
        adapter.net.theta -= 1e-2 * adapter.net.theta.grad
    after = _toy_log_probs(method, adapter.net.theta.item())
    assert (after[w] - after[lo]) - (before[w] - before[lo]) > 1e-6
    # the gradient of a pair is -beta sigmoid(-z) (d lr_w - d lr_l): a clipped pair contributes nothing
    clipped, _ = _method("d3po", {"ratio_clip": 1e-6})
    loss, _ = clipped.loss(Batch({"pairs": torch.tensor([0, 1]), "step": 0, "weight": 0.5}))
    loss.backward()
    assert clipped.adapter.net.theta.grad.item() == 0.0


def test_prdp_loss_equals_hand_computation():
    method, _ = _method("prdp", {"ratio_clip": 0.2}, beta=2.0)
    lp = _toy_log_probs(method, 0.5)
    old = method._store.log_probs[:, 0].tolist()  # the sampling policy is PRDP's reference
    lr = [min(max(a - b, math.log(0.8)), math.log(1.2)) for a, b in zip(lp, old)]
    target = [0.8, -0.3]
    want = ((target[0] - 2.0 * (lr[0] - lr[1])) ** 2 + (target[1] - 2.0 * (lr[2] - lr[3])) ** 2) / 2
    loss, _ = method.loss(Batch({"pairs": torch.tensor([0, 1]), "step": 0, "weight": 0.5}))
    assert loss.item() == pytest.approx(want, rel=1e-6)


# ------------------------------------------------------------------------------------------------ DPO
def _png(path: Path, rgb, size=(2, 2)):
    from PIL import Image

    Image.new("RGB", size, tuple(int(c) for c in rgb)).save(path)


def toy_pairs(folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    rows = []
    for i, (w, lo) in enumerate([((250, 10, 10), (10, 10, 250)), ((200, 60, 60), (60, 200, 60))]):
        _png(folder / f"w{i}.png", w)
        _png(folder / f"l{i}.png", lo)
        rows.append({"id": f"p{i}", "prompt": PROMPTS[i], "chosen": f"w{i}.png", "rejected": f"l{i}.png"})
    (folder / "pairs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return folder / "pairs.jsonl"


def test_dpo_loss_equals_hand_computation_on_two_pairs(tmp_path):
    pairs = toy_pairs(tmp_path)
    adapter = LinearToy(theta=0.5, theta_ref=0.3)
    cfg = toy_cfg("dpo", {"pairs": str(pairs), "pairs_per_update": 2, "timestep_sampling": "uniform"}, beta=50.0)
    method = METHODS.get("dpo")(cfg, adapter, reward_fn=None, runtime=Runtime(reference=adapter.reference))
    col = method.collect(TrainState())
    assert col.num_updates == 2 and sum(len(b.data["pairs"]) for b in col.batches if b.update == 0) == 2
    b = next(bt for bt in col.batches if bt.update == 0)
    inp = method.prepare(b.data["pos"], b.data["pairs"], 0)
    x, target, sigma = inp["x"].numpy(), inp["target"].numpy(), inp["sigma"].numpy()
    # rows: chosen of the batch's pairs, then rejected; x_t = (1 - s) x0 + s eps, target = eps - x0
    for k, i in enumerate(b.data["pairs"].tolist()):
        p = method.pairs[i]
        for row, path in ((k, p.chosen), (k + len(b.data["pairs"]), p.rejected)):
            from PIL import Image

            x0 = np.asarray(Image.open(path).convert("RGB"), dtype=np.float64).transpose(2, 0, 1) / 255 * 2 - 1
            eps = target[row] + x0
            np.testing.assert_allclose(x[row], (1 - sigma[row]) * x0 + sigma[row] * eps, atol=1e-6)
    n = len(b.data["pairs"])

    def err(theta, row):
        return float(np.mean((theta * x[row] - target[row]) ** 2))

    want = sum(-math.log(_sigmoid(-25.0 * ((err(0.5, k) - err(0.3, k)) - (err(0.5, k + n) - err(0.3, k + n)))))
               for k in range(n)) * b.data["weight"]
    loss, _ = method.loss(b)
    assert loss.item() == pytest.approx(want, rel=1e-5)
    # gradient step: the chosen error falls relative to the rejected one
    loss.backward()
    def gap(t):
        return sum(err(t, k) - err(t, k + n) for k in range(n))

    th = adapter.net.theta.item()
    assert gap(th - 1e-3 * adapter.net.theta.grad.item()) < gap(th)


# ------------------------------------------------------------------------------------------------ bad pairs
def test_bad_pairs_file_reports_every_row_and_trains_nothing(tmp_path):
    good = toy_pairs(tmp_path)
    _png(tmp_path / "big.png", (1, 2, 3), size=(4, 4))
    lines = good.read_text().splitlines() + [
        json.dumps({"id": "p2", "prompt": "x", "chosen": "w0.png", "rejected": "missing.png"}),
        json.dumps({"id": "p3", "prompt": "x", "chosen": "big.png", "rejected": "l0.png"}),
        json.dumps({"id": "p0", "prompt": "x", "chosen": "w1.png", "rejected": "l1.png"}),
        '{"id": "p5", "prompt": "x", "chosen": "w0.png"',
        json.dumps({"id": "p6", "chosen": "w0.png", "rejected": "l0.png"}),
        json.dumps({"id": "p7", "prompt": "x", "chosen": "w0.png", "rejected": "./w0.png"}),
    ]
    bad = tmp_path / "bad.jsonl"
    bad.write_text("\n".join(lines) + "\n")
    with pytest.raises(PairsError) as e:
        load_pairs(bad, size=(2, 2))
    msg = str(e.value)
    assert len(e.value.errors) == 6, msg
    for needle in ("line 3 (id 'p2'): rejected file", "not found", "line 4 (id 'p3'): chosen",
                   "is 4x4 (HxW), expected 2x2", "line 5 (id 'p0'): duplicate id 'p0' (first on line 1)",
                   "line 6: malformed JSON",
                   "line 7 (id 'p6'): missing key(s) 'prompt'", "line 8 (id 'p7'): chosen and rejected are the same"):
        assert needle in msg, msg
    # through the trainer: the error comes before anything trains or is written
    from flowalign.trainer import Trainer

    cfg = toy_cfg("dpo", {"pairs": str(bad)}, beta=50.0)
    cfg.output_dir = str(tmp_path / "run")
    cfg.model.lora.enabled = False  # the toy has no LoRA targets
    with pytest.raises(PairsError):
        Trainer(cfg, adapter=LinearToy())
    assert not (tmp_path / "run").exists()


# ------------------------------------------------------------------------------------------------ DDPO
def test_per_prompt_stat_tracking_matches_ddpo():
    """ddpo-pytorch ``PerPromptStatTracker.update``: history per prompt, batch stats below min_count."""
    from collections import deque

    def ddpo(prompts, rewards, stats, buffer_size, min_count):
        prompts, rewards = np.array(prompts), np.array(rewards)
        adv = np.empty_like(rewards)
        for p in np.unique(prompts):
            pr = rewards[prompts == p]
            stats.setdefault(p, deque(maxlen=buffer_size)).extend(pr)
            if len(stats[p]) < min_count:
                mean, std = np.mean(rewards), np.std(rewards) + 1e-6
            else:
                mean, std = np.mean(stats[p]), np.std(stats[p]) + 1e-6
            adv[prompts == p] = (pr - mean) / std
        return adv

    g = torch.Generator().manual_seed(0)
    history, stats = {}, {}
    for it in range(5):
        keys = ["cat"] * 3 + ["dog"] * 3 + ([f"p{it}"] * 3)
        r = torch.randn(9, generator=g, dtype=torch.float64).float()
        ours = per_prompt(r, 3, keys=keys, history=history, buffer_size=5, min_count=4)
        want = ddpo(keys, r.double().numpy(), stats, 5, 4)
        np.testing.assert_allclose(ours.numpy(), want, rtol=1e-5, atol=1e-5)
    assert history["cat"] == pytest.approx(list(stats["cat"]))
    assert json.loads(json.dumps(history)) == history  # checkpointable as plain JSON


def test_ddpo_recipes_are_flow_grpo_with_ddim_and_stat_tracking():
    over = ["sample.prompts=[a, b]"]
    for name, reward in (("sd15_ddpo_jpeg.yaml", "jpeg_compressibility"), ("sd15_ddpo_aesthetic.yaml", "aesthetic")):
        cfg = load_config(ROOT / "recipes" / name, over, validate=False)
        t, s = cfg.train, cfg.sample
        assert (t.method, s.kernel, s.noise_level, cfg.model.adapter) == ("flow_grpo", "ddim", 1.0, "sd15")
        assert t.advantage.estimator == "per_prompt" and not t.advantage.drop_zero_std
        assert (t.clip_range, t.adv_clip_max, t.beta, t.lr, s.guidance) == (1e-4, 5.0, 0.0, 3e-4, 5.0)
        assert list(cfg.reward.weights) == [reward] and s.num_steps == 50


def test_ddpo_history_is_checkpointed(tmp_path):
    from flowalign.trainer import Trainer

    d = {"model": {"adapter": "sd15", "path": tiny.cached("sd15"), "kwargs": dict(tiny.RESOLUTION["sd15"]),
                   "lora": {"rank": 2}},
         "sample": {"prompts": PROMPTS, "prompts_per_round": 2, "group_size": 2, "batch_size": 4, "num_steps": 2,
                    "kernel": "ddim", "noise_level": 1.0, "guidance": 1.0},
         "reward": {"weights": {"redness": 1.0}, "background": False},
         "train": {"train_cfg": False, "advantage": {"estimator": "per_prompt", "drop_zero_std": False,
                                                     "kwargs": {"buffer_size": 4, "min_count": 2}}},
         "ema": {"enabled": False}, "log": {"progress": False}, "output_dir": str(tmp_path), "max_iterations": 1}
    tr = Trainer(load_config(d))
    rec = tr.step()
    assert rec["num_updates"] > 0 and len(tr.method.round.adv_history) == 2  # 2 prompts x 2 rewards
    state = json.loads(json.dumps(tr.method.state_dict()))
    assert sum(len(v) for v in state["adv_history"].values()) == 4
    tr.method.round.adv_history = {}
    tr.method.load_state_dict(state)
    assert tr.method.round.adv_history == state["adv_history"]


# ------------------------------------------------------------------------------------------------ config
def test_config_errors_name_the_key(tmp_path):
    with pytest.raises(ConfigError, match="group_size=1"):
        load_config({**_raw("d3po"), "sample": {**_raw("d3po")["sample"], "group_size": 1}})
    with pytest.raises(ConfigError, match="multiple of sample.group_size"):
        load_config({**_raw("d3po"), "sample": {**_raw("d3po")["sample"], "batch_size": 3, "prompts_per_round": 3}})
    with pytest.raises(ConfigError, match="labels_dir"):
        load_config(_raw("d3po", {"preference": "human"}))
    with pytest.raises(ConfigError, match="train.beta"):
        load_config(_raw("d3po", beta=0.0))
    with pytest.raises(ConfigError, match="needs preference=reward"):
        load_config(_raw("prdp", {"preference": "human", "labels_dir": str(tmp_path)}))
    with pytest.raises(ConfigError, match="unknown config key 'train.method_options.ratio_clp'"):
        load_config(_raw("d3po", {"ratio_clp": 0.1}))
    with pytest.raises(ConfigError, match="method_options.pairs is required"):
        load_config(_raw("dpo"))
    with pytest.raises(PairsError, match="nope.jsonl' not found"):  # read when the method is built
        load_pairs(load_config(_raw("dpo", {"pairs": str(tmp_path / "nope.jsonl")})).train.method_options["pairs"])
    cfg = load_config({**_raw("dpo", {"pairs": str(toy_pairs(tmp_path / "p"))}), "sample": {"guidance": 1.0}})
    assert cfg.sample.prompts == []  # an offline method needs no prompts


def _raw(method, options=None, **train):
    return {"model": {"adapter": "toy_linear"},
            "sample": {"prompts": PROMPTS, "prompts_per_round": 2, "group_size": 2, "batch_size": 2, "num_steps": 2,
                       "kernel": "flow_sde", "noise_level": 0.7, "guidance": 1.0},
            "reward": {"weights": {"redness": 1.0}},
            "train": {"method": method, "beta": 0.5, "train_cfg": False, "method_options": options or {}, **train}}


def test_recipes_load():
    over = ["sample.prompts=[a, b]", "eval.prompts=[a]"]
    d3po = load_config(ROOT / "recipes/shapes_d3po.yaml", over, validate=False)
    assert (d3po.train.method, d3po.train.beta, d3po.train.method_options["ratio_clip"]) == ("d3po", 0.1, 0.1)
    dpo = load_config(ROOT / "recipes/shapes_dpo.yaml", validate=False)
    assert (dpo.train.method, dpo.train.beta) == ("dpo", 100.0)
    sd15 = load_config(ROOT / "recipes/sd15_diffusion_dpo.yaml", validate=False)
    assert (sd15.train.method, sd15.train.beta, sd15.model.adapter, sd15.model.lora.enabled) == \
        ("dpo", 5000.0, "sd15", False)
