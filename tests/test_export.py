"""Exports load in plain diffusers / peft / transformers and reproduce flowalign's own outputs.

Image families (SD3, FLUX, SD1.5, SDXL, Wan; tiny real-class pipelines), LoRA and full fine-tuning: a checkpoint
written by ``flowalign.checkpoint.save`` with perturbed trainable weights (raw and EMA differ, both differ from the
base) is exported by ``flowalign export``; then ``pipe.load_lora_weights(DIR)``, ``PeftModel.from_pretrained(
denoiser, DIR)`` and ``<Class>.from_pretrained(DIR)`` put back into the pipeline give the images of the pipeline
holding flowalign's own module (LoRA injected by ``flowalign.lora.apply_lora``, weights loaded with
``load_trainable`` as a resume does) within 1e-6, and differ from the base images. A real Trainer run writes the
export inside its checkpoint; the LLM trainer's checkpoint export loads with AutoModelForCausalLM / AutoTokenizer
(LoRA merged, and the peft adapter) and gives the policy's log-probs.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from flowalign import checkpoint as ckpt
from flowalign.cli import main as cli_main
from flowalign.config import load_config
from flowalign.export import EXPORT_DIR, LORA_WEIGHTS, denoiser_role
from flowalign.lora import apply_lora, load_trainable
from flowalign.pipelines import get_adapter, tiny

FAMILIES = ["sd3", "flux", "sd15", "sdxl", "wan"]
PROMPTS = ["a red cat", "two blue squares"]
STEPS = 2
TOL = 1e-6
DIFFERS = 1e-3  # an export that loaded nothing reproduces the base images: far above TOL
ITERATION = 3


def _gen() -> torch.Generator:
    return torch.Generator().manual_seed(0)


class Family:
    """The tiny base pipeline of one family, loaded once; pipelines over other denoisers share its components."""

    def __init__(self, family: str) -> None:
        self.family = family
        self.cls = get_adapter(family).pipeline_class
        self.role = denoiser_role(self.cls)
        self.base = self.cls.from_pretrained(tiny.cached(family))
        self.base.set_progress_bar_config(disable=True)
        self.denoiser = getattr(self.base, self.role)
        self.base_images = self.images(self.denoiser)

    def images(self, denoiser) -> torch.Tensor:
        """``pipe.__call__`` (deterministic sampler, fixed seed) with ``denoiser`` in place of the base one."""
        pipe = self.cls(**{**self.base.components, self.role: denoiser})
        pipe.set_progress_bar_config(disable=True)
        with torch.no_grad():
            return pipe(PROMPTS, num_inference_steps=STEPS, guidance_scale=1.0, output_type="pt", generator=_gen(),
                        return_dict=False, **tiny.RESOLUTION[self.family])[0].float()

    def fresh(self):
        return copy.deepcopy(self.denoiser)


@pytest.fixture(scope="module")
def families():
    torch.set_num_threads(1)
    cache: dict[str, Family] = {}

    def get(name: str) -> Family:
        if name not in cache:
            cache[name] = Family(name)
        return cache[name]

    return get


def lora_settings(family: str) -> dict:
    # alpha != r: an export without its adapter metadata would load with scale 1 instead of alpha / r
    return {"r": 4, "lora_alpha": 12.0, "target_modules": list(get_adapter(family).lora_target_modules),
            "init_lora_weights": "gaussian", "lora_dropout": 0.0}


def run_config(tmp: Path, family: str, lora: bool):
    return load_config({"model": {"adapter": family, "path": tiny.cached(family), "lora": {"enabled": lora, "rank": 4},
                                  "kwargs": dict(tiny.RESOLUTION[family])},
                        "sample": {"prompts": PROMPTS}, "reward": {"weights": {"redness": 1.0}},
                        "train": {"method": "flow_grpo"}, "output_dir": str(tmp / "run")})


def perturbed(module, seed: int, scale: float) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {n: (p.detach().float() + scale * torch.randn(p.shape, generator=g)).contiguous()
            for n, p in module.named_parameters() if p.requires_grad}


def write_checkpoint(tmp: Path, fam: Family, lora: bool) -> tuple[Path, dict, dict]:
    """A checkpoint as the trainer writes it (raw weights + a different EMA), with a metrics log holding an eval."""
    module = fam.fresh()
    settings = lora_settings(fam.family) if lora else None
    if lora:
        apply_lora(module, settings)
    else:
        module.requires_grad_(True)
    scale = 0.3 if lora else 0.02
    raw, ema = perturbed(module, 1, scale), perturbed(module, 2, scale)
    cfg = run_config(tmp, fam.family, lora)
    state = {"iteration": ITERATION, "global_step": 6, "samples": 48, "lora": settings, "config": cfg.to_dict()}
    (tmp / "run").mkdir(parents=True, exist_ok=True)
    # train + eval records as the trainer logs them; the card takes the last eval at or before the checkpoint
    records = [{"iteration": ITERATION - 1, "global_step": 4, "reward_mean": 0.25},
               {"iteration": ITERATION - 1, "eval_reward_mean": 0.625},
               {"iteration": ITERATION, "global_step": 6, "reward_mean": 0.75},
               {"iteration": ITERATION + 1, "eval_reward_mean": 0.875}]  # a later run's record
    (tmp / "run" / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    path = ckpt.save(tmp / "ckpts", ITERATION, weights=raw, optimizer={}, scheduler=None, state=state, ema=ema)
    return path, raw, ema


def own_module(fam: Family, path: Path, lora: bool, file: str = "ema.safetensors"):
    """flowalign's own trained denoiser: LoRA injected as the trainer does, weights loaded as a resume does."""
    module = fam.fresh()
    if lora:
        apply_lora(module, lora_settings(fam.family))
    else:
        module.requires_grad_(True)
    named = [(n, p) for n, p in module.named_parameters() if p.requires_grad]
    load_trainable(str(path / file), [n for n, _ in named], [p for _, p in named])
    return module


