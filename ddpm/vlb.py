"""The variational bound on the negative log-likelihood of a diffusion model, term by term, in bits per
dimension: what the hybrid training loss (`ddpm.losses`) and the likelihood evaluation (`ddpm.nll`) share.

Ho et al. 2020, Eq. 5, with our timesteps 0 .. T-1 (t = 0 is the first noising step, x_t at t = 0 is their
x_1):

    -log p(x0) <= L_prior + sum_{t=1}^{T-1} L_t + L_0,
    L_prior = KL(q(x_{T-1} | x0) || N(0, I)),
    L_t     = KL(q(x_{t-1} | x_t, x0) || p(x_{t-1} | x_t)),        (both Gaussians: `normal_kl`)
    L_0     = -log p(x0 | x_t at t = 0), the discretised Gaussian decoder of Sec. 3.3
              (`discretized_gaussian_log_likelihood`),

where p(x_{t-1} | x_t) = N(mu(x_t, t), Sigma_t) has the posterior's mean with the model's x0 in place of x0
and the variance `NoiseScheduler.model_log_variance` (fixed or learned, Nichol & Dhariwal 2021, Eq. 15).
Each term is averaged over the dimensions and divided by log 2, as improved-diffusion reports bits/dim.
"""

import math
from collections.abc import Callable
from typing import NamedTuple

import torch
from torch import Tensor

from ddpm.samplers.solvers import Denoised, gaussian_noise, posterior
from ddpm.schedule import NoiseScheduler

LOG2 = math.log(2.0)


class Bound(NamedTuple):
    """The variational bound of each image of a batch, in bits/dim (`variational_bound`)."""

    total: Tensor  # (N,) prior + every term: the bound on -log2 p(x0) / dims
    prior: Tensor  # (N,) L_prior
    terms: Tensor  # (N, T) L_t at t = 0 .. T-1 (t = 0: the decoder's NLL)


def normal_kl(mean1: Tensor, log_var1: Tensor, mean2: Tensor, log_var2: Tensor) -> Tensor:
    """KL(N(mean1, exp(log_var1)) || N(mean2, exp(log_var2))) per element, in nats:
    0.5 (log_var2 - log_var1 + exp(log_var1 - log_var2) + (mean1 - mean2)^2 exp(-log_var2) - 1).
    Any broadcastable shapes; returns their broadcast shape."""
    return 0.5 * (
        log_var2
        - log_var1
        + torch.exp(log_var1 - log_var2)
        + (mean1 - mean2) ** 2 * torch.exp(-log_var2)
        - 1.0
    )


def discretized_gaussian_log_likelihood(
    x: Tensor, mean: Tensor, log_scale: Tensor, *, bins: int = 256
) -> Tensor:
    """log P(x) per element, in nats, of N(mean, exp(log_scale)^2) discretised to `bins` levels on [-1, 1]
    (Ho et al. 2020, Sec. 3.3, Eq. 13): the mass of the bin [x - 1/(bins-1), x + 1/(bins-1)], the first bin
    extended to -inf and the last to +inf, so that the levels' probabilities sum to 1.

    x: data on the grid -1 + 2k/(bins - 1) (uint8 images scaled to [-1, 1] for bins = 256); mean, log_scale:
    broadcastable to x. The exact normal CDF, with the bin's mass taken on the side of the mean where it does
    not cancel (improved-diffusion uses a tanh approximation of the CDF); floored at 1e-12 as there.
    """
    half_bin = 1.0 / (bins - 1)
    inv_scale = torch.exp(-log_scale)
    upper = (x - mean + half_bin) * inv_scale  # standardised bin edges
    lower = (x - mean - half_bin) * inv_scale
    edge = 1 - half_bin  # between the last two levels: x below -edge is the first level, above edge the last
    # the mass between the edges, Phi(upper) - Phi(lower), computed in the tail where it does not cancel
    right = lower > 0
    mass = torch.where(
        right,
        torch.special.ndtr(-lower) - torch.special.ndtr(-upper),
        torch.special.ndtr(upper) - torch.special.ndtr(lower),
    )
    log_mass = torch.log(mass.clamp(min=1e-12))
    log_cdf_upper = torch.special.log_ndtr(upper)  # first level: (-inf, upper]
    log_sf_lower = torch.special.log_ndtr(-lower)  # last level: [lower, inf)
    return torch.where(x < -edge, log_cdf_upper, torch.where(x > edge, log_sf_lower, log_mass))


def prior_bpd(scheduler: NoiseScheduler, x0: Tensor) -> Tensor:
    """L_prior = KL(q(x_{T-1} | x0) || N(0, I)) in bits/dim; x0: (N, C, H, W) -> (N,). It depends on no
    model: near 0 for a schedule whose alpha_bar_{T-1} is near 0."""
    t = torch.full((x0.shape[0],), scheduler.num_train_timesteps - 1, dtype=torch.long, device=x0.device)
    alpha_bar = scheduler.alpha_bar(t).to(x0.dtype).reshape(-1, *([1] * (x0.ndim - 1)))
    kl = normal_kl(alpha_bar.sqrt() * x0, torch.log1p(-alpha_bar), torch.zeros_like(x0), torch.zeros_like(x0))
    return _mean_bits(kl)


