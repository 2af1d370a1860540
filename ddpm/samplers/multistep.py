"""Multistep solvers in log-SNR time, with the signature of `ddpm.samplers.solvers`:
DPM-Solver++(2M), (3M) and (2M) SDE (Lu et al. 2022a, 2022b) and UniPC (Zhao et al. 2023), each computing what
diffusers' DPMSolverMultistepScheduler and UniPCMultistepScheduler compute on the same timesteps.

Notation (Lu et al. 2022b): alpha_t = sqrt(alpha_bar_t), sigma_t = sqrt(1 - alpha_bar_t) and lambda_t =
log(alpha_t / sigma_t) (half the log-SNR; -inf at alpha_bar = 0, +inf at alpha_bar = 1). Step i goes from
s = timesteps[i], where the network is called, to t = the next timestep (alpha_bar = 1 after the last one),
over h = lambda_t - lambda_s > 0. The solvers remember the data predictions x0 of the last steps; a step of
order k uses the k newest, at most i + 1 of them (warm-up) and fewer on the last steps (`step_order`).

e^{-h} = sigma_t alpha_s / (alpha_t sigma_s) is computed from the scales rather than from h, so that the first
step at zero terminal SNR (alpha_s = 0) and the final step to alpha_bar = 1 (sigma_t = 0) stay finite; the
ratios r of earlier steps to h are then +-inf there, which zeroes the higher-order terms that would use them.
All take the timesteps of diffusers' DPMSolverMultistepScheduler (`inference_timesteps(drop_last=True)`).
"""

import math

import torch
from torch import Tensor

from ddpm.progress import progress_bar
from ddpm.samplers.solvers import Denoiser, alpha_bars, gaussian_noise
from ddpm.schedule import NoiseScheduler

# diffusers' DPMSolverMultistepScheduler lowers the order of the last steps below this many steps
# (lower_order_final=True); its UniPCMultistepScheduler does so at every step count.
DPM_LOWER_ORDER_FINAL_BELOW = 15


def dpmpp_2m(
    denoise: Denoiser, x: Tensor, timesteps: Tensor, scheduler: NoiseScheduler, *, disable: bool = False
) -> Tensor:
    """DPM-Solver++(2M) (Lu et al. 2022b, Algorithm 2, midpoint form), deterministic: x (N, ...) x_T ->
    x0; first order on the first step and on the final step to alpha_bar = 1 (`step_order`)."""
    return _dpmpp(denoise, x, timesteps, scheduler, order=2, disable=disable)


def dpmpp_3m(
    denoise: Denoiser, x: Tensor, timesteps: Tensor, scheduler: NoiseScheduler, *, disable: bool = False
) -> Tensor:
    """DPM-Solver++(3M): the third-order multistep update of DPM-Solver (Lu et al. 2022a) in the data
    prediction of DPM-Solver++ (Lu et al. 2022b), as diffusers' DPMSolverMultistepScheduler(solver_order=3)
    computes it; deterministic: x (N, ...) x_T -> x0, orders 1, 2, 3, ..., lower on the last steps
    (`step_order`)."""
    return _dpmpp(denoise, x, timesteps, scheduler, order=3, disable=disable)


def dpmpp_2m_sde(
    denoise: Denoiser,
    x: Tensor,
    timesteps: Tensor,
    scheduler: NoiseScheduler,
    *,
    generator: torch.Generator | None = None,
    disable: bool = False,
) -> Tensor:
    """DPM-Solver++(2M) SDE: DPM-Solver++(2M) (Lu et al. 2022b) for the reverse SDE, its linear part
    integrated exactly (diffusers' algorithm_type="sde-dpmsolver++", midpoint): x (N, ...) x_T -> x0, one
    standard normal draw (solvers.gaussian_noise, from `generator`) per step but the last."""
    return _dpmpp(denoise, x, timesteps, scheduler, order=2, generator=generator, sde=True, disable=disable)


