"""Adapters over real diffusers pipelines (tiny random-weight instances built offline by ``pipelines/tiny.py``).

Parity: sampling through an adapter with the deterministic kernel (Euler ODE; DDIM eta=0 for SD1.5) and the
pipeline's seed reproduces the pipeline's own ``__call__`` (latents and decoded images, max abs diff <= 1e-4 fp32,
CFG on). Ratio == 1: recomputing stored SDE log-probs with unchanged weights and a different batch split.
"""

from __future__ import annotations

import copy
import subprocess
import sys

import pytest
import torch

from flowalign.pipelines import ADAPTERS, Adapter, Cond, get_adapter, load_adapter, tiny
from flowalign.rollout import recompute_log_probs, sample
from flowalign.schedules import make_plan

PROMPTS = ["a red circle", "two blue squares left of a green triangle", "x", "three yellow stars"]
N = 10
TOL = 1e-4
# adapter options per test case: FLUX once with embedded guidance only and once with true CFG on top
CASES = {
    "sd3": ("sd3", {}, 4.5),
    "flux": ("flux", {}, 3.5),
    "flux-truecfg": ("flux", {"true_cfg_scale": 2.0}, 3.5),
    "wan": ("wan", {}, 5.0),
    "sd15": ("sd15", {}, 7.5),
}
LATENT_SHAPE = {"sd3": (4, 16, 16), "flux": (64, 16), "wan": (16, 3, 4, 4), "sd15": (4, 16, 16)}
IMAGE_SHAPE = {"sd3": (3, 32, 32), "flux": (3, 32, 32), "wan": (9, 3, 32, 32), "sd15": (3, 32, 32)}


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


@pytest.fixture(scope="module")
def adapters():
    """One adapter per case, loaded through ``from_pretrained`` from the tiny saved folder."""
    out = {}
    for case, (family, kw, _) in CASES.items():
        out[case] = load_adapter(family, tiny.cached(family), **tiny.RESOLUTION[family], **kw)
    return out


def _pipeline_call(adapter: Adapter, case: str, output_type: str, guidance: float) -> torch.Tensor:
    family, kw, _ = CASES[case]
    call = dict(tiny.RESOLUTION[family])
    if "true_cfg_scale" in kw:
        call.update(true_cfg_scale=kw["true_cfg_scale"], negative_prompt="")
    out = adapter.pipe(PROMPTS, num_inference_steps=N, guidance_scale=guidance, output_type=output_type,
                       generator=_gen(0), return_dict=False, **call)[0]
    return out


def _ode_rollout(adapter: Adapter, guidance: float, decode: bool = True):
    kernel = "ddim" if adapter.prediction_type == "epsilon" else "ode"
    return sample(adapter, PROMPTS, num_steps=N, kernel=kernel, noise_level=0.0,
                  plan=make_plan("all", N, fraction=1.0), guidance=guidance, generator=_gen(0), decode=decode)


# -- parity with the pipeline's own __call__ ----------------------------------------------------------------------
@pytest.mark.parametrize("case", list(CASES))
def test_parity_with_pipeline(adapters, case):
    adapter, guidance = adapters[case], CASES[case][2]
    family = CASES[case][0]
    traj = _ode_rollout(adapter, guidance)
    ref_latents = _pipeline_call(adapter, case, "latent", guidance)
    ref_images = _pipeline_call(adapter, case, "pt", guidance)

    final = traj.latents[:, -1]
    assert final.shape == ref_latents.shape == (len(PROMPTS), *LATENT_SHAPE[family])
    assert (final - ref_latents).abs().max().item() <= TOL
    assert traj.images.shape == ref_images.shape == (len(PROMPTS), *IMAGE_SHAPE[family])
    assert (traj.images - ref_images).abs().max().item() <= TOL
    assert 0.0 <= traj.images.min().item() and traj.images.max().item() <= 1.0
    # the comparison is not vacuous: the chain moved, and guidance changed it
    assert (final - traj.latents[:, 0]).abs().max().item() > 0.1
    if case != "flux-truecfg":  # embedded-guidance FLUX: guidance changes the forward, not a CFG branch
        unguided = _ode_rollout(adapter, 1.0, decode=False).latents[:, -1]
        assert (unguided - final).abs().max().item() > 1e-2


