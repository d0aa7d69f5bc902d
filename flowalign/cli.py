"""``flowalign <command> ...``: a dispatch table of subcommands, each owning its own argparse parser.

    flowalign train recipes/sd35_pickscore.yaml train.lr=1e-4 sample.group_size=8 [--resume latest|DIR]
    accelerate launch --num_processes 8 -m flowalign.cli train recipes/x.yaml ...   # multi-GPU
    torchrun --standalone --nproc_per_node 2 -m flowalign.cli train recipes/x.yaml  # CPU processes (gloo)
    flowalign train --help-config [recipes/x.yaml]                                  # every key, type and help
    flowalign label serve runs/d3po/labels                                          # human preference labels

``COMMANDS`` maps a name to ``("module:function", help)``; the function takes the remaining argv and returns an
exit code. Targets are imported only when their command runs, so a heavy or missing optional module never slows
down or breaks the others. Add a command with ``register_command`` or one line in ``COMMANDS``.
"""

from __future__ import annotations

import argparse
import sys
from typing import Sequence

from flowalign.registry import import_string

COMMANDS: dict[str, tuple[str, str]] = {
    "train": ("flowalign.cli:train_main", "train a recipe: flowalign train RECIPE.yaml [key=value ...]"),
    "eval": ("flowalign.eval.cli:eval_main", "deterministic generation + rewards of base/LoRA variants"),
    "gallery": ("flowalign.eval.cli:gallery_main", "static HTML gallery of an eval folder"),
    "demo": ("flowalign.demo:demo_main", "align the embedded shapes model with Flow-GRPO on CPU; before/after + gallery"),
    "doctor": ("flowalign.doctor:doctor_main", "port-a-model checklist: flowalign doctor RECIPE.yaml [key=value ...]"),
    "rewards": ("flowalign.cli:rewards_main", "list rewards or serve one: flowalign rewards [list] | serve --reward N"),
    "methods": ("flowalign.cli:methods_main", "list the training methods: flowalign methods list"),
    "recipes": ("flowalign.cli:recipes_main", "list the shipped recipes: flowalign recipes list [--kind image|llm]"),
    "label": ("flowalign.labeling:label_main", "label preference pairs in a browser: flowalign label serve DIR"),
    "export": ("flowalign.export:export_main",
               "diffusers/peft/transformers exports of a checkpoint: flowalign export CKPT --out DIR [--no-ema]"),
}


def _first_line(obj: object) -> str:
    doc = (getattr(obj, "__doc__", None) or "").strip()
    return doc.splitlines()[0].rstrip(".") if doc else ""


def _list_parser(prog: str, description: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=prog, description=description)
    p.add_argument("action", nargs="?", default="list", choices=["list"], help="list (the default)")
    return p


def rewards_main(argv: Sequence[str] | None = None) -> int:
    """``flowalign rewards list`` (registered rewards: modality, differentiable, summary) or ``rewards serve ...``."""
    argv = list(sys.argv[2:] if argv is None else argv)
    if argv and argv[0] == "serve":
        from flowalign.rewards.server import main as serve_main

        return serve_main(argv[1:])
    p = argparse.ArgumentParser(prog="flowalign rewards", description="Rewards: list the registered ones, or serve "
                                "one over HTTP (flowalign rewards serve --help).")
    p.add_argument("action", nargs="?", default="list", choices=["list", "serve"],
                   help="list (the default) | serve --reward NAME [--host 127.0.0.1 --port 8000 ...]")
    p.parse_args(argv)
    import flowalign.rewards  # noqa: F401  (registers the built-ins)
    from flowalign.rewards.base import REWARDS, Reward

    rows = []
    for name in REWARDS.names():
        obj = REWARDS.get(name)
        kind = (f"{obj.modality}{', differentiable' if obj.differentiable else ''}"
                if isinstance(obj, type) and issubclass(obj, Reward) else "factory")
        rows.append((name, kind, _first_line(obj)))
    rows += [(name, "unavailable", reason) for name, reason in sorted(REWARDS._unavailable.items())]
    w0, w1 = max(len(r[0]) for r in rows), max(len(r[1]) for r in rows)
    print("\n".join(f"{n:<{w0}}  {k:<{w1}}  {d}" for n, k, d in rows))
    print("\nuse in a recipe: reward.weights: {NAME: 1.0}; in Python: train(cfg, rewards=[\"NAME\", my_fn])")
    return 0


