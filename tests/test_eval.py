"""flowalign.eval: deterministic shared-noise generation, resumable caching, metrics against hand-computed values,
LoRA/checkpoint variants, the CLI, plots and the gallery HTML (the browser checks are in test_gallery_browser.py).

The model is a tiny stand-in adapter defined here (a real ``Adapter`` over a small conv flow model saved with
safetensors), so the tests need no downloaded weights and run in seconds.
"""

from __future__ import annotations

import csv
import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from flowalign.eval import (bootstrap_ci, bootstrap_p_gain, evaluate, generate_images, initial_noise,
                            pairwise_diversity, parse_seeds, reward_hacking, run_eval, summarize, verifier_accuracy,
                            win_rate)
from flowalign.eval.cli import eval_main, gallery_main
from flowalign.eval.gallery import build_gallery
from flowalign.eval.media import load_png, read_jsonl, video_info
from flowalign.eval.models import apply_lora, variants_from_args
from flowalign.eval.plots import plot_training_curves
from flowalign.adapter import ADAPTERS, Adapter, Cond
from flowalign.rewards.base import REWARDS, FunctionReward

torch.set_num_threads(1)


# ----------------------------------------------------------------------------------------- stand-in model
class ToyNet(nn.Module):
    """Velocity ``v = conv(x) + proj(text)`` (broadcast over pixels), enough to make prompts and LoRA matter."""

    def __init__(self, channels: int = 3, dim: int = 8) -> None:
        super().__init__()
        self.text = nn.Embedding(128, dim)
        self.proj = nn.Linear(dim, channels)
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x, sigma, emb):
        return self.conv(x) * 0.5 + torch.tanh(self.proj(emb))[:, :, None, None] * (1 + sigma)


@ADAPTERS.register("toy_eval", overwrite=True)
class ToyAdapter(Adapter):
    """Images ``3 x size x size``, or videos ``frames x 3 x size x size`` when ``frames`` > 0."""

    def __init__(self, net: ToyNet, size: int = 12, frames: int = 0) -> None:
        super().__init__(pipe=None)
        self.net, self.size, self.frames = net, size, frames
        self.predict_calls = 0

    @classmethod
    def from_pretrained(cls, path, torch_dtype=torch.float32, device="cpu", **kwargs) -> "ToyAdapter":
        cfg = json.loads((Path(path) / "config.json").read_text())
        net = ToyNet()
        net.load_state_dict(load_file(str(Path(path) / "net.safetensors")))
        return cls(net.to(device=device, dtype=torch_dtype), cfg["size"], cfg.get("frames", 0))

    def save(self, path: Path) -> Path:
        path.mkdir(parents=True, exist_ok=True)
        save_file(self.net.state_dict(), str(path / "net.safetensors"))
        (path / "config.json").write_text(json.dumps({"size": self.size, "frames": self.frames}))
        return path

    def encode(self, prompts, negative=None) -> Cond:
        ids = [torch.tensor([ord(c) % 128 for c in p] or [0]) for p in prompts]
        emb = torch.stack([self.net.text(i).mean(0) for i in ids]).detach()
        return Cond({"emb": emb})

    def init_noise(self, batch, generator=None):
        shape = (batch, self.frames, 3, self.size, self.size) if self.frames else (batch, 3, self.size, self.size)
        return torch.randn(shape, generator=generator)

    def sigmas(self, num_steps):
        return torch.linspace(1.0, 0.0, num_steps + 1)

    def predict(self, x, sigma, cond, guidance=1.0):
        self.predict_calls += 1
        emb = cond.kwargs["emb"]
        if x.ndim == 5:  # fold frames into the batch; time varies the conditioning a little
            b, t = x.shape[:2]
            out = self.net(x.flatten(0, 1), sigma, emb.repeat_interleave(t, 0))
            return out.view_as(x) + 0.3 * torch.linspace(-1, 1, t).view(1, t, 1, 1, 1)
        return self.net(x, sigma, emb)

    def decode(self, x):
        return (torch.tanh(x) + 1) / 2

    def trainable_module(self):
        return self.net


def make_toy(seed: int = 0, size: int = 12, frames: int = 0) -> ToyAdapter:
    torch.manual_seed(seed)
    return ToyAdapter(ToyNet(), size, frames)


def brightness(images, prompts, metadata):
    return images.float().flatten(1).mean(1)


