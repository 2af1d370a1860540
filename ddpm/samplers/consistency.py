"""Consistency models (Song et al. 2023, "Consistency Models"): the boundary-condition parameterisation of a
consistency function on any of our networks, one step of the probability-flow ODE between two noise levels
of a row each (the teacher's step of consistency distillation, their Algorithm 2), and the multistep
consistency sampler (their Algorithm 1), sampler "consistency" of `ddpm.samplers.SAMPLERS`.

Frames. The samplers work on x_t = sqrt(alpha_bar) x0 + sqrt(1 - alpha_bar) eps; the paper on
x_sigma = x0 + sigma eps = x_t / sqrt(alpha_bar) with sigma = sqrt((1 - alpha_bar) / alpha_bar) (Karras et
al. 2022). A consistency function maps every point of an ODE trajectory to its end at sigma_min, the
lowest noise level of the schedule, and is the identity there (the boundary condition f(x, sigma_min) = x).
The paper builds it in (Sec. 3, Eq. 5; Appendix C):

    f(x, sigma) = c_skip(sigma) x + c_out(sigma) F(x, sigma)
    c_skip = sd^2 / ((sigma - sigma_min)^2 + sd^2),   c_out = sd (sigma - sigma_min) / sqrt(sd^2 + sigma^2)

with sd = sigma_data (0.5 for data in [-1, 1], SIGMA_DATA). F is the network read as EDM's F (Karras et al.
2022, Eq. 7) at the same sigma_data, F = (D - c_skip^EDM x) / c_out^EDM, D being the network's x0 estimate
(its denoiser, whatever it predicts): so a consistency model started from a diffusion model takes its
network as it is, and away from sigma_min it starts as that model's denoiser. Substituted,

    f = c_skip x + r (D - c_skip^EDM x),   r = c_out / c_out^EDM = 1 - sigma_min / sigma,

which in the samplers' frame is f = A x_t + r D with A = (c_skip - r c_skip^EDM) / sqrt(alpha_bar), computed
in float64 (at sigma = inf, zero terminal SNR, A = 0 and r = 1: f = D).
"""

from __future__ import annotations

import torch
from torch import Tensor

from ddpm.progress import progress_bar
from ddpm.samplers.solvers import Denoiser, alpha_bars, gaussian_noise
from ddpm.schedule import NoiseScheduler

SIGMA_DATA = 0.5  # sigma_data of c_skip and c_out, in data units (Song et al. 2023, Appendix C)
ODE_SOLVERS = ("heun", "euler")  # the teacher's step of `ode_step`
HEUN_MAX_RATIO = 10.0  # `ode_step` takes Euler's step where sigma / sigma' is above this


def boundary_coefficients(
    sigma: Tensor, sigma_min: float, sigma_data: float = SIGMA_DATA
) -> tuple[Tensor, Tensor]:
    """(c_skip, c_out) of Song et al. 2023, Appendix C, at noise levels sigma >= sigma_min (any shape),
    float64: c_skip = sd^2 / ((sigma - sigma_min)^2 + sd^2), c_out = sd (sigma - sigma_min) /
    sqrt(sd^2 + sigma^2), sd = sigma_data; c_skip(sigma_min) = 1 and c_out(sigma_min) = 0 exactly."""
    sigma = torch.as_tensor(sigma, dtype=torch.float64)
    sd2 = sigma_data**2
    offset = sigma - sigma_min
    return sd2 / (offset**2 + sd2), sigma_data * offset / (sigma**2 + sd2).sqrt()


def consistency_output(
    x0: Tensor, x_t: Tensor, t: Tensor, scheduler: NoiseScheduler, sigma_data: float
) -> Tensor:
    """f(x, sigma) of the module docstring in the data frame, from a network's x0 estimate D = x0 at the
    samplers' x_t and timesteps t (0-d or (N,), long or float: `scheduler.alpha_bar`): A x_t + r D.

    x0, x_t: (N, C, H, W). sigma_data: in the samplers' frame (`frame_sigma_data`). sigma_min is the
    schedule's (`sigma_range`). Returns (N, C, H, W) in x_t's dtype (at least float32)."""
    sigma_min, _ = sigma_range(scheduler)
    ab = scheduler.alpha_bar(torch.as_tensor(t)).to(torch.float64)
    sigma = ((1 - ab) / ab).sqrt()  # inf at alpha_bar = 0
    finite = sigma.isfinite()
    safe = torch.where(finite, sigma, torch.ones_like(sigma))  # keeps the unused branch finite
    c_skip, _ = boundary_coefficients(safe, sigma_min, sigma_data)
    r = 1 - sigma_min / safe
    c_skip_edm = sigma_data**2 / (safe**2 + sigma_data**2)
    a = torch.where(finite, (c_skip - r * c_skip_edm) * (1 + safe**2).sqrt(), torch.zeros_like(safe))
    r = torch.where(finite, r, torch.ones_like(r))
    dtype = torch.promote_types(x_t.dtype, torch.float32)
    if ab.ndim == 0 and ab.device.type == "cpu":  # a sampler's step: numbers, no copy to the device
        return a.item() * x_t.to(dtype) + r.item() * x0.to(dtype)
    shape = (-1, *([1] * (x_t.ndim - 1)))
    a, r = (c.to(device=x_t.device, dtype=dtype).reshape(shape) for c in (a, r))
    return a * x_t.to(dtype) + r * x0.to(dtype)


