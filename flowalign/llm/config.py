"""Typed config of the LLM RLVR trainer: help-text dataclasses on the shared machinery of ``flowalign.config``.

A recipe is a YAML mapping with ``kind: llm`` and the sections below. Loading, type checks, dotted ``key=value``
overrides, unknown-key errors (key path + ``difflib`` suggestion) and ``describe`` are the image trainer's own
(``flowalign.config``: ``from_dict``, ``convert``, ``parse_overrides``, ``set_dotted``, ``ConfigError``); key
names follow the image side where the concept is the same (``seed``, ``output_dir``, ``model.lora.rank``/``alpha``,
``reward.weights``/``reward.kwargs``, ``train.lr``/``betas``/``weight_decay``/``max_grad_norm``/``warmup_steps``/
``batch_size``, ``checkpoint.every``/``keep_last``, ``eval.every``). Renamed keys fail with a ``ConfigError``
naming the new key (``RENAMED``).

``algo.preset`` names one of ``PRESETS`` (grpo, dapo, dr_grpo, rloo, reinforce_pp, mc_grpo, gdpo); it fills every
``algo`` field the recipe leaves out, so a recipe states only what differs. ``describe_llm()`` prints every key
(``flowalign train --help-config recipes/llm_grpo.yaml``).
"""

from __future__ import annotations

import dataclasses
import difflib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from flowalign.config import ConfigError, describe as describe_section, from_dict as build, help_field
from flowalign.config import check_reward_section, parse_overrides, set_dotted


@dataclass
class LoraCfg:
    enabled: bool = help_field(False, "Train peft LoRA adapters (true) or every weight of the model (false).")
    rank: int = help_field(8, "LoRA rank r (peft LoraConfig.r).")
    alpha: float = help_field(16, "LoRA alpha (peft lora_alpha); the update is scaled by alpha / rank.")
    dropout: float = help_field(0.0, "LoRA dropout probability.")
    target_modules: list[str] = help_field(factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"],
                                           help="Module names LoRA wraps.")


@dataclass
class ModelCfg:
    path: str = help_field("embedded", "Local Hugging Face causal-LM directory, or 'embedded' for the shipped tiny "
                                       "model (flowalign/llm/weights, scripts/pretrain_llm.py); never downloads.")
    dtype: Literal["float32", "bfloat16"] = help_field("float32", "dtype of the (master) weights.")
    gradient_checkpointing: bool = help_field(False, "Recompute activations in backward (memory for ~1 forward; "
                                                     "turns prefix sharing off in the training forward).")
    lora: LoraCfg = help_field(factory=LoraCfg, help="LoRA settings.")


@dataclass
class TaskCfg:
    name: Literal["arithmetic"] = help_field("arithmetic", "The embedded addition task (flowalign/llm/task.py).")
    max_operand: int = help_field(99, "Operands are drawn from [0, max_operand].")
    heldout_fraction: float = help_field(0.1, "Share of operand pairs kept for evaluation only.")
    seed: int = help_field(0, "Seed of the train/held-out split (must match the pretraining split).")


@dataclass
class RolloutCfg:
    engine: Literal["cached", "hf", "vllm"] = help_field("cached", (
        "cached (our KV-cache decode loop, one prefill per prompt) | hf (model.generate) | vllm (optional extra)."))
    prompts_per_step: int = help_field(16, "Unique prompts per optimizer step, per process.")
    group_size: int = help_field(8, "G completions per prompt (MC-GRPO samples G + 1).")
    max_new_tokens: int = help_field(8, "Completion budget in tokens; also the Dr. GRPO normaliser.")
    temperature: float = help_field(1.0, "Sampling temperature; the log-probs use the same T (as TRL).")
    top_p: float = help_field(1.0, "Nucleus sampling mass (1 = off).")
    top_k: int = help_field(0, "Top-k sampling (0 = off).")
    stop_strings: list[str] = help_field(factory=list, help="A completion ends after any of these (kept).")
    logprob_micro_batch: int = help_field(256, "Rows per no-grad log-prob forward (old policy / reference).")
    position_ids: Literal["mask", "arange"] = help_field("mask", (
        "Position ids of the log-prob passes: 'mask' (default) counts real tokens, as the decode loop and HF "
        "generate; 'arange' numbers the padded columns, as TRL (which passes none). RoPE is relative: ~1e-6 apart."))
    vllm_kwargs: dict[str, Any] = help_field(factory=dict, help=(
        "engine=vllm: extra vllm.LLM arguments (gpu_memory_utilization, enforce_eager, ...)."))


