"""Typed config of the LLM RLVR trainer: dataclasses, YAML recipes, dotted ``key=value`` overrides.

A recipe is a YAML mapping with ``kind: llm`` and the sections below. ``algo.preset`` names one of ``PRESETS``
(grpo, dapo, dr_grpo, rloo, reinforce_pp, mc_grpo, gdpo); it fills every ``algo`` field the recipe leaves out,
so a recipe states only what differs. Errors name the key path and the allowed values, at load time.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from flowalign.advantages import ADVANTAGES
from flowalign.llm.losses import AGG_MODES, KL_ESTIMATORS, POLICY_LOSSES
from flowalign.llm.rollout import ENGINES


@dataclass
class LoraCfg:
    enabled: bool = False  # LoRA adapters via peft; False = full fine-tuning
    r: int = 8  # adapter rank
    alpha: int = 16  # scaling numerator (lora_alpha)
    dropout: float = 0.0  # adapter dropout
    target_modules: list = field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"])


@dataclass
class ModelCfg:
    path: str = "embedded"  # local HF directory, or "embedded" for the shipped tiny model
    dtype: str = "float32"  # float32 | bfloat16 (master weights)
    gradient_checkpointing: bool = False  # recompute activations in backward (saves memory, costs ~1 forward)
    lora: LoraCfg = field(default_factory=LoraCfg)


@dataclass
class TaskCfg:
    name: str = "arithmetic"  # the embedded addition task (flowalign/llm/task.py)
    max_operand: int = 99  # operands drawn from [0, max_operand]
    heldout_fraction: float = 0.1  # share of operand pairs kept for evaluation only
    seed: int = 0  # seed of the train/held-out split (must match the pretraining split)


@dataclass
class RolloutCfg:
    engine: str = "cached"  # cached (our KV-cache decode loop) | hf (model.generate) | vllm (optional extra)
    prompts_per_step: int = 16  # unique prompts per optimizer step (per process)
    group_size: int = 8  # G completions per prompt (MC-GRPO samples G + 1)
    max_new_tokens: int = 8  # completion budget; also the Dr. GRPO normaliser
    temperature: float = 1.0  # sampling temperature; log-probs use the same T (as TRL)
    top_p: float = 1.0  # nucleus sampling
    top_k: int = 0  # 0 = off
    stop_strings: list = field(default_factory=list)  # completion ends after any of these (kept)
    logprob_micro_batch: int = 256  # rows per no-grad log-prob forward (old/reference)
    vllm_kwargs: dict = field(default_factory=dict)  # engine=vllm: extra vllm.LLM arguments (gpu_memory_utilization..)


@dataclass
class AlgoCfg:
    preset: str = "grpo"  # fills the fields below that the recipe leaves out
    advantage: str = "grpo"  # estimator name in flowalign.advantages.ADVANTAGES
    advantage_kwargs: dict = field(default_factory=dict)  # extra args of the estimator (eps, scale, ...)
    policy_loss: str = "clip"  # clip | reinforce (flowalign.llm.losses.POLICY_LOSSES)
    loss_agg_mode: str = "seq-mean-token-mean"  # one of flowalign.llm.losses.AGG_MODES
    eps_low: float = 0.2  # lower clip 1 - eps_low
    eps_high: float | None = None  # upper clip 1 + eps_high (None = eps_low; DAPO clip-higher 0.28)
    delta: float | None = None  # two-sided clip cap on the unclipped ratio (INTELLECT-2)
    importance_sampling_level: str = "token"  # token | sequence (GSPO)
    beta: float = 0.0  # KL coefficient (0 = no reference model forward)
    kl_estimator: str = "k3"  # k1 | k2 | k3
    kl_ratio_correction: bool = True  # multiply the KL term by the ratio (TRL use_bias_correction_kl)
    kl_in_reward: bool = False  # REINFORCE++/RLOO: subtract beta * KL from the reward instead of the loss
    entropy_coef: float = 0.0  # entropy bonus coefficient
    num_iterations: int = 1  # updates per generation batch (mu); > 1 adds an old-policy log-prob pass
    mini_batches: int = 1  # optimizer steps per iteration over the generation batch
    dynamic_sampling: bool = False  # DAPO: drop groups with all-equal rewards and refill them
    max_refill_rounds: int = 4  # DAPO: extra generation rounds per step at most
    mask_truncated: bool = False  # DAPO overlong filtering: no loss on completions without EOS
    overlong_buffer: int = 0  # DAPO soft overlong punishment length L_cache (0 = off)
    overlong_penalty: float = 1.0  # weight of the soft overlong punishment
    median_pivot: bool = False  # MC-GRPO: sample G + 1 and drop each group's median pivot


PRESETS: dict[str, dict[str, Any]] = {
    # DeepSeekMath GRPO: group z-score, seq-mean-token-mean, clip 0.2, k3 KL (beta 0.04)
    "grpo": dict(advantage="grpo", loss_agg_mode="seq-mean-token-mean", beta=0.04),
    # DAPO: clip-higher, token-level loss, dynamic sampling, soft overlong punishment, no KL
    "dapo": dict(advantage="grpo", loss_agg_mode="token-mean", eps_low=0.2, eps_high=0.28, beta=0.0,
                 dynamic_sampling=True, overlong_buffer=2),
    # Dr. GRPO: no std, token sum / constant budget, no KL
    "dr_grpo": dict(advantage="no_std", loss_agg_mode="seq-mean-token-sum-norm", beta=0.0),
    # RLOO: leave-one-out baseline, whole completion as one action, KL folded into the reward
    "rloo": dict(advantage="rloo", policy_loss="reinforce", loss_agg_mode="seq-mean-token-sum", beta=0.0,
                 kl_in_reward=True, kl_estimator="k1"),
    # REINFORCE++-baseline: group mean baseline, global whitening, per-token KL in the reward
    "reinforce_pp": dict(advantage="reinforce_pp", loss_agg_mode="token-mean", beta=0.01, kl_in_reward=True,
                         kl_estimator="k1"),
    # MC-GRPO: G + 1 samples, median baseline, pivot excluded
    "mc_grpo": dict(advantage="median", loss_agg_mode="seq-mean-token-mean", beta=0.0, median_pivot=True),
    # GDPO: decoupled per-reward normalisation
    "gdpo": dict(advantage="gdpo", loss_agg_mode="seq-mean-token-mean", beta=0.0),
}


@dataclass
class RewardCfg:
    name: str  # registered reward name (flowalign.rewards.REWARDS) or "module:attr"
    weight: float = 1.0  # weight in the total reward (GDPO: weight of its normalised advantage)
    kwargs: dict = field(default_factory=dict)  # constructor arguments


@dataclass
class OptimCfg:
    lr: float = 1e-4  # AdamW learning rate
    weight_decay: float = 0.0
    betas: list = field(default_factory=lambda: [0.9, 0.99])
    max_grad_norm: float = 1.0  # 0 = no clipping
    warmup_steps: int = 0  # linear warm-up, then constant


@dataclass
class TrainCfg:
    steps: int = 100  # optimizer-step rounds (generation batches)
    micro_batch: int = 128  # rows per forward/backward; losses use step-level normalisers (exact accumulation)
    skip_zero_advantage: bool = True  # no forward/backward for groups with A == 0 everywhere (exact when no KL/entropy)
    prefix_sharing: bool = True  # run each prompt once per group in the training forward (whole-group micro-batches)
    eval_every: int = 0  # held-out evaluation period in steps (0 = only at start and end)
    eval_prompts: int = 256  # held-out prompts per evaluation
    eval_temperature: float = 1.0  # sampling temperature of evaluation (0 = greedy)
    save_every: int = 0  # checkpoint period in steps (0 = only at the end)
    device: str = "cpu"  # cpu | cuda | auto (accelerate picks)
    threads: int = 0  # torch CPU threads (0 = leave as is)


@dataclass
class LLMConfig:
    kind: str = "llm"
    seed: int = 0
    output_dir: str = "outputs/llm"
    model: ModelCfg = field(default_factory=ModelCfg)
    task: TaskCfg = field(default_factory=TaskCfg)
    rollout: RolloutCfg = field(default_factory=RolloutCfg)
    algo: AlgoCfg = field(default_factory=AlgoCfg)
    rewards: list = field(default_factory=lambda: [RewardCfg("arith_answer", 1.0), RewardCfg("arith_format", 0.5)])
    optim: OptimCfg = field(default_factory=OptimCfg)
    train: TrainCfg = field(default_factory=TrainCfg)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def _choice(path: str, value, allowed) -> None:
    allowed = list(allowed)
    if value not in allowed:
        raise ValueError(f"{path}={value!r} is not allowed. Allowed: {', '.join(map(str, allowed))}")


def _coerce(value: Any, tp: str, path: str) -> Any:
    """Check/convert a scalar against its annotation ("1e-3" from YAML 1.1 -> float); name the key on error."""
    base = tp.replace(" | None", "")
    if value is None:
        if "None" in tp:
            return None
        raise ValueError(f"{path} must not be null (expected {base})")
    try:
        if base == "float" and not isinstance(value, bool):
            return float(value)
        if base == "int" and not isinstance(value, bool) and float(value) == int(float(value)):
            return int(float(value))
    except (TypeError, ValueError):
        pass
    ok = {"bool": bool, "str": str, "list": list, "dict": dict}.get(base)
    if base in ("float", "int") or (ok is not None and not isinstance(value, ok)):
        raise ValueError(f"{path} must be {base}, got {value!r}")
    return value


def _build(cls, data: Any, path: str):
    """Instantiate dataclass ``cls`` from a mapping, rejecting unknown keys with their key path."""
    if data is None:
        return cls()
    if not isinstance(data, dict):
        raise ValueError(f"{path or 'config'} must be a mapping, got {type(data).__name__}")
    names = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(names))
    if unknown:
        raise ValueError(f"unknown key(s) {', '.join(f'{path}.{k}'.lstrip('.') for k in unknown)}; "
                         f"allowed: {', '.join(names)}")
    kw = {}
    for k, v in data.items():
        sub = _SECTIONS.get(k)
        key = f"{path}.{k}".lstrip(".")
        kw[k] = _build(sub, v, key) if sub is not None else _coerce(v, str(names[k].type), key)
    return cls(**kw)


_SECTIONS = {"model": ModelCfg, "task": TaskCfg, "rollout": RolloutCfg, "algo": AlgoCfg, "optim": OptimCfg,
             "train": TrainCfg, "lora": LoraCfg}


def from_dict(data: dict) -> LLMConfig:
    """Build and validate an ``LLMConfig`` (presets applied) from a plain mapping."""
    data = dict(data or {})
    algo = dict(data.get("algo") or {})
    preset = algo.get("preset", "grpo")
    _choice("algo.preset", preset, PRESETS)
    data["algo"] = {**PRESETS[preset], **algo}
    rewards = data.pop("rewards", None)
    cfg = _build(LLMConfig, data, "")
    if rewards is not None:
        if not isinstance(rewards, list) or not rewards:
            raise ValueError("rewards must be a non-empty list of {name, weight, kwargs}")
        cfg.rewards = [_build(RewardCfg, r if isinstance(r, dict) else {"name": r}, f"rewards[{i}]")
                       for i, r in enumerate(rewards)]
    validate(cfg)
    return cfg


def validate(cfg: LLMConfig) -> None:
    """Raise a ValueError naming the key path for any invalid value."""
    _choice("kind", cfg.kind, ["llm"])
    _choice("rollout.engine", cfg.rollout.engine, ENGINES)
    _choice("algo.advantage", cfg.algo.advantage, ADVANTAGES.names())
    _choice("algo.policy_loss", cfg.algo.policy_loss, POLICY_LOSSES.names())
    _choice("algo.loss_agg_mode", cfg.algo.loss_agg_mode, AGG_MODES)
    _choice("algo.kl_estimator", cfg.algo.kl_estimator, KL_ESTIMATORS)
    _choice("algo.importance_sampling_level", cfg.algo.importance_sampling_level, ["token", "sequence"])
    _choice("model.dtype", cfg.model.dtype, ["float32", "bfloat16"])
    _choice("task.name", cfg.task.name, ["arithmetic"])
    for key, val, lo in [("rollout.group_size", cfg.rollout.group_size, 1),
                         ("rollout.prompts_per_step", cfg.rollout.prompts_per_step, 1),
                         ("rollout.max_new_tokens", cfg.rollout.max_new_tokens, 1),
                         ("algo.num_iterations", cfg.algo.num_iterations, 1),
                         ("algo.mini_batches", cfg.algo.mini_batches, 1),
                         ("train.micro_batch", cfg.train.micro_batch, 1),
                         ("train.steps", cfg.train.steps, 0)]:
        if not isinstance(val, int) or val < lo:
            raise ValueError(f"{key} must be an int >= {lo}, got {val!r}")
    if cfg.algo.beta < 0 or cfg.optim.lr <= 0:
        raise ValueError(f"algo.beta must be >= 0 and optim.lr > 0, got {cfg.algo.beta}, {cfg.optim.lr}")
    if cfg.algo.advantage == "gdpo" and len(cfg.rewards) < 2:
        raise ValueError("algo.advantage='gdpo' needs at least two rewards")
    if cfg.algo.median_pivot and cfg.algo.advantage != "median":
        raise ValueError("algo.median_pivot=True needs algo.advantage='median'")


def _set_dotted(d: dict, key: str, value: Any) -> None:
    parts = key.split(".")
    cur = d
    for p in parts[:-1]:
        cur = cur.setdefault(p, {})
        if not isinstance(cur, dict):
            raise ValueError(f"override {key!r}: {p!r} is not a section")
    cur[parts[-1]] = value


def load(path: str | Path | None = None, overrides: list[str] | None = None) -> LLMConfig:
    """Load a YAML recipe (or defaults) and apply ``key=value`` overrides (values parsed as YAML)."""
    data = yaml.safe_load(Path(path).read_text()) if path else {}
    data = data or {}
    for ov in overrides or []:
        if "=" not in ov:
            raise ValueError(f"override {ov!r} must look like key.path=value")
        k, _, v = ov.partition("=")
        _set_dotted(data, k.strip(), yaml.safe_load(v))
    return from_dict(data)