def unipc(
    denoise: Denoiser, x: Tensor, timesteps: Tensor, scheduler: NoiseScheduler, *, disable: bool = False
) -> Tensor:
    """UniPC-2 (Zhao et al. 2023: the UniP-2 predictor and the UniC corrector, B(h) = e^h - 1 "bh2", data
    prediction), deterministic: x (N, ...) x_T -> x0. The corrector of each step reuses the network
    call made at its end, so a step costs one call; there is none after the final step."""
    ab = alpha_bars(scheduler, timesteps)
    lambdas = _lambdas(ab)
    steps = len(timesteps)
    x0s: list[Tensor] = []  # m_i, m_{i-1}: data predictions, newest first
    previous = None  # (base, c0, h, r_1, order) of the step that led to x, for its UniC
    for i in progress_bar(range(steps), show=not disable):
        x0, _ = denoise(x, timesteps[i])
        if previous is not None:  # UniC of the previous step with m at its end: x_i^c replaces x_i
            base, c0, h, r, order = previous
            x = base + c0 * _unic(x0, x0s, h, r, order)
        x0s = [x0, *x0s[:1]]
        order = step_order(i, steps, 2, lower_order_final_below=math.inf)
        keep, c0 = _first_order(ab[i], ab[i + 1], sde=False)  # c0 = -alpha_t B(h), B(h) = e^{-h} - 1
        base = keep * x + c0 * x0  # the first-order (DDIM) step, shared by UniP and UniC
        h = lambdas[i + 1] - lambdas[i]
        r = (lambdas[i - 1] - lambdas[i]) / h if order == 2 else None  # r_1 < 0 of the point before s
        # UniP-2 with diffusers' rho_p = 1/2 on D_1 = (m_{i-1} - m_i) / r_1; UniP-1 is DDIM
        x = base + c0 * 0.5 * (x0s[1] - x0) / r if order == 2 else base
        previous = (base, c0, h, r, order)
    return x


def step_order(
    i: int, steps: int, order: int, *, lower_order_final_below: float = DPM_LOWER_ORDER_FINAL_BELOW
) -> int:
    """The order of step i (0-based) of `steps` for a multistep solver of `order`, as diffusers chooses it:
    at most i + 1 (warm-up: only i + 1 data predictions exist), 1 on the final step to alpha_bar = 1
    (final_sigmas_type="zero"), and, with fewer than `lower_order_final_below` steps, at most steps - i
    (lower_order_final: the last steps, large in log-SNR, are kept stable)."""
    last = steps - i if steps < lower_order_final_below else (1 if i == steps - 1 else order)
    return min(order, i + 1, last)


def _dpmpp(
    denoise: Denoiser,
    x: Tensor,
    timesteps: Tensor,
    scheduler: NoiseScheduler,
    *,
    order: int,
    generator: torch.Generator | None = None,
    sde: bool = False,
    disable: bool = False,
) -> Tensor:
    """DPM-Solver++ of `order` (1..3 for the ODE, 1..2 for the SDE), multistep, in the data prediction x0
    (diffusers' multistep_dpm_solver_{first,second,third}_order_update)."""
    ab = alpha_bars(scheduler, timesteps)
    lambdas = _lambdas(ab)
    steps = len(timesteps)
    x0s: list[Tensor] = []  # m_0 = x0 at timesteps[i], m_1 at timesteps[i - 1], ...: newest first
    for i in progress_bar(range(steps), show=not disable):
        x0, _ = denoise(x, timesteps[i])
        x0s = [x0, *x0s[: order - 1]]
        k = step_order(i, steps, order)
        keep, c0 = _first_order(ab[i], ab[i + 1], sde=sde)
        h = lambdas[i + 1] - lambdas[i]  # finite on steps of order >= 2 (neither the first nor the final)
        # r_0 = h_0 / h, r_1 = h_1 / h with h_0 = lambda_s - lambda_{s-1}, h_1 = lambda_{s-1} - lambda_{s-2}
        r = [(lambdas[i - j] - lambdas[i - j - 1]) / h for j in range(k - 1)]
        if k == 3:  # D1 and D2 estimate h dx0/dlambda and h^2 d2x0/dlambda2 / 2 at s (Lu et al. 2022a)
            d1_0, d1_1 = (x0s[0] - x0s[1]) / r[0], (x0s[1] - x0s[2]) / r[1]
            d1 = d1_0 + r[0] / (r[0] + r[1]) * (d1_0 - d1_1)
            d2 = (d1_0 - d1_1) / (r[0] + r[1])
            em1 = math.expm1(-h)  # e^{-h} - 1
            a_t = ab[i + 1] ** 0.5
            x = keep * x + c0 * x0 + a_t * (em1 / h + 1) * d1 - a_t * ((em1 + h) / h**2 - 0.5) * d2
        else:  # Lu et al. 2022b, Alg. 2: D = m_0 + (m_0 - m_1) / (2 r_0) at order 2, m_0 at order 1
            d = x0 + 0.5 * (x0 - x0s[1]) / r[0] if k == 2 else x0
            x = keep * x + c0 * d
        if sde and i < steps - 1:  # + sigma_t sqrt(1 - e^{-2h}) z; sigma_t = 0 on the final step
            s_t, e = (1 - ab[i + 1]) ** 0.5, _exp_minus_h(ab[i], ab[i + 1])
            x = x + s_t * (1 - e**2) ** 0.5 * gaussian_noise(x.shape, x.dtype, x.device, generator)
    return x