@dataclass
class AlgoCfg:
    preset: Literal["grpo", "dapo", "dr_grpo", "rloo", "reinforce_pp", "mc_grpo", "gdpo"] = help_field(
        "grpo", "Fills every algo key the recipe leaves out (PRESETS).")
    advantage: str = help_field("grpo", "Estimator in flowalign.advantages ADVANTAGES (grpo, no_std, rloo, median, "
                                        "gdpo, reinforce_pp, batch_std, ...).")
    advantage_kwargs: dict[str, Any] = help_field(factory=dict, help="Extra estimator arguments (eps, scale, ddof).")
    policy_loss: str = help_field("clip", "clip | reinforce (flowalign.llm.losses TOKEN_POLICY_LOSSES).")
    loss_agg_mode: str = help_field("seq-mean-token-mean", (
        "flowalign.llm.losses AGG_MODES: seq-mean-token-mean (TRL grpo), token-mean (TRL dapo), micro-token-mean "
        "(TRL bnpo), seq-mean-token-sum, seq-mean-token-sum-norm (Dr. GRPO)."))
    eps_low: float = help_field(0.2, "Lower clip: ratio >= 1 - eps_low.")
    eps_high: float | None = help_field(None, "Upper clip 1 + eps_high; null = eps_low (DAPO clip-higher: 0.28).")
    delta: float | None = help_field(None, "Two-sided clip: cap on the unclipped ratio (INTELLECT-2); null = off.")
    importance_sampling_level: Literal["token", "sequence"] = help_field(
        "token", "Ratio per token, or GSPO's length-normalised sequence ratio.")
    beta: float = help_field(0.0, "KL-to-reference coefficient (0 = no reference forward).")
    kl_estimator: Literal["k1", "k2", "k3"] = help_field("k3", "KL estimator (Schulman): k3 = TRL/verl low_var_kl.")
    kl_ratio_correction: bool = help_field(True, "Multiply the KL term by the ratio (TRL use_bias_correction_kl).")
    kl_in_reward: bool = help_field(False, "Subtract beta * KL from the reward, not the loss (RLOO, REINFORCE++).")
    entropy_coef: float = help_field(0.0, "Entropy bonus coefficient.")
    num_iterations: int = help_field(1, "Updates per generation batch (mu); > 1 adds an old-policy log-prob pass.")
    mini_batches: int = help_field(1, "Optimizer steps per iteration over the generation batch.")
    dynamic_sampling: bool = help_field(False, "DAPO: drop groups whose rewards are all equal and refill them.")
    max_refill_rounds: int = help_field(4, "DAPO: extra generation rounds per step at most.")
    mask_truncated: bool = help_field(False, "DAPO overlong filtering: no loss on completions without EOS.")
    overlong_buffer: int = help_field(0, "DAPO soft overlong punishment length L_cache (0 = off).")
    overlong_penalty: float = help_field(1.0, "Weight of the soft overlong punishment reward.")
    median_pivot: bool = help_field(False, "MC-GRPO: sample G + 1 and drop each group's median pivot.")


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
    weights: dict[str, float] = help_field(factory=lambda: {"arith_answer": 1.0, "arith_format": 0.5}, help=(
        "Reward name (flowalign.rewards REWARDS, 'module:attr' or 'remote:URL') -> weight; the total is the "
        "weighted sum (GDPO: the weight of each normalised advantage). Same key as the image trainer."))
    kwargs: dict[str, dict[str, Any]] = help_field(factory=dict, help="Reward name -> constructor keyword arguments.")


@dataclass
class TrainCfg:
    steps: int = help_field(100, "Optimizer-step rounds: one generation batch and its updates each.")
    lr: float = help_field(1e-4, "AdamW learning rate.")
    betas: list[float] = help_field(factory=lambda: [0.9, 0.99], help="AdamW betas.")
    weight_decay: float = help_field(0.0, "AdamW weight decay.")
    max_grad_norm: float | None = help_field(1.0, "Clip the global grad norm to this; null or 0 = no clipping.")
    warmup_steps: int = help_field(0, "Linear learning-rate warm-up in optimizer steps, then constant.")
    batch_size: int = help_field(128, (
        "Rows per training forward/backward micro-batch; losses use step-level normalisers, so accumulation is "
        "exact (micro-token-mean: these micro-batches are TRL's accumulation windows)."))
    skip_zero_advantage: bool = help_field(True, (
        "No forward/backward for groups whose advantages are all 0 (exact when there is no KL/entropy term)."))
    prefix_sharing: bool = help_field(True, "Run each prompt once per group in the training forward (KV cache).")
    device: Literal["cpu", "cuda", "auto"] = help_field("cpu", "cpu | cuda | auto (accelerate picks).")
    threads: int = help_field(0, "torch CPU threads (0 = leave as is).")


@dataclass
class EvalCfg:
    every: int = help_field(0, "Held-out evaluation period in steps (0 = only at the start and the end).")
    num_prompts: int = help_field(256, "Held-out prompts per evaluation.")
    temperature: float = help_field(1.0, "Sampling temperature of evaluation (0 = greedy).")


