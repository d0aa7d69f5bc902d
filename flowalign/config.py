"""Typed run configuration: dataclass sections with a help string per field, YAML recipes, dotted overrides.

>>> cfg = load_config("recipes/sd35_pickscore.yaml", ["train.lr=1e-4", "sample.group_size=8"])

* Every field carries ``metadata["help"]`` (TRL ``GRPOConfig`` style); ``describe()`` prints them all.
* Override values are parsed with ``yaml.safe_load`` (``1e-4`` -> float, ``[a, b]`` -> list, ``null`` -> None).
* Unknown keys fail at load with the full key path and a ``difflib`` close match; wrong types fail with the key
  path and the expected type; cross-field rules (batch geometry, windows, CFG/policy consistency, registered
  names) are checked by ``Config.validate`` at load time, and the method adds its own rules
  (``Method.check_config``). Rules that need the world size are checked when the trainer starts.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import math
import os
import re
import types
import typing
from dataclasses import dataclass, field
from typing import Any, Literal, Union

import yaml


def help_field(default: Any = dataclasses.MISSING, help: str = "", factory: Any = None) -> Any:  # noqa: A002
    """A dataclass field with a help string."""
    if factory is not None:
        return field(default_factory=factory, metadata={"help": help})
    return field(default=default, metadata={"help": help})


class ConfigError(ValueError):
    """A configuration problem, always naming the key path."""


# ----------------------------------------------------------------------------------------------- sections
@dataclass
class LoraSection:
    enabled: bool = help_field(True, "Train LoRA adapters (true) or fine-tune every weight of the denoiser (false).")
    rank: int | None = help_field(None, "LoRA rank r; null = the adapter's default (SD3/Wan 32, FLUX 64; flow_grpo).")
    alpha: float | None = help_field(None, "LoRA alpha; null = the adapter's default (2 * rank in flow_grpo).")
    target_modules: list[str] | None = help_field(None, "Module names LoRA wraps; null = the adapter's default targets.")
    init: str = help_field("gaussian", "peft init_lora_weights ('gaussian' as flow_grpo, 'default', 'pissa', ...).")
    dropout: float = help_field(0.0, "LoRA dropout probability.")
    path: str | None = help_field(None, "Start from these LoRA weights (a flowalign checkpoint dir or .safetensors file).")


@dataclass
class ModelSection:
    adapter: str = help_field("sd3", "Adapter name registered in flowalign.pipelines ADAPTERS: sd3, flux, wan, sd15, "
                      "sdxl, flux2, qwenimage, zimage, hunyuan_video, shapes.")
    path: str = help_field("", "Pipeline path or hub id passed to the adapter's from_pretrained (local dirs only offline).")
    dtype: Literal["float32", "float16", "bfloat16"] = help_field(
        "float32", "dtype of the frozen pipeline weights; trainable parameters are always kept in float32.")
    lora: LoraSection = help_field(factory=LoraSection, help="LoRA settings.")
    gradient_checkpointing: bool = help_field(False, "Enable activation checkpointing on the denoiser (memory for time).")
    kwargs: dict[str, Any] = help_field(factory=dict, help="Extra keyword arguments for the adapter's from_pretrained.")


@dataclass
class SampleSection:
    prompts: list[str | dict[str, Any]] | str | dict[str, Any] = help_field(factory=list, help=(
        "Training prompts: a list (strings or {prompt: ..., **metadata} records), a path to a .txt (one per line), "
        ".jsonl ({'prompt': ..., other keys become reward metadata}) or .csv (a 'prompt' column + metadata "
        "columns) file, or a datasets spec {dataset: name_or_path, split: train, column: prompt} "
        "(flowalign.data.load_prompts). A relative path in a recipe is relative to the recipe file."))
    prompts_per_round: int = help_field(8, "Distinct prompts (groups) per iteration, over all processes (flow_grpo: 48).")
    group_size: int = help_field(8, "Samples per prompt G (flow_grpo num_image_per_prompt: 24 for SD3.5).")
    num_steps: int = help_field(10, "Denoising steps of a training rollout (flow_grpo: 10 for SD3.5, 6 for FLUX).")
    kernel: str = help_field("flow_sde", "Step kernel in flowalign.sde KERNELS: flow_sde, cps, dance, ddim, ode.")
    noise_level: float = help_field(0.7, "Kernel noise level a (flow_sde 0.7 SD3.5 / 0.9 FLUX; cps 0.8; dance eta 0.3).")
    guidance: float = help_field(4.5, "CFG scale while sampling (and training when train.train_cfg); 1.0 = no CFG.")
    negative_prompt: str = help_field("", "Negative prompt for CFG (flow_grpo: the empty string).")
    schedule: str = help_field("all", "Step schedule in flowalign.schedules: all, fraction, window (Fast), sliding (Mix).")
    schedule_options: dict[str, Any] = help_field(factory=lambda: {"fraction": 0.99}, help=(
        "Options of the schedule, e.g. {fraction: 0.99} or {size: 3, lo: 0, hi: 5} for window."))
    same_noise: bool = help_field(False, "Share the initial noise x_T within a group (DanceGRPO); needs batch_size % G == 0.")
    batch_size: int = help_field(8, "Rows per sampling chunk on one process (the denoiser batch while sampling).")
    reduction: Literal["mean", "sum"] = help_field("mean", "Log-prob reduction over latent dims (mean = flow_grpo).")
    density: Literal["gaussian", "unnormalized"] = help_field("gaussian", "Log-prob form; 'unnormalized' = flow_grpo CPS.")
    shuffle_prompts: bool = help_field(True, "Visit prompts in a seeded random order per epoch (false: file order).")


@dataclass
class RewardSection:
    weights: dict[str, float] = help_field(factory=dict, help=(
        "Reward name (REWARDS registry, 'module:attr' or 'remote:URL') -> weight; the total is the weighted sum."))
    kwargs: dict[str, dict[str, Any]] = help_field(factory=dict, help="Reward name -> constructor keyword arguments.")
    device: str | None = help_field(None, "Device of the reward models; null = the training device.")
    background: bool = help_field(True, "Score each sampled chunk in a background thread while the next chunk samples.")


@dataclass
class AdvantageSection:
    estimator: str | None = help_field(None, (
        "ADVANTAGES registry name (grpo, batch_std, no_std, rloo, median, gdpo, reinforce_pp or 'module:fn'); "
        "null = derived from std/baseline/per_reward."))
    std: Literal["group", "global", "none"] = help_field("group", (
        "Scale: per-group std, std of the whole round (flow_grpo global_std, SD3.5 configs) or none (Dr.GRPO)."))
    baseline: Literal["mean", "median", "loo"] = help_field("mean", "Group baseline: mean, median (MC-GRPO), loo (RLOO).")
    per_reward: bool = help_field(False, "Normalise each reward in its group, then weight and re-normalise (GDPO).")
    eps: float = help_field(1e-4, "Added to the std (flow_grpo 1e-4).")
    ddof: Literal[0, 1] = help_field(0, (
        "Delta degrees of freedom of every std: 0 = numpy np.std as flow_grpo's PerPromptStatTracker and "
        "global_std (the image default), 1 = torch.std as TRL/verl (advantages x sqrt(G/(G-1)))."))
    drop_zero_std: bool = help_field(True, "Skip groups whose rewards are all equal (zero advantage); logged as zero_std.")
    kwargs: dict[str, Any] = help_field(factory=dict, help="Extra keyword arguments for an explicitly named estimator.")


@dataclass
class TrainSection:
    method: str = help_field("flow_grpo", "Method in flowalign.methods METHODS.")
    lr: float = help_field(3e-4, "AdamW learning rate (flow_grpo base 3e-4).")
    betas: list[float] = help_field(factory=lambda: [0.9, 0.999], help="AdamW betas.")
    weight_decay: float = help_field(1e-4, "AdamW weight decay (flow_grpo 1e-4).")
    adam_eps: float = help_field(1e-8, "AdamW epsilon.")
    adam_8bit: bool = help_field(False, "Use bitsandbytes AdamW8bit (needs the bitsandbytes package).")
    lr_scheduler: str = help_field("constant", "diffusers.optimization scheduler: constant, constant_with_warmup, cosine...")
    warmup_steps: int = help_field(0, "Scheduler warm-up in optimizer steps.")
    max_grad_norm: float | None = help_field(1.0, "Clip the global grad norm to this; null = no clipping.")
    updates_per_iteration: int = help_field(2, "Optimizer steps per inner epoch (flow_grpo: 2 per epoch).")
    num_inner_epochs: int = help_field(1, "Passes over one iteration's samples (flow_grpo num_inner_epochs 1).")
    batch_size: int | None = help_field(None, "Rows per training micro-batch; null = sample.batch_size (ratio == 1 safest).")
    shuffle: bool = help_field(True, "Shuffle samples before splitting them into updates (seeded; flow_grpo does).")
    clip_range: float = help_field(1e-4, "PPO clip epsilon (flow_grpo 1e-4; tiny because log-probs are dim-means).")
    clip_range_lt: float | None = help_field(None, "Lower clip (ratio >= 1 - lt); null = clip_range.")
    clip_range_gt: float | None = help_field(None, "Upper clip (ratio <= 1 + gt); null = clip_range.")
    adv_clip_max: float = help_field(5.0, "Clip advantages to [-adv_clip_max, adv_clip_max] (flow_grpo 5).")
    beta: float = help_field(0.0, "KL-to-reference coefficient (flow_grpo 0.04 GenEval/OCR, 0.01 PickScore, 0 Fast/FLUX); "
                          "the preference beta of d3po (0.1), dpo (epsilon 5000, flow 100) and prdp.")
    kl: Literal["flow_grpo", "exact"] = help_field("flow_grpo", (
        "KL form: 'exact' = mean((mu-mu_ref)^2)/(2 std^2); 'flow_grpo' = that times |dt| (train_sd3.py)."))
    train_cfg: bool = help_field(True, "Train the CFG-combined policy (flow_grpo train.cfg); false = CFG-free policy.")
    advantage: AdvantageSection = help_field(factory=AdvantageSection, help="Advantage estimation.")
    method_options: dict[str, Any] = help_field(factory=dict, help="Method-specific options, validated by the method.")


@dataclass
class EMASection:
    enabled: bool = help_field(True, "Keep an EMA of the trainable weights, used for eval and saved (flow_grpo: on).")
    decay: float = help_field(0.9, "Max EMA decay; effective min((1+n)/(10+n), decay) as flow_grpo.")
    interval: int = help_field(8, "Apply the EMA every N optimizer steps (flow_grpo 8).")


@dataclass
class EvalSection:
    every: int = help_field(0, "Evaluate every N iterations (0 = never); also after the last iteration when > 0.")
    prompts: list[str | dict[str, Any]] | str | dict[str, Any] = help_field(factory=list, help=(
        "Held-out prompts: the same forms as sample.prompts (list, .txt/.jsonl/.csv path, datasets spec)."))
    num_steps: int = help_field(40, "Sampling steps (flow_grpo: 40 for SD3.5).")
    guidance: float | None = help_field(None, "CFG scale; null = sample.guidance.")
    kernel: str = help_field("ode", "Kernel; 'ode' = deterministic Euler (the sampler users deploy).")
    noise_level: float = help_field(0.0, "Kernel noise level (0 for ode).")
    batch_size: int = help_field(8, "Rows per eval chunk.")
    seed: int = help_field(0, "Seed of the eval noise (fixed, so evals are comparable across iterations).")
    use_ema: bool = help_field(True, "Evaluate the EMA weights when EMA is enabled.")
    fn: str = help_field("flowalign.eval:trainer_eval", "Eval function 'module:attr' taking the trainer, returning metrics "
                 "(default: flowalign.eval, which also writes images + tidy rows under <output_dir>/eval/).")


@dataclass
class CheckpointSection:
    every: int = help_field(0, "Save every N iterations (0 = only at the end).")
    keep_last: int = help_field(2, "Keep the N newest checkpoints (0 = keep all).")
    dir: str | None = help_field(None, "Checkpoint directory; null = <output_dir>/checkpoints.")
    save_final: bool = help_field(True, "Save when the run ends (max_iterations or max_minutes).")
    export: bool = help_field(True, "Also write <checkpoint>/export: the weights as diffusers LoRA + peft adapter, or "
                              "a save_pretrained denoiser (full), with README.md; EMA weights when EMA is on.")


@dataclass
class LogSection:
    jsonl: str | None = help_field(None, "Per-iteration JSONL metrics; null = <output_dir>/metrics.jsonl.")
    trackers: list[str] = help_field(factory=list, help="accelerate trackers: tensorboard, wandb, ... (optional packages).")
    project: str = help_field("flowalign", "Tracker project name.")
    run_name: str | None = help_field(None, "Tracker run name (W&B name; TensorBoard dir <output_dir>/<project>/<run_name>).")
    init_kwargs: dict[str, dict[str, Any]] = help_field(factory=dict, help="Tracker -> init kwargs (accelerate "
                                                        "init_trackers, e.g. {wandb: {entity: me, tags: [a]}}).")
    sample_images_every: int = help_field(0, "Save a grid of the first sampled images every N iterations (0 = never).")
    progress: bool = help_field(True, "Show a tqdm bar on the main process.")


@dataclass
class Config:
    model: ModelSection = help_field(factory=ModelSection, help="The pipeline and what is trained.")
    sample: SampleSection = help_field(factory=SampleSection, help="Rollouts.")
    reward: RewardSection = help_field(factory=RewardSection, help="Rewards.")
    train: TrainSection = help_field(factory=TrainSection, help="Optimisation and the method's loss.")
    ema: EMASection = help_field(factory=EMASection, help="EMA of the trainable weights.")
    eval: EvalSection = help_field(factory=EvalSection, help="Periodic evaluation.")
    checkpoint: CheckpointSection = help_field(factory=CheckpointSection, help="Checkpoints.")
    log: LogSection = help_field(factory=LogSection, help="Logging.")
    seed: int = help_field(0, "Seed of every random draw of the run (prompts, noise, windows, LoRA init).")
    output_dir: str = help_field("outputs/run", "Run directory (config.yaml, metrics.jsonl, checkpoints, samples).")
    max_iterations: int = help_field(100, "Stop after this many iterations (rollout round + updates).")
    max_minutes: float | None = help_field(None, "Also stop (and save) after this many minutes of wall time.")
    mixed_precision: Literal["no", "fp16", "bf16"] = help_field("no", "accelerate mixed precision (autocast).")
    cpu: bool = help_field(False, "Force CPU even when an accelerator is present.")
    deterministic: bool = help_field(False, (
        "Deterministic kernels (torch.use_deterministic_algorithms, cuDNN deterministic, no TF32, "
        "CUBLAS_WORKSPACE_CONFIG): rollout and training forwards agree bit-for-bit on GPU; slower."))
    resume: str | None = help_field(None, "'latest' or a checkpoint directory to continue from (bit-exact on CPU).")

    # --------------------------------------------------------------------------------------- helpers
    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    @property
    def global_batch(self) -> int:
        return self.sample.prompts_per_round * self.sample.group_size

    @property
    def train_batch_size(self) -> int:
        return self.train.batch_size or self.sample.batch_size

    def validate(self) -> "Config":
        """Cross-field checks (see module docstring); returns self."""
        _validate(self)
        return self


# ----------------------------------------------------------------------------------------------- loading
def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return " | ".join(repr(a) for a in typing.get_args(tp))
    if origin in (Union, types.UnionType):
        return " | ".join(_type_name(a) for a in typing.get_args(tp))
    if origin is not None:
        return f"{origin.__name__}[{', '.join(_type_name(a) for a in typing.get_args(tp))}]"
    if tp is type(None):
        return "null"
    return getattr(tp, "__name__", str(tp))


def convert(value: Any, tp: Any, path: str) -> Any:
    """Check ``value`` against the annotation ``tp`` (coercing int -> float only) or raise ConfigError."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if tp is Any:
        return value
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, dict):
            raise ConfigError(f"{path}: expected a mapping (section {tp.__name__}), got {type(value).__name__} "
                              f"{value!r}")
        return from_dict(tp, value, path)
    if origin in (Union, types.UnionType):
        errors = []
        for a in args:
            try:
                return convert(value, a, path)
            except ConfigError as e:
                errors.append(e)
        raise ConfigError(f"{path}: expected {_type_name(tp)}, got {type(value).__name__} {value!r}")
    if origin is Literal:
        if value is False and "no" in args:  # YAML 1.1 reads a bare `no` as false (mixed_precision: no)
            value = "no"
        if value not in args:
            close = difflib.get_close_matches(str(value), [str(a) for a in args], n=1)
            hint = f" Did you mean {close[0]!r}?" if close else ""
            raise ConfigError(f"{path}={value!r} is not allowed.{hint} Allowed: {', '.join(map(str, args))}")
        return value
    if tp is type(None):
        if value is not None:
            raise ConfigError(f"{path}: expected null, got {value!r}")
        return None
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{path}: expected bool (true/false), got {type(value).__name__} {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{path}: expected int, got {type(value).__name__} {value!r}")
        return value
    if tp is float:
        if isinstance(value, str):  # yaml 1.1 reads "1e-4" as a string; accept numeric strings
            try:
                value = float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{path}: expected float, got {type(value).__name__} {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{path}: expected str, got {type(value).__name__} {value!r}")
        return value
    if origin is list:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{path}: expected {_type_name(tp)}, got {type(value).__name__} {value!r}")
        return [convert(v, args[0], f"{path}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{path}: expected {_type_name(tp)}, got {type(value).__name__} {value!r}")
        return {convert(k, args[0], f"{path} key"): convert(v, args[1], f"{path}.{k}") for k, v in value.items()}
    raise TypeError(f"unsupported annotation {tp!r} at {path}")  # pragma: no cover - schema bug


def from_dict(cls: type, data: dict, prefix: str = "") -> Any:
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kw = {}
    for key, value in data.items():
        path = f"{prefix}.{key}" if prefix else str(key)
        if key not in names:
            close = difflib.get_close_matches(str(key), names, n=1)
            hint = f" Did you mean {(prefix + '.' if prefix else '') + close[0]!r}?" if close else ""
            raise ConfigError(f"unknown config key {path!r}.{hint} Known keys here: {', '.join(names)}")
        kw[key] = convert(value, hints[key], path)
    return cls(**kw)


def set_dotted(data: dict, dotted: str, value: Any) -> None:
    """``set_dotted(d, "train.lr", 1e-4)``: create intermediate mappings as needed."""
    parts = dotted.split(".")
    if not all(parts):
        raise ConfigError(f"bad override key {dotted!r}: expected section.key=value")
    node = data
    for i, p in enumerate(parts[:-1]):
        nxt = node.get(p)
        if nxt is None:
            nxt = node[p] = {}
        if not isinstance(nxt, dict):
            raise ConfigError(f"cannot set {dotted!r}: {'.'.join(parts[: i + 1])!r} is {nxt!r}, not a section")
        node = nxt
    node[parts[-1]] = value


_FLOAT_RE = re.compile(r"^[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)$")


def parse_overrides(overrides: list[str] | None) -> list[tuple[str, Any]]:
    """``["train.lr=1e-4", "sample.prompts=[a, b]"]`` -> ``[("train.lr", 0.0001), ...]`` (values via yaml)."""
    out = []
    for item in overrides or []:
        if "=" not in item:
            raise ConfigError(f"override {item!r} must look like section.key=value")
        key, _, raw = item.partition("=")
        try:
            from flowalign.config_checks import load_yaml

            value = load_yaml(raw, f"override {key}") if raw.strip() else ""
        except yaml.YAMLError as e:
            raise ConfigError(f"override {key}: cannot parse value {raw!r}: {e}") from e
        if isinstance(value, str) and _FLOAT_RE.match(value):  # YAML 1.1 reads 1e-4 (no dot) as a string
            value = float(value)
        out.append((key.strip(), value))
    return out


def load_config(source: "str | os.PathLike | dict | None" = None, overrides: list[str] | None = None,
                validate: bool = True) -> Config:
    """Build a ``Config`` from a YAML path, a shipped recipe name or a dict, apply ``key=value`` overrides (paths
    in them relative to the working directory), and validate it. Paths inside a recipe file resolve relative to
    that file (``flowalign.recipe_paths``)."""
    if source is None:
        data: dict = {}
    elif isinstance(source, dict):
        data = json.loads(json.dumps(source))  # deep copy of plain data
    else:
        from flowalign.recipe_paths import find_recipe, resolve_recipe_paths

        try:  # a file, or a shipped recipe by name ("sd35_pickscore")
            path = find_recipe(source)
        except FileNotFoundError as e:
            raise ConfigError(str(e)) from None
        from flowalign.config_checks import load_yaml  # duplicate keys are refused, naming key and lines

        data = load_yaml(path.read_text(), str(path)) or {}
        if not isinstance(data, dict):
            raise ConfigError(f"recipe {str(path)!r} must be a mapping of sections, got {type(data).__name__}")
        resolve_recipe_paths(data, path.parent)  # input paths are relative to the recipe file (recipe_paths.py)
    for key, value in parse_overrides(overrides):
        set_dotted(data, key, value)
    cfg = from_dict(Config, data)
    return cfg.validate() if validate else cfg


def describe(cls: type = Config, prefix: str = "") -> str:
    """Every key with its type, default and help string (``flowalign train --help-config``)."""
    lines = []
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        path = f"{prefix}{f.name}"
        tp = hints[f.name]
        if dataclasses.is_dataclass(tp):
            lines.append(f"{path}:  # {f.metadata.get('help', '')}")
            lines.append(describe(tp, path + "."))
            continue
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
        lines.append(f"  {path} ({_type_name(tp)}, default {default!r}): {f.metadata.get('help', '')}")
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------- prompts
# one prompt loader (list, .txt, .jsonl, .csv) for config checks, methods, eval and tools; re-exported here
from flowalign.data import load_prompts  # noqa: E402


# ----------------------------------------------------------------------------------------------- checks
def _positive(cfg: Config, *paths: str) -> None:
    for p in paths:
        v = _get(cfg, p)
        if v is not None and not v > 0:
            raise ConfigError(f"{p} must be > 0, got {v!r}")


def _get(cfg: Any, dotted: str) -> Any:
    for part in dotted.split("."):
        cfg = getattr(cfg, part)
    return cfg


def _registered(registry, name: str, path: str) -> None:
    try:
        registry.get(name)
    except ValueError as e:
        raise ConfigError(f"{path}: {e}") from None


def _validate(cfg: Config) -> None:
    from flowalign import sde
    from flowalign.advantages import ADVANTAGES, resolve_estimator
    from flowalign.config_checks import check_fields
    from flowalign.schedules import SCHEDULES, make_plan

    s, t = cfg.sample, cfg.train
    _registered(SCHEDULES, s.schedule, "sample.schedule")
    # finite numbers, ranges, option maps against signatures, names resolved (flowalign.config_checks)
    check_fields(cfg)
    _positive(cfg, "sample.prompts_per_round", "sample.group_size", "sample.num_steps", "sample.batch_size",
              "train.lr", "train.updates_per_iteration", "train.num_inner_epochs", "train.batch_size",
              "train.clip_range", "train.clip_range_lt", "train.clip_range_gt", "train.adv_clip_max",
              "train.max_grad_norm", "train.adam_eps", "max_iterations", "max_minutes", "eval.num_steps",
              "eval.batch_size", "ema.interval")
    for p in ("train.beta", "train.weight_decay", "train.warmup_steps", "sample.noise_level", "eval.noise_level",
              "model.lora.dropout", "eval.every", "checkpoint.every", "checkpoint.keep_last",
              "log.sample_images_every"):
        if _get(cfg, p) < 0:
            raise ConfigError(f"{p} must be >= 0, got {_get(cfg, p)!r}")
    if not 0 <= cfg.ema.decay < 1:
        raise ConfigError(f"ema.decay must be in [0, 1), got {cfg.ema.decay}")
    if len(t.betas) != 2 or not all(0 <= b < 1 for b in t.betas):
        raise ConfigError(f"train.betas must be two numbers in [0, 1), got {t.betas}")
    if cfg.model.lora.rank is not None and cfg.model.lora.rank < 1:
        raise ConfigError(f"model.lora.rank must be >= 1, got {cfg.model.lora.rank}")
    if not (isinstance(s.prompts, str) or s.prompts) and not _offline_method(t.method):
        raise ConfigError("sample.prompts is empty: give a list of prompts or a .txt/.jsonl path")
    if isinstance(s.prompts, str):
        load_prompts(s.prompts, "sample.prompts")
    if cfg.eval.every > 0:
        if not (isinstance(cfg.eval.prompts, str) or cfg.eval.prompts):
            raise ConfigError("eval.every > 0 needs eval.prompts (a list or a .txt/.jsonl path)")
        if isinstance(cfg.eval.prompts, str):
            load_prompts(cfg.eval.prompts, "eval.prompts")

    # batch geometry: one round = prompts_per_round * group_size rows, cut into sampling chunks
    if cfg.global_batch % s.batch_size:
        raise ConfigError(
            f"sample.prompts_per_round * sample.group_size = {s.prompts_per_round} * {s.group_size} = "
            f"{cfg.global_batch} rows per round must be a multiple of sample.batch_size={s.batch_size}")
    if s.same_noise and s.batch_size % s.group_size:
        raise ConfigError(f"sample.same_noise needs sample.batch_size ({s.batch_size}) to be a multiple of "
                          f"sample.group_size ({s.group_size}) so a group's shared x_T is drawn in one chunk")
    if t.updates_per_iteration > cfg.global_batch:
        raise ConfigError(f"train.updates_per_iteration={t.updates_per_iteration} exceeds the "
                          f"{cfg.global_batch} rows sampled per round")

    # kernel / schedule
    for p, kind, level in (("sample.kernel", s.kernel, s.noise_level), ("eval.kernel", cfg.eval.kernel,
                                                                        cfg.eval.noise_level)):
        try:
            sde.validate(kind, level, s.reduction, s.density)
        except ValueError as e:
            raise ConfigError(f"{p}: {e}") from None
    _registered(SCHEDULES, s.schedule, "sample.schedule")
    try:
        import torch

        plan = make_plan(s.schedule, s.num_steps, generator=torch.Generator().manual_seed(0),
                         **s.schedule_options)
    except (ValueError, TypeError) as e:
        raise ConfigError(f"sample.schedule={s.schedule!r} with sample.schedule_options={s.schedule_options} "
                          f"and sample.num_steps={s.num_steps}: {e}") from None
    if not bool(plan.train.any()):
        raise ConfigError(f"sample.schedule={s.schedule!r} trains no step with num_steps={s.num_steps}")

    # the sampling policy must be the trained policy (else ratio != 1 at the first update)
    if not t.train_cfg and s.guidance != 1.0:
        raise ConfigError(f"train.train_cfg=false trains the CFG-free policy, so sampling must not use CFG: "
                          f"set sample.guidance=1.0 (got {s.guidance})")
    if t.clip_range_lt is not None and t.clip_range_lt >= 1:
        raise ConfigError(f"train.clip_range_lt must be < 1 (ratio >= 1 - lt), got {t.clip_range_lt}")

    # advantages
    a = t.advantage
    try:
        name, _ = resolve_estimator(a.estimator, a.std, a.baseline, a.per_reward, a.eps, a.kwargs, a.ddof)
    except ValueError as e:
        raise ConfigError(f"train.advantage: {e}") from None
    _registered(ADVANTAGES, name, "train.advantage.estimator")
    if name == "gdpo" and len(cfg.reward.weights) < 2:
        raise ConfigError("train.advantage.per_reward (GDPO) needs at least two rewards in reward.weights")

    check_reward_section(cfg.reward, example="pickscore: 1.0")
    _check_rewards(cfg)

    _check_adapter(cfg.model.adapter)

    # method (its own rules too)
    from flowalign.methods import METHODS

    _registered(METHODS, t.method, "train.method")
    METHODS.get(t.method).check_config(cfg)


def check_reward_section(reward: Any, example: str) -> None:
    """The ``reward`` section both trainers share: at least one weighted reward, and ``kwargs`` only for those."""
    if not reward.weights:
        raise ConfigError(f"reward.weights is empty: name at least one reward, e.g. reward.weights={{{example}}}")
    extra = set(reward.kwargs) - set(reward.weights)
    if extra:
        raise ConfigError(f"reward.kwargs names {sorted(extra)} that are not in reward.weights "
                          f"({sorted(reward.weights)})")


def _offline_method(name: str) -> bool:
    """Methods with ``offline = True`` (e.g. ``dpo``) train from files and sample no prompts."""
    from flowalign.methods import METHODS

    try:
        return bool(getattr(METHODS.get(name), "offline", False))
    except ValueError:
        return False  # reported by the train.method check below


def _check_adapter(name: str) -> None:
    """``model.adapter`` must name an adapter: registered (``get_adapter`` registers the built-ins on first use)
    or a ``"package.module:Class"`` string, imported when the model is loaded."""
    if ":" in name:
        return
    from flowalign.adapter import get_adapter

    try:
        get_adapter(name)
    except ValueError as e:
        raise ConfigError(f"model.adapter: {e}") from None


def _check_rewards(cfg: Config) -> None:
    try:
        import flowalign.rewards  # noqa: F401  (registers the built-in rewards)
        from flowalign.rewards.base import REWARDS
    except ImportError:  # pragma: no cover
        return
    for name in cfg.reward.weights:
        if name.startswith("remote:") or ":" in name:
            continue
        if not math.isfinite(cfg.reward.weights[name]):
            raise ConfigError(f"reward.weights.{name} must be finite")
        _registered(REWARDS, name, f"reward.weights.{name}")
