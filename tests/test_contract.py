"""The adapter contract in the core (``flowalign.adapter``) and the one prompt loader (``flowalign.data``).

What must hold:

* ``deterministic_kernel`` and ``check_size`` are the one rule each (ODE for flow, DDIM eta 0 for epsilon; size
  multiples and video frame counts);
* ``get_adapter`` finds built-ins in a fresh interpreter (registering them on first use), ``module:Class`` strings
  and gives the closest name for a typo; ``load_adapter`` takes a dtype name; config validation uses the same path;
* ``encode_images`` is the exact inverse of each family's ``decode`` latent transform (the VAE sees, on decode,
  exactly the posterior sample it produced on encode), the pixel-space default is ``2 img - 1``, and an adapter
  that needs its own says so by name;
* ``flow_shift``/``ddpm_levels`` give the training noise tables (scheduler shift, ``sqrt(1 - alpha_bar_t)``);
* the rollouts built on the contract record no autograd graph;
* ``pipeline_call_kwargs`` defaults to the adapter's size/sequence attributes that ``__call__`` accepts;
* ``load_prompts`` reads lists, .txt, .jsonl and .csv (metadata kept) and names the key in every error; config
  and eval re-export the same function.
"""

from __future__ import annotations

import sys
from types import SimpleNamespace

import pytest
import torch
from torch import nn

import flowalign.config
import flowalign.eval
from flowalign.adapter import (DTYPES, Adapter, Cond, check_size, deterministic_kernel, get_adapter, load_adapter,
                               resolve_dtype)
from flowalign.config import ConfigError, load_config
from flowalign.data import load_prompts
from flowalign.eval.generate import as_prompt_records
from flowalign.pipelines import tiny

_LOADED: dict[str, Adapter] = {}


def tiny_adapter(family: str) -> Adapter:
    if family not in _LOADED:
        _LOADED[family] = load_adapter(family, tiny.cached(family), **tiny.RESOLUTION[family])
    return _LOADED[family]


# ----------------------------------------------------------------------------------------------- shared rules
def test_deterministic_kernel_is_ode_for_flow_and_ddim_for_epsilon():
    assert deterministic_kernel("flow") == ("ode", 0.0)
    assert deterministic_kernel("epsilon") == ("ddim", 0.0)
    with pytest.raises(ValueError, match="prediction_type"):
        deterministic_kernel("v_prediction")


def test_check_size():
    assert check_size(64, 32.0, 16, "vae * 2") == (64, 32)
    with pytest.raises(ValueError, match=r"height=30 and width=32 must be positive multiples of 16 \(vae \* 2\)"):
        check_size(30, 32, 16, "vae * 2")
    with pytest.raises(ValueError, match="multiples"):
        check_size(0, 32, 16, "vae * 2")
    assert check_size(32, 32, 16, "x", num_frames=9, temporal=4) == (32, 32)
    with pytest.raises(ValueError, match="num_frames=8: num_frames - 1 must be a multiple of 4"):
        check_size(32, 32, 16, "x", num_frames=8, temporal=4)


def test_dtypes():
    assert resolve_dtype("bfloat16") is torch.bfloat16 and resolve_dtype(torch.float16) is torch.float16
    assert set(DTYPES) == {"float32", "float16", "bfloat16"}
    with pytest.raises(ValueError, match="float64"):
        resolve_dtype("float64")