@dataclass
class CheckpointCfg:
    every: int = help_field(0, "Save every N steps (0 = only at the end); flowalign.checkpoint, crash-safe.")
    keep_last: int = help_field(2, "Keep the N newest checkpoints (0 = keep all).")
    dir: str | None = help_field(None, "Checkpoint directory; null = <output_dir>/checkpoints (as the image trainer).")
    export: bool = help_field(True, "Also write <checkpoint>/export: save_pretrained model (LoRA merged; adapter/ "
                              "holds the peft adapter) + tokenizer + README.md.")


@dataclass
class LogCfg:
    trackers: list[str] = help_field(factory=list, help="accelerate trackers: tensorboard, wandb, ... (as the image "
                                     "trainer's log.trackers; a missing package stops the run at config load).")
    project: str = help_field("flowalign", "Tracker project name.")
    run_name: str | None = help_field(None, "Tracker run name (W&B name; TensorBoard dir <output_dir>/<project>/<run_name>).")
    init_kwargs: dict[str, dict[str, Any]] = help_field(factory=dict, help="Tracker -> init kwargs (accelerate "
                                                        "init_trackers, e.g. {wandb: {entity: me}}).")
    samples: int = help_field(4, "Completions (prompt, completion, reward) logged as text per step (0 = none).")


@dataclass
class LLMConfig:
    kind: Literal["llm"] = help_field("llm", "Marks an LLM RLVR recipe (flowalign train dispatches on it).")
    seed: int = help_field(0, "Seed of the prompt stream, the sampling and the group shuffles.")
    output_dir: str = help_field("outputs/llm", "Run directory (config.yaml, metrics.jsonl, checkpoint-<step>).")
    model: ModelCfg = help_field(factory=ModelCfg, help="The causal LM and what is trained.")
    task: TaskCfg = help_field(factory=TaskCfg, help="Prompts and answers.")
    rollout: RolloutCfg = help_field(factory=RolloutCfg, help="Sampling G completions per prompt.")
    algo: AlgoCfg = help_field(factory=AlgoCfg, help="Advantages and the policy loss (GRPO family).")
    reward: RewardCfg = help_field(factory=RewardCfg, help="Rewards (as the image trainer's reward section).")
    train: TrainCfg = help_field(factory=TrainCfg, help="Optimisation.")
    eval: EvalCfg = help_field(factory=EvalCfg, help="Held-out evaluation.")
    checkpoint: CheckpointCfg = help_field(factory=CheckpointCfg, help="Checkpoints (flowalign/checkpoint.py).")
    log: LogCfg = help_field(factory=LogCfg, help="Trackers (flowalign.trackers); metrics.jsonl is always written.")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


# old key -> new key (raised as ConfigError naming the new key)
RENAMED: dict[str, str] = {
    "model.lora.r": "model.lora.rank",
    "rewards": "reward.weights (a {name: weight} map; constructor arguments in reward.kwargs: {name: {...}})",
    "optim.lr": "train.lr", "optim.betas": "train.betas", "optim.weight_decay": "train.weight_decay",
    "optim.max_grad_norm": "train.max_grad_norm", "optim.warmup_steps": "train.warmup_steps",
    "optim": "train.lr, train.betas, train.weight_decay, train.max_grad_norm, train.warmup_steps",
    "train.micro_batch": "train.batch_size", "train.save_every": "checkpoint.every",
    "train.eval_every": "eval.every", "train.eval_prompts": "eval.num_prompts",
    "train.eval_temperature": "eval.temperature",
}


def _check_renamed(data: dict) -> None:
    for old in sorted(RENAMED, key=lambda k: -k.count(".")):  # the most specific name first
        node: Any = data
        for part in old.split("."):
            node = node.get(part, dataclasses.MISSING) if isinstance(node, dict) else dataclasses.MISSING
        if node is not dataclasses.MISSING:
            raise ConfigError(f"{old} was renamed: use {RENAMED[old]}")


def _choice(path: str, value: Any, allowed) -> None:
    allowed = [str(a) for a in allowed]
    if value not in allowed:
        close = difflib.get_close_matches(str(value), allowed, n=1)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        raise ConfigError(f"{path}={value!r} is not allowed.{hint} Allowed: {', '.join(allowed)}")


def from_dict(data: dict | None) -> LLMConfig:
    """Build and validate an ``LLMConfig`` (preset applied) from a plain mapping; raises ``ConfigError``."""
    data = json.loads(json.dumps(data or {}))  # deep copy of plain data
    if not isinstance(data, dict):
        raise ConfigError(f"an LLM recipe must be a mapping of sections, got {type(data).__name__}")
    _check_renamed(data)
    algo = data.get("algo") or {}
    if not isinstance(algo, dict):
        raise ConfigError(f"algo: expected a mapping (section AlgoCfg), got {type(algo).__name__} {algo!r}")
    preset = algo.get("preset", "grpo")
    _choice("algo.preset", preset, PRESETS)
    data["algo"] = {**PRESETS[preset], **algo}
    cfg = build(LLMConfig, data)
    validate(cfg)
    return cfg