def export(path: Path, out: Path, *flags: str) -> Path:
    assert cli_main(["export", str(path), "--out", str(out), *flags]) == 0
    return out


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    assert a.shape == b.shape
    return (a - b).abs().max().item()


def check_lora_loads(fam: Family, own: torch.Tensor, folder: Path) -> None:
    """diffusers ``load_lora_weights`` and peft ``PeftModel.from_pretrained`` each reproduce ``own``."""
    from peft import PeftModel

    pipe = fam.cls(**{**fam.base.components, fam.role: fam.fresh()})
    pipe.load_lora_weights(str(folder))
    assert max_diff(fam.images(getattr(pipe, fam.role)), own) <= TOL
    peft_module = PeftModel.from_pretrained(fam.fresh(), str(folder)).get_base_model()
    assert max_diff(fam.images(peft_module), own) <= TOL


def check_full_loads(fam: Family, own: torch.Tensor, folder: Path) -> None:
    """``<Class>.from_pretrained(folder)`` in the pipeline reproduces ``own``."""
    loaded = type(fam.denoiser).from_pretrained(str(folder))
    assert max_diff(fam.images(loaded), own) <= TOL


# ------------------------------------------------------------------------------------------------ round trips
@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("mode", ["lora", "full"])
def test_image_export_round_trip(families, family, mode, tmp_path):
    fam, lora = families(family), mode == "lora"
    path, _, _ = write_checkpoint(tmp_path, fam, lora)
    out = export(path, tmp_path / "export")
    own = fam.images(own_module(fam, path, lora))  # EMA by default
    assert max_diff(own, fam.base_images) > DIFFERS  # the trained weights change the images
    if lora:
        assert {"pytorch_lora_weights.safetensors", "adapter_config.json", "adapter_model.safetensors"} <= \
            {p.name for p in out.iterdir()}
        check_lora_loads(fam, own, out)
    else:
        assert (out / "config.json").is_file() and (out / "diffusion_pytorch_model.safetensors").is_file()
        check_full_loads(fam, own, out)


