"""The solvers: step loops from x_T to x0, one signature for all (k-diffusion style):

    solver(denoise, x, timesteps, scheduler, *, <its own options>, disable) -> x0

where `denoise(x_t, t) -> (x0, eps)` is the model call followed by the scheduler's one conversion
(`NoiseScheduler.predict_x0_and_eps`), x is x_T, and `timesteps` (steps,) is the descending list of the
scheduler's `inference_timesteps`. The next timestep is always read from that list; after its last entry comes
alpha_bar = 1 (diffusers' set_alpha_to_one), so the final step returns the predicted x0. Each solver declares
only the options it uses, keyword-only (`generator` for the stochastic ones), and works in x's dtype whatever
precision the model runs in. `ddpm.samplers.sample` builds `denoise` and calls them by their registry name.
"""

from collections.abc import Callable

import torch
from torch import Tensor
from tqdm.auto import tqdm

from ddpm.schedule import NoiseScheduler

Denoiser = Callable[[Tensor, Tensor], tuple[Tensor, Tensor]]  # (x_t (N, ...), t 0-d long) -> (x0, eps)
VARIANCES = ("fixed_small", "fixed_large")


def ddpm_ancestral(
    denoise: Denoiser,
    x: Tensor,
    timesteps: Tensor,
    scheduler: NoiseScheduler,
    *,
    variance: str = "fixed_small",
    generator: torch.Generator | None = None,
    disable: bool = False,
) -> Tensor:
    """Ancestral sampling from the posterior q(x_s | x_t, x0) (Ho et al. 2020, Eq. 6-7 and Algorithm 2), with
    s the next timestep of the list, generalised to skipped steps as diffusers' DDPMScheduler does
    (beta_t := 1 - alpha_bar_t / alpha_bar_s). variance: one of VARIANCES, the std of the noise added."""
    alpha_bars = _alpha_bars(scheduler, timesteps)
    for i in tqdm(range(len(timesteps)), disable=disable):
        ab_t, ab_s = alpha_bars[i], alpha_bars[i + 1]
        x0, _ = denoise(x, timesteps[i])
        mean, var_small, beta = posterior(x0, x, ab_t, ab_s)
        if i == len(timesteps) - 1:  # alpha_bar_s = 1: the mean is x0 and no noise is added (z = 0 at t = 1)
            x = mean
        else:
            std = (var_small if variance == "fixed_small" else beta) ** 0.5
            x = mean + std * gaussian_noise(x.shape, x.dtype, x.device, generator)
    return x


def ddim(
    denoise: Denoiser,
    x: Tensor,
    timesteps: Tensor,
    scheduler: NoiseScheduler,
    *,
    eta: float = 0.0,
    generator: torch.Generator | None = None,
    disable: bool = False,
) -> Tensor:
    """DDIM (Song et al. 2021, Eq. 12) with sigma_t = eta * sqrt(beta-tilde) (Eq. 16): eta = 0 is the
    deterministic DDIM, eta = 1 the DDPM posterior with fixed_small variance."""
    alpha_bars = _alpha_bars(scheduler, timesteps)
    for i in tqdm(range(len(timesteps)), disable=disable):
        ab_t, ab_s = alpha_bars[i], alpha_bars[i + 1]
        x0, eps = denoise(x, timesteps[i])
        sigma2 = eta**2 * (1 - ab_s) / (1 - ab_t) * (1 - ab_t / ab_s)
        # x_s = sqrt(ab_s) x0 + sqrt(1 - ab_s - sigma^2) eps + sigma z. At eta = 1 the root's argument is
        # (1 - ab_s)^2 ab_t / (ab_s (1 - ab_t)) >= 0, which rounding may push just below 0: hence the max().
        x = ab_s**0.5 * x0 + max(1 - ab_s - sigma2, 0.0) ** 0.5 * eps
        if sigma2 > 0:
            x = x + sigma2**0.5 * gaussian_noise(x.shape, x.dtype, x.device, generator)
    return x