@pytest.mark.parametrize("case", ["sd3", "flux", "wan"])
def test_flow_sigmas_equal_scheduler(adapters, case):
    adapter = adapters[case]
    for n in (N, 7):
        adapter.pipe(PROMPTS[:1], num_inference_steps=n, guidance_scale=1.0, output_type="latent",
                     generator=_gen(0), **tiny.RESOLUTION[CASES[case][0]])  # leaves its sigmas on the scheduler
        s = adapter.sigmas(n)
        assert s.shape == (n + 1,) and s.dtype == torch.float32
        torch.testing.assert_close(s, adapter.pipe.scheduler.sigmas.cpu(), rtol=0, atol=0)
        assert s[0].item() == 1.0 and s[-1].item() == 0.0 and bool((s[1:] < s[:-1]).all())


def test_flux_mu_depends_on_resolution(adapters):
    base = adapters["flux"]
    big = get_adapter("flux")(base.pipe, height=64, width=64)
    assert big.image_seq_len == 4 * base.image_seq_len
    # a larger image is shifted towards high noise (FLUX's resolution-dependent mu)
    assert bool((big.sigmas(N)[1:-1] > base.sigmas(N)[1:-1]).all())


def test_sd15_sigmas_are_ddim_levels(adapters):
    adapter = adapters["sd15"]
    sched = adapter.pipe.scheduler
    s = adapter.sigmas(N)
    ts = adapter.timesteps(N)
    alphas = sched.alphas_cumprod.double()
    expected = torch.sqrt(1 - torch.cat([alphas[ts], torch.as_tensor([sched.final_alpha_cumprod]).double()]))
    assert s.dtype == torch.float64 and s.shape == (N + 1,)  # fp64: the ddim kernel rebuilds 1 - sigma^2
    torch.testing.assert_close(s, expected, rtol=0, atol=0)
    # set_alpha_to_one=False (SD1.5): the terminal level is alpha_bar_0's, not 0
    assert s[-1].item() == pytest.approx(float(torch.sqrt(1 - alphas[0])), abs=1e-7) and s[-1].item() > 0
    # every sigma maps back to its own integer timestep
    assert torch.equal(adapter.sigma_to_timestep(s[:-1], N), ts.long())
    assert torch.equal(adapter.sigma_to_timestep(s[:-1].float(), N), ts.long())  # fp32 sigmas map back too
    with pytest.raises(ValueError, match="not a DDPM level"):
        adapter.sigma_to_timestep(torch.tensor(0.5), 1)


def test_sd15_rejects_inconsistent_spacing(adapters):
    from diffusers import DDIMScheduler

    base = adapters["sd15"].pipe
    pipe = type(base)(**{**base.components, "requires_safety_checker": False,
                         "scheduler": DDIMScheduler.from_config(base.scheduler.config, timestep_spacing="linspace")})
    adapter = get_adapter("sd15")(pipe, height=32, width=32)
    with pytest.raises(ValueError, match="timestep_spacing"):
        adapter.sigmas(N)


# -- ratio == 1 for the stochastic kernel ------------------------------------------------------------------------
@pytest.mark.parametrize("case", ["sd3", "flux", "wan", "sd15"])
def test_ratio_one_any_batch_split(adapters, case):
    adapter, guidance = adapters[case], CASES[case][2]
    kernel, level = ("ddim", 1.0) if adapter.prediction_type == "epsilon" else ("flow_sde", 0.7)
    traj = sample(adapter, PROMPTS[:3], group_size=2, num_steps=4, kernel=kernel, noise_level=level,
                  guidance=guidance, generator=_gen(1), batch_size=4, decode=False)
    trained = traj.train_mask
    assert bool((traj.log_probs[:, trained] != 0).all())
    for batch_size in (None, 1, 5):
        new = recompute_log_probs(adapter, traj, batch_size=batch_size)
        ratio = torch.exp(new - traj.log_probs)
        assert (ratio - 1).abs().max().item() <= 1e-6


# -- contract details -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("case", ["sd3", "flux", "wan", "sd15"])
def test_shapes_and_predict(adapters, case):
    adapter, family = adapters[case], CASES[case][0]
    x = adapter.init_noise(3, _gen(2))
    assert x.shape == (3, *LATENT_SHAPE[family])
    # init_noise is the pipeline's draw: the same generator gives the same tensor
    assert torch.equal(x, adapter.init_noise(3, _gen(2)))
    cond = adapter.encode(PROMPTS[:3], negative="")
    s = adapter.sigmas(N)[2]
    out = adapter.predict(x, s, cond, CASES[case][2])
    assert out.shape == x.shape and out.std().item() > 1e-3
    # a per-sample [B] sigma is the same as the scalar
    torch.testing.assert_close(adapter.predict(x, s.expand(3).clone(), cond, CASES[case][2]), out, rtol=0,
                               atol=1e-6)
    with pytest.raises(ValueError, match="sigma"):
        adapter.predict(x, torch.stack([s, s]), cond, CASES[case][2])
    images = adapter.decode(x)
    assert images.shape == (3, *IMAGE_SHAPE[family])
    assert images.min().item() >= 0.0 and images.max().item() <= 1.0
    assert adapter.trainable_module() is (adapter.pipe.unet if family == "sd15" else adapter.pipe.transformer)


