"""Step kernels (flowalign.sde): formulas against the peers' code, exact log-densities, sampling statistics,
marginal preservation on closed-form toys, and early errors for bad input.

Marginal preservation is checked twice:
* exactly, without sampling: on Gaussian data the exact posterior-mean denoiser is affine, so every kernel's chain is
  a linear-Gaussian recursion whose terminal mean/variance we compute in float64 from the kernel itself;
* by sampling (slow): a 2-D Gaussian mixture with its closed-form velocity field (``tests.toy``), 20,000 chains,
  terminal mean and covariance against the mixture's within 3 standard errors.
"""

from __future__ import annotations

import math

import pytest
import torch

from flowalign import sde
from flowalign.adapter import Cond
from flowalign.rewards.base import check_images
from flowalign.rollout import sample
from flowalign.schedules import make_plan
from tests.toy import GaussianMixtureAdapter, flow_sigmas

torch.set_num_threads(1)

# (kernel, noise level, sigma, sigma_next): flow kernels on the flow convention, ddim on sqrt(1 - alpha_bar)
STOCHASTIC = [("flow_sde", 0.7, 0.5, 0.45), ("cps", 0.8, 0.5, 0.45), ("dance", 0.3, 0.5, 0.45),
              ("ddim", 1.0, 0.8, 0.6)]


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def rand(*shape, seed: int = 0, dtype=torch.float32) -> torch.Tensor:
    return torch.randn(*shape, generator=gen(seed), dtype=dtype)


# ------------------------------------------------------------------------------------- formulas vs peers
def test_flow_sde_with_zero_noise_is_the_euler_step():
    x, v = rand(4, 3, 5, 5, seed=1), rand(4, 3, 5, 5, seed=2)
    for s, s_next in [(1.0, 0.9), (0.63, 0.41), (0.05, 0.0)]:  # incl. the sigma == 1 guard and the terminal step
        st = sde.step("flow_sde", x, v, s, s_next, 0.0, generator=gen())
        assert torch.equal(st.x_next, x + v * (torch.tensor(s_next) - torch.tensor(s)))  # fp32 dt, bitwise
        assert torch.equal(st.mean, st.x_next) and (st.std == 0).all() and (st.log_prob == 0).all()
        ode = sde.step("ode", x, v, s, s_next, 0.7, generator=gen())  # ode ignores the noise level
        assert torch.equal(ode.x_next, st.x_next) and (ode.log_prob == 0).all()
    for kind in ["cps", "dance"]:  # the other flow kernels also reduce to Euler without noise
        st = sde.step(kind, x, v, 0.63, 0.41, 0.0, generator=gen())
        torch.testing.assert_close(st.x_next, x + v * (0.41 - 0.63), rtol=0, atol=2e-6)


def _flow_grpo_sde(x, v, sigma, sigma_next, sigma_max, a):
    """flow_grpo ``sde_step_with_logprob`` (sde_type='sde'), written as there (expanded form)."""
    dt = sigma_next - sigma
    std_dev_t = math.sqrt(sigma / (1 - (sigma_max if sigma == 1 else sigma))) * a
    mean = x * (1 + std_dev_t**2 / (2 * sigma) * dt) + v * (1 + std_dev_t**2 * (1 - sigma) / (2 * sigma)) * dt
    return mean, std_dev_t * math.sqrt(-dt)


def _flow_grpo_cps(x, v, sigma, sigma_next, a):
    """flow_grpo ``sde_type='cps'``."""
    std = sigma_next * math.sin(a * math.pi / 2)
    x0, eps = x - sigma * v, x + v * (1 - sigma)
    return x0 * (1 - sigma_next) + eps * math.sqrt(sigma_next**2 - std**2), std


def _dance_grpo(x, v, sigma, sigma_next, eta):
    """DanceGRPO ``flux_step`` (``train_grpo_flux.py``)."""
    dsigma = sigma_next - sigma
    x0 = x - sigma * v
    score = -(x - x0 * (1 - sigma)) / sigma**2
    mean = x + dsigma * v + (-0.5 * eta**2 * score) * dsigma
    return mean, eta * math.sqrt(sigma - sigma_next)