def ode_step(
    denoise: Denoiser,
    x_t: Tensor,
    t: Tensor,
    t_next: Tensor,
    scheduler: NoiseScheduler,
    *,
    solver: str = "heun",
) -> Tensor:
    """One step of the probability-flow ODE dx_sigma/dsigma = eps (Karras et al. 2022, Eq. 4) from
    timesteps t to t_next (< t), one each per row ((N,) float64 or long), with the denoiser `denoise`:

        "euler": x~ = x0 + sigma' eps                             (one call; DDIM's step at eta = 0)
        "heun":  x~ + (sigma' - sigma) (eps' - eps) / 2, eps' at (x~, sigma')   (two calls; Karras Alg. 1)
                 on the rows where sigma <= HEUN_MAX_RATIO sigma', x~ on those of a wider step

    written in the samplers' frame (x_t = sqrt(alpha_bar) x_sigma), as `ddpm.samplers.euler` and `heun` step
    (here with a noise level per row). x_t: (N, C, H, W). Returns x at t_next, x_t's shape and dtype.

    Why Euler on wide steps: Heun's trapezoid weighs eps at the end by (sigma - sigma') / 2, which over a
    step of 250x in sigma (the digits' 2e4 down to `ddpm.training.consistency.GRID_SIGMA_MAX`) turns the
    denoiser's small change there, of order (sigma_data / sigma')^2, into an error 27x Euler's on the
    exact-score mixture; Euler's step, DDIM's, is exact for a denoiser that does not change."""
    if solver not in ODE_SOLVERS:
        raise ValueError(f"unknown ODE solver {solver!r}; valid: {', '.join(ODE_SOLVERS)}")
    shape = (-1, *([1] * (x_t.ndim - 1)))
    ab, ab_next = (scheduler.alpha_bar(s).to(x_t.device, x_t.dtype).reshape(shape) for s in (t, t_next))
    x0, eps = denoise(x_t, t)
    x_next = ab_next.sqrt() * x0 + (1 - ab_next).sqrt() * eps
    if solver == "euler":
        return x_next
    sigma, sigma_next = ((1 - ab) / ab).sqrt(), ((1 - ab_next) / ab_next).sqrt()
    _, eps_next = denoise(x_next, t_next)
    heun = x_next + ab_next.sqrt() * (sigma_next - sigma) / 2 * (eps_next - eps)
    return torch.where(sigma <= HEUN_MAX_RATIO * sigma_next, heun, x_next)


def consistency(
    denoise: Denoiser,
    x: Tensor,
    timesteps: Tensor,
    scheduler: NoiseScheduler,
    *,
    generator: torch.Generator | None = None,
    disable: bool = False,
) -> Tensor:
    """Multistep consistency sampling (Song et al. 2023, Algorithm 1) of a consistency model (a network
    distilled by `ddpm.training.consistency`): x0 = f(x_T, sigma_0) at the first timestep, then at each next
    timestep tau_i the image re-noised, x_sigma = x0 + sqrt(sigma_i^2 - sigma_min^2) z, and x0 = f(x_sigma,
    sigma_i) again; one network call per timestep. f is `consistency_output` at sigma_data = SIGMA_DATA (in
    the samplers' frame: `frame_sigma_data`); the timesteps are the schedule's grid (a consistency student's
    is trailing: T-1, then evenly spaced t; for the EDM formulation sigma_max, then Karras levels above
    sigma_min, where f would be the identity and a call be spent on nothing).
    Returns the last f, (N, C, H, W)."""
    sigma_data = frame_sigma_data(scheduler)
    sigma_min, _ = sigma_range(scheduler)
    abars = alpha_bars(scheduler, timesteps)
    x0 = x
    for i in progress_bar(range(len(timesteps)), show=not disable):
        if i > 0:  # Alg. 1, line 5: back to sigma_i along fresh noise
            sigma2 = (1 - abars[i]) / abars[i]
            z = gaussian_noise(x.shape, x.dtype, x.device, generator)
            x = abars[i] ** 0.5 * (x0 + max(sigma2 - sigma_min**2, 0.0) ** 0.5 * z)
        x0 = consistency_output(denoise(x, timesteps[i]).x0, x, timesteps[i], scheduler, sigma_data)
    return x0


def sigma_range(scheduler: NoiseScheduler) -> tuple[float, float]:
    """(sigma_min, sigma_max) of the schedule in the samplers' frame: its noise levels at t = 0 and T-1 (the
    ends of `ddpm.schedule.sigma_grid`'s spacings; sigma_max is inf under zero terminal SNR)."""
    low, high = scheduler.log_sigmas[[0, -1]].exp().tolist()
    return low, high


def frame_sigma_data(scheduler: NoiseScheduler) -> float:
    """SIGMA_DATA in the samplers' frame: the data over `scheduler.data_scale` (1 but for the EDM formulation,
    whose samplers work on the data over its sigma_data)."""
    return SIGMA_DATA / scheduler.data_scale
