"""Toy adapters for tests: real ``Adapter`` subclasses with no diffusers and no weights to download.

* ``GaussianMixtureAdapter`` -- the *exact* denoiser of a ``D``-dim Gaussian mixture with diagonal covariances.
  With ``x_t = alpha x_0 + sigma eps`` (flow matching: ``alpha = 1 - sigma``; DDPM: ``alpha = sqrt(1 - sigma^2)``)
  every component ``k`` gives ``x_t | k ~ N(alpha mu_k, V_k)``, ``V_k = alpha^2 s_k^2 + sigma^2`` (per dim), so

      w_k(x) = softmax_k[log pi_k + log N(x; alpha mu_k, V_k)]
      E[x_0 | x, k] = mu_k + alpha s_k^2 / V_k (x - alpha mu_k),   E[eps | x, k] = sigma / V_k (x - alpha mu_k)

  and the network outputs are the posterior means: velocity ``v = E[eps - x_0 | x]`` ("flow", Lipman et al. 2023;
  Liu et al. 2023) or ``eps_hat = E[eps | x]`` ("epsilon", Ho et al. 2020). A prompt shifts the whole mixture by a
  fixed offset ``c(prompt)``; the negative (CFG) branch has offset 0. Computed in float64, element-wise per row, so
  the output does not depend on the batch split.
* ``TinyFlowAdapter`` -- a small learnable model: an MLP velocity (or epsilon) ``net(x, sigma, emb)`` conditioned on a
  hashed bag-of-words prompt embedding, with ``encode / init_noise / sigmas / predict (CFG) / decode /
  trainable_module`` and ``save_pretrained`` / ``from_pretrained`` (safetensors + config.json), so trainer and method
  tests can use it without diffusers. Registered as adapter ``"toy_mlp"`` (and ``"toy_gmm"``).
"""

from __future__ import annotations

import json
import math
import zlib
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import Tensor, nn

from flowalign.adapter import ADAPTERS, Adapter, Cond

PREDICTION_TYPES = ("flow", "epsilon")


def _check_prediction_type(prediction_type: str) -> None:
    if prediction_type not in PREDICTION_TYPES:
        raise ValueError(f"prediction_type={prediction_type!r} is not allowed. Allowed: {', '.join(PREDICTION_TYPES)}")


def _prompt_generator(prompt: str) -> torch.Generator:
    """A generator seeded from the prompt text (crc32; stable across processes, unlike ``hash``)."""
    return torch.Generator().manual_seed(zlib.crc32(prompt.encode()))


def flow_sigmas(num_steps: int, shift: float = 1.0) -> Tensor:
    """``linspace(1, 0, N+1)`` through the SD3 time shift ``s t / (1 + (s - 1) t)`` (diffusers
    ``FlowMatchEulerDiscreteScheduler``, ``shift``; DanceGRPO ``sd3_time_shift``)."""
    if not isinstance(num_steps, int) or num_steps < 1:
        raise ValueError(f"num_steps must be a positive integer, got {num_steps!r}")
    t = torch.linspace(1.0, 0.0, num_steps + 1, dtype=torch.float64)
    return (shift * t / (1 + (shift - 1) * t)).float()