@pytest.mark.parametrize("s, s_next", [(1.0, 0.96), (0.7, 0.6), (0.1, 0.0)])
def test_flow_kernels_match_the_peers_expressions(s, s_next):
    x, v = rand(3, 4, 6, dtype=torch.float64, seed=3), rand(3, 4, 6, dtype=torch.float64, seed=4)
    mean, std = sde.mean_std("flow_sde", x, v, s, s_next, 0.7)
    ref_mean, ref_std = _flow_grpo_sde(x, v, s, s_next, sigma_max=s_next, a=0.7)  # sigma_max = sigmas[1]
    torch.testing.assert_close(mean, ref_mean, rtol=0, atol=1e-12)
    assert torch.allclose(std, torch.full_like(std, ref_std), rtol=0, atol=1e-12)
    mean, std = sde.mean_std("cps", x, v, s, s_next, 0.8)
    ref_mean, ref_std = _flow_grpo_cps(x, v, s, s_next, 0.8)
    torch.testing.assert_close(mean, ref_mean, rtol=0, atol=1e-12)
    assert torch.allclose(std, torch.full_like(std, ref_std), rtol=0, atol=1e-12)
    mean, std = sde.mean_std("dance", x, v, s, s_next, 0.3)
    ref_mean, ref_std = _dance_grpo(x, v, s, s_next, 0.3)
    torch.testing.assert_close(mean, ref_mean, rtol=0, atol=1e-12)
    assert torch.allclose(std, torch.full_like(std, ref_std), rtol=0, atol=1e-12)


@pytest.mark.parametrize("eta", [0.0, 0.5, 1.0])
def test_ddim_kernel_matches_diffusers_ddim_scheduler(eta):
    """DDPO's ``ddim_step_with_logprob`` is diffusers' ``DDIMScheduler.step`` with the log-prob added."""
    from diffusers import DDIMScheduler

    sched = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                          set_alpha_to_one=False, steps_offset=1)
    sched.set_timesteps(10)
    ac = sched.alphas_cumprod.double()
    x, eps, noise = rand(2, 4, 8, 8, seed=5), rand(2, 4, 8, 8, seed=6), rand(2, 4, 8, 8, seed=7)
    for t in sched.timesteps.tolist():
        prev = t - sched.config.num_train_timesteps // 10
        ab, ab_prev = ac[t], (ac[prev] if prev >= 0 else torch.as_tensor(sched.final_alpha_cumprod).double())
        ref = sched.step(eps, t, x, eta=eta, variance_noise=noise).prev_sample
        st = sde.step("ddim", x, eps, math.sqrt(1 - ab), math.sqrt(1 - ab_prev), eta, noise=noise)
        torch.testing.assert_close(st.x_next, ref, rtol=0, atol=2e-5)


def _ddpo_ddim_step_fp64(x, eps, noise, ab, ab_prev, eta):
    """DDPO ``ddim_step_with_logprob`` (kvablack/ddpo-pytorch ``diffusers_patch/ddim_with_logprob.py``) re-typed
    in float64 on the scheduler's own ``alphas_cumprod``: the ground truth for the kernel's next latents."""
    x, eps, noise = x.double(), eps.double(), noise.double()
    x0 = (x - (1 - ab) ** 0.5 * eps) / ab**0.5
    variance = (1 - ab_prev) / (1 - ab) * (1 - ab / ab_prev)
    std = eta * variance**0.5
    mean = ab_prev**0.5 * x0 + (1 - ab_prev - std**2) ** 0.5 * eps
    return mean + std * noise


