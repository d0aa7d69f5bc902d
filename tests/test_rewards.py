"""Reward library: tiny random-weight scorers loaded through the public loaders, batch invariance, gradients,
real OCR, math-verify, text/video/simple rewards, registry, plug-ins and Compose."""

from __future__ import annotations

import io
import shutil
import textwrap

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw, ImageFont

import flowalign.rewards as R
from flowalign.rewards import REWARDS, Compose, get_reward, tiny
from flowalign.rewards.base import Reward
from tests.deps import require_executable

@pytest.fixture(autouse=True)
def _one_torch_thread():
    """Tiny models gain nothing from intra-op threads, and on a shared 2-core machine two OpenMP threads per
    process oversubscribe the cores and make these tests many times slower; restored afterwards."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


PROMPTS7 = ["a red circle", "two blue squares", "a cat", "a red circle", "a dog on the left", "", "a photo"]


# ----------------------------------------------------------------------------- tiny scorers
@pytest.fixture(scope="module")
def tiny_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny_rewards")
    hps_ckpt, hps_cfg = tiny.save_tiny_hps(root / "hps")
    ir_dir, ir_vit = tiny.save_tiny_imagereward(root / "imagereward")
    return {
        "clip_score": tiny.save_tiny_open_clip(root / "open_clip"),
        "pickscore": tiny.save_tiny_hf_clip(root / "pickscore"),
        "hpsv2": (hps_ckpt, hps_cfg),
        "aesthetic": tiny.save_tiny_aesthetic(root / "aesthetic"),
        "imagereward": (ir_dir, ir_vit),
    }


def load(name: str, dirs: dict, **kw) -> Reward:
    """Each scorer through its public loader, as a user would with downloaded weights."""
    d = dirs[name]
    if name == "clip_score":
        return R.CLIPScore.from_pretrained(d, **kw)
    if name == "pickscore":
        return R.PickScore.from_pretrained(d, **kw)
    if name == "hpsv2":
        return R.HPSv2.from_pretrained(d[0], model=d[1], **kw)
    if name == "aesthetic":
        return R.AestheticScore.from_pretrained(d, **kw)
    if name == "imagereward":
        return R.ImageReward.from_pretrained(d[0], vit=d[1], **kw)
    raise KeyError(name)


SCORERS = ["clip_score", "pickscore", "hpsv2", "aesthetic", "imagereward"]


@pytest.fixture(scope="module")
def scorers(tiny_dirs):
    return {name: load(name, tiny_dirs) for name in SCORERS}


def images(n: int, h: int = 20, w: int = 24, seed: int = 0, dtype=torch.float32) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 3, h, w, generator=g, dtype=dtype)


@pytest.mark.parametrize("name", SCORERS)
def test_scorer_shape_and_batch_invariance(scorers, name):
    r = scorers[name]
    assert r.differentiable and r.modality == "image"
    x = images(7)
    s = r(x, PROMPTS7)
    assert s.shape == (7,) and s.dtype == torch.float32 and torch.isfinite(s).all()
    assert s.std() > 0, "scores must depend on the input"
    singles = torch.cat([r(x[i : i + 1], PROMPTS7[i : i + 1]) for i in range(7)])
    torch.testing.assert_close(s, singles, atol=1e-5, rtol=0)
    r.batch_size = 3  # internal micro-batching gives the same numbers
    try:
        torch.testing.assert_close(r(x, PROMPTS7), s, atol=1e-5, rtol=0)
    finally:
        r.batch_size = 32


def test_scorers_load_by_registry_name(tiny_dirs, scorers):
    x = images(3, seed=5)
    p = PROMPTS7[:3]
    r = get_reward("clip_score", model=str(tiny_dirs["clip_score"]))
    torch.testing.assert_close(r(x, p), scorers["clip_score"](x, p))
    r = get_reward("pickscore", model=str(tiny_dirs["pickscore"]), processor=str(tiny_dirs["pickscore"]))
    torch.testing.assert_close(r(x, p), scorers["pickscore"](x, p))
    r = get_reward("hpsv2", checkpoint=str(tiny_dirs["hpsv2"][0].parent), model=str(tiny_dirs["hpsv2"][1]))
    torch.testing.assert_close(r(x, p), scorers["hpsv2"](x, p))


def test_clip_score_matches_open_clip_pipeline(tiny_dirs, scorers):
    """The torch preprocessing + cosine equals open_clip's own PIL transform and encoders (on a square image of
    the model's input size, where the PIL and tensor resize paths coincide)."""
    import open_clip

    name = "local-dir:" + str(tiny_dirs["clip_score"])
    model, _, preprocess = open_clip.create_model_and_transforms(name)
    tok = open_clip.get_tokenizer(name)
    x = (images(2, 16, 16, seed=3) * 255).round() / 255
    pil = [Image.fromarray((a.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)) for a in x]
    with torch.no_grad():
        out = model(torch.stack([preprocess(p) for p in pil]), tok(["a cat", "a dog"]))
    ref = (out[0] * out[1]).sum(-1)
    torch.testing.assert_close(scorers["clip_score"](x, ["a cat", "a dog"]), ref, atol=1e-5, rtol=0)