@pytest.mark.parametrize("case", ["sd3", "wan", "sd15"])
def test_cfg_needs_uncond(adapters, case):
    adapter = adapters[case]
    x = adapter.init_noise(1, _gen(0))
    cond = adapter.encode(PROMPTS[:1])
    assert cond.uncond is None
    with pytest.raises(ValueError, match="negative"):
        adapter.predict(x, adapter.sigmas(N)[0], cond, 4.0)


def test_encode_cache(adapters):
    adapter = adapters["sd3"]
    adapter.clear_encode_cache()
    calls = []
    hook = adapter.pipe.text_encoder_3.register_forward_hook(lambda *a: calls.append(1))
    try:
        a = adapter.encode(PROMPTS, negative="")
        n = len(calls)
        b = adapter.encode(list(PROMPTS), negative=[""] * len(PROMPTS))
        assert b is a and len(calls) == n  # cached: keyed by the prompt tuples
        c = adapter.encode(PROMPTS)
        assert c is not a and c.uncond is None and len(calls) > n
        torch.testing.assert_close(c.kwargs["encoder_hidden_states"], a.kwargs["encoder_hidden_states"])
        adapter.clear_encode_cache()
        assert adapter.encode(PROMPTS, negative="") is not a
    finally:
        hook.remove()
    with pytest.raises(ValueError, match="negative"):
        adapter.encode(PROMPTS, negative=["", ""])


def test_flux_true_cfg_encodes_negative_only_when_used(adapters):
    assert adapters["flux"].encode(PROMPTS[:2], negative="").uncond is None
    cond = adapters["flux-truecfg"].encode(PROMPTS[:2])
    assert cond.uncond is not None and isinstance(cond, Cond)
    assert cond.extra["txt_ids"].shape[-1] == 3


@pytest.mark.parametrize("family", ["sd3", "flux", "wan", "sd15"])
def test_lora_targets_exist(adapters, family):
    from peft import LoraConfig, inject_adapter_in_model

    cls = get_adapter(family)
    module = copy.deepcopy(adapters[family].trainable_module())
    cfg = LoraConfig(r=cls.lora_rank, lora_alpha=cls.lora_alpha, target_modules=cls.lora_target_modules)
    module = inject_adapter_in_model(cfg, module)
    wrapped = {name.rsplit(".lora_A", 1)[0] for name, _ in module.named_modules() if name.endswith("lora_A")}
    assert wrapped
    suffixes = {t for t in cls.lora_target_modules if any(w.endswith(t) for w in wrapped)}
    assert {"to_q", "to_k", "to_v", "to_out.0"} <= suffixes
    if family == "flux":
        assert {"ff.net.0.proj", "ff.net.2", "ff_context.net.0.proj", "ff_context.net.2", "add_q_proj"} <= suffixes


def test_registry_and_loading_errors(adapters, tmp_path):
    assert {"sd3", "flux", "wan", "sd15"} <= set(ADAPTERS.names())
    assert get_adapter("sd3").pipeline_class.__name__ == "StableDiffusion3Pipeline"
    assert get_adapter("sd15").prediction_type == "epsilon" and get_adapter("sd15").default_kernel == "ddim"
    assert (get_adapter("flux").lora_rank, get_adapter("flux").lora_alpha) == (64, 128)
    with pytest.raises(ValueError, match="unknown adapter"):
        get_adapter("sdxl-turbo")
    with pytest.raises(ValueError, match="family"):
        tiny.build("no-such-family", tmp_path)
    with pytest.raises(ValueError, match="multiples"):
        load_adapter("flux", tiny.cached("flux"), height=30, width=32)
    for adapter in adapters.values():
        with pytest.raises(ValueError, match="num_steps"):
            adapter.sigmas(0)