def redness(images, prompts, metadata):
    x = images.float()
    x = x[:, 0] if x.ndim == 5 else x
    return x[:, 0].flatten(1).mean(1) - x[:, 1:].flatten(1).mean(1)


def verifier(images, prompts, metadata):
    """Fraction of two checks passed: bright enough, red enough."""
    bright = (brightness(images, prompts, metadata) > 0.5).float()
    return (bright + (redness(images, prompts, metadata) > 0).float()) / 2


REWARDS.register("toy_bright", overwrite=True)(brightness)
REWARDS.register("toy_red", overwrite=True)(redness)
REWARDS.register("shapes_toy", overwrite=True)(verifier)

PROMPTS = ["a red circle", "two blue squares", "a green triangle left of a red circle"]


def save_lora(adapter: ToyAdapter, path: Path, scale: float = 0.5, seed: int = 1, zero: bool = False) -> Path:
    """A peft LoRA folder as ``PeftModel.save_pretrained`` writes it (adapter_config.json +
    adapter_model.safetensors, keys ``base_model.model.*.lora_A.weight``)."""
    from peft import LoraConfig, get_peft_model

    net = ToyNet()
    net.load_state_dict(adapter.net.state_dict())
    model = get_peft_model(net, LoraConfig(r=2, lora_alpha=4, target_modules=["proj", "conv"]))
    g = torch.Generator().manual_seed(seed)
    for name, p in model.named_parameters():
        if "lora_" in name:
            p.data = torch.zeros_like(p) if zero and "lora_B" in name else torch.randn(p.shape, generator=g) * scale
    model.save_pretrained(str(path))
    return path


@pytest.fixture(scope="module")
def toy_dir(tmp_path_factory) -> Path:
    return make_toy().save(tmp_path_factory.mktemp("toy") / "model")


# ----------------------------------------------------------------------------------------- determinism
def test_same_seeds_give_identical_images_across_runs(tmp_path, toy_dir):
    kw = dict(num_steps=6, batch_size=2, progress=False)
    variants = variants_from_args(f"toy_eval:{toy_dir}")
    a = run_eval(variants, PROMPTS, "0-1", ["toy_bright"], out_dir=tmp_path / "a", **kw)
    b = run_eval(variants, PROMPTS, "0-1", ["toy_bright"], out_dir=tmp_path / "b", **kw)
    assert len(a.records) == len(PROMPTS) * 2
    for ra, rb in zip(a.records, b.records):
        assert ra["pixel_sha"] == rb["pixel_sha"]
        assert (tmp_path / "a" / ra["image"]).read_bytes() == (tmp_path / "b" / rb["image"]).read_bytes()
    assert [r["value"] for r in a.rows] == [r["value"] for r in b.rows]
    # different seeds give different noise and images
    by_seed = {(r["prompt_idx"], r["seed"]): r for r in a.records}
    assert by_seed[(0, 0)]["noise_sha"] != by_seed[(0, 1)]["noise_sha"]
    assert by_seed[(0, 0)]["pixel_sha"] != by_seed[(0, 1)]["pixel_sha"]


def test_noise_is_per_seed_and_independent_of_batching():
    adapter = make_toy()
    noise = initial_noise(adapter, [3, 5, 7])
    assert torch.equal(noise[1], adapter.init_noise(1, torch.Generator().manual_seed(5))[0])
    prompts = [PROMPTS[0], PROMPTS[1], PROMPTS[0]]
    together, n_all = generate_images(adapter, prompts, [3, 5, 7], num_steps=5)
    alone = torch.cat([generate_images(adapter, [p], [s], num_steps=5)[0] for p, s in zip(prompts, [3, 5, 7])])
    assert torch.equal(n_all, noise)
    torch.testing.assert_close(together, alone, atol=1e-6, rtol=0)
    # prompts matter: same seed, different prompt -> different image
    assert (together[0] - generate_images(adapter, [PROMPTS[2]], [3], num_steps=5)[0][0]).abs().max() > 1e-3


