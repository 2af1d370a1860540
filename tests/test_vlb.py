"""The variational bound (ddpm.vlb) and the hybrid loss: each term against closed forms written here, the
discretised decoder against a numeric integral, and the whole bound on data of known density."""

import math

import pytest
import torch

from ddpm.losses import HYBRID_VLB_WEIGHT, diffusion_loss, diffusion_losses
from ddpm.samplers import denoiser
from ddpm.schedule import NoiseScheduler
from ddpm.vlb import (
    discretized_gaussian_log_likelihood,
    normal_kl,
    prior_bpd,
    variational_bound,
    vlb_term_bpd,
)


def gaussian_kl(m1, s1, m2, s2):
    """KL(N(m1, s1^2) || N(m2, s2^2)) = log(s2 / s1) + (s1^2 + (m1 - m2)^2) / (2 s2^2) - 1/2."""
    return math.log(s2 / s1) + (s1**2 + (m1 - m2) ** 2) / (2 * s2**2) - 0.5


def test_normal_kl_is_the_closed_form():
    for m1, s1, m2, s2 in [(0.0, 1.0, 0.0, 1.0), (0.3, 0.5, -0.2, 2.0), (1.0, 0.01, 1.001, 0.02)]:
        got = normal_kl(
            *(torch.tensor(v, dtype=torch.float64) for v in (m1, 2 * math.log(s1), m2, 2 * math.log(s2)))
        )
        assert got.item() == pytest.approx(gaussian_kl(m1, s1, m2, s2), rel=1e-12, abs=1e-15)


def test_each_kl_term_is_the_closed_form_of_the_two_posteriors():
    """L_t for t > 0: KL between q(x_{t-1} | x_t, x0) = N(mu~, beta~) and p = N(mu(x0_pred), Sigma), with
    mu~ = sqrt(ab_{t-1}) beta_t / (1 - ab_t) x0 + sqrt(alpha_t) (1 - ab_{t-1}) / (1 - ab_t) x_t (Ho et al.
    Eq. 7) and Sigma from v (learned_range), all written here; per element, averaged, in bits."""
    scheduler = NoiseScheduler(num_train_timesteps=100, variance_type="learned_range")
    g = torch.Generator().manual_seed(0)
    x0, x_t, x0_pred = (torch.rand(3, 1, 2, 2, generator=g, dtype=torch.float64) * 2 - 1 for _ in range(3))
    v = torch.rand(3, 1, 2, 2, generator=g, dtype=torch.float64) * 2 - 1
    t = torch.tensor([1, 40, 99])
    got = vlb_term_bpd(scheduler, x0, x_t, t, x0_pred, v)
    for i, step in enumerate(t.tolist()):
        ab_t, ab_s = scheduler.alphas_cumprod[step].item(), scheduler.alphas_cumprod[step - 1].item()
        beta = 1 - ab_t / ab_s
        beta_tilde = (1 - ab_s) / (1 - ab_t) * beta
        total = 0.0
        for j in range(4):
            a, xt, p, vv = (z[i].flatten()[j].item() for z in (x0, x_t, x0_pred, v))

            c_x0, c_xt = ab_s**0.5 * beta / (1 - ab_t), (1 - beta) ** 0.5 * (1 - ab_s) / (1 - ab_t)
            frac = (vv + 1) / 2
            sigma = math.exp(0.5 * (frac * math.log(beta) + (1 - frac) * math.log(beta_tilde)))
            total += gaussian_kl(c_x0 * a + c_xt * xt, beta_tilde**0.5, c_x0 * p + c_xt * xt, sigma)
        assert got[i].item() == pytest.approx(total / 4 / math.log(2), rel=1e-9)