def test_pickscore_matches_transformers_processor(tiny_dirs, scorers):
    """PickScore README formula on the processor's own PIL pipeline: ``logit_scale.exp() * cos``."""
    from transformers import AutoModel, AutoProcessor

    model = AutoModel.from_pretrained(tiny_dirs["pickscore"]).eval()
    proc = AutoProcessor.from_pretrained(tiny_dirs["pickscore"])
    x = (images(2, 16, 16, seed=4) * 255).round() / 255
    pil = [Image.fromarray((a.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)) for a in x]
    prompts = ["a cat", "two blue squares"]
    with torch.no_grad():
        inp = proc(images=pil, text=prompts, padding=True, truncation=True, max_length=77, return_tensors="pt")
        img = model.get_image_features(pixel_values=inp["pixel_values"])
        txt = model.get_text_features(input_ids=inp["input_ids"], attention_mask=inp["attention_mask"])
        img, txt = [t if torch.is_tensor(t) else t.pooler_output for t in (img, txt)]
        ref = model.logit_scale.exp() * torch.nn.functional.cosine_similarity(img, txt)
    torch.testing.assert_close(scorers["pickscore"](x, prompts), ref, atol=1e-4, rtol=1e-5)


def test_hps_pads_non_square_to_square(scorers):
    from flowalign.rewards._image import resize_max_pad

    x = torch.ones(1, 3, 10, 20)
    y = resize_max_pad(x, 16)
    assert y.shape == (1, 3, 16, 16)
    assert y[0, :, :4].abs().sum() == 0 and y[0, :, -4:].abs().sum() == 0  # zero padding top and bottom
    assert scorers["hpsv2"](torch.rand(2, 3, 10, 20), ["a", "b"]).shape == (2,)


# Finite-difference gradient checks in float64 with torch.autograd.gradcheck: the analytic d score / d pixels
# (backward through the torch preprocessing and the network) is compared with central differences, eps = 1e-6.
# Pass condition, elementwise: |analytic − numeric| <= atol + rtol·|numeric| with rtol = 1e-4 and
# atol = 1e-6·max|analytic| (relative to the gradient's scale, so tiny gradients cannot pass vacuously).
# The fast check (every scorer) compares vᵀJu along random directions u, v; the slow one the full Jacobian.
GRAD_RTOL = 1e-4


def _gradcheck(r: Reward, shape: tuple, fast: bool) -> None:
    x = (images(*shape, seed=1, dtype=torch.float64) * 0.8 + 0.1).requires_grad_(True)
    prompts = ["a red circle", "a cat"]
    s = r(x, prompts)
    assert s.dtype == torch.float64 and s.shape == (2,)
    (g,) = torch.autograd.grad(s.sum(), x)
    scale = g.abs().max().item()
    assert scale > 1e-4, f"gradient must reach the pixels (max |grad| = {scale:.2e})"
    assert torch.autograd.gradcheck(lambda t: r(t, prompts), (x,), eps=1e-6, atol=1e-6 * scale, rtol=GRAD_RTOL,
                                    fast_mode=fast)


@pytest.mark.parametrize("name", SCORERS)
def test_scorer_gradcheck_float64_fast(tiny_dirs, name):
    _gradcheck(load(name, tiny_dirs).to(dtype=torch.float64), (2, 20, 24), fast=True)  # antialiased downsample


@pytest.mark.slow
@pytest.mark.parametrize("name", ["clip_score", "pickscore", "hpsv2", "aesthetic"])
def test_scorer_gradcheck_float64_full_jacobian(tiny_dirs, name):
    _gradcheck(load(name, tiny_dirs).to(dtype=torch.float64), (2, 6, 8), fast=False)  # 288 inputs, upsample


@pytest.mark.parametrize("name", ["brightness", "color_target", "redness"])
def test_simple_differentiable_gradcheck(name):
    r = get_reward(name)
    x = (images(2, 5, 6, dtype=torch.float64) * 0.8 + 0.1).requires_grad_(True)
    assert torch.autograd.gradcheck(lambda t: r(t, ["", ""]), (x,), eps=1e-6, atol=1e-8, rtol=GRAD_RTOL)