def test_variants_share_initial_noise(tmp_path, toy_dir):
    base = ToyAdapter.from_pretrained(toy_dir)
    lora = save_lora(base, tmp_path / "lora_a")
    zero = save_lora(base, tmp_path / "lora_zero", zero=True)
    variants = variants_from_args(f"toy_eval:{toy_dir}", [str(lora), str(zero)])
    assert [v.name for v in variants] == ["base", "lora_a", "lora_zero"]
    res = run_eval(variants, PROMPTS, [0, 4], ["toy_bright"], num_steps=6, out_dir=tmp_path / "ev", progress=False)
    recs = {(r["variant"], r["prompt_idx"], r["seed"]): r for r in res.records}
    for p in range(len(PROMPTS)):
        for s in (0, 4):
            noise = {recs[(v, p, s)]["noise_sha"] for v in ("base", "lora_a", "lora_zero")}
            assert len(noise) == 1, "every variant must start from the same noise"
            # B = 0 LoRA leaves the model unchanged: same noise + same weights -> bit-identical image
            assert recs[("lora_zero", p, s)]["pixel_sha"] == recs[("base", p, s)]["pixel_sha"]
            assert recs[("lora_a", p, s)]["pixel_sha"] != recs[("base", p, s)]["pixel_sha"]
    assert recs[("base", 0, 0)]["noise_sha"] != recs[("base", 0, 4)]["noise_sha"]


def test_apply_lora_matches_peft_model(tmp_path, toy_dir):
    """The loaded LoRA computes what peft's own model does with the same weights."""
    from peft import PeftModel

    base = ToyAdapter.from_pretrained(toy_dir)
    lora = save_lora(base, tmp_path / "lora")
    ours = apply_lora(ToyAdapter.from_pretrained(toy_dir), lora)
    ref = PeftModel.from_pretrained(ToyAdapter.from_pretrained(toy_dir).net, str(lora))
    x, emb = torch.randn(2, 3, 12, 12), torch.randn(2, 8)
    torch.testing.assert_close(ours.net(x, 0.5, emb), ref(x, 0.5, emb), atol=1e-6, rtol=0)
    assert (ours.net(x, 0.5, emb) - base.net(x, 0.5, emb)).abs().max() > 1e-3


def test_apply_lora_from_trainer_checkpoint(tmp_path, toy_dir):
    """A checkpoint written the trainer's way (flowalign.trainer.apply_lora + flowalign.checkpoint.save): LoRA
    settings from state.json, EMA weights preferred, raw weights on request; a file that fits no layer fails."""
    from flowalign import checkpoint as ckpt
    from flowalign.trainer import apply_lora as trainer_apply_lora

    settings = {"r": 2, "lora_alpha": 8.0, "target_modules": ["proj", "conv"], "init_lora_weights": "gaussian",
                "lora_dropout": 0.0}
    net = trainer_apply_lora(ToyAdapter.from_pretrained(toy_dir).net, settings)
    names = [n for n, p in net.named_parameters() if p.requires_grad]
    g = torch.Generator().manual_seed(3)
    raw = {n: torch.randn(p.shape, generator=g) * 0.3 for n, p in net.named_parameters() if p.requires_grad}
    ema = {n: v * 0.5 for n, v in raw.items()}
    path = ckpt.save(tmp_path / "ckpts", 10, weights=raw, optimizer={}, scheduler=None, ema=ema,
                     state={"iteration": 10, "lora": settings})
    x, emb = torch.randn(2, 3, 12, 12), torch.randn(2, 8)
    for weights, use_ema in ((ema, True), (raw, False)):
        with torch.no_grad():
            for n, p in net.named_parameters():
                if n in names:
                    p.copy_(weights[n])
        loaded = apply_lora(ToyAdapter.from_pretrained(toy_dir), path, use_ema=use_ema)
        torch.testing.assert_close(loaded.net(x, 0.3, emb), net(x, 0.3, emb), atol=1e-6, rtol=0)
    assert variants_from_args(f"toy_eval:{toy_dir}", [str(path)])[1].name == "checkpoint-00000010"
    bad = tmp_path / "bad.safetensors"
    save_file({"nothere.lora_A.default.weight": torch.zeros(2, 8), "nothere.lora_B.default.weight": torch.zeros(3, 2)},
              str(bad))
    with pytest.raises(ValueError):
        apply_lora(ToyAdapter.from_pretrained(toy_dir), bad)