# ----------------------------------------------------------------------------------------------- finding adapters
def test_get_adapter_registers_builtins_on_first_lookup(tmp_path, monkeypatch):
    """An unregistered name imports the built-in package once (here a stand-in that registers ``toy_builtin``);
    registered names and ``module:Class`` strings import nothing; a typo names the closest adapter."""
    import flowalign.adapter as core

    (tmp_path / "fake_builtins.py").write_text(
        "from flowalign.adapter import ADAPTERS\nIMPORTS = [1]\n"
        "@ADAPTERS.register('toy_builtin', overwrite=True)\nclass ToyBuiltin:\n    pipeline_class = None\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setattr(core, "BUILTIN_PACKAGE", "fake_builtins")
    monkeypatch.delitem(core.ADAPTERS._items, "toy_builtin", raising=False)
    monkeypatch.delitem(sys.modules, "fake_builtins", raising=False)
    assert get_adapter("sd3").__name__ == "SD3Adapter" and "fake_builtins" not in sys.modules
    assert get_adapter("flowalign.pipelines.flux:FluxAdapter").__name__ == "FluxAdapter"
    assert "fake_builtins" not in sys.modules
    assert get_adapter("toy_builtin").__name__ == "ToyBuiltin" and "fake_builtins" in sys.modules
    with pytest.raises(ValueError, match=r"unknown adapter 'sd33'\. Did you mean 'sd3'\?"):
        get_adapter("sd33")
    core.ADAPTERS._items.pop("toy_builtin")


def test_load_adapter_takes_a_dtype_name_and_config_checks_through_get_adapter():
    a = load_adapter("sd3", tiny.cached("sd3"), torch_dtype="float32", **tiny.RESOLUTION["sd3"])
    assert type(a).__name__ == "SD3Adapter" and a.dtype == torch.float32
    base = {"model": {"adapter": "sd3", "path": "x"}, "sample": {"prompts": ["a"]},
            "reward": {"weights": {"redness": 1.0}}}
    with pytest.raises(ConfigError, match=r"model\.adapter: unknown adapter 'sd33'\. Did you mean 'sd3'\?"):
        load_config({**base, "model": {"adapter": "sd33", "path": "x"}})
    assert load_config(base).model.adapter == "sd3"


# ----------------------------------------------------------------------------------------------- encode_images
class _Captured(Exception):
    def __init__(self, z: torch.Tensor) -> None:
        super().__init__("captured")
        self.z = z


@pytest.mark.parametrize("family", ["sd3", "flux", "sd15", "sdxl", "wan"])
def test_encode_images_inverts_the_decode_latent_transform(family, monkeypatch):
    """The VAE's posterior sample ``z0`` -> ``encode_images`` -> ``decode`` hands the VAE exactly ``z0`` again
    (scaling, shift, latents_mean/std and FLUX packing are undone in the right order)."""
    adapter = tiny_adapter(family)
    x = adapter.init_noise(2, torch.Generator().manual_seed(0))
    vae_shape = adapter.unpack(x).shape if family == "flux" else x.shape
    vae = adapter.pipe.vae
    z0 = torch.randn(vae_shape, generator=torch.Generator().manual_seed(1)).to(vae.dtype)
    seen = {}

    def encode(images, *args, **kwargs):
        seen["images"] = images
        return SimpleNamespace(latent_dist=SimpleNamespace(sample=lambda generator=None: z0))

    def decode(z, *args, **kwargs):
        raise _Captured(z)

    monkeypatch.setattr(vae, "encode", encode)
    monkeypatch.setattr(vae, "decode", decode)
    res = tiny.RESOLUTION[family]
    frames = (res["num_frames"],) if "num_frames" in res else ()
    images = torch.rand(2, *frames, 3, res["height"], res["width"])
    lat = adapter.encode_images(images, torch.Generator().manual_seed(2))
    assert lat.shape == x.shape and lat.dtype == x.dtype
    want_in = (images * 2 - 1).permute(0, 2, 1, 3, 4) if frames else images * 2 - 1  # video: B,C,T,H,W
    torch.testing.assert_close(seen["images"].float(), want_in, atol=0, rtol=0)
    with pytest.raises(_Captured) as got:
        adapter.decode(lat)
    torch.testing.assert_close(got.value.z.float(), z0.float(), atol=1e-5, rtol=1e-5)


class _Toy(Adapter):
    device, dtype = torch.device("cpu"), torch.float32

    def __init__(self, decode_fn) -> None:
        super().__init__(pipe=None)
        self.net, self.decode_fn = nn.Linear(1, 1), decode_fn

    def encode(self, prompts, negative=None):
        return Cond({"e": torch.zeros(len(prompts), 1)})

    def init_noise(self, batch, generator=None):
        return torch.randn(batch, 3, 4, 4, generator=generator)

    def sigmas(self, num_steps):
        return torch.linspace(1, 0, num_steps + 1)

    def predict(self, x, sigma, cond, guidance=1.0):
        return x

    def decode(self, x):
        return self.decode_fn(x)

    def trainable_module(self):
        return self.net


def test_encode_images_default_serves_pixel_space_and_names_other_adapters():
    images = torch.rand(2, 3, 4, 4)
    pixel = _Toy(lambda x: (x.float() / 2 + 0.5).clamp(0, 1))
    torch.testing.assert_close(pixel.encode_images(images), images * 2 - 1, atol=0, rtol=0)
    latent = _Toy(torch.tanh)
    with pytest.raises(NotImplementedError, match="_Toy does not implement encode_images"):
        latent.encode_images(images)
    with pytest.raises(NotImplementedError, match="_Toy wraps no diffusers pipeline"):
        pixel.pipeline_call_kwargs(4.5)


def test_rollouts_record_no_autograd_graph():
    """``sample``/``sample_tree`` are inference: with trainable weights and grad mode on, nothing they return
    carries a graph (a graph would hold every step's activations in memory)."""
    from flowalign.rollout import sample
    from flowalign.tree import sample_tree

    class Trainable(_Toy):
        def predict(self, x, sigma, cond, guidance=1.0):
            return self.net.weight * x  # depends on a parameter with requires_grad

    toy = Trainable(lambda x: (x.float() / 2 + 0.5).clamp(0, 1))
    assert torch.is_grad_enabled() and toy.net.weight.requires_grad
    traj = sample(toy, ["a", "b"], group_size=2, num_steps=3, generator=torch.Generator().manual_seed(0))
    tree = sample_tree(toy, ["a"], num_steps=3, branch_steps=[1], generator=torch.Generator().manual_seed(0))
    for t in (traj.latents, traj.log_probs, traj.images, tree.latents, tree.log_probs):
        assert not t.requires_grad and t.grad_fn is None


def test_shapes_encode_images_is_the_exact_inverse_of_decode():
    from flowalign.pipelines.shapes import ShapesAdapter

    adapter = ShapesAdapter.from_pretrained(ShapesAdapter.default_weights())
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    torch.testing.assert_close(adapter.encode_images(adapter.decode(x)), x, atol=1e-6, rtol=0)


def test_training_noise_tables():
    """``flow_shift``/``ddpm_levels``: what DPO-style methods draw training noise levels from."""
    sd3, sd15 = tiny_adapter("sd3"), tiny_adapter("sd15")
    assert sd3.flow_shift() == sd3.pipe.scheduler.config.shift and sd3.flow_shift() != 1.0
    levels = sd15.ddpm_levels()
    alphas = sd15.pipe.scheduler.alphas_cumprod.double()
    assert levels.dtype == torch.float32 and levels.shape == (sd15.pipe.scheduler.config.num_train_timesteps,)
    torch.testing.assert_close(levels, torch.sqrt(1 - alphas).float(), atol=0, rtol=0)
    toy = _Toy(torch.tanh)
    assert toy.flow_shift() == 1.0
    with pytest.raises(NotImplementedError, match="_Toy has no scheduler with alphas_cumprod"):
        toy.ddpm_levels()


def test_pipeline_call_kwargs_default_and_overrides():
    assert tiny_adapter("sd3").pipeline_call_kwargs(4.5) == {"height": 32, "width": 32, "max_sequence_length": 256,
                                                           "guidance_scale": 4.5}
    flux = tiny_adapter("flux")
    kw = get_adapter("flux")(flux.pipe, height=32, width=32, true_cfg_scale=2.0).pipeline_call_kwargs(3.5)
    assert (kw["true_cfg_scale"], kw["negative_prompt"], kw["guidance_scale"]) == (2.0, "", 3.5)
    assert "guidance_rescale" in tiny_adapter("sdxl").pipeline_call_kwargs(5.0)  # SDXL's own override


# ----------------------------------------------------------------------------------------------- prompts
def test_load_prompts_reads_every_format(tmp_path):
    txt = tmp_path / "p.txt"
    txt.write_text("# a comment\na cat\n\n  a dog  \n")
    assert load_prompts(str(txt)) == (["a cat", "a dog"], [{}, {}])
    jl = tmp_path / "p.jsonl"
    jl.write_text('{"prompt": "two cats", "tag": "counting"}\n\n"a bare string"\n')
    assert load_prompts(jl) == (["two cats", "a bare string"], [{"tag": "counting"}, {}])
    csv_file = tmp_path / "p.csv"
    csv_file.write_text('prompt,tag,n\n"a red, round apple",color,1\nsky,scene,2\n')
    assert load_prompts(str(csv_file)) == (["a red, round apple", "sky"],
                                           [{"tag": "color", "n": "1"}, {"tag": "scene", "n": "2"}])
    assert load_prompts(["x", {"prompt": "y", "k": 1}]) == (["x", "y"], [{}, {"k": 1}])
    assert load_prompts([]) == ([], [])
    assert flowalign.config.load_prompts is load_prompts and flowalign.eval.load_prompts is load_prompts
    assert as_prompt_records(str(csv_file))[0] == {"prompt": "a red, round apple", "tag": "color", "n": "1"}
    assert as_prompt_records("a single prompt") == [{"prompt": "a single prompt"}]


def test_load_prompts_errors_name_the_key(tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("# only a comment\n\n")
    no_col = tmp_path / "no_col.csv"
    no_col.write_text("text,tag\na cat,x\n")
    bad_json = tmp_path / "bad.jsonl"
    bad_json.write_text('{"prompt": "ok"}\n{"prompt": 3}\n')
    cases = [(tmp_path / "missing.txt", r"eval\.prompts='.*missing\.txt': file not found"),
             (empty, r"eval\.prompts='.*empty\.txt': the file holds no prompts"),
             (no_col, r"eval\.prompts: '.*no_col\.csv' has no 'prompt' column"),
             (tmp_path / "p.yaml", r"eval\.prompts='.*p\.yaml': unknown prompt file type '\.yaml'"),
             (bad_json, r"eval\.prompts: line 2 of '.*bad\.jsonl': expected a prompt string")]
    for spec, pattern in cases:
        with pytest.raises(ConfigError, match=pattern):
            load_prompts(str(spec), "eval.prompts")
    with pytest.raises(ConfigError, match=r"sample\.prompts\[1\]"):
        load_prompts(["ok", 3])