@pytest.mark.parametrize("t", [901, 941, 981])
def test_ddim_next_latents_match_fp64_ddpo_step_where_alpha_bar_is_small(t):
    """Where ``alpha_bar`` is small, rebuilding it from an fp32 ``sigma = sqrt(1 - alpha_bar)`` cancels badly
    (~1.5e-5 off DDPO's step); float64 sigmas and fp64 kernel arithmetic keep re-sampled latents within 1e-6."""
    from diffusers import DDIMScheduler

    sched = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                          set_alpha_to_one=False, steps_offset=1)  # SD1.5's DDIM, as DDPO samples it (50 steps)
    ac = sched.alphas_cumprod.double()
    ab, ab_prev = ac[t], ac[t - 20]
    assert float(ab) < 0.02  # the regime of the cancellation
    x, eps, noise = rand(2, 4, 16, 16, seed=11), rand(2, 4, 16, 16, seed=12), rand(2, 4, 16, 16, seed=13)
    sig, sig_prev = torch.sqrt(1 - ab), torch.sqrt(1 - ab_prev)  # float64, as the epsilon adapters hand them out
    for eta in (1.0, 0.5):
        want = _ddpo_ddim_step_fp64(x, eps, noise, ab, ab_prev, eta)
        st = sde.step("ddim", x, eps, sig, sig_prev, eta, noise=noise)
        assert st.x_next.dtype == torch.float32 and st.mean.dtype == torch.float32
        torch.testing.assert_close(st.x_next.double(), want, rtol=0, atol=1e-6)
        # the stored transition's log-prob is unchanged by the recompute (ratio == 1)
        again = sde.log_prob_of("ddim", x, st.x_next, eps, sig, sig_prev, eta)
        assert torch.equal(again.log_prob, st.log_prob)


def test_sd15_sigmas_are_float64_and_kept_by_the_rollout():
    from flowalign.rollout import _schedule

    sig64 = torch.tensor([0.99, 0.5], dtype=torch.float64)
    assert _schedule(sig64).dtype == torch.float64 and _schedule(sig64.float()).dtype == torch.float32


# ------------------------------------------------------------------------------------------- log-probs
@pytest.mark.parametrize("kind, level, s, s_next", STOCHASTIC)
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_log_prob_is_the_normal_density_reduced_as_configured(kind, level, s, s_next, reduction):
    x, out = rand(3, 4, 5, 6, seed=8), rand(3, 4, 5, 6, seed=9)
    sig = torch.tensor([s, s - 0.1, s + 0.1])  # per-sample sigmas too
    sig_next = torch.tensor([s_next, s_next - 0.1, s_next + 0.1])
    st = sde.step(kind, x, out, sig, sig_next, level, generator=gen(1), reduction=reduction)
    assert st.mean.dtype == torch.float32 and st.std.shape == (3, 1, 1, 1) and (st.std > 0).all()
    ref = torch.distributions.Normal(st.mean, st.std.expand_as(st.mean)).log_prob(st.x_next)
    ref = ref.mean(dim=(1, 2, 3)) if reduction == "mean" else ref.sum(dim=(1, 2, 3))
    torch.testing.assert_close(st.log_prob, ref, rtol=1e-6, atol=1e-5 if reduction == "sum" else 1e-6)
    again = sde.log_prob_of(kind, x, st.x_next, out, sig, sig_next, level, reduction=reduction)
    assert torch.equal(again.log_prob, st.log_prob)  # the training recomputation is the same density, bitwise


def test_unnormalized_density_is_flow_grpo_cps_form_and_default_reduction_is_mean():
    x, v = rand(2, 3, 4, 4, seed=10), rand(2, 3, 4, 4, seed=11)
    st = sde.step("cps", x, v, 0.6, 0.5, 0.8, generator=gen(2), density="unnormalized")
    assert torch.allclose(st.log_prob, (-(st.x_next - st.mean) ** 2).mean(dim=(1, 2, 3)), rtol=0, atol=1e-7)
    default = sde.step("cps", x, v, 0.6, 0.5, 0.8, generator=gen(2))
    ref = torch.distributions.Normal(default.mean, default.std.expand_as(default.mean)).log_prob(default.x_next)
    torch.testing.assert_close(default.log_prob, ref.mean(dim=(1, 2, 3)))