def test_ema_by_default_and_no_ema(families, tmp_path):
    fam = families("sd3")
    path, raw, ema = write_checkpoint(tmp_path, fam, lora=True)
    default = load_file(str(export(path, tmp_path / "ema") / LORA_WEIGHTS))
    explicit = load_file(str(export(path, tmp_path / "ema2", "--ema") / LORA_WEIGHTS))
    no_ema = load_file(str(export(path, tmp_path / "raw", "--no-ema") / LORA_WEIGHTS))
    # trainer name <m>.lora_A.default.weight -> diffusers key transformer.<m>.lora_A.weight
    key = {n: "transformer." + n.replace(".default", "") for n in raw}
    assert set(default) == set(no_ema) == set(key.values())
    for n, k in key.items():
        assert torch.equal(default[k], ema[n]) and torch.equal(explicit[k], ema[n]) and torch.equal(no_ema[k], raw[n])
    assert any(not torch.equal(default[k], no_ema[k]) for k in key.values())
    own_raw = fam.images(own_module(fam, path, True, "weights.safetensors"))
    assert max_diff(own_raw, fam.images(own_module(fam, path, True))) > DIFFERS  # two different models
    check_lora_loads(fam, own_raw, tmp_path / "raw")
    assert "raw (not the EMA)" in (tmp_path / "raw" / "README.md").read_text()


def test_model_card_and_recipe(families, tmp_path):
    fam = families("sd3")
    path, _, _ = write_checkpoint(tmp_path, fam, lora=True)
    out = export(path, tmp_path / "export")
    card = (out / "README.md").read_text()
    for text in (tiny.cached("sd3"), "`flow_grpo`", "`redness` (1.0)", f"iteration {ITERATION}", "48 samples",
                 "| eval_reward_mean | 0.625 |", "flowalign train recipe.yaml", "- **Weights:** EMA",
                 "library_name: diffusers"):
        assert text in card, text
    assert "0.75" not in card and "0.875" not in card  # training records and later evals are not its figures
    recipe = load_config(str(out / "recipe.yaml"))
    assert recipe.to_dict() == run_config(tmp_path, "sd3", True).to_dict()


def test_export_leaves_the_random_streams_alone():
    import random

    import numpy as np

    from flowalign.export import rng_preserved

    before = (random.random(), np.random.rand(), torch.rand(1))
    with rng_preserved():
        random.random(), np.random.rand(), torch.rand(1)  # what loading a model may draw
    after = (random.random(), np.random.rand(), torch.rand(1))
    assert after[0] != before[0] and after[1] != before[1] and not torch.equal(after[2], before[2])
    state = (random.getstate(), np.random.get_state()[1].copy(), torch.get_rng_state())
    with rng_preserved():
        random.random(), np.random.rand(), torch.rand(3)
    assert random.getstate() == state[0] and (np.random.get_state()[1] == state[1]).all()
    assert torch.equal(torch.get_rng_state(), state[2])


def test_export_errors(families, tmp_path, capsys):
    assert cli_main(["export", str(tmp_path), "--out", str(tmp_path / "x")]) == 2
    assert "not a flowalign checkpoint" in capsys.readouterr().err
    fam = families("sd3")
    path, _, _ = write_checkpoint(tmp_path, fam, lora=True)
    (path / "ema.safetensors").unlink()
    assert cli_main(["export", str(path), "--out", str(tmp_path / "x"), "--ema"]) == 2
    assert "no ema.safetensors" in capsys.readouterr().err
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "keep.txt").write_text("mine")
    for target in (tmp_path / "busy", path, tmp_path):  # never delete a folder that is not an earlier export
        assert cli_main(["export", str(path), "--out", str(target)]) == 2
        assert "choose a new folder" in capsys.readouterr().err
    assert (tmp_path / "busy" / "keep.txt").read_text() == "mine" and (path / "weights.safetensors").is_file()
    with pytest.raises(SystemExit):
        cli_main(["export", str(path), "--out", str(tmp_path / "x"), "--ema", "--no-ema"])