def vlb_term_bpd(
    scheduler: NoiseScheduler,
    x0: Tensor,
    x_t: Tensor,
    t: Tensor,
    x0_pred: Tensor,
    variance_values: Tensor | None = None,
    *,
    bins: int = 256,
) -> Tensor:
    """The bound's term at training timesteps t, in bits/dim: L_t = KL(q(x_{t-1} | x_t, x0) ||
    p(x_{t-1} | x_t)) for t > 0 and the decoder's L_0 = -log p(x0 | x_t)
    (`discretized_gaussian_log_likelihood` with `bins` levels) at t = 0 (Ho et al. 2020, Eq. 5 and Sec. 3.3).

    x0: (N, C, H, W) data; x_t: (N, C, H, W) = `scheduler.add_noise(x0, eps, t)`; t: (N,) long; x0_pred: the
    model's x0 (from `NoiseScheduler.predict_x0_and_eps`), which gives the model's mean (the posterior mean
    with x0_pred for x0, Ho et al. Eq. 7); variance_values: the model's v for "learned_range"
    (`NoiseScheduler.split_output`), else None. Detach x0_pred for the hybrid loss's stop-gradient on the mean
    (Nichol & Dhariwal 2021, Sec. 3.1). Returns (N,) in x0's dtype (at least float32).
    """
    dtype = torch.promote_types(x0.dtype, torch.float32)
    x0, x_t, x0_pred = x0.to(dtype), x_t.to(dtype), x0_pred.to(dtype)
    shape = (-1, *([1] * (x0.ndim - 1)))
    ab_t = scheduler.alpha_bar(t).to(dtype).reshape(shape)
    previous = (t - 1).clamp(min=0)
    ab_s = torch.where(t.reshape(shape) == 0, 1.0, scheduler.alpha_bar(previous).to(dtype).reshape(shape))
    true_mean, _, _ = posterior(x0, x_t, ab_t, ab_s)
    true_log_var = scheduler.posterior_log_variance(t, ndim=x0.ndim).to(dtype)
    model_mean, _, _ = posterior(x0_pred, x_t, ab_t, ab_s)
    v = variance_values.to(dtype) if variance_values is not None else None
    model_log_var = scheduler.model_log_variance(t, v, ndim=x0.ndim).to(dtype)
    kl = _mean_bits(normal_kl(true_mean, true_log_var, model_mean, model_log_var))
    decoder_nll = _mean_bits(
        -discretized_gaussian_log_likelihood(x0, model_mean, 0.5 * model_log_var, bins=bins)
    )
    return torch.where(t == 0, decoder_nll, kl)


# denoise(x_t, t, image) of the bound's rows: x_t (R, C, H, W), t (R,) long timesteps, image (R,) long, the
# image of x0 each row noises (to pick its label); returns `Denoised` (x0, eps, variance values) for each row.
RowDenoiser = Callable[[Tensor, Tensor, Tensor], Denoised]


@torch.no_grad()
def variational_bound(
    denoise: RowDenoiser,
    scheduler: NoiseScheduler,
    x0: Tensor,
    *,
    generator: torch.Generator | None = None,
    batch_size: int | None = None,
    bins: int = 256,
    callback: Callable[[int], None] | None = None,
) -> Bound:
    """The whole bound on -log p(x0) (Ho et al. 2020, Eq. 5) of each image, in bits/dim, as
    improved-diffusion's calc_bpd_loop: for every image and every t one draw x_t ~ q(x_t | x0), the model's
    prediction there, and `vlb_term_bpd`; plus `prior_bpd`.

    The N x T pairs (image, t) are rows, in the order image 0 at t = T-1 .. 0, then image 1, ..., and each
    network call takes the next `batch_size` of them (default T: one image per call), many timesteps in one
    batch: `bound_calls(N, T, batch_size)` calls. Each image's noise is one (T, C, H, W) draw from
    `generator`, made in image order, so an image's bound depends on the generator's state and on the images
    before it, never on batch_size.

    denoise: `RowDenoiser` (e.g. `ddpm.samplers.denoiser(model, scheduler, y=labels[image])(x_t, t)`, x0
    clipped as when sampling, by the scheduler's clip_sample); x0: (N, C, H, W) on the grid of `bins` levels
    in [-1, 1]; callback: called after each network call with its number of rows.
    """
    T = scheduler.num_train_timesteps
    n = x0.shape[0]
    batch_size = batch_size or T
    if batch_size < 1:
        raise ValueError(f"batch size must be >= 1 (rows per network call), got {batch_size}")
    terms = x0.new_zeros(n, T, dtype=torch.promote_types(x0.dtype, torch.float32))
    noise: dict[int, Tensor] = {}  # image -> its (T, C, H, W) noise, row k of it at t = T-1-k
    for start in range(0, n * T, batch_size):
        end = min(start + batch_size, n * T)
        images = range(start // T, (end - 1) // T + 1)  # the images this call's rows belong to
        for i in list(noise):
            if i < images[0]:
                del noise[i]
        for i in images:
            if i not in noise:
                noise[i] = gaussian_noise((T, *x0.shape[1:]), x0.dtype, x0.device, generator)
        eps = torch.cat([noise[i][max(start - i * T, 0) : min(end - i * T, T)] for i in images])
        row = torch.arange(start, end, device=x0.device)
        image, t = row // T, T - 1 - row % T
        x0_rows = x0[image]  # (R, C, H, W)
        x_t = scheduler.add_noise(x0_rows, eps, t)
        denoised = denoise(x_t, t, image)
        terms[image, t] = vlb_term_bpd(
            scheduler, x0_rows, x_t, t, denoised.x0, denoised.variance_values, bins=bins
        ).to(terms.dtype)
        if callback is not None:
            callback(end - start)
    prior = prior_bpd(scheduler, x0).to(terms.dtype)
    return Bound(prior + terms.sum(dim=1), prior, terms)


def bound_calls(n: int, T: int, batch_size: int) -> int:
    """The network calls `variational_bound` makes for n images of T timesteps, batch_size rows a call."""
    return -(-n * T // batch_size)


def _mean_bits(nats: Tensor) -> Tensor:
    """(N, ...) nats per element -> (N,) bits per dimension."""
    return nats.flatten(1).mean(dim=1) / LOG2