def test_bf16_inputs_are_computed_in_fp32_and_the_stored_sample_is_scored():
    """x_next is cast to the latent dtype *before* its log-prob is taken, so a stored bf16 transition scores the
    same on recomputation (ratio == 1 exactly)."""
    x, v = rand(2, 4, 6, 6, seed=12).bfloat16(), rand(2, 4, 6, 6, seed=13).bfloat16()
    st = sde.step("flow_sde", x, v, 0.8, 0.7, 0.7, generator=gen(3))
    assert st.x_next.dtype == torch.bfloat16 and st.mean.dtype == torch.float32 and st.log_prob.dtype == torch.float32
    ref_mean, _ = sde.mean_std("flow_sde", x.float(), v.float(), 0.8, 0.7, 0.7)
    assert torch.equal(st.mean, ref_mean)
    assert torch.equal(sde.log_prob_of("flow_sde", x, st.x_next, v, 0.8, 0.7, 0.7).log_prob, st.log_prob)
    ref = torch.distributions.Normal(st.mean, st.std.expand_as(st.mean)).log_prob(st.x_next.float()).mean((1, 2, 3))
    torch.testing.assert_close(st.log_prob, ref)


def test_float64_inputs_stay_float64():
    x, v = rand(2, 3, dtype=torch.float64, seed=14), rand(2, 3, dtype=torch.float64, seed=15)
    st = sde.step("dance", x, v, 0.5, 0.4, 0.3, generator=gen(4))
    assert st.x_next.dtype == st.mean.dtype == st.log_prob.dtype == torch.float64
    ref = torch.distributions.Normal(st.mean, st.std.expand_as(st.mean)).log_prob(st.x_next).mean(1)
    torch.testing.assert_close(st.log_prob, ref, rtol=0, atol=1e-12)


@pytest.mark.parametrize("kind, level, s, s_next", STOCHASTIC)
def test_20000_draws_have_the_kernels_mean_and_std(kind, level, s, s_next):
    n = 20_000
    x = (2.0 + 0.3 * rand(1, 2, 2, 2, seed=16)).expand(n, -1, -1, -1)
    out = (0.3 * rand(1, 2, 2, 2, seed=17)).expand(n, -1, -1, -1)
    st = sde.step(kind, x, out, s, s_next, level, generator=gen(5))
    mean, std = st.mean[0], st.std[0]
    assert (mean.abs() > 1.0).all()  # "within 1%" of a mean bounded away from 0
    emp_mean, emp_std = st.x_next.mean(0), st.x_next.std(0)
    assert ((emp_mean - mean).abs() <= 0.01 * mean.abs()).all(), (emp_mean, mean)
    assert ((emp_std / std - 1).abs() <= 0.03).all(), (emp_std, std)  # per element: 0.5% standard error
    z = (st.x_next - st.mean) / st.std  # pooled over the 8 elements: 160,000 standardised residuals
    assert abs(float(z.mean())) < 0.01 and abs(float(z.std()) - 1) < 0.01