def test_prior_term_is_the_closed_form():
    scheduler = NoiseScheduler(num_train_timesteps=50)
    x0 = torch.tensor([[[[0.5, -1.0]]]], dtype=torch.float64)
    ab = scheduler.alphas_cumprod[-1].item()
    expected = sum(gaussian_kl(ab**0.5 * x, (1 - ab) ** 0.5, 0.0, 1.0) for x in (0.5, -1.0)) / 2 / math.log(2)
    assert prior_bpd(scheduler, x0).item() == pytest.approx(expected, rel=1e-10)


@pytest.mark.parametrize(("mean", "scale"), [(0.1, 0.05), (-0.3, 0.004), (0.9, 0.3)])
def test_discretised_decoder_is_the_integral_of_the_gaussian_over_the_bin(mean, scale):
    """P(x) = integral over [x - 1/255, x + 1/255] of the density, by the trapezoid rule on a fine grid;
    the end levels take the tails; the 256 probabilities sum to 1."""
    levels = torch.linspace(-1, 1, 256, dtype=torch.float64)
    log_p = discretized_gaussian_log_likelihood(
        levels, torch.tensor(mean, dtype=torch.float64), torch.tensor(math.log(scale), dtype=torch.float64)
    )
    assert log_p.exp().sum().item() == pytest.approx(1.0, abs=1e-9)

    def density(u):
        return torch.exp(-0.5 * ((u - mean) / scale) ** 2) / (scale * math.sqrt(2 * math.pi))

    for k in (1, 100, 127, 140, 254):
        x = levels[k].item()
        u = torch.linspace(x - 1 / 255, x + 1 / 255, 20001, dtype=torch.float64)
        integral = torch.trapezoid(density(u), u).item()
        if integral > 1e-10:
            assert log_p[k].exp().item() == pytest.approx(integral, rel=1e-6)
    lo = torch.linspace(mean - 12 * scale, -1 + 1 / 255, 200001, dtype=torch.float64)
    tail = torch.trapezoid(density(lo), lo).item() if lo[0] < lo[-1] else 0.0
    assert log_p[0].exp().item() == pytest.approx(tail, rel=1e-5, abs=1e-12)


def test_hybrid_loss_is_mse_plus_the_scaled_bound_term_with_the_mean_detached():
    scheduler = NoiseScheduler(num_train_timesteps=200, variance_type="learned_range")
    g = torch.Generator().manual_seed(1)
    x0 = torch.rand(4, 1, 4, 4, generator=g) * 2 - 1
    noise = torch.randn(4, 1, 4, 4, generator=g)
    t = torch.tensor([0, 3, 100, 199])
    out = torch.randn(4, 2, 4, 4, generator=g).requires_grad_()

    def model(x, t, y):
        return out * 1.0

    losses = diffusion_losses(model, scheduler, x0, noise, t)
    x_t = scheduler.add_noise(x0, noise, t)
    mse = ((out[:, :1] - noise) ** 2).mean(dim=(1, 2, 3))
    x0_pred, _ = scheduler.predict_x0_and_eps(out[:, :1].detach(), x_t, t)
    vlb = vlb_term_bpd(scheduler, x0, x_t, t, x0_pred, out[:, 1:])
    torch.testing.assert_close(losses, mse + HYBRID_VLB_WEIGHT * 200 * vlb)
    # the bound's gradient reaches the variance channels only: the mean's is the MSE's alone
    losses.sum().backward()
    expected = 2 * (out[:, :1] - noise) / 16
    torch.testing.assert_close(out.grad[:, :1], expected.detach())
    assert out.grad[:, 1:].abs().sum() > 0
    assert diffusion_loss(model, scheduler, x0, noise, t).item() == pytest.approx(losses.mean().item())


def test_fixed_variance_loss_is_the_mse_alone():
    scheduler = NoiseScheduler(num_train_timesteps=20)
    x0, noise = torch.zeros(2, 1, 2, 2), torch.ones(2, 1, 2, 2)
    losses = diffusion_losses(lambda x, t, y: torch.zeros_like(x), scheduler, x0, noise, torch.tensor([0, 5]))
    torch.testing.assert_close(losses, torch.ones(2))