def methods_main(argv: Sequence[str] | None = None) -> int:
    """``flowalign methods list``: every registered method, online/offline, and its summary line."""
    _list_parser("flowalign methods", "List the training methods (train.method).").parse_args(
        list(sys.argv[2:] if argv is None else argv))
    from flowalign.methods import METHODS

    names = METHODS.names()
    w = max(map(len, names))
    for name in names:
        cls = METHODS.get(name)
        kind = "offline" if getattr(cls, "offline", False) else "online"
        print(f"{name:<{w}}  {kind:<7}  {_first_line(cls)}")
    print("\noptions of one: flowalign train --help-config RECIPE (train.method_options)")
    return 0


def recipes_main(argv: Sequence[str] | None = None) -> int:
    """``flowalign recipes list``: the shipped recipes (name, model or kind, method, first comment line)."""
    p = _list_parser("flowalign recipes", "List the shipped recipes; train one by name: flowalign train NAME.")
    p.add_argument("--kind", choices=["image", "llm"], default=None, help="only image or only LLM recipes")
    args = p.parse_args(list(sys.argv[2:] if argv is None else argv))
    import yaml

    from flowalign.recipe_paths import list_recipes, recipes_dir

    rows = []
    for path in list_recipes():
        text = path.read_text(encoding="utf-8")
        data = yaml.safe_load(text) or {}
        kind = "llm" if data.get("kind") == "llm" else "image"
        if args.kind and kind != args.kind:
            continue
        model = data.get("model") or {}
        what = (f"llm {(data.get('algo') or {}).get('preset', '')}" if kind == "llm" else
                f"{model.get('adapter', '?')} {(data.get('train') or {}).get('method', '?')}")
        first = next((ln.lstrip("# ").strip() for ln in text.splitlines() if ln.startswith("#")), "")
        rows.append((path.stem, what, first[:90]))
    w0, w1 = max(len(r[0]) for r in rows), max(len(r[1]) for r in rows)
    print("\n".join(f"{n:<{w0}}  {k:<{w1}}  {d}" for n, k, d in rows))
    print(f"\n{len(rows)} recipes in {recipes_dir()}; run one: flowalign train NAME [--dry-run] [key=value ...]")
    return 0


def register_command(name: str, target: str, help: str = "") -> None:  # noqa: A002
    """Add ``flowalign <name>`` dispatching to ``target`` = ``"module:function(argv) -> int"``."""
    COMMANDS[name] = (target, help)


# ----------------------------------------------------------------------------------------------- train
def train_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="flowalign train", description="Train with a YAML recipe and overrides.")
    p.add_argument("recipe", nargs="?", help="YAML recipe path, or a shipped recipe's name (flowalign recipes list); "
                   "relative paths inside it resolve against its folder")
    p.add_argument("overrides", nargs="*", help="dotted overrides key=value, e.g. train.lr=1e-4 sample.group_size=8")
    p.add_argument("--resume", default=None, metavar="latest|DIR", help="continue from a checkpoint (bit-exact)")
    p.add_argument("--help-config", action="store_true",
                   help="list every config key with its type and help, and the method options (of RECIPE's method "
                        "when a recipe is given, else of every method)")
    p.add_argument("--dry-run", action="store_true", help="validate the config offline (nothing is loaded or "
                   "downloaded), print the resolved YAML and whether the model was loaded, exit")
    p.add_argument("--overwrite", action="store_true",
                   help="start a fresh run in an output_dir that holds another run's metrics/checkpoints; the old "
                        "run is moved to <output_dir>/overwritten-<time>/ (without it such a run is refused)")
    p.add_argument("--allow-config-change", nargs="+", default=[], metavar="KEY",
                   help="with --resume: config keys (or section prefixes) allowed to differ from the checkpoint's "
                        "config; they take effect and are logged. Without it such a resume is refused")
    return p