# --------------------------------------------------------------------------- marginal preservation, exact
def _gaussian_terminal(kind: str, level: float, num_steps: int, mu: list[float], c: list[float],
                       shift: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Terminal mean/variance of ``num_steps`` kernel steps from N(0, I) for data N(mu, diag c^2).

    The exact denoiser of Gaussian data is affine in x, so each step is ``x' = P x + q + std z`` with ``P, q`` read
    off the kernel at x = 0 and x = 1; then ``m' = P m + q``, ``V' = P^2 V + std^2`` exactly (float64).
    """
    toy = GaussianMixtureAdapter(means=[mu], stds=[c], shift=shift, out_dtype=torch.float64)
    sig = toy.sigmas(num_steps).double()
    d = len(mu)
    pts = torch.stack([torch.zeros(d), torch.ones(d)]).double()
    cond = Cond({"offset": torch.zeros(2, d, dtype=torch.float64)})
    m, var = torch.zeros(d, dtype=torch.float64), torch.ones(d, dtype=torch.float64)
    for i in range(num_steps):
        mean, std = sde.mean_std(kind, pts, toy.predict(pts, sig[i], cond), sig[i], sig[i + 1], level)
        p, q = mean[1] - mean[0], mean[0]
        m, var = p * m + q, p**2 * var + std[0] ** 2
    return m, var


@pytest.mark.parametrize("kind, level", [("ode", 0.0), ("flow_sde", 0.7), ("flow_sde", 1.0), ("dance", 0.3)])
def test_kernels_preserve_gaussian_marginals_as_steps_grow(kind, level):
    """The SDEs are the ODE's stochastic twins: their exact terminal law converges to the data's."""
    mu, c = [0.5, -1.0], [1.0, 0.3]
    c2 = torch.tensor(c, dtype=torch.float64) ** 2
    err = {}
    for n in (50, 400):
        m, var = _gaussian_terminal(kind, level, n, mu, c)
        torch.testing.assert_close(m, torch.tensor(mu, dtype=torch.float64), rtol=0, atol=1e-9)  # straight mean path
        err[n] = float((var / c2 - 1).abs().max())
    assert err[400] < 0.015, err  # Euler / Euler-Maruyama error; 0.5-1.2% at 400 steps
    assert err[50] < 0.11, err
    if kind in ("ode", "dance"):  # plain O(1/N) convergence
        assert err[400] < err[50] / 4, err


def naive_flow_sde(x, v, sigma, sigma_next, a):
    """flow_sde's noise with the plain Euler drift (no score correction): a kernel that must fail."""
    _, std = sde.flow_sde(x, v, sigma, sigma_next, a)
    return x + v * (sigma_next - sigma), std


def test_flow_sde_without_its_drift_correction_would_not_preserve_marginals():
    """Negative control for the test above: Euler drift + the same noise inflates the variance."""
    _, var = _gaussian_terminal("tests.test_sde:naive_flow_sde", 0.7, 400, [0.5, -1.0], [1.0, 0.3])
    assert (var / torch.tensor([1.0, 0.09], dtype=torch.float64) > 1.4).all(), var


def test_cps_is_not_marginal_preserving_and_matches_its_closed_form():
    """CPS (flow_grpo ``sde_type='cps'``, arXiv 2509.05952) re-noises with std ``sigma' sin(a pi/2)``, a fixed
    fraction of the noise level rather than ``O(sqrt(dt))``: it is not the discretisation of any
    marginal-preserving SDE, and with an exact posterior-mean denoiser it shrinks the variance at any step count.

    For data N(0, c^2), ``x0_hat = alpha c^2/v x``, ``eps_hat = sigma/v x`` (``v = alpha^2 c^2 + sigma^2``), so
    ``Var' = ((alpha' alpha c^2 + sigma' sigma cos t)/v)^2 Var + sigma'^2 sin^2 t`` with ``t = a pi / 2``.
    """
    a, c = 0.8, 1.0
    th = a * math.pi / 2
    for n in (50, 400):
        sig = flow_sigmas(n).double().tolist()
        var = 1.0
        for s, sp in zip(sig[:-1], sig[1:]):
            v = (1 - s) ** 2 * c**2 + s**2
            var = ((1 - sp) * (1 - s) * c**2 + sp * s * math.cos(th)) ** 2 / v**2 * var + (sp * math.sin(th)) ** 2
        _, ours = _gaussian_terminal("cps", a, n, [0.0], [c])
        assert float(ours) == pytest.approx(var, rel=1e-9)
        assert 0.55 < var < 0.7  # 35-40% of the variance is lost, at 50 and at 400 steps alike
    _, zero = _gaussian_terminal("cps", 0.0, 400, [0.0], [c])  # a = 0 is DDIM(eta=0), i.e. the Euler ODE
    assert float(zero) == pytest.approx(float(_gaussian_terminal("ode", 0.0, 400, [0.0], [c])[1]), rel=1e-9)


# -------------------------------------------------------------------------- marginal preservation, sampled
def _moments(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Sample mean, covariance and their standard errors (the SE of a covariance entry from the spread of the
    products of centred coordinates)."""
    n = x.shape[0]
    m = x.mean(0)
    xc = x - m
    prod = (xc[:, :, None] * xc[:, None, :]).reshape(n, -1)
    return m, torch.cov(x.T), x.std(0) / n**0.5, (prod.std(0) / n**0.5).view(x.shape[1], x.shape[1])


def _terminal(toy: GaussianMixtureAdapter, kind: str, level: float, num_steps: int, n: int, seed: int):
    traj = sample(toy, ["a prompt"], group_size=n, num_steps=num_steps, kernel=kind, noise_level=level,
                  plan=make_plan("all", num_steps, fraction=1.0), generator=gen(seed), decode=False)
    return traj.latents[:, -1].double()


@pytest.mark.slow
def test_sde_kernels_are_the_odes_stochastic_twins_on_a_gaussian_mixture():
    """2-D, 3-component anisotropic mixture with the closed-form velocity ``E[eps - x0 | x_t]``; 20,000 chains per
    kernel. flow_sde (a=0.7), dance (eta=0.3) and the Euler ODE all land on the mixture's mean and covariance
    within 3 standard errors; CPS (a=0.8) does not (see the closed-form test above).

    Step counts: the SDE at Flow-GRPO's setting is within 3 SE at 50 steps; the Euler ODE itself is not (its
    O(1/N) variance deficit is ~5% at 50 steps, 6-8 SE at this sample size, for any shift), so the three kernels are
    compared on one 400-step grid where the discretisation error is below one standard error.
    """
    toy = GaussianMixtureAdapter.default(prompt_offset=0.5)
    n = 20_000
    true_m, true_c = toy.data_mean("a prompt"), toy.data_cov()

    def z_scores(x):
        m, c, se_m, se_c = _moments(x)
        return (m - true_m) / se_m, (c - true_c) / se_c

    runs = {("flow_sde", 0.7, 50): 1, ("ode", 0.0, 400): 2, ("flow_sde", 0.7, 400): 3, ("dance", 0.3, 400): 4}
    for (kind, level, steps), seed in runs.items():
        zm, zc = z_scores(_terminal(toy, kind, level, steps, n, seed))
        assert zm.abs().max() < 3 and zc.abs().max() < 3, (kind, steps, zm, zc)
    zm, zc = z_scores(_terminal(toy, "cps", 0.8, 50, n, 5))
    assert max(zm.abs().max(), zc.abs().max()) > 6, (zm, zc)  # the test has the power to see a biased kernel


# ------------------------------------------------------------------------------------------ the toy itself
@pytest.mark.parametrize("prediction_type", ["flow", "epsilon"])
def test_mixture_posterior_means_are_the_exact_score(prediction_type):
    """Tweedie: ``grad log p_t(x) = -E[eps | x_t] / sigma``, with ``p_t`` the closed-form mixture density."""
    toy = GaussianMixtureAdapter.default(prediction_type=prediction_type, out_dtype=torch.float64)
    mu, sd, logw = toy.holder.means, toy.holder.stds, toy.holder.log_weights
    x = (2 * rand(64, 2, dtype=torch.float64, seed=18)).requires_grad_(True)
    for s in (0.9, 0.5, 0.1):
        a = 1 - s if prediction_type == "flow" else math.sqrt(1 - s**2)
        var = a**2 * sd**2 + s**2  # [K, D]
        log_p = torch.logsumexp(logw + (-0.5 * ((x[:, None] - a * mu) ** 2 / var + torch.log(2 * math.pi * var))
                                        ).sum(-1), dim=1)
        (score,) = torch.autograd.grad(log_p.sum(), x)
        x0, eps = toy.posterior(x.detach(), s)
        torch.testing.assert_close(-eps / s, score, rtol=1e-9, atol=1e-9)
        torch.testing.assert_close(a * x0 + s * eps, x.detach(), rtol=0, atol=1e-9)  # x_t = alpha x0 + sigma eps
        out = toy.predict(x.detach(), s, Cond({"offset": torch.zeros(64, 2)}))
        torch.testing.assert_close(out, eps - x0 if prediction_type == "flow" else eps)


def test_mixture_moments_match_its_samples():
    toy = GaussianMixtureAdapter.default(prompt_offset=0.5)
    x = toy.sample_data(200_000, gen(6), prompt="p")
    m, c, se_m, se_c = _moments(x)
    assert ((m - toy.data_mean("p")).abs() < 4 * se_m).all() and ((c - toy.data_cov()).abs() < 4 * se_c).all()
    assert not torch.allclose(toy.data_mean("p"), toy.data_mean("q"))  # prompts shift the data


# ----------------------------------------------------------------------------------------------- bad input
@pytest.mark.parametrize("call, match", [
    (lambda x: sde.step("euler_sde", x, x, 0.5, 0.4, 0.7), r"unknown kernel 'euler_sde'.*Registered: .*flow_sde"),
    (lambda x: sde.step("flow_sde", x, x, 0.5, 0.4, -0.1), r"noise_level must be a finite number >= 0, got -0.1"),
    (lambda x: sde.step("flow_sde", x, x, 0.5, 0.4, float("nan")), r"noise_level must be a finite number >= 0"),
    (lambda x: sde.log_prob_of("cps", x, x, x, 0.5, 0.4, -1.0), r"noise_level must be a finite number >= 0"),
    (lambda x: sde.step("flow_sde", x, x, 0.5, 0.4, 0.7, reduction="max"),
     r"reduction='max' is not allowed.*Allowed: mean, sum"),
    (lambda x: sde.step("flow_sde", x, x, 0.5, 0.4, 0.7, density="laplace"),
     r"density='laplace' is not allowed.*Allowed: gaussian, unnormalized"),
    (lambda x: sde.step("flow_sde", x, x, torch.ones(3), 0.4, 0.7), r"sigma must be a scalar or have shape \[batch\]=2"),
    (lambda x: sde.step("flow_sde", x, x[:1], 0.5, 0.4, 0.7), r"model_out must have x's shape \(2, 3, 4\)"),
    (lambda x: sde.step("flow_sde", x, x, 0.5, 0.4, 0.7, noise=x[:, :1]), r"noise must have x's shape \(2, 3, 4\)"),
])
def test_bad_kernel_input_raises_value_errors_naming_the_argument(call, match):
    with pytest.raises(ValueError, match=match):
        call(rand(2, 3, 4))


@pytest.mark.parametrize("images, match", [
    (torch.full((2, 3, 4, 4), -0.5), r"images must be in \[0, 1\], got range \[-0.500, -0.500\]"),
    (torch.full((2, 3, 4, 4), 255.0), r"images must be in \[0, 1\]"),
    (torch.zeros(2, 3, 4, 4, dtype=torch.uint8), r"images must be float in \[0, 1\].*divide uint8 images by 255"),
    (torch.zeros(3, 4, 4), r"images must be B,C,H,W or B,T,C,H,W"),
])
def test_wrong_image_range_raises(images, match):
    with pytest.raises(ValueError, match=match):
        check_images(images)
    assert check_images(torch.rand(2, 3, 4, 4)) is not None


def test_every_recipe_that_samples_cps_uses_flow_grpos_unnormalised_density():
    """flow_grpo's CPS log-prob is ``-(x_next - mean)^2`` (no 1/2s^2, no constants); the Gaussian form differs by up
    to 3.4 nats per transition, so a recipe that samples with CPS (all of ours follow flow_grpo) must say so."""
    from pathlib import Path

    import yaml

    cps = {}
    for path in sorted(Path("recipes").glob("*.yaml")):
        sample = (yaml.safe_load(path.read_text()) or {}).get("sample") or {}
        if sample.get("kernel") == "cps":
            cps[path.name] = sample.get("density", "gaussian")
    assert cps, "no recipe samples with CPS any more: drop or move this check"
    assert cps == dict.fromkeys(cps, "unnormalized"), cps
