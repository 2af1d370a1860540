"""The solvers: step loops from x_T to x0, one signature for all (k-diffusion style):

    solver(denoise, x, timesteps, scheduler, *, <its own options>, disable) -> x0

where `denoise(x_t, t) -> (x0, eps)` (a `Denoised`, which also carries a learned variance's values) is
`ddpm.samplers.denoiser`: the model call followed by the scheduler's one conversion
(`NoiseScheduler.predict_x0_and_eps`), x is x_T, and `timesteps` (steps,) is the descending list of the
scheduler's `inference_timesteps` (long, or float64 continuous timesteps for the sigma spacings). The next
timestep is always read from that list; after its last entry comes alpha_bar = 1 (sigma = 0, diffusers'
set_alpha_to_one), so the final step returns the predicted x0; `alpha_bars` gives those steps + 1 values.
Each solver declares only the options it uses, keyword-only (`generator` for the stochastic ones), and works
in x's dtype whatever precision the model runs in. A solver makes one network call per step unless
`CALLS_PER_STEP` says otherwise (`network_calls`). `ddpm.samplers.sample` builds `denoise` and calls them by
their registry name.

The sigma-space solvers (Karras et al. 2022) work on x_t / sqrt(alpha_bar) = x0 + sigma eps with
sigma = sqrt((1 - alpha_bar) / alpha_bar), whose probability-flow ODE is dx/dsigma = eps; they are written
back in x_t = sqrt(alpha_bar) (x0 + sigma eps) so that alpha_bar = 0 (sigma = inf, zero terminal SNR) stays
finite.
"""

import math
from collections.abc import Callable

import torch
from torch import Tensor

from ddpm.progress import progress_bar
from ddpm.schedule import NoiseScheduler


class Denoised(tuple):
    """What `denoise(x_t, t)` returns: the pair (x0, eps), which every solver unpacks as
    `x0, eps = denoise(x, t)`, carrying also `variance_values`, the model's variance channels v in [-1, 1]
    ((N, C, H, W), from the conditional pass under guidance) when its schedule has variance_type
    "learned_range", else None. Only the ancestral sampler reads them."""

    def __new__(cls, x0: Tensor, eps: Tensor, variance_values: Tensor | None = None) -> "Denoised":
        pair = super().__new__(cls, (x0, eps))
        pair.variance_values = variance_values
        return pair

    @property
    def x0(self) -> Tensor:
        return self[0]

    @property
    def eps(self) -> Tensor:
        return self[1]


# (x_t (N, ...), t 0-d, or (N,) one per row) -> (x0, eps) and the variance values
Denoiser = Callable[[Tensor, Tensor], Denoised]


def ddpm_ancestral(
    denoise: Denoiser,
    x: Tensor,
    timesteps: Tensor,
    scheduler: NoiseScheduler,
    *,
    generator: torch.Generator | None = None,
    disable: bool = False,
) -> Tensor:
    """Ancestral sampling from the posterior q(x_s | x_t, x0) (Ho et al. 2020, Eq. 6-7 and Algorithm 2), with
    s the next timestep of the list, generalised to skipped steps as diffusers' DDPMScheduler and
    improved-diffusion's respacing do (beta_t := 1 - alpha_bar_t / alpha_bar_s). The noise added has the
    variance `scheduler.variance_type` names (`NoiseScheduler.log_variance`) for this step's beta and
    beta-tilde: with "learned_range", the model's variance values interpolate between them."""
    abars = alpha_bars(scheduler, timesteps)
    for i in progress_bar(range(len(timesteps)), show=not disable):
        x = ancestral_step(x, denoise(x, timesteps[i]), abars[i], abars[i + 1], scheduler, generator)
    return x


def ancestral_step(
    x: Tensor,
    denoised: Denoised,
    ab_t: float,
    ab_s: float,
    scheduler: NoiseScheduler,
    generator: torch.Generator | None = None,
) -> Tensor:
    """One step of `ddpm_ancestral` from x = x_t (N, C, H, W) at alpha_bar_t = ab_t to alpha_bar_s = ab_s
    (> ab_t; 1 for the final x0), given the model's `denoise(x, t)` there: the posterior mean with the
    predicted x0 (Ho et al. 2020, Eq. 7) plus noise of the variance `scheduler.log_variance` gives for this
    step's beta = 1 - ab_t / ab_s and beta-tilde (with the model's variance values for "learned_range").
    No noise is added where ab_s = 1 (Algorithm 2: z = 0 at the last step). For code that runs the reverse
    process itself (inpainting, editing) with any variance type."""
    mean, var_small, beta = posterior(denoised.x0, x, ab_t, ab_s)
    if ab_s == 1.0:  # the mean is x0
        return mean
    # var_small > 0 here, since ab_s < 1
    log_var = scheduler.log_variance(
        torch.tensor(math.log(beta), dtype=x.dtype),
        torch.tensor(math.log(var_small), dtype=x.dtype),
        denoised.variance_values,
    )
    std = (0.5 * log_var).exp().to(x.dtype)
    return mean + std * gaussian_noise(x.shape, x.dtype, x.device, generator)


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
    abars = alpha_bars(scheduler, timesteps)
    for i in progress_bar(range(len(timesteps)), show=not disable):
        x0, eps = denoise(x, timesteps[i])
        x = ddim_step(x0, eps, abars[i], abars[i + 1], eta=eta, generator=generator)
    return x