def test_trainer_periodic_eval_goes_through_flowalign_eval(tmp_path):
    """eval.fn = flowalign.eval:trainer_eval: the trainer's eval is this module's evaluate()."""
    from flowalign.config import load_config
    from flowalign.rewards.base import Compose
    from flowalign.trainer import Trainer

    cfg = load_config({"model": {"adapter": "toy_eval", "path": "unused",
                                 "lora": {"target_modules": ["proj", "conv"], "rank": 2}},
                       "sample": {"prompts": PROMPTS}, "reward": {"weights": {"toy_bright": 1.0}},
                       "eval": {"prompts": PROMPTS, "num_steps": 3, "seed": 7,
                                "fn": "flowalign.eval:trainer_eval"},
                       "output_dir": str(tmp_path / "run"), "cpu": True})
    trainer = Trainer(cfg, adapter=make_toy(), reward_fn=Compose({"toy_bright": 1.0, "toy_red": 0.5}))
    logs = trainer.evaluate()
    direct = evaluate(make_toy(), PROMPTS, [7], ["toy_bright", "toy_red"], num_steps=3).means()["current"]
    # the LoRA starts with B = 0, so the trainer's model still equals the base: same numbers as a direct call
    assert logs["eval/reward_toy_bright"] == pytest.approx(direct["toy_bright"], abs=1e-6)
    assert logs["eval/reward_toy_red"] == pytest.approx(direct["toy_red"], abs=1e-6)
    assert logs["eval/reward"] == pytest.approx(direct["toy_bright"] + 0.5 * direct["toy_red"], abs=1e-6)
    recs = read_jsonl(tmp_path / "run" / "eval" / "iter-000000" / "images.jsonl")
    assert len(recs) == len(PROMPTS) and all((tmp_path / "run" / "eval" / "iter-000000" / r["image"]).is_file()
                                             for r in recs)
    assert json.loads((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()[-1])["eval/reward"] == \
        logs["eval/reward"]


# ----------------------------------------------------------------------------------------- resume / cache
def test_resume_after_crash_and_added_reward(tmp_path, toy_dir):
    calls = {"n": 0}

    def flaky(images, prompts, metadata):
        calls["n"] += 1
        if calls["n"] == 3:
            raise RuntimeError("simulated crash")
        return brightness(images, prompts, metadata)

    REWARDS.register("toy_flaky", overwrite=True)(flaky)
    loads = []

    def factory():
        loads.append(ToyAdapter.from_pretrained(toy_dir))
        return loads[-1]

    kw = dict(num_steps=4, batch_size=2, out_dir=tmp_path, progress=False, fingerprints={"base": "v1"})
    with pytest.raises(RuntimeError, match="simulated crash"):
        run_eval({"base": factory}, PROMPTS, "0-1", ["toy_flaky"], **kw)
    done = read_jsonl(tmp_path / "cache" / "images.jsonl")
    assert len(done) == 4  # two batches of two finished before the crash in the third
    calls["n"] = 10
    res = run_eval({"base": factory}, PROMPTS, "0-1", ["toy_flaky"], **kw)
    assert len(res.records) == 6 and len(res.rows) == 6
    assert loads[-1].predict_calls == 4  # only the last batch (1 call per step) was generated again
    fresh = run_eval(variants_from_args(f"toy_eval:{toy_dir}"), PROMPTS, "0-1", ["toy_bright"], num_steps=4,
                     batch_size=2, out_dir=tmp_path / "fresh", progress=False)
    assert sorted(r["value"] for r in res.rows) == sorted(r["value"] for r in fresh.rows)
    # adding a reward scores the saved PNGs without loading the model; values equal a fresh run's
    n_loads = len(loads)
    res2 = run_eval({"base": factory}, PROMPTS, "0-1", ["toy_flaky", "toy_red"], **kw)
    assert len(loads) == n_loads
    fresh2 = run_eval({"base": make_toy_factory(toy_dir)}, PROMPTS, "0-1", ["toy_red"], num_steps=4, batch_size=2,
                      progress=False)
    red = {(r["prompt_idx"], r["seed"]): r["value"] for r in res2.rows if r["reward"] == "toy_red"}
    assert red == {(r["prompt_idx"], r["seed"]): r["value"] for r in fresh2.rows}
    # a torn last line in the cache (crash mid-write) is tolerated
    with (tmp_path / "cache" / "scores.jsonl").open("a") as f:
        f.write('{"key": "abc", "rew')
    run_eval({"base": factory}, PROMPTS, "0-1", ["toy_flaky", "toy_red"], **kw)
    assert len(loads) == n_loads


def make_toy_factory(toy_dir):
    return lambda: ToyAdapter.from_pretrained(toy_dir)


def test_evaluate_seam_for_trainer():
    adapter = make_toy()
    adapter.net.train()
    res = evaluate(adapter, PROMPTS[:2], seeds=[0, 1], rewards=["toy_bright", "toy_red"], num_steps=4)
    logs = res.log_dict()
    assert set(logs) == {"eval/toy_bright", "eval/toy_red"}
    bright = [r["value"] for r in res.rows if r["reward"] == "toy_bright"]
    assert logs["eval/toy_bright"] == pytest.approx(np.mean(bright))
    assert adapter.net.training  # restored
    imgs = res.images()
    assert imgs.dtype == torch.uint8 and imgs.shape == (4, 3, 12, 12)
    again = evaluate(adapter, PROMPTS[:2], seeds=[0, 1], rewards=["toy_bright", "toy_red"], num_steps=4)
    assert again.log_dict() == logs


def test_video_variant_writes_playable_mp4(tmp_path):
    adapter = make_toy(size=10, frames=6)
    reward = FunctionReward(brightness, name="toy_bright_video", modality="video")
    res = run_eval({"vid": adapter}, PROMPTS[:1], [0], [reward], num_steps=3, out_dir=tmp_path, fps=6,
                   progress=False)
    assert res.rows[0]["reward"] == "toy_bright_video" and 0 < res.rows[0]["value"] < 1
    rec = res.records[0]
    assert rec["kind"] == "video" and rec["image"].endswith(".mp4") and rec["poster"].endswith(".png")
    info = video_info(tmp_path / rec["image"])
    assert info["codec"] == "h264" and info["frames"] == 6
    assert info["duration_s"] == pytest.approx(1.0, abs=0.2)
    assert (tmp_path / rec["poster"]).stat().st_size > 0


# ----------------------------------------------------------------------------------------- metrics
def test_bootstrap_ci_hand_computed():
    # mean of 4 draws from {0,0,0,1} is k/4 with k ~ Binomial(4, 1/4): P(k<=2) = .949, P(k<=3) = .996,
    # so the 2.5% quantile is 0 and the 97.5% quantile is 3/4
    ci = bootstrap_ci([0, 0, 0, 1], n_resamples=20_000)
    assert (ci.mean, ci.lo, ci.hi, ci.n) == (0.25, 0.0, 0.75, 4)
    # two values: resampled means 0, .5, 1 with probabilities 1/4, 1/2, 1/4 -> CI [0, 1]
    ci = bootstrap_ci([0.0, 1.0], n_resamples=20_000)
    assert (ci.mean, ci.lo, ci.hi) == (0.5, 0.0, 1.0)
    assert bootstrap_ci([2.5] * 7).as_dict() == {"mean": 2.5, "lo": 2.5, "hi": 2.5, "n": 7}
    # cluster bootstrap: groups {a: [0, 0, 0], b: [1]} -> drawing 2 groups gives means 0 (1/4), 1/4 (1/2), 1 (1/4)
    ci = bootstrap_ci([0, 0, 0, 1], groups=["a", "a", "a", "b"], n_resamples=20_000)
    assert (ci.mean, ci.lo, ci.hi) == (0.25, 0.0, 1.0)
    assert bootstrap_ci([0, 0, 0, 1], groups=["a"] * 4, n_resamples=20_000).hi == 0.75  # one group: resample values
    # normal theory: the 95% CI of a mean of n standard normals has half-width ~1.96/sqrt(n)
    x = np.random.default_rng(0).standard_normal(400)
    ci = bootstrap_ci(x)
    assert (ci.hi - ci.lo) / 2 == pytest.approx(1.96 / 20, rel=0.1)
    assert bootstrap_ci(x, seed=3).lo == bootstrap_ci(x, seed=3).lo
    with pytest.raises(ValueError):
        bootstrap_ci([])


def test_bootstrap_p_gain_hand_computed():
    # gains {1, -1}: means of 2 draws are 1, 0, -1 with p 1/4, 1/2, 1/4 -> P(mean <= 0) = 3/4
    assert bootstrap_p_gain([1.0, -1.0]) == pytest.approx(0.75, abs=0.01)
    # clustered {a: [1, 1], b: [-3]}: 2 prompts drawn -> aa: 1 (1/4), ab: -1/3 (1/2), bb: -3 (1/4) -> 3/4;
    # unclustered, 3 draws of {1, 1, -3} are <= 0 unless no -3 is drawn: 1 - (2/3)^3 = 19/27
    assert bootstrap_p_gain([1, 1, -3], groups=["a", "a", "b"]) == pytest.approx(0.75, abs=0.01)
    assert bootstrap_p_gain([1, 1, -3]) == pytest.approx(19 / 27, abs=0.01)
    assert bootstrap_p_gain(np.ones(10)) == 0.0 and bootstrap_p_gain(-np.ones(10)) == 1.0
    with pytest.raises(ValueError):
        bootstrap_p_gain([])


def test_win_rate_hand_computed():
    # pairs: 3>1 win, 2=2 tie, 1<3 loss, 5>4 win -> (2 + 0.5) / 4
    wr = win_rate([3, 2, 1, 5], [1, 2, 3, 4], n_resamples=20_000)
    assert wr.mean == 0.625
    # indicators {1, .5, 0, 1}: P(mean of 4 draws == 1) = (1/2)^4 = .0625 > .025, so hi = 1; in halves each draw
    # adds 2, 1, 0 with p .5, .25, .25: P(sum <= 1) = .0195 < .025 < P(sum <= 2) = .0742, so lo = 2/8
    assert wr.hi == 1.0 and wr.lo == 0.25
    assert win_rate([1, 1], [0, 0]).as_dict() == {"mean": 1.0, "lo": 1.0, "hi": 1.0, "n": 2}
    assert win_rate([1.0, 2.0], [1.05, 2.0], tol=0.1).mean == 0.5
    with pytest.raises(ValueError):
        win_rate([1, 2], [1])


def test_pairwise_diversity_hand_computed():
    e1, e2 = torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0])
    # cosine distances: (e1, e2) = 1, (e1, -e1) = 2, (e2, -e1) = 1 -> mean 4/3
    assert pairwise_diversity(torch.stack([e1, e2, -e1])) == pytest.approx(4 / 3)
    assert pairwise_diversity(torch.stack([e1, 2 * e1])) == pytest.approx(0.0)
    assert pairwise_diversity(e1[None]) == 0.0


