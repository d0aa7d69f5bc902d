"""The trainer + Flow-GRPO on tiny real-class diffusers pipelines (random weights, CPU).

What must hold: every shipped recipe runs a full iteration on its tiny pipeline; one step changes only the LoRA
weights and leaves the reference (adapters disabled) untouched; at the first inner update ratio == 1 exactly and
the loss is -mean(A); the policy learns a simple reward; resume is bit-exact; EMA/eval/checkpoint plumbing.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from flowalign.config import load_config
from flowalign.pipelines import tiny
from flowalign.rewards.base import FunctionReward
from flowalign.trainer import Trainer

ROOT = Path(__file__).resolve().parents[1]
PY = sys.executable
PROMPTS = ["a red cat", "a blue dog", "a green tree", "a white house"]


def tiny_cfg(tmp_path, *overrides: str, family: str = "sd3", **sections):
    d = {
        "model": {"adapter": family, "path": tiny.cached(family), "kwargs": dict(tiny.RESOLUTION[family]),
                  "lora": {"rank": 4}},
        "sample": {"prompts": PROMPTS, "prompts_per_round": 2, "group_size": 4, "num_steps": 4, "batch_size": 4,
                   "guidance": 4.5},
        "reward": {"weights": {"redness": 1.0}},
        "train": {"lr": 1e-3, "beta": 0.01},
        "output_dir": str(tmp_path / "run"), "max_iterations": 1, "log": {"progress": False},
        "checkpoint": {"save_final": False},
    }
    for k, v in sections.items():
        d[k].update(v)
    return load_config(d, list(overrides))


def snapshot(module):
    return {n: p.detach().clone() for n, p in module.state_dict().items()}


# ------------------------------------------------------------------------------------------------ recipes
RECIPES = sorted(p for p in (ROOT / "recipes").glob("*.yaml")
                 if not p.name.startswith(("llm_", "shapes", "dance_", "mixgrpo_", "branch_", "sd15_diffusion_dpo")))
# dance_/mixgrpo_/branch_ recipes (HPS rewards, tree geometry) run one step in tests/test_online_methods.py;
# sd15_diffusion_dpo (needs a pairs dataset) in tests/test_preference_learning.py


@pytest.fixture(scope="module")
def tiny_pickscore(tmp_path_factory):
    from flowalign.rewards.tiny import save_tiny_hf_clip

    return str(save_tiny_hf_clip(tmp_path_factory.mktemp("pickscore")))


# rewards whose real weights cannot be had offline are swapped for cheap built-ins (one per component, so
# multi-reward recipes keep their shape); the reward library tests the real ones on tiny weights
CHEAP = ["redness", "brightness", "jpeg_compressibility", "color_target"]


def small_recipe(recipe: Path, out: Path, tiny_pickscore: str):
    """The recipe with its model path -> the matching tiny pipeline and a small round (when its rules allow)."""
    from flowalign.config import ConfigError

    raw = load_config(recipe, ["sample.prompts=[a, b]"], validate=False)
    fam = raw.model.adapter
    res = json.dumps(tiny.RESOLUTION[fam]).replace('"', "")
    weights = {}
    for i, (name, w) in enumerate(raw.reward.weights.items()):
        weights[name if name in ("pickscore", "ocr") else CHEAP[i % len(CHEAP)]] = w
    base = [
        f"model.path={tiny.cached(fam)}", f"model.kwargs={res}", "model.dtype=float32", "mixed_precision=no",
        "model.lora.rank=2", "sample.prompts=[a red cat, the text 'hi', a dog]", "eval.every=0",
        "checkpoint.save_final=false", "max_iterations=1", f"output_dir={out}", "log.progress=false",
        "reward.weights=" + json.dumps(weights).replace('"', ""), "reward.kwargs={}",
    ]
    if "pickscore" in weights:
        base.append(f"reward.kwargs.pickscore={{model: {tiny_pickscore}, processor: {tiny_pickscore}}}")
    shapes = [["sample.prompts_per_round=2", "sample.group_size=2", "sample.batch_size=2", "train.batch_size=null"],
              ["sample.prompts_per_round=1"], []]
    for geo in shapes:  # the smallest round and step count the recipe's own rules accept
        for steps in ([f"sample.num_steps={n}"] for n in (4, 10)):
            try:
                return load_config(recipe, base + geo + steps)
            except ConfigError:
                continue
    return load_config(recipe, base)  # raises the recipe's own error


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda p: p.name)
def test_recipe_runs_one_step_on_tiny_pipeline(recipe, tmp_path, tiny_pickscore):
    cfg = small_recipe(recipe, tmp_path, tiny_pickscore)
    tr = Trainer(cfg)
    before = [p.detach().clone() for p in tr.params]
    rec = tr.step()
    assert rec["iteration"] == 1 and rec["samples"] == cfg.global_batch
    assert all(f"reward_{k}_mean" in rec for k in cfg.reward.weights)
    # every recipe's round has non-constant rewards on its tiny pipeline (measured: OCR's edit-distance reward too,
    # std 0.14), so its groups survive drop_zero_std and the step must train
    assert rec["num_updates"] > 0 and torch.isfinite(torch.tensor(rec["loss"]))
    assert any(not torch.equal(a, p) for a, p in zip(before, tr.params))
    assert all("lora_" in n for n in tr.param_names)


# ------------------------------------------------------------------------------------------------ one step
def test_one_step_changes_only_lora_and_reference_is_unchanged(tmp_path):
    tr = Trainer(tiny_cfg(tmp_path, "ema.interval=1"))
    a = tr.adapter
    base_names = [n for n in tr.module.state_dict() if "lora_" not in n]
    before = snapshot(tr.module)
    assert tr.param_names and all("lora_" in n for n in tr.param_names)
    opt_ids = {id(p) for g in tr.optimizer.param_groups for p in g["params"]}
    assert opt_ids == {id(p) for p in tr.params}

    g = torch.Generator().manual_seed(123)
    x = a.init_noise(2, g)
    cond = a.encode(["a red cat", "a dog"], negative="")
    with torch.no_grad():
        ref0 = a.predict(x, 0.7, cond, 4.5)
        with tr.reference():
            ref_disabled0 = a.predict(x, 0.7, cond, 4.5)
    # gaussian init: lora_B == 0, so the policy starts exactly at the reference
    assert torch.equal(ref0, ref_disabled0)

    rec = tr.step()
    assert rec["num_updates"] == 2 and rec["global_step"] == 2
    after = snapshot(tr.module)
    assert all(torch.equal(before[n], after[n]) for n in base_names)
    changed = [n for n in tr.param_names if not torch.equal(before[n], after[n])]
    assert any("lora_B" in n for n in changed)
    with torch.no_grad():
        with tr.reference():
            ref1 = a.predict(x, 0.7, cond, 4.5)
        pol1 = a.predict(x, 0.7, cond, 4.5)
    assert torch.equal(ref1, ref_disabled0)  # the reference is the untouched base model
    assert not torch.equal(pol1, ref1)  # the policy moved
    # EMA (interval 1, decay min((1+n)/(10+n), 0.9) = 1/10 then 2/11): strictly between start and live weights
    for s, n in zip(tr.ema.shadow, tr.param_names):
        if n in changed and "lora_B" in n:
            assert not torch.equal(s, after[n]) and not torch.equal(s, before[n])


def test_first_inner_update_ratio_is_one_and_loss_is_minus_mean_advantage(tmp_path):
    cfg = tiny_cfg(tmp_path, "train.beta=0.0", "sample.prompts_per_round=3")  # 12 rows, groups cut by chunks
    tr = Trainer(cfg)
    tr.module.eval()
    col = tr.method.collect(tr.state)
    tr.module.train()
    st = tr.method._store
    first = [b for b in col.batches if b.update == 0]
    assert first
    rows_steps = []
    for b in first:
        loss, m = tr.method.loss(b)
        rows = b.data.rows
        adv = st.adv[rows].clamp(-cfg.train.adv_clip_max, cfg.train.adv_clip_max)
        assert m["ratio_min"].item() == 1.0 and m["ratio_max"].item() == 1.0  # exactly
        assert m["policy_loss"].item() == pytest.approx(-adv.mean().item(), abs=1e-7)
        assert loss.item() == pytest.approx(-adv.sum().item() * b.weight, abs=1e-7)
        tr.accelerator.backward(loss)
        rows_steps.append((rows, b.data.step, adv))
    tr.optimizer.step()
    # sign check: one step on the surrogate raises sum A * log pi for the rows it was computed on
    with torch.no_grad():
        gain = 0.0
        for rows, j, adv in rows_steps:
            from flowalign import sde

            x, x1 = st.latents[rows, j], st.latents[rows, j + 1]
            out = tr.adapter.predict(x, st.sigmas[j], st.cond.index(rows), 4.5)
            lp = sde.log_prob_of("flow_sde", x, x1, out, st.sigmas[j], st.sigmas[j + 1], 0.7).log_prob
            gain += float((adv * (lp - st.log_probs[rows, j])).sum())
    assert gain > 0


def test_zero_std_groups_are_dropped(tmp_path):
    const = FunctionReward(lambda images, prompts, meta: torch.full((len(images),), 0.5), name="const")
    tr = Trainer(tiny_cfg(tmp_path), reward_fn=const)
    before = [p.detach().clone() for p in tr.params]
    rec = tr.step()
    assert rec["zero_std_frac"] == 1.0 and rec["kept_frac"] == 0.0 and rec["num_updates"] == 0
    assert all(torch.equal(a, p) for a, p in zip(before, tr.params))
    assert rec["reward_const_mean"] == 0.5


def test_full_finetune_keeps_a_frozen_reference(tmp_path):
    tr = Trainer(tiny_cfg(tmp_path, "model.lora.enabled=false", "train.lr=1e-4"))
    assert len(tr.params) == len(list(tr.module.parameters()))
    a = tr.adapter
    x = a.init_noise(1, torch.Generator().manual_seed(0))
    cond = a.encode(["a red cat"], negative="")
    with torch.no_grad():
        out0 = a.predict(x, 0.5, cond, 4.5)
    tr.step()
    with torch.no_grad():
        with tr.reference():
            ref = a.predict(x, 0.5, cond, 4.5)
        out1 = a.predict(x, 0.5, cond, 4.5)
    assert torch.equal(ref, out0) and not torch.equal(out1, out0)


def test_eval_images_logs_and_max_minutes(tmp_path):
    cfg = tiny_cfg(tmp_path, "eval.every=1", "eval.prompts=[a red cat, a dog, a tree]", "eval.num_steps=3",
                   "eval.batch_size=2", "log.sample_images_every=1", "max_iterations=1")
    tr = Trainer(cfg)
    tr.train()
    lines = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    train_rec, eval_rec = lines
    for k in ("reward_mean", "reward_redness_std", "adv_std", "approx_kl", "clipfrac", "ratio_mean", "kl",
              "zero_std_frac", "time/sample", "time/reward", "time/train", "images_per_s", "grad_norm", "lr"):
        assert k in train_rec, k
    assert set(eval_rec) == {"iteration", "eval/reward", "eval/reward_redness"}
    assert (tmp_path / "run" / "samples" / "iter_000001.png").is_file()
    assert (tmp_path / "run" / "config.yaml").is_file()
    # EMA weights were swapped in for eval and the live weights restored
    w = [p.detach().clone() for p in tr.params]
    tr.evaluate()
    assert all(torch.equal(a, b) for a, b in zip(w, tr.params))
    # max_minutes stops before the next iteration (and still saves)
    cfg2 = tiny_cfg(tmp_path, "max_minutes=1e-9", "max_iterations=5", "checkpoint.save_final=true")
    tr2 = Trainer(cfg2, overwrite=True)  # a fresh run in the used output dir (issue 22: refused without it)
    assert tr2.train() == [] and (tmp_path / "run" / "checkpoints" / "checkpoint-00000000").is_dir()


def test_world_size_must_split_the_chunks(tmp_path):
    tr = Trainer(tiny_cfg(tmp_path))  # 2 chunks of 4
    tr.method.check_world(2)
    with pytest.raises(ValueError, match=r"2 sampling chunks per round .* cannot be split evenly over 3 processes"):
        tr.method.check_world(3)


# ------------------------------------------------------------------------------------------------ resume
def _cli(args: list[str], env: dict) -> None:
    out = subprocess.run([PY, "-m", "flowalign.cli", "train", *args], env=env, capture_output=True, text=True,
                         cwd=ROOT, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]


def _straight_run(tmp: Path) -> None:
    recipe = tmp / "r.yaml"
    recipe.write_text(tiny_cfg(tmp, "ema.interval=1", "sample.num_steps=3", "sample.schedule=window",
                               "sample.schedule_options={size: 2}", "log.sample_images_every=0").to_yaml())
    _cli([str(recipe), f"output_dir={tmp / 'straight'}", "max_iterations=4", "checkpoint.every=1",
          "checkpoint.keep_last=2"], {**os.environ, "OMP_NUM_THREADS": "1"})


@pytest.fixture(scope="session")
def straight_run(shared_cache) -> tuple[Path, Path]:
    """The resume tests' recipe and its straight 4-iteration run in a new process (a checkpoint every iteration,
    keep_last 2), run once per session: both resume tests compare against it."""
    d = shared_cache.directory("test_trainer.straight_run", _straight_run)
    return d / "r.yaml", d / "straight"


@pytest.mark.slow
def test_exact_resume_is_bitwise(tmp_path, straight_run):
    """4 iterations straight == 2 iterations, new process, resume latest, 2 more: bitwise weights/optimizer/EMA.
    The straight run checkpoints every iteration, the split one every 2: saving does not perturb training."""
    recipe, straight = straight_run
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    split = tmp_path / "split"
    _cli([str(recipe), f"output_dir={split}", "max_iterations=2", "checkpoint.every=2"], env)
    _cli([str(recipe), f"output_dir={split}", "max_iterations=4", "checkpoint.every=2", "--resume", "latest"], env)
    a, b = straight / "checkpoints" / "checkpoint-00000004", split / "checkpoints" / "checkpoint-00000004"
    for name in ("weights.safetensors", "ema.safetensors"):
        wa, wb = load_file(str(a / name)), load_file(str(b / name))
        assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
    oa, ob = torch.load(a / "optimizer.pt"), torch.load(b / "optimizer.pt")
    assert oa["param_groups"] == ob["param_groups"]
    for k in oa["state"]:
        for s in ("exp_avg", "exp_avg_sq", "step"):
            assert torch.equal(oa["state"][k][s], ob["state"][k][s])
    sa, sb = json.loads((a / "state.json").read_text()), json.loads((b / "state.json").read_text())
    assert (sa["iteration"], sa["global_step"], sa["method"]) == (sb["iteration"], sb["global_step"], sb["method"])
    ra = [json.loads(x) for x in (straight / "metrics.jsonl").read_text().splitlines()]
    rb = [json.loads(x) for x in (split / "metrics.jsonl").read_text().splitlines()]
    assert [r["reward_mean"] for r in ra] == [r["reward_mean"] for r in rb]
    assert sorted(p.name for p in (split / "checkpoints").iterdir()) == ["checkpoint-00000002",
                                                                         "checkpoint-00000004"]  # keep_last=2


# ------------------------------------------------------------------------------------------------ learning
@pytest.mark.slow
def test_flow_grpo_learns_redness_on_tiny_sd3(tmp_path):
    """15 iterations x 16 samples raise mean redness; paired test on shared noise vs the base model."""
    from scipy import stats

    from flowalign.methods.base import generator
    from flowalign.rollout import sample

    cfg = tiny_cfg(tmp_path, "sample.guidance=1.0", "train.train_cfg=false", "train.beta=0.0", "train.lr=1e-2",
                   "train.clip_range=1e-3", "model.lora.rank=8", "sample.group_size=8", "sample.batch_size=16",
                   "ema.enabled=false", "max_iterations=15")
    tr = Trainer(cfg)
    hist = tr.train()
    assert len(hist) == 15

    def rewards(policy: bool) -> torch.Tensor:
        traj_ctx = torch.no_grad()
        with traj_ctx, (tr.reference() if not policy else torch.enable_grad()):
            traj = sample(tr.adapter, PROMPTS, group_size=16, num_steps=4, kernel="flow_sde", noise_level=0.7,
                          generator=generator(999, "test"), batch_size=32)
        return tr.reward_fn(traj.images.clamp(0, 1), traj.sample_prompts)

    base, trained = rewards(False), rewards(True)
    diff = (trained - base).double().numpy()
    t, p = stats.ttest_rel(trained.double().numpy(), base.double().numpy())
    print(f"redness base {base.mean():.4f} -> trained {trained.mean():.4f} (paired t={t:.1f}, p={p:.2e})")
    assert diff.mean() > 0.01 and t > 0 and p < 1e-4
    early = sum(h["reward_mean"] for h in hist[:3]) / 3
    late = sum(h["reward_mean"] for h in hist[-3:]) / 3
    assert late > early + 0.01


@pytest.mark.slow
def test_exact_resume_after_sigkill_is_bitwise(tmp_path, straight_run):
    """A run checkpointing every iteration is SIGKILLed once checkpoint 2 is complete (mid-iteration 3, or later),
    ``--resume latest`` finishes it to 4 iterations: weights, EMA, optimizer, scheduler and RNG states are
    bitwise those of a straight 4-iteration run, every logged iteration matches, and keep_last=2 leaves 3 and 4."""
    import signal
    import time

    import numpy as np

    from flowalign import checkpoint as ckpt

    recipe, straight = straight_run  # the same settings as ``common``, run to the end in one process
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    common = [str(recipe), "max_iterations=4", "checkpoint.every=1", "checkpoint.keep_last=2"]
    killed = tmp_path / "killed"
    assert sorted(p.name for p in (straight / "checkpoints").iterdir()) == ["checkpoint-00000003",
                                                                            "checkpoint-00000004"]

    # the final name appears only by the atomic rename, after every file (state.json last) is written
    marker = killed / "checkpoints" / "checkpoint-00000002"
    proc = subprocess.Popen([PY, "-m", "flowalign.cli", "train", *common, f"output_dir={killed}"], env=env,
                            cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)
    try:
        deadline = time.monotonic() + 600
        while not marker.is_dir() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.02)
        assert proc.poll() is None, f"run ended before it could be killed: {proc.stderr.read()[-3000:]!r}"
        assert marker.is_dir(), "checkpoint 2 never appeared"
        os.killpg(proc.pid, signal.SIGKILL)
        assert proc.wait(timeout=60) == -signal.SIGKILL
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        proc.stderr.close()
    latest = ckpt.find_latest(killed / "checkpoints")
    at_kill = json.loads((latest / "state.json").read_text())["iteration"]
    assert at_kill in (2, 3)  # the kill can land after checkpoint 3 too; checkpoint 4 would mean it finished
    assert not (killed / "checkpoints" / "checkpoint-00000004").exists()
    logged_before = len((killed / "metrics.jsonl").read_text().splitlines())

    _cli([*common, f"output_dir={killed}", "--resume", "latest"], env)
    assert sorted(p.name for p in (killed / "checkpoints").iterdir()) == ["checkpoint-00000003",
                                                                          "checkpoint-00000004"]
    a, b = straight / "checkpoints" / "checkpoint-00000004", killed / "checkpoints" / "checkpoint-00000004"
    for name in ("weights.safetensors", "ema.safetensors"):
        wa, wb = load_file(str(a / name)), load_file(str(b / name))
        assert wa and wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa), name
    oa, ob = torch.load(a / "optimizer.pt"), torch.load(b / "optimizer.pt")
    assert oa["param_groups"] == ob["param_groups"] and oa["state"].keys() == ob["state"].keys()
    for k in oa["state"]:
        for s in ("exp_avg", "exp_avg_sq", "step"):
            assert torch.equal(oa["state"][k][s], ob["state"][k][s])
    assert torch.load(a / "scheduler.pt") == torch.load(b / "scheduler.pt")
    ra, rb = torch.load(a / "rng_0.pt", weights_only=False), torch.load(b / "rng_0.pt", weights_only=False)
    assert torch.equal(ra["torch"], rb["torch"]) and ra["python"] == rb["python"]
    assert len(ra["numpy"]) == len(rb["numpy"]) and all(np.array_equal(x, y) for x, y in zip(ra["numpy"], rb["numpy"]))
    sa, sb = json.loads((a / "state.json").read_text()), json.loads((b / "state.json").read_text())
    assert (sa["iteration"], sa["global_step"], sa["samples"], sa["method"]) == \
           (sb["iteration"], sb["global_step"], sb["samples"], sb["method"])
    # the log reads as the straight run's: resuming dropped what the killed process logged past its last
    # checkpoint (it ran again), so every iteration appears once, with the straight run's values
    keys = ("reward_mean", "loss", "grad_norm", "approx_kl", "global_step")
    ref = [json.loads(x) for x in (straight / "metrics.jsonl").read_text().splitlines()]
    lines = [json.loads(x) for x in (killed / "metrics.jsonl").read_text().splitlines()]
    assert logged_before >= at_kill
    assert [r["iteration"] for r in lines] == [r["iteration"] for r in ref] == [1, 2, 3, 4]
    for r, q in zip(lines, ref):
        assert {k: r[k] for k in keys} == {k: q[k] for k in keys}, r["iteration"]
