"""Trackers through accelerate (``flowalign.trackers``), read back from what they wrote.

* TensorBoard, image trainer: the event file holds the scalars of ``metrics.jsonl`` (same values), the sample grid
  (pixel-equal, within the uint8 rounding, to ``samples/iter_000001.png``), its captions (prompt + reward, whose
  mean is the logged ``reward_mean``) and the captioned eval grid; ``log.run_name`` picks the directory.
* TensorBoard, LLM trainer: scalars (train + ``eval/accuracy``) equal to ``metrics.jsonl`` and the completions text.
* W&B offline (``WANDB_MODE=offline``): the run directory holds the captioned images and the summary scalars.
* A requested tracker whose package is missing stops at config load, naming the package and the extra.
"""

from __future__ import annotations

import io
import json
import re

import numpy as np
import pytest

from flowalign.config import ConfigError, load_config
from tests.deps import require_module
from tests.test_trainer import PROMPTS, tiny_cfg

# a dev extra: skips locally without it, fails in CI (tests/deps.py)
require_module("tensorboard", "pip install -e '.[dev]' (or flowalign[tensorboard])", module_level=True)


def _events(path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    ea = EventAccumulator(str(path), size_guidance={"images": 0, "scalars": 0, "tensors": 0})
    ea.Reload()
    return ea


def _text(ea, tag: str) -> str:
    return ea.Tensors(f"{tag}/text_summary")[0].tensor_proto.string_val[0].decode()  # torch add_text tag


def _png(encoded: bytes) -> np.ndarray:
    from PIL import Image

    return np.asarray(Image.open(io.BytesIO(encoded)).convert("RGB")).astype(np.int16)


def test_tensorboard_image_trainer_scalars_images_captions(tmp_path):
    from PIL import Image

    from flowalign.trainer import Trainer

    cfg = tiny_cfg(tmp_path, "log.trackers=[tensorboard]", "log.run_name=r1", "log.sample_images_every=1",
                   "sample.batch_size=8", "eval.every=1", "eval.prompts=[a red cat, a dog, a tree]",
                   "eval.num_steps=2", "eval.batch_size=3")
    Trainer(cfg).train()
    rec, ev = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    ea = _events(tmp_path / "run" / "flowalign" / "r1")
    tags = ea.Tags()
    for key in ("reward_mean", "loss", "grad_norm", "lr"):
        (s,) = ea.Scalars(key)
        assert s.step == 1 and s.value == pytest.approx(rec[key], rel=1e-6, abs=1e-12), key
    (s,) = ea.Scalars("eval/reward")
    assert s.step == 1 and s.value == pytest.approx(ev["eval/reward"], rel=1e-6)
    assert {"samples/images", "eval/images"} <= set(tags["images"])
    (img,) = ea.Images("samples/images")
    want = np.asarray(Image.open(tmp_path / "run" / "samples" / "iter_000001.png").convert("RGB")).astype(np.int16)
    got = _png(img.encoded_image_string)
    assert img.step == 1 and got.shape == want.shape
    assert np.abs(got - want).max() <= 1  # TensorBoard truncates to uint8, save_image rounds
    caps = re.findall(r"\| \d+ \| (.+?) \| reward (-?[\d.]+) \|", _text(ea, "samples/images/captions"))
    assert len(caps) == 8 and all(p in PROMPTS for p, _ in caps)
    assert np.mean([float(r) for _, r in caps]) == pytest.approx(rec["reward_mean"], abs=1e-4)
    (grid,) = ea.Images("eval/images")
    assert grid.step == 1 and grid.width > grid.height  # three images in one row
    ecaps = _text(ea, "eval/images/captions")
    assert all(p in ecaps for p in ("a red cat", "a dog", "a tree")) and ecaps.count("redness") == 3


def test_tensorboard_llm_trainer_scalars_and_completions(tmp_path):
    from flowalign.llm.config import load
    from flowalign.llm.trainer import LLMTrainer

    cfg = load("recipes/llm_grpo.yaml", [f"output_dir={tmp_path}", "rollout.prompts_per_step=2",
                                         "rollout.group_size=2", "train.batch_size=4", "eval.num_prompts=4",
                                         "rollout.max_new_tokens=8", "train.steps=1", "log.trackers=[tensorboard]"])
    LLMTrainer(cfg).train(progress=False)
    rows = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    train = next(r for r in rows if "reward" in r)
    ea = _events(tmp_path / "flowalign")
    for key in ("reward", "response_length", "lr"):
        (s,) = ea.Scalars(key)
        assert s.step == 1 and s.value == pytest.approx(train[key], rel=1e-5, abs=1e-6), key
    acc = ea.Scalars("eval/accuracy")
    assert [a.step for a in acc] == [0, 1]
    assert [a.value for a in acc] == pytest.approx([r["eval"]["accuracy"] for r in rows if "eval" in r])
    text = _text(ea, "samples/completions")
    assert text.startswith("| prompt | completion | reward |\n")
    rewards = [float(r) for r in re.findall(r"^\| .+? \| .*? \| (-?[\d.]+) \|$", text, re.M)]
    assert len(rewards) == 4 and np.mean(rewards) == pytest.approx(train["reward"], abs=1e-4)  # every row, once


def _wandb_records(path):
    """The protobuf ``Record``s of an offline ``run-*.wandb`` file (leveldb log framing: 7-byte block headers
    ``crc32, length, type`` in 32 KiB blocks; type 1 = full record, 2/3/4 = first/middle/last fragment)."""
    import struct

    from wandb.proto import wandb_internal_pb2 as pb

    data, pos, buf, out = path.read_bytes(), 7, b"", []  # after the ':W&B' file header
    while pos + 7 <= len(data):
        left = 32768 - pos % 32768
        if left < 7:
            pos += left
            continue
        _, n, kind = struct.unpack("<IHB", data[pos:pos + 7])
        buf, pos = buf + data[pos + 7:pos + 7 + n], pos + 7 + n
        if kind in (1, 4):
            out.append(pb.Record.FromString(buf))
            buf = b""
    return out


def test_wandb_offline_run_holds_captioned_images(tmp_path, monkeypatch):
    require_module("wandb", "pip install -e '.[dev]' (or flowalign[wandb])")
    from flowalign.trainer import Trainer

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    monkeypatch.setenv("WANDB_SILENT", "true")
    cfg = tiny_cfg(tmp_path, "log.trackers=[wandb]", "log.run_name=r-offline", "log.sample_images_every=1",
                   "sample.batch_size=8", "log.init_kwargs={wandb: {tags: [t1]}}")
    Trainer(cfg).train()
    rec = json.loads((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()[0])
    (run_dir,) = (tmp_path / "wandb").glob("offline-run-*")
    records = _wandb_records(next(run_dir.glob("run-*.wandb")))
    (run,) = [r.run for r in records if r.WhichOneof("record_type") == "run"]
    assert (run.display_name, list(run.tags), run.project) == ("r-offline", ["t1"], "flowalign")
    (row,) = [{i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in r.history.item}
              for r in records if r.WhichOneof("record_type") == "history"]
    assert row["_step"] == 1 and row["reward_mean"] == pytest.approx(rec["reward_mean"], rel=1e-12)
    assert row["samples/images/_type"] == "images/separated" and row["samples/images/count"] == 8
    files = row["samples/images/filenames"]
    assert len(files) == 8 and all((run_dir / "files" / f).is_file() for f in files)
    caps = row["samples/images/captions"]
    assert all(c.split(" | reward ")[0] in PROMPTS for c in caps)
    assert np.mean([float(c.split(" | reward ")[1]) for c in caps]) == pytest.approx(rec["reward_mean"], abs=1e-4)


@pytest.mark.parametrize("trainer", ["image", "llm"])
def test_missing_tracker_package_stops_at_config_load(tmp_path, monkeypatch, trainer):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else real(name, *a))
    with pytest.raises(ConfigError, match=r"log\.trackers\[1\]='wandb' needs the 'wandb' package.*"
                                          r"pip install 'flowalign\[wandb\]'"):
        if trainer == "image":
            load_config({"output_dir": str(tmp_path)}, ["log.trackers=[tensorboard, wandb]"])
        else:
            from flowalign.llm.config import load

            load("recipes/llm_grpo.yaml", ["log.trackers=[tensorboard, wandb]"])


def test_run_name_and_init_kwargs_reach_accelerate(tmp_path):
    from types import SimpleNamespace

    from flowalign import trackers

    calls = []
    acc = SimpleNamespace(init_trackers=lambda p, config, init_kwargs: calls.append((p, config, init_kwargs)))
    log = SimpleNamespace(trackers=["wandb", "tensorboard"], project="proj", run_name="r7",
                          init_kwargs={"wandb": {"entity": "me"}, "tensorboard": {"flush_secs": 5}})
    trackers.start(acc, log, {"a": {"b": 1, "c": [1, 2]}})
    assert calls == [("proj", {"a.b": 1, "a.c": "[1, 2]"}, {"wandb": {"entity": "me", "name": "r7"}})]
    (tb,) = [t for t in trackers.log_with(log, tmp_path) if not isinstance(t, str)]
    assert (tb.run_name, tb.logging_dir_param, tb.init_kwargs) == ("proj/r7", str(tmp_path), {"flush_secs": 5})