@pytest.mark.parametrize("spec", ["ocr", "jpeg_compressibility", "jpeg_incompressibility"])
def test_non_differentiable_refuse_requires_grad(spec):
    if spec == "ocr":
        require_executable("tesseract", "make sysdeps (Debian tesseract-ocr)")
    r = get_reward(spec)
    assert not r.differentiable
    with pytest.raises(ValueError, match="not differentiable.*requires_grad"):
        r(images(2).requires_grad_(True), ["a", "b"])


def test_remote_and_per_frame_refuse_requires_grad():
    r = R.RemoteReward("http://127.0.0.1:9", modality="image", retries=0)
    with pytest.raises(ValueError, match="not differentiable"):
        r(images(1).requires_grad_(True), ["a"])
    v = R.PerFrame("jpeg_compressibility")
    with pytest.raises(ValueError, match="not differentiable"):
        v(torch.rand(1, 2, 3, 8, 8, requires_grad=True), ["a"])


def test_input_checks():
    r = get_reward("brightness")
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        r(torch.full((1, 3, 4, 4), 2.0), ["a"])
    with pytest.raises(ValueError, match="uint8"):
        r(torch.zeros(1, 3, 4, 4, dtype=torch.uint8), ["a"])
    with pytest.raises(ValueError, match="prompts"):
        r(torch.zeros(2, 3, 4, 4), ["a"])
    with pytest.raises(ValueError, match="PerFrame"):  # an image-only reward given a video
        ConstantReward()(torch.zeros(1, 2, 3, 4, 4), ["a"])
    assert get_reward("jpeg_compressibility")(torch.zeros(1, 2, 3, 8, 8), ["a"]).shape == (1,)  # scores videos


# ----------------------------------------------------------------------------- OCR (real tesseract)
FONT = "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf"


