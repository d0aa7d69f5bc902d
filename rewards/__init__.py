"""flowalign.rewards: one protocol for image, video and text rewards.

``Reward.__call__(images, prompts, metadata) -> Tensor[B]`` (images float [0,1] ``B,C,H,W``, video ``B,T,C,H,W``;
text rewards take ``completions=`` and ``answers=``). Build any reward by name with ``get_reward``:

>>> from flowalign.rewards import get_reward, Compose
>>> r = get_reward("pickscore", model="/ckpt/PickScore_v1", processor="/ckpt/CLIP-ViT-H-14")
>>> r = get_reward("my_pkg.rewards:MyReward")            # any importable Reward subclass or function
>>> r = get_reward("remote:http://gpu-box:8000", token=...)  # a reward served by `flowalign rewards serve`
>>> r = Compose({"pickscore": 1.0, "ocr": 0.5}); total, parts = r(images, prompts, return_components=True)

Third-party packages register rewards under the ``flowalign.rewards`` entry-point group.
Built-ins: clip_score, pickscore, hpsv2, aesthetic, imagereward, ocr, jpeg_compressibility,
jpeg_incompressibility, brightness, color_target, redness, math_verify, format, overlong_penalty, per_frame,
temporal_consistency (and the shapes-world rewards when ``flowalign.rewards.shapes`` is present).
"""

import importlib

from flowalign.rewards.base import (REWARDS, Compose, FunctionReward, NonFiniteRewardError, Reward, as_reward,
                                    check_images, get_reward, reward_name)
from flowalign.rewards import aesthetic, clip, hps, imagereward, ocr, pickscore, simple, text, video  # noqa: F401  (register)
from flowalign.rewards.aesthetic import AestheticScore
from flowalign.rewards.clip import CLIPScore
from flowalign.rewards.hps import HPSv2
from flowalign.rewards.imagereward import ImageReward
from flowalign.rewards.ocr import OCRReward
from flowalign.rewards.pickscore import PickScore
from flowalign.rewards.remote import RemoteReward
from flowalign.rewards.simple import Brightness, ColorTarget, JpegCompressibility, JpegIncompressibility, Redness
from flowalign.rewards.text import FormatReward, MathVerify, OverlongPenalty
from flowalign.rewards.video import PerFrame, TemporalConsistency

try:  # the shapes-world rewards live in their own module, written separately; absent is fine
    importlib.import_module("flowalign.rewards.shapes")
except ImportError as e:
    if e.name != "flowalign.rewards.shapes":  # a real import error inside shapes.py must surface
        raise

__all__ = [
    "REWARDS", "Reward", "get_reward", "as_reward", "reward_name", "Compose", "FunctionReward", "RemoteReward",
    "check_images",
    "NonFiniteRewardError",
    "CLIPScore", "PickScore", "HPSv2", "AestheticScore", "ImageReward", "OCRReward",
    "JpegCompressibility", "JpegIncompressibility", "Brightness", "ColorTarget", "Redness",
    "MathVerify", "FormatReward", "OverlongPenalty", "PerFrame", "TemporalConsistency",
]
