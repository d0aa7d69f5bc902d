"""The embedded language task: two-operand addition with a bracketed answer, and its verifier rewards.

A prompt is ``"37+45="``; the wanted completion is ``"<82>"`` followed by EOS. Operand pairs are split once,
deterministically from the task seed, into a train and a held-out set (pairs, not strings, so a held-out sum is
never seen in pretraining or RL). Two rule rewards score a completion:

* ``arith_answer`` (the verifier): 1 if the first integer in the completion equals ``a + b``, else 0;
* ``arith_format``: 1 if the completion is exactly ``<digits>``, else 0.

Both are ``Reward`` subclasses with ``modality = "text"`` registered in ``flowalign.rewards.REWARDS``, called as
``reward(completions=..., prompts=..., answers=...)`` like every text reward of the library.

The tokenizer is character level and built locally (``build_tokenizer``), so nothing is downloaded.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass
from flowalign.rewards.base import REWARDS
from flowalign.rewards.text import TextReward

PAD, BOS, EOS = "<pad>", "<s>", "</s>"
CHARS = list("0123456789+-=<> ")
_INT = re.compile(r"-?\d+")
_FORMAT = re.compile(r"^<\d+>$")


def build_tokenizer():
    """Character-level ``PreTrainedTokenizerFast``: one id per character of ``CHARS``, BOS prepended, left padding.

    Ids: ``<pad>`` 0, ``<s>`` 1, ``</s>`` 2, then the characters. Decoding joins characters without spaces.
    """
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {PAD: 0, BOS: 1, EOS: 2}
    for c in CHARS:
        vocab[c] = len(vocab)
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token=PAD))
    # One token per character: "isolated" keeps every single-character match as its own piece.
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    tok.decoder = decoders.Fuse()
    tok.post_processor = processors.TemplateProcessing(single=f"{BOS} $A", special_tokens=[(BOS, 1)])
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token=PAD, bos_token=BOS, eos_token=EOS, padding_side="left",
        model_max_length=64,
    )


@dataclass(frozen=True)
class Example:
    """One task instance: the prompt text and the integer answer."""

    prompt: str
    answer: int


@dataclass
class ArithmeticTask:
    """Addition of two operands in ``[0, max_operand]``; pairs split into train / held-out by ``seed``."""

    max_operand: int = 99
    heldout_fraction: float = 0.1
    seed: int = 0

    def __post_init__(self) -> None:
        if self.max_operand < 1:
            raise ValueError(f"max_operand must be >= 1, got {self.max_operand}")
        if not 0.0 < self.heldout_fraction < 1.0:
            raise ValueError(f"heldout_fraction must be in (0, 1), got {self.heldout_fraction}")
        pairs = [(a, b) for a in range(self.max_operand + 1) for b in range(self.max_operand + 1)]
        random.Random(self.seed).shuffle(pairs)
        n_held = max(1, int(round(len(pairs) * self.heldout_fraction)))
        self._splits = {"heldout": pairs[:n_held], "train": pairs[n_held:]}

    def split(self, name: str) -> list[Example]:
        """All examples of split ``name`` ("train" or "heldout"), in a fixed seeded order."""
        if name not in self._splits:
            raise ValueError(f"split={name!r} is not allowed. Allowed: train, heldout")
        return [Example(f"{a}+{b}=", a + b) for a, b in self._splits[name]]

    @staticmethod
    def completion(answer: int) -> str:
        """The wanted completion text for ``answer`` (EOS is added by the tokenizer side)."""
        return f"<{answer}>"


def parse_answer(completion: str) -> int | None:
    """First integer in ``completion`` or None."""
    m = _INT.search(completion)
    return int(m.group()) if m else None


@REWARDS.register("arith_answer")
class ArithAnswerReward(TextReward):
    """Verifier: 1.0 if the first integer of the completion equals ``metadata["answer"]``, else 0.0."""

    name = "arith_answer"

    def score_one(self, completion: str, prompt: str, metadata: dict) -> float:
        if "answer" not in metadata:
            raise ValueError("arith_answer needs answers=[...] (one integer per completion)")
        return float(parse_answer(completion) == int(metadata["answer"]))


@REWARDS.register("arith_format")
class ArithFormatReward(TextReward):
    """Format: 1.0 if the completion is exactly ``<digits>``, else 0.0."""

    name = "arith_format"

    def score_one(self, completion: str, prompt: str, metadata: dict) -> float:
        return float(bool(_FORMAT.match(completion.strip())))
