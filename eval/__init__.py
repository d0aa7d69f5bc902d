"""Evaluation: deterministic generation of model variants, metrics, galleries and plots.

>>> from flowalign.eval import evaluate
>>> res = evaluate(adapter, ["a red circle"], seeds="0-3", rewards=["clip_score"], num_steps=20)
>>> res.log_dict()            # {"eval/clip_score": ...}

The trainer's periodic eval uses this module with ``eval.fn: flowalign.eval:trainer_eval``.
``run_eval`` compares several variants on one (prompt, seed) grid with shared initial noise; ``summarize`` gives
bootstrap CIs, win rates, verifier accuracy and the reward-hacking report; ``build_gallery`` writes the HTML page.
"""

from flowalign.data import load_prompts  # the one prompt loader (list, .txt, .jsonl, .csv)
from flowalign.eval.generate import EvalResult, evaluate, generate_images, initial_noise, parse_seeds, run_eval
from flowalign.eval.models import Variant, apply_lora, load_adapter, variants_from_args
from flowalign.eval.metrics import (CI, bootstrap_ci, bootstrap_p_gain, diversity, pairwise_diversity, reward_hacking, summarize,
                                    verifier_accuracy, win_rate)
from flowalign.eval.trainer_eval import trainer_eval

__all__ = [
    "CI", "EvalResult", "Variant", "apply_lora", "bootstrap_p_gain", "bootstrap_ci", "build_gallery", "diversity", "evaluate",
    "generate_images", "initial_noise", "load_adapter", "load_prompts", "pairwise_diversity", "parse_seeds",
    "reward_hacking", "run_eval", "summarize", "trainer_eval", "variants_from_args", "verifier_accuracy",
    "win_rate",
]


def build_gallery(*args, **kwargs):
    """See ``flowalign.eval.gallery.build_gallery`` (imported lazily: it pulls in jinja2 and matplotlib)."""
    from flowalign.eval.gallery import build_gallery as _build

    return _build(*args, **kwargs)