def ddim_step(
    x0: Tensor,
    eps: Tensor,
    ab_t: float,
    ab_s: float,
    *,
    eta: float = 0.0,
    generator: torch.Generator | None = None,
) -> Tensor:
    """One step of `ddim` (Song et al. 2021, Eq. 12 and 16) from alpha_bar ab_t to ab_s, given the estimates
    (x0, eps) (N, ...) at x_t: x_s = sqrt(ab_s) x0 + sqrt(1 - ab_s - sigma^2) eps + sigma z with
    sigma^2 = eta^2 beta-tilde. At eta = 0 it is deterministic and goes either way: ab_s < ab_t is the step
    of DDIM inversion (Sec. 4.3)."""
    sigma2 = eta**2 * (1 - ab_s) / (1 - ab_t) * (1 - ab_t / ab_s) if eta else 0.0
    # At eta = 1 the root's argument is (1 - ab_s)^2 ab_t / (ab_s (1 - ab_t)) >= 0, which rounding may push
    # just below 0: hence the max().
    x = ab_s**0.5 * x0 + max(1 - ab_s - sigma2, 0.0) ** 0.5 * eps
    if sigma2 > 0:
        x = x + sigma2**0.5 * gaussian_noise(x.shape, x.dtype, x.device, generator)
    return x


def euler(
    denoise: Denoiser, x: Tensor, timesteps: Tensor, scheduler: NoiseScheduler, *, disable: bool = False
) -> Tensor:
    """Euler's method on the probability-flow ODE dx/dsigma = eps in sigma (Karras et al. 2022, Eq. 4 and
    Alg. 1 without its correction; diffusers' EulerDiscreteScheduler). Deterministic.

    x_sigma' = x_sigma + (sigma' - sigma) eps = x0 + sigma' eps, i.e. x_s = sqrt(alpha_bar_s) x0 +
    sqrt(1 - alpha_bar_s) eps: the same update as DDIM at eta = 0 (Karras et al. 2022, Sec. 3), on the
    timesteps of EulerDiscreteScheduler (no drop_last), which for "karras" and "exponential" are continuous.
    """
    abars = alpha_bars(scheduler, timesteps)
    for i in progress_bar(range(len(timesteps)), show=not disable):
        x0, eps = denoise(x, timesteps[i])
        x = _to_level(x0, eps, abars[i + 1])
    return x


def heun(
    denoise: Denoiser,
    x: Tensor,
    timesteps: Tensor,
    scheduler: NoiseScheduler,
    *,
    s_churn: float = 0.0,
    s_tmin: float = 0.0,
    s_tmax: float = math.inf,
    s_noise: float = 1.0,
    generator: torch.Generator | None = None,
    disable: bool = False,
) -> Tensor:
    """Heun's 2nd-order method on the probability-flow ODE in sigma (Karras et al. 2022, Alg. 1; diffusers'
    HeunDiscreteScheduler), with Alg. 2's churn: s_churn = 0 (the default) is deterministic.

    Step i from sigma to sigma': with churn, gamma = min(s_churn / steps, sqrt(2) - 1) where s_tmin <= sigma
    <= s_tmax (else 0), sigma_hat = sigma (1 + gamma), and x_sigma gets noise of std
    sqrt(sigma_hat^2 - sigma^2) * s_noise (sigma_hat capped at the schedule's sigma_max, the highest level
    the network knows; its continuous t is `sigma_to_t`). Then the Euler step x~ = x0 + sigma' eps and, unless
    sigma' = 0 (the last step, Euler alone), the correction with eps' evaluated at (x~, sigma'):
    x_sigma' = x~ + (sigma' - sigma_hat) (eps' - eps) / 2. Two network calls per step, one on the last
    (`network_calls`: 2 steps - 1); at an infinite sigma (zero terminal SNR) the step is Euler's alone.
    """
    abars = alpha_bars(scheduler, timesteps)
    sigma_max = math.exp(scheduler.log_sigmas[-1].item())
    gamma = min(s_churn / len(timesteps), 2**0.5 - 1)
    for i in progress_bar(range(len(timesteps)), show=not disable):
        t, ab, ab_next = timesteps[i], abars[i], abars[i + 1]
        sigma, sigma_next = _sigma(ab), _sigma(ab_next)
        sigma_hat = min(sigma * (1 + gamma), sigma_max) if s_tmin <= sigma <= s_tmax else sigma
        if sigma_hat > sigma * (1 + 1e-9):  # EDM Alg. 2, lines 5-6, in x_t = x_sigma / sqrt(1 + sigma^2)
            noise = gaussian_noise(x.shape, x.dtype, x.device, generator)
            x_hat = x / ab**0.5 + (sigma_hat**2 - sigma**2) ** 0.5 * s_noise * noise
            x = x_hat / (1 + sigma_hat**2) ** 0.5
            t = scheduler.sigma_to_t(sigma_hat)  # continuous: the model sees x_hat at its own level
        else:  # no churn here, or none left below sigma_max (up to rounding)
            sigma_hat = sigma
        x0, eps = denoise(x, t)
        x_next = _to_level(x0, eps, ab_next)
        if sigma_next > 0 and math.isfinite(sigma_hat):
            _, eps_next = denoise(x_next, timesteps[i + 1])
            x_next = x_next + ab_next**0.5 * (sigma_next - sigma_hat) / 2 * (eps_next - eps)
        x = x_next
    return x