def train_main(argv: Sequence[str] | None = None) -> int:
    from flowalign.config import ConfigError, load_config

    args = train_parser().parse_intermixed_args(argv)
    if args.help_config:
        return help_config(args.recipe, args.overrides)
    if not args.recipe:
        print("flowalign train: give a recipe YAML or a shipped recipe name (flowalign recipes list), "
              "or --help-config", file=sys.stderr)
        return 2
    from flowalign.recipe_paths import find_recipe, model_status

    try:  # a YAML path, or the name of a shipped recipe ("sd35_pickscore")
        args.recipe = str(find_recipe(args.recipe))
    except FileNotFoundError as e:
        print(f"config error: {e}", file=sys.stderr)
        return 2
    if _recipe_kind(args.recipe) == "llm":  # LLM RLVR recipes have their own config (flowalign/llm/config.py)
        from flowalign.llm.trainer import main as llm_main

        return llm_main([args.recipe, *args.overrides, *(["--resume", args.resume] if args.resume else []),
                         *(["--dry-run"] if args.dry_run else []), *(["--overwrite"] if args.overwrite else []),
                         *(["--allow-config-change", *args.allow_config_change] if args.allow_config_change else [])])
    overrides = list(args.overrides)
    if args.resume:
        overrides.append(f"resume={args.resume}")
    try:
        cfg = load_config(args.recipe, overrides)
    except ConfigError as e:
        print(f"config error: {e}", file=sys.stderr)
        return 2
    if args.dry_run:  # offline: the config is validated, nothing is loaded or downloaded
        print(cfg.to_yaml())
        ok, note = model_status(cfg.model.path)
        print(f"# dry-run: {'config valid' if ok else 'config error'}; {note}", file=sys.stderr)
        return 0 if ok else 2
    from flowalign.checkpoint import CheckpointError
    from flowalign.guards import NonFiniteError, ResumeConfigError, RunDirError
    from flowalign.trainer import train

    try:
        train(cfg, overwrite=args.overwrite, allow_config_change=args.allow_config_change)
    except (RunDirError, ResumeConfigError, CheckpointError) as e:  # refused before training: nothing written
        print(f"flowalign train: error: {e}", file=sys.stderr)
        return 2
    except NonFiniteError as e:
        print(f"flowalign train: error: {e}", file=sys.stderr)
        return 1
    return 0


def help_config(recipe: str | None = None, overrides: Sequence[str] = ()) -> int:
    """``flowalign train --help-config [RECIPE]``: the config schema, then method options under a heading each.

    With an image recipe: that recipe's method only, and its ``train.method_options`` are parsed (a typo exits 2
    with the key path and a suggestion). With an LLM recipe: the LLM trainer's schema. Without one: every
    registered method's options."""
    from flowalign.config import ConfigError, describe, load_config
    from flowalign.methods import METHODS

    if recipe and _recipe_kind(recipe) == "llm":
        from flowalign.llm import config as llm_config

        print(llm_config.describe_llm())
        return 0
    print("# config keys (recipe YAML or dotted overrides)")
    print(describe())
    if not recipe:
        for name in METHODS.names():
            print(f"\n# train.method_options of train.method={name}")
            print(METHODS.get(name).describe_options() or "  (no options)")
        return 0
    try:
        cfg = load_config(recipe, list(overrides), validate=False)
        method = METHODS.get(cfg.train.method)
    except (ConfigError, ValueError) as e:
        print(f"config error: {e}", file=sys.stderr)
        return 2
    print(f"\n# train.method_options of train.method={cfg.train.method} ({recipe})")
    print(method.describe_options() or "  (no options)")
    try:
        method.options(cfg)
    except ConfigError as e:
        print(f"config error: {e}", file=sys.stderr)
        return 2
    return 0


def _recipe_kind(path: str) -> str | None:
    """The recipe's top-level ``kind`` (``llm`` for the LLM trainer), None when absent or unreadable."""
    try:
        import yaml

        from flowalign.recipe_paths import find_recipe

        with open(find_recipe(path)) as f:  # a path or a shipped recipe name
            data = yaml.safe_load(f)
    except (OSError, ValueError):
        return None
    return data.get("kind") if isinstance(data, dict) else None


# ----------------------------------------------------------------------------------------------- dispatch
def version() -> str:
    """The installed distribution's version (``flowalign --version``), or the package's own when not installed."""
    from importlib import metadata

    try:
        return metadata.version("flowalign")
    except metadata.PackageNotFoundError:  # a source checkout on sys.path
        import flowalign

        return getattr(flowalign, "__version__", "unknown")


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    width = max(map(len, COMMANDS))
    usage = "usage: flowalign [--version] <command> [args]\n\ncommands:\n" + "\n".join(
        f"  {name:<{width}}  {help_}" for name, (_, help_) in sorted(COMMANDS.items()))
    if not argv or argv[0] in ("-h", "--help"):
        print(usage)
        return 0 if argv else 2
    if argv[0] in ("-V", "--version"):
        print(f"flowalign {version()}")
        return 0
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        import difflib

        close = difflib.get_close_matches(name, list(COMMANDS), n=1)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        print(f"flowalign: unknown command {name!r}.{hint}\n\n{usage}", file=sys.stderr)
        return 2
    return int(import_string(COMMANDS[name][0])(rest) or 0)


if __name__ == "__main__":
    sys.exit(main())