def _unic(m_t: Tensor, x0s: list[Tensor], h: float, r: float | None, order: int) -> Tensor:
    """The UniC-`order` correction (Zhao et al. 2023, bh2, data prediction) of a step s -> t over h,
    in units of c0 = -alpha_t B(h): x_t^c = (first-order step) + c0 * this. m_t: the data prediction at the
    step's end; x0s = [m_s, m_{s-1}]; r = r_1 = (lambda_{s-1} - lambda_s) / h (order 2 only)."""
    d1_t = m_t - x0s[0]  # D_1 at t, whose r is 1
    if order == 1:  # diffusers' rho_c = 1/2 for UniC-1
        return 0.5 * d1_t
    # rho_c solves R rho = b with R = [[1, 1], [r_1, 1]] and, for B(h) = e^{-h} - 1 (bh2), b_1 = phi / B(h),
    # b_2 = 2 (-phi / h - 1/2) / B(h), phi = (1 - e^{-h}) / h - 1. r_1 = -inf (lambda_{s-1} = -inf): rho_0 = 0
    em1 = math.expm1(-h)  # e^{-h} - 1
    phi = -em1 / h - 1
    b1, b2 = phi / em1, 2 * (-phi / h - 0.5) / em1
    rho_0 = (b1 - b2) / (1 - r)
    return rho_0 * (x0s[1] - x0s[0]) / r + (b1 - rho_0) * d1_t


def _first_order(ab_s: float, ab_t: float, *, sde: bool) -> tuple[float, float]:
    """(keep, c0) of the first-order step x_t = keep x_s + c0 x0 from alpha_bar_s to alpha_bar_t (DPM-Solver++
    first order, i.e. DDIM, and its SDE form without the noise): keep = sigma_t / sigma_s (ODE) or
    sigma_t e^{-h} / sigma_s (SDE), c0 = alpha_t (1 - e^{-h}) (ODE) or alpha_t (1 - e^{-2h}) (SDE)."""
    a_t, s_t, s_s = ab_t**0.5, (1 - ab_t) ** 0.5, (1 - ab_s) ** 0.5
    e = _exp_minus_h(ab_s, ab_t)
    if sde:
        return s_t / s_s * e, a_t * (1 - e * e)
    return s_t / s_s, a_t * (1 - e)


def _exp_minus_h(ab_s: float, ab_t: float) -> float:
    """e^{-h} = sigma_t alpha_s / (alpha_t sigma_s): 0 at alpha_bar_s = 0 and at alpha_bar_t = 1."""
    return ((1 - ab_t) * ab_s) ** 0.5 / (ab_t * (1 - ab_s)) ** 0.5


def _lambdas(ab: list[float]) -> list[float]:
    """lambda = log(alpha / sigma) = (log alpha_bar - log(1 - alpha_bar)) / 2 at each alpha_bar of `ab`: +inf
    at 1, -inf at 0."""
    ab = torch.tensor(ab, dtype=torch.float64)
    return (0.5 * (ab.log() - (1 - ab).log())).tolist()