# ------------------------------------------------------------------------------------------------ trainer
@pytest.mark.parametrize("family,lora", [("sd3", True), ("sd15", False)])
def test_trainer_checkpoint_holds_export(families, tmp_path, family, lora):
    """A real (1-iteration) Flow-GRPO run: ``<checkpoint>/export`` is written inside the atomic save and holds the
    EMA weights; diffusers reproduces the trainer's own pipeline with the EMA swapped in."""
    from flowalign.trainer import Trainer

    fam = families(family)
    cfg = load_config({
        "model": {"adapter": family, "path": tiny.cached(family), "kwargs": dict(tiny.RESOLUTION[family]),
                  "lora": {"enabled": lora, "rank": 4}},
        "sample": {"prompts": PROMPTS, "prompts_per_round": 2, "group_size": 2, "num_steps": 2, "batch_size": 4,
                   "guidance": 1.0, "kernel": "ddim" if family == "sd15" else "flow_sde"},
        "reward": {"weights": {"redness": 1.0}},
        "train": {"lr": 3e-2 if lora else 1e-3, "updates_per_iteration": 1},
        "ema": {"interval": 1}, "output_dir": str(tmp_path / "run"), "max_iterations": 1,
        "log": {"progress": False}})
    tr = Trainer(cfg)
    tr.train()
    path = ckpt.find_latest(tr.ckpt_dir)
    folder = path / EXPORT_DIR
    assert (folder / (LORA_WEIGHTS if lora else "config.json")).is_file() and not list(tr.ckpt_dir.glob(".tmp-*"))
    with torch.no_grad(), tr.ema.swapped_in():
        own = fam.images(tr.module)
    assert max_diff(own, fam.base_images) > DIFFERS and max_diff(own, fam.images(tr.module)) > 0  # EMA != raw
    (check_lora_loads if lora else check_full_loads)(fam, own, folder)
    assert "- **Weights:** EMA" in (folder / "README.md").read_text()


# ------------------------------------------------------------------------------------------------ LLM
@pytest.fixture(scope="module", params=["full", "lora"])
def llm_run(request, tmp_path_factory):
    """One real training step of the LLM trainer (checkpoint + export written at its end) and a fixed batch."""
    from flowalign.llm.config import load
    from flowalign.llm.rollout import generate
    from flowalign.llm.trainer import LLMTrainer

    torch.set_num_threads(1)
    out = tmp_path_factory.mktemp(f"llm_{request.param}")
    lora = ["model.lora.enabled=true", "train.lr=3e-2"] if request.param == "lora" else []
    tr = LLMTrainer(load("recipes/llm_grpo.yaml", [
        f"output_dir={out}", "rollout.prompts_per_step=4", "rollout.group_size=4", "train.batch_size=16",
        "eval.num_prompts=8", "eval.every=0", *lora]))
    tr.train(1, progress=False)
    ro = generate(tr.policy, tr.tok, ["12+30=", "5+77=", "99+9="], group_size=2, max_new_tokens=6,
                  generator=torch.Generator().manual_seed(0))
    return tr, ro, ckpt.find_latest(out / "checkpoints")


def _logps(model, ro) -> torch.Tensor:
    from flowalign.llm.rollout import token_logps

    with torch.no_grad():
        lp, _ = token_logps(model, ro.prompt_ids, ro.prompt_mask, ro.completion_ids, ro.completion_mask)
    return lp[ro.completion_mask.bool()]