def euler_ancestral(
    denoise: Denoiser,
    x: Tensor,
    timesteps: Tensor,
    scheduler: NoiseScheduler,
    *,
    generator: torch.Generator | None = None,
    disable: bool = False,
) -> Tensor:
    """Euler ancestral (k-diffusion's sample_euler_ancestral at eta = 1; diffusers'
    EulerAncestralDiscreteScheduler): each step from sigma to sigma' is an Euler step to sigma_down, then
    fresh noise of std sigma_up, with sigma_up^2 = sigma'^2 (1 - sigma'^2 / sigma^2) and sigma_down^2 =
    sigma'^2 - sigma_up^2, the DDPM posterior's split of sigma' (Ho et al. 2020): x_sigma' = x0 +
    sigma_down eps + sigma_up z. No noise on the last step (sigma' = 0)."""
    abars = alpha_bars(scheduler, timesteps)
    for i in progress_bar(range(len(timesteps)), show=not disable):
        x0, eps = denoise(x, timesteps[i])
        sigma, sigma_next = _sigma(abars[i]), _sigma(abars[i + 1])
        if sigma_next == 0:
            x = x0
            continue
        sigma_up = sigma_next * max(1 - (sigma_next / sigma) ** 2, 0.0) ** 0.5
        sigma_down = (sigma_next**2 - sigma_up**2) ** 0.5
        noise = gaussian_noise(x.shape, x.dtype, x.device, generator)
        x = abars[i + 1] ** 0.5 * (x0 + sigma_down * eps + sigma_up * noise)
    return x


# Solvers that cost other than one network call per step: solver -> (calls per step, calls saved), i.e.
# network_calls = per_step * steps - saved. Heun's last step to sigma = 0 is Euler's alone.
CALLS_PER_STEP: dict[Callable[..., Tensor], tuple[int, int]] = {heun: (2, 1)}


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
    depend on the device the sampling runs on). Noise drawn on the CPU for a CUDA device is drawn into pinned
    memory and copied without waiting (a plain copy from the host would wait for the device at every step)."""
    draw_device = generator.device if generator is not None else torch.device(device)
    to_cuda = draw_device.type == "cpu" and torch.device(device).type == "cuda"
    noise = torch.randn(
        tuple(shape), generator=generator, device=draw_device, dtype=dtype, pin_memory=to_cuda
    )
    return noise.to(device, non_blocking=to_cuda)


def alpha_bars(scheduler: NoiseScheduler, timesteps: Tensor) -> list[float]:
    """alpha_bar (float64) at each entry of the descending `timesteps` (long or float, see
    `NoiseScheduler.alpha_bar`), then 1 for the final x0: steps + 1 floats."""
    return scheduler.alpha_bar(timesteps.cpu()).tolist() + [1.0]


def network_calls(solver: Callable[..., Tensor], steps: int) -> int:
    """The network calls `solver` makes in `steps` steps (without guidance, which batches each call)."""
    per_step, saved = CALLS_PER_STEP.get(solver, (1, 0))
    return per_step * steps - saved


def steps_for_calls(solver: Callable[..., Tensor], calls: int) -> int:
    """The most steps whose `network_calls` are at most `calls` (0 when even one step costs more)."""
    per_step, saved = CALLS_PER_STEP.get(solver, (1, 0))
    return (calls + saved) // per_step


def _sigma(alpha_bar: float) -> float:
    """sigma = sqrt((1 - alpha_bar) / alpha_bar): inf at alpha_bar = 0, 0 at alpha_bar = 1."""
    return math.inf if alpha_bar == 0 else ((1 - alpha_bar) / alpha_bar) ** 0.5


def _to_level(x0: Tensor, eps: Tensor, alpha_bar: float) -> Tensor:
    """sqrt(alpha_bar) x0 + sqrt(1 - alpha_bar) eps: the point at noise level alpha_bar on the line through
    the estimates, where an Euler step in sigma (or a DDIM step at eta = 0) lands."""
    return alpha_bar**0.5 * x0 + (1 - alpha_bar) ** 0.5 * eps