def _rows(values: dict[str, dict[str, list[float]]]) -> list[dict]:
    """values[variant][reward] -> per-(prompt, seed) list (prompt = i // 2, seed = i % 2)."""
    return [{"variant": v, "reward": r, "prompt_idx": i // 2, "seed": i % 2, "value": x, "prompt": f"p{i // 2}"}
            for v, d in values.items() for r, xs in d.items() for i, x in enumerate(xs)]


def test_summary_accuracy_and_hacking_report():
    rows = _rows({
        "base": {"opt": [0.1, 0.2, 0.3, 0.4, 0.5, 0.6], "held": [0.5] * 6, "shapes_x": [1, 0.5, 0, 1, 1, 0.5]},
        "hacked": {"opt": [0.9, 0.8, 0.9, 0.7, 0.9, 0.8], "held": [0.2, 0.1, 0.3, 0.2, 0.1, 0.2],
                   "shapes_x": [1, 1, 1, 1, 0.5, 1]},
        "honest": {"opt": [0.3, 0.4, 0.5, 0.6, 0.7, 0.8], "held": [0.6, 0.5, 0.6, 0.7, 0.5, 0.6],
                   "shapes_x": [1] * 6},
    })
    s = summarize(rows, optimized="opt", held_out="held", n_resamples=5000)
    acc = s["accuracy"]["shapes_x"]
    assert acc["base"]["strict"]["mean"] == pytest.approx(3 / 6)
    assert acc["base"]["partial"]["mean"] == pytest.approx(4 / 6)
    assert acc["hacked"]["strict"]["mean"] == pytest.approx(5 / 6) and acc["honest"]["strict"]["mean"] == 1.0
    flags = {h["variant"]: h["flagged"] for h in s["hacking"]}
    assert flags == {"hacked": True, "honest": False}
    hacked = next(h for h in s["hacking"] if h["variant"] == "hacked")
    assert hacked["held_out_gain"]["mean"] == pytest.approx(np.mean([0.2, 0.1, 0.3, 0.2, 0.1, 0.2]) - 0.5)
    table = {(e["reward"], e["variant"]): e for e in s["table"]}
    assert table[("opt", "honest")]["gain"]["mean"] == pytest.approx(0.2)
    assert table[("opt", "honest")]["win_rate"]["mean"] == 1.0
    assert "gain" not in table[("opt", "base")]
    assert verifier_accuracy(rows, "shapes_x")["honest"]["partial"]["mean"] == 1.0
    with pytest.raises(ValueError, match="different"):
        reward_hacking(rows, "opt", "opt")


def test_parse_seeds_and_errors():
    assert parse_seeds("0-3") == [0, 1, 2, 3]
    assert parse_seeds("0,5,7-8") == [0, 5, 7, 8]
    assert parse_seeds([2, 1]) == [2, 1]
    for bad in ("3-1", "a", "", "1,1"):
        with pytest.raises(ValueError, match="seeds"):
            parse_seeds(bad)
    with pytest.raises(ValueError, match="names"):
        variants_from_args("toy_eval:/x", [], names=["a", "b"])


# ----------------------------------------------------------------------------------------- CLI, plots, gallery
def test_cli_eval_gallery_and_plots(tmp_path, toy_dir, capsys):
    base = ToyAdapter.from_pretrained(toy_dir)
    lora = save_lora(base, tmp_path / "ckpt_a")
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": p, "tag": "t"}) + "\n" for p in PROMPTS))
    log = tmp_path / "run" / "metrics.jsonl"
    log.parent.mkdir()
    log.write_text("".join(json.dumps({"step": i, "reward": {"mean": i / 10}, "loss": 1 / (i + 1)}) + "\n"
                           for i in range(12)) + '{"step": 12, "rew')
    out = tmp_path / "ev"
    rc = eval_main(["--model", f"toy_eval:{toy_dir}", "--lora", str(lora), "--prompts", str(prompts),
                    "--rewards", "toy_bright,toy_red,shapes_toy", "--seeds", "0-2", "--steps", "4", "--out", str(out),
                    "--optimized", "toy_bright", "--held-out", "toy_red", "--gallery", "--logs", str(log), "--quiet",
                    "--bootstrap", "2000"])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "toy_bright" in printed and "gallery: file://" in printed
    with (out / "results.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 2 * 3 * 3 * 3  # variants x prompts x seeds x rewards
    assert {"prompt", "seed", "variant", "reward", "value", "image"} <= set(rows[0])
    metrics = json.loads((out / "metrics.json").read_text())
    assert set(metrics["diversity"]) == {"base", "ckpt_a"} and metrics["diversity"]["base"]["mean"] > 0
    assert "shapes_toy" in metrics["accuracy"] and len(metrics["hacking"]) == 1
    html = (out / "index.html").read_text()
    assert len(re.findall(r"<img class=\"thumb", html)) == 2 * 3 * 3
    assert html.count('loading="lazy"') >= 18 and "http://" not in html and "https://" not in html
    assert 'data-sort="g:toy_bright:ckpt_a"' in html
    assert "summary_00_toy_bright.svg" in html and re.search(r"curve_\d+_loss\.svg", html)
    curves = plot_training_curves([log], tmp_path / "plots", fmt="png")
    assert {p.name for p in curves} == {"curve_00_loss.png", "curve_01_reward_mean.png"}
    assert all(p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for p in curves)
    # resume: a second identical run generates nothing and gives the same numbers
    rc = eval_main(["--model", f"toy_eval:{toy_dir}", "--lora", str(lora), "--prompts", str(prompts),
                    "--rewards", "toy_bright,toy_red,shapes_toy", "--seeds", "0-2", "--steps", "4", "--out", str(out),
                    "--quiet", "--bootstrap", "2000"])
    assert rc == 0
    with (out / "results.csv").open() as f:
        assert list(csv.DictReader(f)) == rows
    # standalone gallery command, and clear errors
    assert gallery_main([str(out), "--out", str(tmp_path / "g" / "page.html"), "--bootstrap", "500"]) == 0
    page = (tmp_path / "g" / "page.html").read_text()
    assert 'src="../ev/images/' in page
    assert gallery_main([str(tmp_path / "nothing")]) == 2
    assert eval_main(["--model", f"toy_eval:{toy_dir}", "--prompts", str(prompts), "--rewards", "toy_bright",
                      "--optimized", "toy_bright", "--held-out", "nope", "--out", str(tmp_path / "x")]) == 2
    assert eval_main(["--model", f"toy_eval:{toy_dir}", "--prompts", str(prompts), "--rewards", "no_such_reward",
                      "--out", str(tmp_path / "x")]) == 2


def test_gallery_escapes_prompts(tmp_path):
    prompt = 'a <script>alert("x")</script> & "quotes"'
    run_eval({"base": make_toy()}, [prompt], [0], ["toy_bright"], num_steps=2, out_dir=tmp_path, progress=False)
    (tmp_path / "eval.json").write_text(json.dumps(json.loads((tmp_path / "eval.json").read_text())))
    html = build_gallery(tmp_path, n_resamples=200).read_text()
    assert "<script>alert" not in html and "&lt;script&gt;alert" in html


# ----------------------------------------------------------------------------------------- real diffusers classes
def test_sd3_eval_image_equals_the_pipelines_own_output(tmp_path):
    """Tiny real SD3 (random weights): the adapter is found from model_index.json, and the eval image of
    (prompt, seed) is what ``pipe(prompt, generator=torch.Generator().manual_seed(seed))`` returns."""
    from diffusers import StableDiffusion3Pipeline

    from flowalign.pipelines import tiny

    path = tiny.cached("sd3")
    pairs = [("a red circle", 0), ("a cat", 5)]
    res = run_eval(variants_from_args(path), ["a red circle", "a cat"], [0, 5], ["toy_bright"], num_steps=4,
                   out_dir=tmp_path, progress=False)
    pipe = StableDiffusion3Pipeline.from_pretrained(path)
    pipe.set_progress_bar_config(disable=True)
    by_pair = {(r["prompt"], r["seed"]): r for r in res.records}
    for prompt, seed in pairs:
        ref = pipe(prompt, num_inference_steps=4, guidance_scale=1.0, height=32, width=32, output_type="pt",
                   generator=torch.Generator().manual_seed(seed)).images[0]
        ours = load_png(tmp_path / by_pair[(prompt, seed)]["image"])
        assert torch.equal(ours, (ref * 255).round().clamp(0, 255).to(torch.uint8))


def test_wan_video_eval_writes_h264_with_poster(tmp_path):
    """Tiny real Wan: adapter arguments via model_kwargs (--model-arg), frames scored as B,T,C,H,W, mp4 + poster."""
    from flowalign.pipelines import tiny

    variants = variants_from_args("wan:" + tiny.cached("wan"), model_kwargs={"height": 32, "width": 32,
                                                                          "num_frames": 9})
    reward = FunctionReward(brightness, name="bright", modality="video")
    res = run_eval(variants, ["a red circle"], [0], [reward], num_steps=2, out_dir=tmp_path, fps=8, progress=False)
    rec = res.records[0]
    assert rec["kind"] == "video" and rec["size"] == [32, 32]
    info = video_info(tmp_path / rec["image"])
    assert (info["codec"], info["frames"], info["width"]) == ("h264", 9, 32)
    assert info["duration_s"] == pytest.approx(9 / 8, abs=0.15)


def test_cli_real_clip_reward_and_clip_diversity(tmp_path, toy_dir):
    """A registered library reward with constructor arguments (--reward-arg) and CLIP-embedding diversity."""
    from flowalign.rewards import tiny as tiny_rewards
    from flowalign.rewards.base import get_reward

    clip_dir = tiny_rewards.save_tiny_open_clip(tmp_path / "clip")
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("# comment\n" + "\n".join(PROMPTS[:2]) + "\n\n")
    out = tmp_path / "ev"
    assert eval_main(["--model", f"toy_eval:{toy_dir}", "--prompts", str(prompts), "--rewards", "clip_score",
                      "--reward-arg", f"clip_score.model={clip_dir}", "--diversity", "clip_score", "--seeds", "0-2",
                      "--steps", "3", "--out", str(out), "--quiet", "--bootstrap", "500"]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["diversity_features"] == "clip_score"
    clip = get_reward("clip_score", model=str(clip_dir))
    recs = read_jsonl(out / "images.jsonl")
    per_prompt = []
    for p in range(2):
        imgs = torch.stack([load_png(out / r["image"]) for r in recs if r["prompt_idx"] == p]).float() / 255
        per_prompt.append(pairwise_diversity(clip.image_features(imgs)))
    assert metrics["diversity"]["base"]["mean"] == pytest.approx(np.mean(per_prompt), rel=1e-5)
    rows = read_jsonl(out / "results.jsonl")
    assert len(rows) == 6 and all(r["reward"] == "clip_score" for r in rows)
    imgs = torch.stack([load_png(out / r["image"]) for r in rows]).float() / 255
    torch.testing.assert_close(torch.tensor([r["value"] for r in rows]), clip(imgs, [r["prompt"] for r in rows]))