def check_llm_loads(tr, ro, folder: Path, adapter: bool) -> None:
    """AutoModelForCausalLM (+ the peft adapter on the base) and AutoTokenizer reproduce the trained policy."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from flowalign.llm.model import load_model

    own = _logps(tr.policy, ro)
    assert (own - _logps(load_model("embedded")[0], ro)).abs().max().item() > DIFFERS  # training moved it
    tok = AutoTokenizer.from_pretrained(str(folder))
    assert tok("37+45=<82>")["input_ids"] == tr.tok("37+45=<82>")["input_ids"]
    merged = AutoModelForCausalLM.from_pretrained(str(folder))
    # a merged LoRA (W + s B A) rounds differently from the unmerged forward (float32 rounding); the adapter is exact
    assert (_logps(merged, ro) - own).abs().max().item() <= (1e-5 if adapter else TOL)  # measured 2.3e-6
    if adapter:
        from peft import PeftModel

        peft_model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(_base()), str(folder / "adapter"))
        assert (_logps(peft_model, ro) - own).abs().max().item() <= TOL


def _base():
    from flowalign.llm.model import WEIGHTS_DIR

    return str(WEIGHTS_DIR)


def test_llm_checkpoint_export(llm_run):
    tr, ro, path = llm_run
    folder = path / EXPORT_DIR
    assert (folder / "config.json").is_file() and (folder / "README.md").is_file()
    assert (folder / "adapter" / "adapter_config.json").is_file() == tr.lora
    check_llm_loads(tr, ro, folder, adapter=tr.lora)
    card = (folder / "README.md").read_text()
    assert "library_name: transformers" in card and f"step {tr.step}" in card and "`arith_answer` (1.0)" in card
    assert "| accuracy |" in card  # the run's eval at the last step
    again = export(path, path.parent / "again")  # the CLI writes the same export
    check_llm_loads(tr, ro, again, adapter=tr.lora)


def test_peft_folder_is_what_peft_writes(families, tmp_path):
    """Our adapter folder re-saved by peft's own ``PeftModel.save_pretrained`` is the same tensors and config."""
    from peft import PeftModel

    fam = families("flux")
    path, _, _ = write_checkpoint(tmp_path, fam, lora=True)
    ours = export(path, tmp_path / "ours")
    PeftModel.from_pretrained(fam.fresh(), str(ours)).save_pretrained(str(tmp_path / "peft"))
    a, b = (load_file(str(d / "adapter_model.safetensors")) for d in (ours, tmp_path / "peft"))
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)
    ca, cb = (json.loads((d / "adapter_config.json").read_text()) for d in (ours, tmp_path / "peft"))
    ca["target_modules"], cb["target_modules"] = sorted(ca["target_modules"]), sorted(cb["target_modules"])
    for k in ("r", "lora_alpha", "target_modules", "peft_type", "base_model_name_or_path"):
        assert ca[k] == cb[k], k


def test_failed_export_warns_and_checkpoint_survives(tmp_path, monkeypatch, capsys):
    import flowalign.export as export_module
    from flowalign.trainer import Trainer

    def boom(*_, **__):
        raise RuntimeError("boom")

    monkeypatch.setattr(export_module, "export_image", boom)
    tr = Trainer(load_config({
        "model": {"adapter": "sd3", "path": tiny.cached("sd3"), "kwargs": dict(tiny.RESOLUTION["sd3"]),
                  "lora": {"rank": 4}},
        "sample": {"prompts": PROMPTS, "prompts_per_round": 1, "group_size": 2, "num_steps": 2, "batch_size": 2},
        "reward": {"weights": {"redness": 1.0}}, "output_dir": str(tmp_path / "run"), "max_iterations": 1,
        "log": {"progress": False}}))
    tr.train()
    path = ckpt.find_latest(tr.ckpt_dir)
    assert (path / "weights.safetensors").is_file() and not (path / EXPORT_DIR).exists()
    err = capsys.readouterr().err
    assert "export" in err and "boom" in err and "flowalign export CKPT" in err
