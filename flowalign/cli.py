"""``flowalign <command> ...``: a dispatch table of subcommands, each owning its own argparse parser.

    flowalign train recipes/sd35_pickscore.yaml train.lr=1e-4 sample.group_size=8 [--resume latest|DIR]
    accelerate launch --num_processes 8 -m flowalign.cli train recipes/x.yaml ...   # multi-GPU
    torchrun --standalone --nproc_per_node 2 -m flowalign.cli train recipes/x.yaml  # CPU processes (gloo)
    flowalign train --help-config                                                   # every key, type and help
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
    "rewards": ("flowalign.cli:rewards_main", "reward server: flowalign rewards serve --reward NAME --host 127.0.0.1 --port 8000"),
    "label": ("flowalign.labeling:label_main", "label preference pairs in a browser: flowalign label serve DIR"),
}


def rewards_main(argv: Sequence[str] | None = None) -> int:
    """``flowalign rewards serve ...`` (the only ``rewards`` subcommand so far)."""
    argv = list(sys.argv[2:] if argv is None else argv)
    if not argv or argv[0] != "serve":
        print("usage: flowalign rewards serve --reward NAME [--host 127.0.0.1 --port 8000 ...]", file=sys.stderr)
        return 2
    from flowalign.rewards.server import main as serve_main

    return serve_main(argv[1:])


def register_command(name: str, target: str, help: str = "") -> None:  # noqa: A002
    """Add ``flowalign <name>`` dispatching to ``target`` = ``"module:function(argv) -> int"``."""
    COMMANDS[name] = (target, help)


# ----------------------------------------------------------------------------------------------- train
def train_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="flowalign train", description="Train with a YAML recipe and overrides.")
    p.add_argument("recipe", nargs="?", help="YAML recipe (see recipes/)")
    p.add_argument("overrides", nargs="*", help="dotted overrides key=value, e.g. train.lr=1e-4 sample.group_size=8")
    p.add_argument("--resume", default=None, metavar="latest|DIR", help="continue from a checkpoint (bit-exact)")
    p.add_argument("--help-config", action="store_true", help="list every config key with its type and help")
    p.add_argument("--dry-run", action="store_true", help="validate the config, print the resolved YAML, exit")
    return p


def train_main(argv: Sequence[str] | None = None) -> int:
    from flowalign.config import ConfigError, describe, load_config

    args = train_parser().parse_intermixed_args(argv)
    if args.help_config:
        print(describe())
        return 0
    if not args.recipe:
        print("flowalign train: give a recipe YAML (or --help-config)", file=sys.stderr)
        return 2
    if _recipe_kind(args.recipe) == "llm":  # LLM RLVR recipes have their own config (flowalign/llm/config.py)
        from flowalign.llm.trainer import main as llm_main

        return llm_main([args.recipe, *args.overrides, *(["--resume", args.resume] if args.resume else []),
                         *(["--dry-run"] if args.dry_run else [])])
    overrides = list(args.overrides)
    if args.resume:
        overrides.append(f"resume={args.resume}")
    try:
        cfg = load_config(args.recipe, overrides)
    except ConfigError as e:
        print(f"config error: {e}", file=sys.stderr)
        return 2
    if args.dry_run:
        print(cfg.to_yaml())
        return 0
    from flowalign.trainer import train

    train(cfg)
    return 0


def _recipe_kind(path: str) -> str | None:
    """The recipe's top-level ``kind`` (``llm`` for the LLM trainer), None when absent or unreadable."""
    try:
        import yaml

        with open(path) as f:
            data = yaml.safe_load(f)
    except (OSError, ValueError):
        return None
    return data.get("kind") if isinstance(data, dict) else None


# ----------------------------------------------------------------------------------------------- dispatch
def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    width = max(map(len, COMMANDS))
    usage = "usage: flowalign <command> [args]\n\ncommands:\n" + "\n".join(
        f"  {name:<{width}}  {help_}" for name, (_, help_) in sorted(COMMANDS.items()))
    if not argv or argv[0] in ("-h", "--help"):
        print(usage)
        return 0 if argv else 2
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
