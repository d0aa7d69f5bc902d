"""Text rewards for the LLM RLVR trainer (``modality = "text"``): inputs are ``completions`` (+ ``answers``).

* ``math_verify``: 1 if the completion's final answer equals the reference (``math_verify.parse`` + ``verify``,
  symbolic/numeric equivalence, e.g. ``\\boxed{1/2}`` == ``0.5``), else 0 (as in TRL's / verl's math rewards).
* ``format``: 1 if the completion matches a regex (default the DeepSeek-R1 ``<think>…</think><answer>…</answer>``
  template), else 0.
* ``overlong_penalty``: DAPO's soft overlong punishment (arXiv 2503.14476, eq. 13) with ``L_max`` and cache
  ``L_cache``: 0 if ``|y| ≤ L_max − L_cache``; ``(L_max − L_cache − |y|)/L_cache`` if ``L_max − L_cache < |y| ≤ L_max``;
  −1 beyond.
"""

from __future__ import annotations

import re
import threading
from typing import Any, Callable, Sequence

import torch
from torch import Tensor

from flowalign.rewards.base import REWARDS, Reward


class TextReward(Reward):
    """Base for text rewards: validates that every completion is a string."""

    modality = "text"

    def __init__(self, device: str | torch.device = "cpu", batch_size: int | None = None) -> None:
        super().__init__(device=device, batch_size=batch_size)

    def score(self, inputs: list[str], prompts: list[str], metadata: list[dict]) -> Tensor:
        bad = [type(c).__name__ for c in inputs if not isinstance(c, str)]
        if bad:
            raise ValueError(f"reward {self.name!r} takes completions as strings, got {bad[0]}")
        return torch.tensor([self.score_one(c, p, m) for c, p, m in zip(inputs, prompts, metadata)],
                            dtype=torch.float32)

    def score_one(self, completion: str, prompt: str, metadata: dict) -> float:
        raise NotImplementedError


@REWARDS.register("math_verify")
class MathVerify(TextReward):
    """``1[verify(parse(answer), parse(completion))]`` with math-verify; the reference comes from ``answers=`` (or
    ``metadata['answer']``). math-verify's signal-based timeouts only work in the main thread, so elsewhere
    (server worker threads, executors) they are disabled."""

    name = "math_verify"

    def __init__(self, timeout_seconds: int = 5, device: str | torch.device = "cpu",
                 batch_size: int | None = None) -> None:
        super().__init__(device=device, batch_size=batch_size)
        self.timeout_seconds = timeout_seconds

    def score_one(self, completion: str, prompt: str, metadata: dict) -> float:
        from math_verify import parse, verify

        if "answer" not in metadata or metadata["answer"] is None:
            raise ValueError("math_verify needs the reference answer: pass answers=[...] or metadata['answer']")
        t = self.timeout_seconds if threading.current_thread() is threading.main_thread() else None
        gold = parse(str(metadata["answer"]), parsing_timeout=t)
        pred = parse(completion, parsing_timeout=t)
        if not gold or not pred:
            return 0.0
        try:
            return float(verify(gold, pred, timeout_seconds=t))
        except Exception:
            return 0.0


R1_FORMAT = r"^\s*<think>.*?</think>\s*<answer>.*?</answer>\s*$"


@REWARDS.register("format")
class FormatReward(TextReward):
    """``1[re.fullmatch(pattern, completion, DOTALL)]``; ``tags=("think", "answer")`` builds the pattern
    ``<think>…</think>\\s*<answer>…</answer>`` (each tag once, in order)."""

    name = "format"

    def __init__(self, pattern: str | None = None, tags: Sequence[str] | None = None, *,
                 device: str | torch.device = "cpu", batch_size: int | None = None) -> None:
        super().__init__(device=device, batch_size=batch_size)
        if pattern is not None and tags is not None:
            raise ValueError("give either pattern or tags, not both")
        if tags is not None:
            body = r"\s*".join(rf"<{re.escape(t)}>(?:(?!<{re.escape(t)}>).)*?</{re.escape(t)}>" for t in tags)
            pattern = rf"^\s*{body}\s*$"
        self.pattern = re.compile(pattern or R1_FORMAT, re.DOTALL)

    def score_one(self, completion: str, prompt: str, metadata: dict) -> float:
        return float(self.pattern.fullmatch(completion) is not None)


@REWARDS.register("overlong_penalty")
class OverlongPenalty(TextReward):
    """DAPO soft overlong punishment (eq. 13). Length ``|y|`` = ``metadata['num_tokens']`` when given, else the
    ``tokenizer`` (a callable ``str -> list`` or a transformers tokenizer) token count."""

    name = "overlong_penalty"

    def __init__(self, max_length: int = 20480, cache_length: int = 4096,
                 tokenizer: Callable[[str], Any] | Any | None = None, *, device: str | torch.device = "cpu",
                 batch_size: int | None = None) -> None:
        super().__init__(device=device, batch_size=batch_size)
        if not 0 < cache_length <= max_length:
            raise ValueError(f"need 0 < cache_length <= max_length, got {cache_length}, {max_length}")
        self.max_length, self.cache_length, self.tokenizer = max_length, cache_length, tokenizer

    def length(self, completion: str, metadata: dict) -> int:
        if metadata.get("num_tokens") is not None:
            return int(metadata["num_tokens"])
        if self.tokenizer is None:
            raise ValueError("overlong_penalty needs token counts: pass metadata['num_tokens'] or a tokenizer")
        if hasattr(self.tokenizer, "encode"):
            return len(self.tokenizer.encode(completion, add_special_tokens=False))
        return len(self.tokenizer(completion))

    def score_one(self, completion: str, prompt: str, metadata: dict) -> float:
        n, hi, c = self.length(completion, metadata), self.max_length, self.cache_length
        if n <= hi - c:
            return 0.0
        if n <= hi:
            return (hi - c - n) / c
        return -1.0