def dpmpp_2m(
    denoise: Denoiser, x: Tensor, timesteps: Tensor, scheduler: NoiseScheduler, *, disable: bool = False
) -> Tensor:
    """DPM-Solver++(2M) (Lu et al. 2022, Algorithm 2): multistep second order in the data prediction x0,
    first order on the first step and on the final step to alpha_bar = 1. Deterministic.

    With alpha_t = sqrt(alpha_bar_t), sigma_t = sqrt(1 - alpha_bar_t), lambda_t = log(alpha_t / sigma_t) and
    h_i = lambda_{t_i} - lambda_{t_{i-1}}, a step is
        x_{t_i} = (sigma_{t_i} / sigma_{t_{i-1}}) x_{t_{i-1}} - alpha_{t_i} (e^{-h_i} - 1) D_i,
        D_i = (1 + 1/(2 r_i)) x0_{i-1} - 1/(2 r_i) x0_{i-2},  r_i = h_{i-1} / h_i,
    and D_i = x0_{i-1} for a first-order step.
    alpha_t (e^{-h} - 1) is computed as sigma_{t_i} alpha_{t_{i-1}} / sigma_{t_{i-1}} - alpha_{t_i}, finite at
    alpha_bar = 0 (zero terminal SNR, lambda = -inf) and at alpha_bar = 1 (lambda = +inf); there r = +inf
    makes D_i = x0_{i-1}. Takes the timesteps of diffusers' DPMSolverMultistepScheduler (drop_last=True).
    """
    alpha_bars = _alpha_bars(scheduler, timesteps)
    ab = torch.tensor(alpha_bars, dtype=torch.float64)
    lambdas = (0.5 * (ab.log() - (1 - ab).log())).tolist()  # lambda_t, -inf at alpha_bar = 0, +inf at 1
    x0_prev = None
    for i in tqdm(range(len(timesteps)), disable=disable):
        (a_t, s_t), (a_s, s_s) = _scales(alpha_bars[i]), _scales(alpha_bars[i + 1])
        x0, _ = denoise(x, timesteps[i])
        if x0_prev is None or i == len(timesteps) - 1:
            d = x0
        else:
            r = (lambdas[i] - lambdas[i - 1]) / (lambdas[i + 1] - lambdas[i])
            d = (1 + 0.5 / r) * x0 - (0.5 / r) * x0_prev
        x = (s_s / s_t) * x + (a_s - s_s * a_t / s_t) * d
        x0_prev = x0
    return x


def posterior(x0: Tensor, x_t: Tensor, ab_t: float, ab_s: float) -> tuple[Tensor, float, float]:
    """q(x_s | x_t, x0) for s < t, alpha_bar_t = ab_t, alpha_bar_s = ab_s (Ho et al. 2020, Eq. 6-7, with
    beta_t generalised to 1 - ab_t / ab_s for skipped steps). Returns the mean (N, ...), the posterior
    variance beta-tilde = (1 - ab_s) / (1 - ab_t) beta_t ("fixed_small") and beta_t ("fixed_large").

    beta-tilde is 0 where ab_s = 1; the solvers add no noise there, so the log-variance clipping that
    diffusers and improved-diffusion apply at that step is not needed.
    """
    alpha = ab_t / ab_s
    beta = 1 - alpha
    mean = (ab_s**0.5 * beta / (1 - ab_t)) * x0 + (alpha**0.5 * (1 - ab_s) / (1 - ab_t)) * x_t
    return mean, (1 - ab_s) / (1 - ab_t) * beta, beta


def gaussian_noise(
    shape, dtype: torch.dtype, device: torch.device, generator: torch.Generator | None
) -> Tensor:
    """Standard normal noise of `shape` on `device`, drawn on the generator's device (so that results do not
    depend on the device the sampling runs on)."""
    draw_device = generator.device if generator is not None else device
    return torch.randn(tuple(shape), generator=generator, device=draw_device, dtype=dtype).to(device)


def _alpha_bars(scheduler: NoiseScheduler, timesteps: Tensor) -> list[float]:
    """alpha_bar (float64) at each timestep of the list, then 1 for the final x0: steps + 1 floats."""
    return scheduler.alphas_cumprod[timesteps].tolist() + [1.0]


def _scales(alpha_bar: float) -> tuple[float, float]:
    """(alpha, sigma) = (sqrt(alpha_bar), sqrt(1 - alpha_bar))."""
    return alpha_bar**0.5, (1 - alpha_bar) ** 0.5