def validate(cfg: LLMConfig) -> None:
    """Cross-field and registry checks; raise a ``ConfigError`` naming the key path."""
    from flowalign.advantages import ADVANTAGES
    from flowalign.llm.losses import AGG_MODES, TOKEN_POLICY_LOSSES

    import dataclasses

    from flowalign.config_checks import check_finite

    check_finite(dataclasses.asdict(cfg))  # every number finite, named by key path (issue 22)
    if not cfg.model.lora.dropout < 1:
        raise ConfigError(f"model.lora.dropout must be in [0, 1), got {cfg.model.lora.dropout}")
    from accelerate.utils import LoggerType

    from flowalign.trackers import check_installed

    for i, tracker in enumerate(cfg.log.trackers):
        _choice(f"log.trackers[{i}]", tracker, [t.value for t in LoggerType])
    check_installed(cfg.log.trackers)
    a = cfg.algo
    _choice("algo.advantage", a.advantage, ADVANTAGES.names())
    _choice("algo.policy_loss", a.policy_loss, TOKEN_POLICY_LOSSES.names())
    _choice("algo.loss_agg_mode", a.loss_agg_mode, AGG_MODES)
    for key, lo in [("rollout.group_size", 1), ("rollout.prompts_per_step", 1), ("rollout.max_new_tokens", 1),
                    ("rollout.logprob_micro_batch", 1), ("algo.num_iterations", 1), ("algo.mini_batches", 1),
                    ("train.batch_size", 1), ("train.steps", 0), ("train.warmup_steps", 0), ("eval.every", 0),
                    ("eval.num_prompts", 1), ("checkpoint.every", 0), ("checkpoint.keep_last", 0),
                    ("model.lora.rank", 1)]:
        val = _get(cfg, key)
        if val < lo:
            raise ConfigError(f"{key} must be >= {lo}, got {val!r}")
    for key in ("algo.beta", "algo.entropy_coef", "train.weight_decay", "model.lora.dropout"):
        if _get(cfg, key) < 0:
            raise ConfigError(f"{key} must be >= 0, got {_get(cfg, key)!r}")
    if cfg.train.lr <= 0:
        raise ConfigError(f"train.lr must be > 0, got {cfg.train.lr}")
    if len(cfg.train.betas) != 2 or not all(0 <= b < 1 for b in cfg.train.betas):
        raise ConfigError(f"train.betas must be two numbers in [0, 1), got {cfg.train.betas}")
    check_reward_section(cfg.reward, example="arith_answer: 1")
    if a.advantage == "gdpo" and len(cfg.reward.weights) < 2:
        raise ConfigError("algo.advantage='gdpo' needs at least two rewards in reward.weights")
    if a.median_pivot and a.advantage != "median":
        raise ConfigError("algo.median_pivot=true needs algo.advantage='median'")


def _get(cfg: Any, dotted: str) -> Any:
    for part in dotted.split("."):
        cfg = getattr(cfg, part)
    return cfg


def load(path: str | Path | None = None, overrides: list[str] | None = None) -> LLMConfig:
    """Load a YAML recipe (or the defaults) and apply ``key=value`` overrides (values parsed as YAML)."""
    data: Any = {}
    if path:
        if not Path(path).is_file():
            raise ConfigError(f"recipe {str(path)!r} does not exist")
        from flowalign.config_checks import load_yaml  # duplicate keys refused, as for image recipes

        data = load_yaml(Path(path).read_text(), str(path)) or {}
        if not isinstance(data, dict):
            raise ConfigError(f"recipe {str(path)!r} must be a mapping of sections, got {type(data).__name__}")
    for key, value in parse_overrides(overrides):
        set_dotted(data, key, value)
    return from_dict(data)


def describe_llm() -> str:
    """Every LLM key with its type, default and help, then the presets (``flowalign train --help-config``)."""
    lines = ["# LLM RLVR config keys (kind: llm; recipe YAML or dotted overrides)", describe_section(LLMConfig),
             "\n# algo.preset fills the algo keys a recipe leaves out:"]
    lines += [f"  {name}: {', '.join(f'{k}={v!r}' for k, v in kw.items())}" for name, kw in PRESETS.items()]
    lines.append("\n# renamed keys (an old key fails with a ConfigError naming the new one):")
    lines += [f"  {old} -> {new}" for old, new in RENAMED.items()]
    return "\n".join(lines)