def test_cached_builds_once(tmp_path, monkeypatch):
    monkeypatch.setenv("FLOWALIGN_CACHE", str(tmp_path))
    path = tiny.cached("sd3")
    stamp = (tmp_path / "tiny" / f"sd3-v{tiny.VERSION}" / "model_index.json").stat().st_mtime_ns
    assert tiny.cached("sd3") == path
    assert (tmp_path / "tiny" / f"sd3-v{tiny.VERSION}" / "model_index.json").stat().st_mtime_ns == stamp
    assert sorted(p.name for p in (tmp_path / "tiny").iterdir()) == [f"sd3-v{tiny.VERSION}"]  # no temp left


# -- scheduler swaps and Wan 2.2 layouts --------------------------------------------------------------------------
def test_wan_unipc_is_swapped_for_flow_euler(adapters):
    from diffusers import FlowMatchEulerDiscreteScheduler, UniPCMultistepScheduler

    unipc = UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=3.0)
    pipe = type(adapters["wan"].pipe)(**{**adapters["wan"].pipe.components, "scheduler": unipc})
    adapter = get_adapter("wan")(pipe, **tiny.RESOLUTION["wan"])
    assert isinstance(pipe.scheduler, FlowMatchEulerDiscreteScheduler) and pipe.scheduler.config.shift == 3.0
    torch.testing.assert_close(adapter.sigmas(N), adapters["wan"].sigmas(N))


def test_sd15_pndm_is_swapped_for_ddim(adapters):
    from diffusers import DDIMScheduler, PNDMScheduler

    base = adapters["sd15"].pipe
    pipe = type(base)(**{**base.components, "requires_safety_checker": False,
                         "scheduler": PNDMScheduler.from_config(base.scheduler.config)})
    adapter = get_adapter("sd15")(pipe, height=32, width=32)
    assert isinstance(pipe.scheduler, DDIMScheduler)
    torch.testing.assert_close(adapter.sigmas(N), adapters["sd15"].sigmas(N))


@pytest.mark.parametrize("layout", ["two_experts", "expand_timesteps"])
def test_wan22_layouts_match_pipeline(adapters, layout):
    from diffusers import WanPipeline

    base = adapters["wan"].pipe
    parts = dict(base.components)
    if layout == "two_experts":  # Wan 2.2 A14B: a second (low-noise) transformer below the boundary
        second = copy.deepcopy(base.transformer)
        with torch.no_grad():
            for p in second.parameters():
                p.add_(0.05 * torch.randn(p.shape, generator=_gen(3)))
        parts.update(transformer_2=second, boundary_ratio=0.6)
    else:  # Wan 2.2 TI2V: one timestep per latent patch
        parts.update(expand_timesteps=True)
    pipe = WanPipeline(**parts)
    pipe.set_progress_bar_config(disable=True)
    g2 = {"guidance_scale_2": 2.0} if layout == "two_experts" else {}
    adapter = get_adapter("wan")(pipe, guidance_2=g2.get("guidance_scale_2"), **tiny.RESOLUTION["wan"])
    traj = sample(adapter, PROMPTS[:2], num_steps=6, kernel="ode", noise_level=0.0,
                  plan=make_plan("all", 6, fraction=1.0), guidance=5.0, generator=_gen(0), decode=False)
    ref = pipe(PROMPTS[:2], num_inference_steps=6, guidance_scale=5.0, output_type="latent", generator=_gen(0),
               return_dict=False, **g2, **tiny.RESOLUTION["wan"])[0]
    assert (traj.latents[:, -1] - ref).abs().max().item() <= TOL
    if layout == "two_experts":  # the low-noise expert really took over below the boundary
        single = sample(adapters["wan"], PROMPTS[:2], num_steps=6, kernel="ode", noise_level=0.0,
                        plan=make_plan("all", 6, fraction=1.0), guidance=5.0, generator=_gen(0), decode=False)
        assert (single.latents[:, -1] - traj.latents[:, -1]).abs().max().item() > 1e-2


def test_family_missing_from_installed_diffusers_is_reported_not_fatal():
    """An older diffusers without ZImagePipeline still imports flowalign.pipelines; asking for the family says why."""
    code = ("import sys; sys.modules['diffusers.pipelines.z_image'] = None\n"
            "import flowalign.pipelines as P\n"
            "assert 'sd3' in P.ADAPTERS and 'zimage' not in P.ADAPTERS\n"
            "try:\n    P.get_adapter('zimage')\nexcept ValueError as e:\n    print(e)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "adapter 'zimage' is not available here" in out.stdout and "pip install -U diffusers" in out.stdout