class GaussianData:
    """Data x0 ~ N(mu, s^2) per dimension, on the 256-level grid, and its exact model: the reverse process
    of Gaussian data is Gaussian, with mean the posterior mean at E[x0 | x_t] = mu + a s^2 / (a^2 s^2 +
    sigma^2) (x_t - a mu) (a = sqrt(alpha_bar_t), sigma^2 = 1 - alpha_bar_t; predicted as x0, prediction_type
    "sample") and variance beta-tilde_t + c_t^2 Var[x0 | x_t], c_t = sqrt(alpha_bar_{t-1}) beta_t /
    (1 - alpha_bar_t), Var[x0 | x_t] = s^2 sigma^2 / (a^2 s^2 + sigma^2) (given as learned_range's v)."""

    mu, s = 0.1, 0.3

    def draw(self, n: int) -> torch.Tensor:
        g = torch.Generator().manual_seed(0)
        x = self.mu + self.s * torch.randn(n, 1, 4, 4, generator=g, dtype=torch.float64)
        return (torch.round((x.clamp(-1, 1) + 1) * 127.5) / 127.5 - 1).clamp(-1, 1)

    def nll_bits(self, x0: torch.Tensor) -> torch.Tensor:
        """The exact -log2 P(x0) / dims of each image, P the data's mass in each pixel's bin (the end bins
        reaching to -inf and inf): (N,)."""
        normal = torch.distributions.Normal(self.mu, self.s)
        inf = torch.tensor(math.inf, dtype=torch.float64)
        upper = torch.where(x0 > 1 - 1 / 255, inf, x0 + 1 / 255)
        lower = torch.where(x0 < -1 + 1 / 255, -inf, x0 - 1 / 255)
        return -(normal.cdf(upper) - normal.cdf(lower)).log2().flatten(1).mean(dim=1)

    def model(self, scheduler: NoiseScheduler):
        def exact(x, t, y=None):
            shape = (-1, 1, 1, 1)
            ab = scheduler.alpha_bar(t).view(shape)
            x0 = self.mu + ab.sqrt() * self.s**2 / (ab * self.s**2 + 1 - ab) * (x - ab.sqrt() * self.mu)
            if not scheduler.learns_variance:
                return x0
            ab_prev = torch.where(
                t.view(shape) == 0, 1.0, scheduler.alpha_bar((t - 1).clamp(min=0)).view(shape)
            )
            beta = 1 - ab / ab_prev
            var_x0 = self.s**2 * (1 - ab) / (ab * self.s**2 + 1 - ab)
            var = (
                scheduler.posterior_variance[t].view(shape) + (ab_prev.sqrt() * beta / (1 - ab)) ** 2 * var_x0
            )
            low, high = scheduler.posterior_log_variance(t), scheduler.betas[t].log().view(shape)
            v = (2 * (var.log() - low) / (high - low) - 1).clamp(-1, 1)
            return torch.cat([x0, v.expand_as(x0)], dim=1)

        return exact


def test_the_bound_is_above_the_exact_nll_and_reaches_it_with_the_exact_model():
    """On 500 images of Gaussian data: every bound (mean over images) is above the exact NLL up to 3
    standard errors of the gap; with the exact model (exact mean and variance) it equals the NLL within 3
    standard errors and beats both fixed variances; with fixed_large it approaches the NLL as T grows."""
    data = GaussianData()
    x0 = data.draw(500)
    nll = data.nll_bits(x0)
    gaps: dict[str, list[float]] = {}
    for T in (10, 100, 1000):
        for variance_type in ("fixed_small", "fixed_large", "learned_range"):
            scheduler = NoiseScheduler(
                num_train_timesteps=T,
                beta_schedule="cosine",
                prediction_type="sample",
                variance_type=variance_type,
            )
            denoise = denoiser(data.model(scheduler), scheduler, dtype=torch.float64)
            bound = variational_bound(
                lambda x_t, t, image, denoise=denoise: denoise(x_t, t),
                scheduler,
                x0,
                generator=torch.Generator().manual_seed(1),
                batch_size=4000,
            )
            torch.testing.assert_close(bound.total, bound.prior + bound.terms.sum(dim=1))
            gap = bound.total - nll
            mean, stderr = gap.mean().item(), gap.std().item() / len(gap) ** 0.5
            assert mean > -3 * stderr, (T, variance_type, mean, stderr)
            if variance_type == "learned_range":
                assert abs(mean) < 3 * stderr, (T, mean, stderr)
            gaps.setdefault(variance_type, []).append(mean)
    for i in range(3):
        assert gaps["learned_range"][i] < min(gaps["fixed_small"][i], gaps["fixed_large"][i]), gaps
    assert gaps["fixed_large"][0] > gaps["fixed_large"][1] > gaps["fixed_large"][2], gaps