def render(text: str, size=(512, 256), bg=(255, 255, 255), fg=(0, 0, 0), font_size=40) -> torch.Tensor:
    try:
        font = ImageFont.truetype(FONT, font_size)
    except OSError:
        font = ImageFont.load_default(size=font_size)
    im = Image.new("RGB", size, bg)
    ImageDraw.Draw(im).text((20, size[1] // 2 - font_size // 2), text, font=font, fill=fg)
    return torch.from_numpy(np.array(im)).permute(2, 0, 1).float() / 255


def test_ocr_reads_rendered_prompt_text():
    require_executable("tesseract", "make sysdeps (Debian tesseract-ocr)")
    r = get_reward("ocr")
    texts = ["Hello World", "flow align", "OPEN SESAME", "Grumpy Cat 42"]
    x = torch.stack([render(t) for t in texts] + [render("Hello World", bg=(20, 20, 60), fg=(250, 250, 250))])
    prompts = [f'a storefront sign that says "{t}"' for t in texts] + ['neon sign "Hello World"']
    s = r(x, prompts)
    assert (s >= 0.9).all(), s
    wrong = r(torch.stack([render("Banana Split"), render("quiet"), render("xyz")]),
              ['a sign "Hello World"', 'a sign "OPEN SESAME"', 'a sign "flow align"'])
    assert (wrong <= 0.3).all(), wrong
    blank = r(torch.ones(1, 3, 64, 64), ['a sign "Hello"'])
    assert blank.item() == 0.0


def test_ocr_formula_matches_flow_grpo():
    from flowalign.rewards.ocr import ocr_edit_reward, target_text

    assert target_text('a sign that says "Hi There" on a wall') == "Hi There"
    assert target_text("no quotes here") == "no quotes here"
    assert target_text('x "y" z', {"text": "override"}) == "override"
    assert ocr_edit_reward("xx hithere yy", "Hi There") == 1.0  # substring shortcut
    assert ocr_edit_reward("hithera", "Hi There") == pytest.approx(1 - 1 / 7)
    assert ocr_edit_reward("completely different text", "abc") == 0.0  # distance clipped to |t|
    # a pluggable backend: any uint8 HWC -> str callable
    r = R.OCRReward(backend=lambda a: "hithere")
    assert r(torch.rand(2, 3, 8, 8), ['"Hi There"', '"Bye"']).tolist() == [1.0, 0.0]


# ----------------------------------------------------------------------------- text rewards
def test_math_verify():
    r = get_reward("math_verify")
    s = r(completions=["so the answer is \\boxed{1/2}", "\\boxed{0.3}", "I don't know", "$\\frac{2}{4}$"],
          answers=["0.5", "0.5", "0.5", "0.5"])
    assert s.tolist() == [1.0, 0.0, 0.0, 1.0]
    assert r.modality == "text"
    with pytest.raises(ValueError, match="reference answer"):
        r(completions=["\\boxed{1}"])


def test_format_and_overlong():
    f = get_reward("format")
    ok = "<think>because</think>\n<answer>42</answer>"
    assert f(completions=[ok, "42", "<answer>42</answer><think>x</think>"]).tolist() == [1.0, 0.0, 0.0]
    g = get_reward("format", tags=["reasoning", "answer"])
    assert g(completions=["<reasoning>r</reasoning> <answer>a</answer>", ok]).tolist() == [1.0, 0.0]
    o = get_reward("overlong_penalty", max_length=100, cache_length=20)
    meta = [{"num_tokens": n} for n in (50, 80, 90, 100, 101)]
    assert o(completions=[""] * 5, metadata=meta).tolist() == pytest.approx([0.0, 0.0, -0.5, -1.0, -1.0])
    o2 = get_reward("overlong_penalty", max_length=10, cache_length=4, tokenizer=str.split)
    assert o2(completions=["a " * 8]).tolist() == pytest.approx([-0.5])


# ----------------------------------------------------------------------------- simple rewards
def test_jpeg_rewards_match_pil():
    x = torch.cat([torch.full((1, 3, 32, 32), 0.5), images(1, 32, 32)])
    inc = get_reward("jpeg_incompressibility")(x, ["", ""])
    arr = (x[1] * 255).round().clamp(0, 255).to(torch.uint8).permute(1, 2, 0).numpy()
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="JPEG", quality=95)
    assert inc[1].item() == pytest.approx(buf.tell() / 1000)
    assert inc[1] > inc[0] * 2  # noise does not compress
    comp = get_reward("jpeg_compressibility", divisor=500)(x, ["", ""])
    torch.testing.assert_close(comp, -inc / 500)


def test_brightness_color_redness_values():
    x = torch.zeros(2, 3, 4, 4)
    x[0, 0] = 1.0  # pure red
    x[1] = 1.0  # white
    assert get_reward("brightness")(x, ["", ""]).tolist() == pytest.approx([0.299, 1.0])
    assert get_reward("brightness", target=1.0)(x, ["", ""]).tolist() == pytest.approx([-0.701, 0.0])
    assert get_reward("redness")(x, ["", ""]).tolist() == pytest.approx([1.0, 0.0])
    c = get_reward("color_target", color=(1, 0, 0))(x, ["", ""])
    assert c.tolist() == pytest.approx([1.0, 1 - 2**0.5 / 3**0.5], abs=1e-5)


# ----------------------------------------------------------------------------- video
def test_per_frame_and_temporal_consistency(scorers):
    v = torch.zeros(2, 4, 3, 8, 8)
    for t in range(4):
        v[0, t] = t / 3  # brightening video
    v[1] = 0.5  # static
    pf = R.PerFrame("brightness", reduction="mean")
    assert pf.modality == "video" and pf.differentiable
    assert pf(v, ["", ""]).tolist() == pytest.approx([0.5, 0.5])
    assert R.PerFrame("brightness", reduction="min")(v, ["", ""]).tolist() == pytest.approx([0.0, 0.5])
    assert R.PerFrame("brightness", frame_stride=2)(v, ["", ""]).tolist() == pytest.approx([(0 + 2 / 3) / 2, 0.5])
    tc = get_reward("temporal_consistency")(v, ["", ""])
    assert tc.tolist() == pytest.approx([1 - 1 / 3, 1.0])
    tce = R.TemporalConsistency(embedder=scorers["clip_score"])
    s = tce(torch.cat([torch.rand(1, 3, 3, 16, 16), torch.full((1, 3, 3, 16, 16), 0.3)]), ["", ""])
    assert s[1].item() == pytest.approx(1.0, abs=1e-5) and s[0] < 1
    with pytest.raises(ValueError, match="B,T,C,H,W"):
        pf(torch.zeros(1, 3, 8, 8), [""])
    # a model scorer per frame
    clipv = R.PerFrame(scorers["clip_score"])
    vid = torch.rand(2, 3, 3, 16, 16)
    manual = scorers["clip_score"](vid.reshape(6, 3, 16, 16), ["a"] * 3 + ["b"] * 3).reshape(2, 3).mean(1)
    torch.testing.assert_close(clipv(vid, ["a", "b"]), manual)


# ----------------------------------------------------------------------------- registry, plug-ins, Compose
class ConstantReward(Reward):
    name = "constant_test"

    def __init__(self, value: float = 3.0, **kw):
        super().__init__(**kw)
        self.value = value

    def score(self, inputs, prompts, metadata):
        return torch.full((inputs.shape[0],), self.value)


def test_unknown_reward_lists_registered_names():
    with pytest.raises(ValueError) as e:
        get_reward("pikscore")
    msg = str(e.value)
    assert "Did you mean 'pickscore'" in msg
    for name in ("pickscore", "clip_score", "hpsv2", "aesthetic", "imagereward", "ocr", "math_verify"):
        assert name in msg


def test_module_attr_specs(tmp_path, monkeypatch):
    (tmp_path / "user_rewards_mod.py").write_text(textwrap.dedent("""
        import torch
        from flowalign.rewards import Reward
        class Constant(Reward):
            name = "constant_user"
            def __init__(self, value=3.0, **kw):
                super().__init__(**kw)
                self.value = value
            def score(self, inputs, prompts, metadata):
                return torch.full((inputs.shape[0],), self.value)
        def mean_pixel(images, prompts, metadata):
            return images.mean(dim=(1, 2, 3))
    """))
    monkeypatch.syspath_prepend(str(tmp_path))
    r = get_reward("user_rewards_mod:Constant", value=2.0)
    assert r(torch.zeros(3, 3, 4, 4)).tolist() == [2.0, 2.0, 2.0]
    f = get_reward("user_rewards_mod:mean_pixel")
    assert f(torch.full((2, 3, 4, 4), 0.25)).tolist() == [0.25, 0.25]
    with pytest.raises(ValueError, match="cannot import module"):
        get_reward("no_such_pkg.mod:Thing")


def test_entry_point_plugin(tmp_path, monkeypatch):
    pkg = tmp_path / "my_reward_plugin"
    pkg.mkdir()
    (pkg / "__init__.py").write_text(textwrap.dedent("""
        import torch
        from flowalign.rewards import Reward
        class Half(Reward):
            name = "half"
            def score(self, inputs, prompts, metadata):
                return torch.full((inputs.shape[0],), 0.5)
    """))
    dist = tmp_path / "my_reward_plugin-0.1.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: my-reward-plugin\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text("[flowalign.rewards]\nhalf_plugin = my_reward_plugin:Half\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setattr(REWARDS, "_items", dict(REWARDS._items))
    monkeypatch.setattr(REWARDS, "_entry_points_loaded", False)
    assert "half_plugin" in REWARDS.names()
    assert get_reward("half_plugin")(torch.zeros(2, 3, 4, 4)).tolist() == [0.5, 0.5]


def test_compose_weighted_sum_and_components():
    x = torch.zeros(2, 3, 4, 4)
    x[0, 0] = 1.0
    c = Compose({"brightness": 2.0, "redness": {"weight": -1.0},
                 ConstantReward(value=1.5): 0.5})
    total, parts = c(x, ["", ""], return_components=True)
    assert set(parts) == {"brightness", "redness", "constant_test"}
    expected = 2.0 * parts["brightness"] - parts["redness"] + 0.5 * parts["constant_test"]
    torch.testing.assert_close(total, expected)
    assert total.tolist() == pytest.approx([2 * 0.299 - 1 + 0.75, 0.75])
    torch.testing.assert_close(c(x, ["", ""]), total)
    assert c.differentiable is False  # ConstantReward is not
    assert Compose({"brightness": 1, "redness": 1}).differentiable is True
    t = Compose({"math_verify": 1.0, "format": 0.1})
    tot, parts = t(completions=["<think>x</think><answer>\\boxed{2}</answer>", "3"], answers=["2", "2"],
                   return_components=True)
    assert tot.tolist() == pytest.approx([1.1, 0.0]) and parts["format"].tolist() == [1.0, 0.0]
    with pytest.raises(ValueError, match="modalities"):
        Compose({"brightness": 1, "format": 1})


def test_imagereward_checkpoint_is_strict(tiny_dirs, tmp_path):
    d, vit = tiny_dirs["imagereward"]
    sd = torch.load(d / "ImageReward.pt", weights_only=True)
    assert "blip.visual_encoder.blocks.0.attn.qkv.weight" in sd and "mlp.layers.7.bias" in sd
    for f in ("med_config.json", "vocab.txt"):
        shutil.copy(d / f, tmp_path / f)
    sd.pop("blip.text_encoder.encoder.layer.0.crossattention.self.key.weight")
    torch.save(sd, tmp_path / "ImageReward.pt")
    with pytest.raises(RuntimeError, match="crossattention"):
        R.ImageReward.from_pretrained(tmp_path, vit=vit)
