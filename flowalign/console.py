"""What a training run prints: the start-up summary, the progress bars, the checkpoint lines (main process only).

* ``summary(cfg, ...)``: model, trainable parameters, method, rewards, samples per iteration, budget, output
  directory, and the sampling policy (kernel, noise level, log-prob density and reduction, steps, guidance,
  schedule) -- the facts that decide what a run trains, in one block before the first iteration.
* ``RunBar``: the outer bar. With a time budget (``max_minutes``) its total is the budget in minutes and it
  advances by wall-clock minutes (the iteration count rides in the postfix); otherwise its total is
  ``max_iterations``. An iteration bar that a time budget stops early would never fill.
* ``inner(iterable, desc)``: a transient bar inside one iteration (sampling chunks, optimizer updates).
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Iterator, Mapping
from typing import Any, TypeVar

T = TypeVar("T")


def _count(n: int) -> str:
    """``2_300_000`` -> ``2.30M``."""
    for unit, div in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= div:
            return f"{n / div:.2f}{unit}"
    return str(n)


def summary(cfg: Any, trainable: int, total: int, world_size: int = 1, reward_weights: Mapping[str, float] | None
            = None) -> str:
    """The start-up block (module docstring). ``trainable``/``total``: parameter counts of the trained module."""
    m, s, t = cfg.model, cfg.sample, cfg.train
    lora = (f"LoRA r{m.lora.rank if m.lora.rank is not None else 'default'}" if m.lora.enabled else "full fine-tune")
    weights = dict(reward_weights if reward_weights is not None else cfg.reward.weights)
    rewards = ", ".join(f"{k} x {w:g}" for k, w in weights.items()) or "(none)"
    budget = [f"{cfg.max_iterations} iteration{'s' if cfg.max_iterations != 1 else ''}"]
    budget += [f"{cfg.max_minutes:g} minutes"] if cfg.max_minutes else []
    per_iter = cfg.global_batch
    rows = [
        ("model", f"{m.adapter} from {m.path or '(adapter default)'} ({m.dtype})"),
        ("trainable", f"{_count(trainable)} of {_count(total)} parameters ({100 * trainable / max(total, 1):.2f}%, "
                      f"{lora})"),
        ("method", f"{t.method} (lr {t.lr:g}, {t.updates_per_iteration} update(s) per iteration)"),
        ("rewards", rewards),
        ("samples", f"{per_iter} per iteration = {s.prompts_per_round} prompts x {s.group_size} "
                    f"({world_size} process{'es' if world_size != 1 else ''})"),
        ("sampling", f"kernel {s.kernel}, noise level {s.noise_level:g}, log-prob density {s.density}, "
                     f"reduction {s.reduction}; {s.num_steps} steps, guidance {s.guidance:g}, schedule {s.schedule}"),
        ("budget", " or ".join(budget) + (" (whichever comes first)" if len(budget) > 1 else "")),
        ("output", str(cfg.output_dir)),
    ]
    w = max(len(k) for k, _ in rows)
    return "flowalign run\n" + "\n".join(f"  {k:<{w}}  {v}" for k, v in rows)


class RunBar:
    """The outer progress bar (module docstring); ``update(iteration, **postfix)`` after each iteration.
    ``total``/``unit``/``n``/``postfix`` mirror the bar (also when it is disabled, e.g. on other processes)."""

    def __init__(self, max_iterations: int, max_minutes: float | None, iteration: int = 0, elapsed_s: float = 0.0,
                 enabled: bool = True) -> None:
        from tqdm.auto import tqdm

        self.minutes = max_minutes is not None
        self.max_iterations = max_iterations
        self.start = time.time() - elapsed_s  # a resumed run continues its budget
        self.total: float = float(max_minutes) if max_minutes is not None else max_iterations
        self.unit = "min" if self.minutes else "it"
        self.n: float = min(elapsed_s / 60, self.total) if self.minutes else iteration
        self.postfix: dict[str, Any] = {}
        fmt = "{l_bar}{bar}| {n:.1f}/{total:.1f} min [{elapsed}<{remaining}{postfix}]" if self.minutes else None
        self.bar = tqdm(total=self.total, initial=self.n, unit=self.unit, desc="flowalign", disable=not enabled,
                        dynamic_ncols=True, bar_format=fmt)

    def update(self, iteration: int, **postfix: Any) -> None:
        if self.minutes:
            n = min((time.time() - self.start) / 60, self.total)
            postfix = {"it": f"{iteration}/{self.max_iterations}", **postfix}
        else:
            n = iteration
        self.bar.update(n - self.n)
        self.n, self.postfix = n, postfix
        self.bar.set_postfix(postfix, refresh=False)

    def write(self, line: str) -> None:
        """A line above the bar (e.g. "checkpoint saved to ..."), printed even when the bar is disabled."""
        from tqdm.auto import tqdm

        tqdm.write(line)

    def close(self) -> None:
        self.bar.close()


def inner(iterable: Iterable[T], desc: str, enabled: bool = True, total: int | None = None) -> Iterator[T]:
    """A transient bar over one iteration's chunks or updates (gone when done: ``leave=False``)."""
    from tqdm.auto import tqdm

    if total is None and hasattr(iterable, "__len__"):
        total = len(iterable)  # type: ignore[arg-type]
    yield from tqdm(iterable, desc=desc, total=total, leave=False, disable=not enabled or not total or total < 2,
                    dynamic_ncols=True)