def per_timestep_bound(model, scheduler, x0, y, seed):
    """The bound written as a loop, one network call per image and timestep: image i's noise is the (i+1)-th
    (T, C, H, W) draw of a generator seeded `seed`, its row k at t = T-1-k (variational_bound's contract)."""
    T, generator = scheduler.num_train_timesteps, torch.Generator().manual_seed(seed)
    terms = torch.zeros(len(x0), T)
    for i in range(len(x0)):
        noise = torch.randn((T, *x0.shape[1:]), generator=generator)
        denoise = denoiser(model, scheduler, y=y[i : i + 1])
        for k, step in enumerate(range(T - 1, -1, -1)):
            t = torch.tensor([step])
            x_t = scheduler.add_noise(x0[i : i + 1], noise[k : k + 1], t)
            out = denoise(x_t, t[0])
            terms[i, step] = vlb_term_bpd(scheduler, x0[i : i + 1], x_t, t, out.x0, out.variance_values)[0]
    return prior_bpd(scheduler, x0) + terms.sum(dim=1), terms


@pytest.mark.parametrize("batch_size", [1, 5, 12, 36])
def test_the_batched_bound_is_the_per_timestep_loop_whatever_the_batch(batch_size):
    """Rows of many timesteps (and several images) in one network call give each image's terms as one call
    per (image, t) does, with the same noise whatever batch_size: ceil(N T / batch_size) calls, none of
    more than batch_size rows, each row with its own image's label."""
    from test_sampling_paths import TINY

    from ddpm.models import UNet
    from ddpm.vlb import bound_calls

    torch.manual_seed(0)
    model = UNet(**{**TINY, "out_channels": 2}).eval()
    scheduler = NoiseScheduler(
        num_train_timesteps=12,
        beta_schedule="cosine",
        prediction_type="v_prediction",
        variance_type="learned_range",
        clip_sample=True,
    )
    x0 = torch.round(torch.rand(3, 1, 8, 8, generator=torch.Generator().manual_seed(2)) * 255) / 127.5 - 1
    y = torch.tensor([2, 0, 1])
    expected_total, expected_terms = per_timestep_bound(model, scheduler, x0, y, seed=7)
    calls, rows = [], []

    def denoise(x_t, t, image):
        calls.append(len(x_t))
        rows.append(torch.stack([image, t], dim=1))
        return denoiser(model, scheduler, y=y[image])(x_t, t)

    bound = variational_bound(
        denoise, scheduler, x0, generator=torch.Generator().manual_seed(7), batch_size=batch_size
    )
    torch.testing.assert_close(bound.terms, expected_terms, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(bound.total, expected_total, rtol=1e-5, atol=1e-6)
    assert len(calls) == bound_calls(3, 12, batch_size) == -(-36 // batch_size)
    assert max(calls) <= batch_size and sum(calls) == 36
    row = torch.arange(36)  # image 0 at t = 11 .. 0, then image 1, image 2
    assert torch.equal(torch.cat(rows), torch.stack([row // 12, 11 - row % 12], dim=1))