def ddim_sigmas(num_steps: int, num_train_timesteps: int = 1000, beta_start: float = 0.00085,
                beta_end: float = 0.012) -> Tensor:
    """``sqrt(1 - alpha_bar)`` at DDIM "leading" timesteps of SD's scaled-linear DDPM schedule, ending at
    ``alpha_bar = 1`` (``set_alpha_to_one``): the ``sigma`` slot of the ``ddim`` kernel (see ``flowalign.sde``)."""
    if not isinstance(num_steps, int) or not 1 <= num_steps <= num_train_timesteps:
        raise ValueError(f"num_steps must be an integer in [1, {num_train_timesteps}], got {num_steps!r}")
    betas = torch.linspace(beta_start**0.5, beta_end**0.5, num_train_timesteps, dtype=torch.float64) ** 2
    alpha_bar = torch.cumprod(1.0 - betas, 0)
    ts = torch.arange(num_steps - 1, -1, -1) * (num_train_timesteps // num_steps)
    ab = torch.cat([alpha_bar[ts], torch.ones(1, dtype=torch.float64)])
    return torch.sqrt(1.0 - ab).float()


def _sigma64(sigma, batch: int, device=None) -> Tensor:
    """A scalar or ``[batch]`` sigma as float64 ``[batch]`` (``Adapter.expand_sigma`` would round it to fp32)."""
    s = torch.as_tensor(sigma, dtype=torch.float64, device=device)
    if s.ndim == 0:
        return s.expand(batch)
    if s.shape != (batch,):
        raise ValueError(f"sigma must be a scalar or have shape [batch]=[{batch}], got {tuple(s.shape)}")
    return s


def _alpha(sigma: Tensor, prediction_type: str) -> Tensor:
    return 1.0 - sigma if prediction_type == "flow" else torch.sqrt((1.0 - sigma**2).clamp_min(0.0))


class _Holder(nn.Module):
    """Keeps the mixture parameters as buffers so ``trainable_module()`` has a device and dtype like a real model."""

    def __init__(self, means: Tensor, stds: Tensor, log_weights: Tensor) -> None:
        super().__init__()
        self.register_buffer("means", means)
        self.register_buffer("stds", stds)
        self.register_buffer("log_weights", log_weights)

    @property
    def device(self) -> torch.device:
        return self.means.device

    @property
    def dtype(self) -> torch.dtype:
        return torch.float32


@ADAPTERS.register("toy_gmm", overwrite=True)
class GaussianMixtureAdapter(Adapter):
    """Exact posterior-mean denoiser of a diagonal Gaussian mixture (see module docstring).

    ``means``/``stds``: ``[K, D]``; ``weights``: ``[K]`` (normalised here). Latents are ``[B, D]`` in
    ``latent_dtype``; predictions are returned in ``out_dtype``. ``decode`` maps a point to a ``1 x 1 x D``
    "image" ``sigmoid(x)``. ``calls`` / ``rows`` count ``predict`` calls and evaluated rows (CFG counts once).
    """

    def __init__(self, means, stds, weights=None, prediction_type: str = "flow", prompt_offset: float = 0.0,
                 shift: float = 1.0, latent_dtype: torch.dtype = torch.float32,
                 out_dtype: torch.dtype = torch.float32) -> None:
        super().__init__(pipe=None)
        _check_prediction_type(prediction_type)
        means = torch.as_tensor(means, dtype=torch.float64)
        stds = torch.as_tensor(stds, dtype=torch.float64).expand_as(means).clone()
        weights = torch.ones(means.shape[0], dtype=torch.float64) if weights is None else \
            torch.as_tensor(weights, dtype=torch.float64)
        if means.ndim != 2 or weights.shape != (means.shape[0],) or (stds <= 0).any() or (weights <= 0).any():
            raise ValueError("means must be [K, D], stds > 0 broadcastable to it, weights > 0 of shape [K]")
        self.holder = _Holder(means, stds, torch.log(weights / weights.sum()))
        self.prediction_type = prediction_type
        self.default_kernel = "flow_sde" if prediction_type == "flow" else "ddim"
        self.prompt_offset, self.shift = float(prompt_offset), float(shift)
        self.latent_dtype, self.out_dtype = latent_dtype, out_dtype
        self.calls = self.rows = 0

    @classmethod
    def default(cls, **kwargs) -> GaussianMixtureAdapter:
        """A fixed, well-separated, anisotropic 3-component mixture in 2-D."""
        return cls(means=[[-2.0, 0.5], [1.5, 1.5], [1.0, -2.0]], stds=[[0.5, 0.3], [0.3, 0.6], [0.4, 0.4]],
                   weights=[0.5, 0.3, 0.2], **kwargs)

    @property
    def dim(self) -> int:
        return self.holder.means.shape[1]

    # -- ground truth -------------------------------------------------------------------------------
    def offset(self, prompt: str) -> Tensor:
        """The prompt's shift of the data distribution, ``prompt_offset * N(0, I)`` seeded by the text."""
        if not self.prompt_offset or not prompt:
            return torch.zeros(self.dim, dtype=torch.float64)
        return self.prompt_offset * torch.randn(self.dim, generator=_prompt_generator(prompt), dtype=torch.float64)

    def data_mean(self, prompt: str = "") -> Tensor:
        """``E[x_0] = sum_k pi_k mu_k + c``."""
        w = self.holder.log_weights.exp()
        return w @ self.holder.means + self.offset(prompt)

    def data_cov(self) -> Tensor:
        """``Cov[x_0] = sum_k pi_k (diag s_k^2 + mu_k mu_k^T) - m m^T``."""
        w, mu, s = self.holder.log_weights.exp(), self.holder.means, self.holder.stds
        m = w @ mu
        second = torch.einsum("k,ki,kj->ij", w, mu, mu) + torch.diag(w @ s**2)
        return second - torch.outer(m, m)

    def sample_data(self, n: int, generator: torch.Generator | None = None, prompt: str = "") -> Tensor:
        """``n`` exact draws of ``x_0`` (float64)."""
        k = torch.multinomial(self.holder.log_weights.exp(), n, replacement=True, generator=generator)
        z = torch.randn(n, self.dim, generator=generator, dtype=torch.float64)
        return self.holder.means[k] + self.holder.stds[k] * z + self.offset(prompt)

    def posterior(self, x: Tensor, sigma) -> tuple[Tensor, Tensor]:
        """``(E[x_0 | x_t], E[eps | x_t])`` for the offset-free mixture, float64 ``[B, D]`` each."""
        x0, eps = self._posterior_t(x.double().T.contiguous(), sigma)
        return x0.T, eps.T

    def _posterior_t(self, xt: Tensor, sigma) -> tuple[Tensor, Tensor]:
        # layout [K, D, B]: every op runs over contiguous batch vectors (ops over a tiny last dim are slow on CPU)
        s = _sigma64(sigma, xt.shape[1], xt.device)  # [B]
        a = _alpha(s, self.prediction_type)
        mu, sd = self.holder.means[..., None], self.holder.stds[..., None]  # [K, D, 1]
        var = a**2 * sd**2 + s**2  # [K, D, B]
        r = xt - a * mu
        log_n = -0.5 * (r**2 / var + torch.log(2 * math.pi * var)).sum(1)  # [K, B]
        w = torch.softmax(self.holder.log_weights[:, None] + log_n, dim=0)[:, None]  # [K, 1, B]
        x0 = (w * (mu + a * sd**2 / var * r)).sum(0)  # [D, B]
        eps = (w * (s / var * r)).sum(0)
        return x0, eps

    # -- the adapter contract ------------------------------------------------------------------------
    def encode(self, prompts: Sequence[str], negative: Sequence[str] | str | None = None) -> Cond:
        prompts = self.check_prompts(prompts)
        off = torch.stack([self.offset(p) for p in prompts])
        uncond = None
        if negative is not None:
            neg = [negative] * len(prompts) if isinstance(negative, str) else list(negative)
            uncond = {"offset": torch.stack([self.offset(p) for p in neg])}
        return Cond({"offset": off}, uncond)

    def init_noise(self, batch: int, generator: torch.Generator | None = None) -> Tensor:
        return torch.randn(batch, self.dim, generator=generator).to(self.latent_dtype)

    def sigmas(self, num_steps: int) -> Tensor:
        return flow_sigmas(num_steps, self.shift) if self.prediction_type == "flow" else ddim_sigmas(num_steps)

    def _predict_one(self, x: Tensor, sigma, offset: Tensor) -> Tensor:
        s = _sigma64(sigma, x.shape[0], x.device)
        c = offset.double().T  # [D, B]
        x0, eps = self._posterior_t(x.double().T - _alpha(s, self.prediction_type) * c, sigma)  # x_t - alpha c
        out = eps - (x0 + c) if self.prediction_type == "flow" else eps
        return out.T.contiguous()

    def predict(self, x: Tensor, sigma, cond: Cond, guidance: float = 1.0) -> Tensor:
        self.calls += 1
        self.rows += x.shape[0]
        out = self._predict_one(x, sigma, cond.kwargs["offset"])
        if guidance != 1.0:
            if cond.uncond is None:
                raise ValueError("guidance != 1 needs cond.uncond (encode with negative=...)")
            out = self.cfg_combine(self._predict_one(x, sigma, cond.uncond["offset"]), out, guidance)
        return out.to(self.out_dtype)

    def decode(self, x: Tensor) -> Tensor:
        return torch.sigmoid(x.float()).view(x.shape[0], 1, 1, -1)

    def trainable_module(self) -> nn.Module:
        return self.holder


# ------------------------------------------------------------------------------------------ learnable toy
class TextEncoder(nn.Module):
    """Hashed bag-of-words embedding (a frozen stand-in for a text encoder)."""

    def __init__(self, vocab: int = 257, dim: int = 16) -> None:
        super().__init__()
        self.vocab = vocab
        self.embed = nn.Embedding(vocab, dim)

    def forward(self, prompts: Sequence[str]) -> Tensor:
        ids = [torch.tensor([zlib.crc32(w.encode()) % self.vocab for w in p.split()] or [0]) for p in prompts]
        return torch.stack([self.embed(i).mean(0) for i in ids])


class VelocityMLP(nn.Module):
    """``out = fc_out(silu(fc_hidden(silu(fc_in([x, emb, sin/cos(sigma)])))))`` applied to the flattened latent."""

    def __init__(self, latent_dim: int, emb_dim: int = 16, hidden: int = 64, n_freq: int = 4) -> None:
        super().__init__()
        self.n_freq = n_freq
        self.fc_in = nn.Linear(latent_dim + emb_dim + 2 * n_freq, hidden)
        self.fc_hidden = nn.Linear(hidden, hidden)
        self.fc_out = nn.Linear(hidden, latent_dim)

    @property
    def device(self) -> torch.device:
        return self.fc_in.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.fc_in.weight.dtype

    def forward(self, x: Tensor, sigma: Tensor, emb: Tensor) -> Tensor:
        freqs = torch.arange(1, self.n_freq + 1, device=x.device, dtype=self.dtype) * math.pi
        s = sigma.to(self.dtype)[:, None] * freqs
        h = torch.cat([x.flatten(1).to(self.dtype), emb.to(self.dtype), torch.sin(s), torch.cos(s)], dim=1)
        h = nn.functional.silu(self.fc_in(h))
        h = nn.functional.silu(self.fc_hidden(h))
        return self.fc_out(h).view_as(x)


@ADAPTERS.register("toy_mlp", overwrite=True)
class TinyFlowAdapter(Adapter):
    """A learnable toy: MLP denoiser over latents ``latent_shape`` (default ``3 x 4 x 4``), images ``sigmoid(x)``.

    Build with ``TinyFlowAdapter.build(seed=...)``; ``save_pretrained`` / ``from_pretrained`` round-trip it.
    The outputs are returned in the network's dtype (bf16 weights give bf16 predictions, as a real model does).
    """

    lora_target_modules = ["fc_in", "fc_hidden", "fc_out"]
    lora_rank = 4
    lora_alpha = 8

    def __init__(self, net: VelocityMLP, text: TextEncoder, latent_shape: Sequence[int] = (3, 4, 4),
                 prediction_type: str = "flow", shift: float = 1.0) -> None:
        super().__init__(pipe=None)
        _check_prediction_type(prediction_type)
        self.net, self.text = net, text
        self.latent_shape = tuple(int(d) for d in latent_shape)
        self.prediction_type = prediction_type
        self.default_kernel = "flow_sde" if prediction_type == "flow" else "ddim"
        self.shift = float(shift)
        self.calls = self.rows = 0

    @classmethod
    def build(cls, seed: int = 0, latent_shape: Sequence[int] = (3, 4, 4), hidden: int = 64, emb_dim: int = 16,
              prediction_type: str = "flow", shift: float = 1.0, dtype: torch.dtype = torch.float32
              ) -> TinyFlowAdapter:
        """Random weights from ``seed`` (the global RNG is left untouched)."""
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            text = TextEncoder(dim=emb_dim)
            net = VelocityMLP(math.prod(latent_shape), emb_dim=emb_dim, hidden=hidden)
        text.requires_grad_(False)
        return cls(net.to(dtype), text.to(dtype), latent_shape, prediction_type, shift)

    def config(self) -> dict:
        return {"latent_shape": list(self.latent_shape), "prediction_type": self.prediction_type,
                "shift": self.shift, "hidden": self.net.fc_hidden.in_features,
                "emb_dim": self.text.embed.embedding_dim}

    def save_pretrained(self, path: str | Path) -> Path:
        from safetensors.torch import save_file

        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        tensors = {f"net.{k}": v for k, v in self.net.state_dict().items()}
        tensors.update({f"text.{k}": v for k, v in self.text.state_dict().items()})
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(path / "model.safetensors"))
        (path / "config.json").write_text(json.dumps(self.config()))
        return path

    @classmethod
    def from_pretrained(cls, path_or_repo_id: str, torch_dtype: torch.dtype = torch.float32,
                        device: str | torch.device = "cpu", **kwargs) -> TinyFlowAdapter:
        from safetensors.torch import load_file

        path = Path(path_or_repo_id)
        cfg = json.loads((path / "config.json").read_text())
        cfg.update(kwargs)
        adapter = cls.build(latent_shape=cfg["latent_shape"], hidden=cfg["hidden"], emb_dim=cfg["emb_dim"],
                            prediction_type=cfg["prediction_type"], shift=cfg["shift"])
        state = load_file(str(path / "model.safetensors"))
        adapter.net.load_state_dict({k[4:]: v for k, v in state.items() if k.startswith("net.")})
        adapter.text.load_state_dict({k[5:]: v for k, v in state.items() if k.startswith("text.")})
        adapter.net.to(device=device, dtype=torch_dtype)
        adapter.text.to(device=device, dtype=torch_dtype)
        return adapter

    # -- the adapter contract ------------------------------------------------------------------------
    @torch.no_grad()
    def encode(self, prompts: Sequence[str], negative: Sequence[str] | str | None = None) -> Cond:
        def fn(p, n):
            return Cond({"emb": self.text(list(p))}, None if n is None else {"emb": self.text(list(n))})

        return self.cached_encode(prompts, negative, fn)

    def init_noise(self, batch: int, generator: torch.Generator | None = None) -> Tensor:
        return torch.randn((batch, *self.latent_shape), generator=generator).to(device=self.device,
                                                                                dtype=self.dtype)

    def sigmas(self, num_steps: int) -> Tensor:
        return flow_sigmas(num_steps, self.shift) if self.prediction_type == "flow" else ddim_sigmas(num_steps)

    def predict(self, x: Tensor, sigma, cond: Cond, guidance: float = 1.0) -> Tensor:
        self.calls += 1
        self.rows += x.shape[0]
        s = self.expand_sigma(sigma, x.shape[0], x.device)
        if guidance == 1.0:
            return self.net(x, s, cond.kwargs["emb"])
        if cond.uncond is None:
            raise ValueError("guidance != 1 needs cond.uncond (encode with negative=...)")
        both = self.net(torch.cat([x, x]), torch.cat([s, s]), torch.cat([cond.uncond["emb"], cond.kwargs["emb"]]))
        out_u, out_c = both.chunk(2)
        return self.cfg_combine(out_u, out_c, guidance)

    def decode(self, x: Tensor) -> Tensor:
        return torch.sigmoid(x.float())

    def trainable_module(self) -> nn.Module:
        return self.net
