"""Sampling: `sample(model, scheduler, ...)` and the samplers it dispatches to by name.

Every sampler is a function with one signature (k-diffusion style):

    sampler(denoise, x, timesteps, scheduler, *, eta, variance, generator, disable) -> x0

where `denoise(x_t, t) -> (x0, eps)` is the model call followed by the scheduler's one conversion
(`NoiseScheduler.predict_x0_and_eps`), x is x_T, and `timesteps` (steps,) is the descending list of the
scheduler's `inference_timesteps` (with drop_last=True for "dpm++", diffusers' DPM-Solver grid). The next
timestep is always read from that list; after its last entry comes alpha_bar = 1 (diffusers'
set_alpha_to_one), so the final step returns the predicted x0. Samplers work in x's dtype (float32, or
float64 when given float64 noise) whatever precision the model runs in.
"""

import math
import numbers
from collections.abc import Callable, Sequence

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from ddpm.schedule import NoiseScheduler

Denoiser = Callable[[Tensor, Tensor], tuple[Tensor, Tensor]]  # (x_t (N, ...), t 0-d long) -> (x0, eps)
VARIANCES = ("fixed_small", "fixed_large")


@torch.no_grad()
def sample(
    model: Callable[[Tensor, Tensor, Tensor | None], Tensor],
    scheduler: NoiseScheduler,
    shape: Sequence[int] | None = None,
    *,
    noise: Tensor | None = None,
    sampler: str = "ddim",
    steps: int = 50,
    eta: float = 0.0,
    variance: str = "fixed_small",
    y: Tensor | None = None,
    guidance_scale: float = 1.0,
    null_class: int | None = None,
    generator: torch.Generator | None = None,
    progress: bool = True,
) -> Tensor:
    """Draw images by running `sampler` for `steps` steps from x_T to x0.

    model: any callable `model(x, t, y)` returning the prediction `scheduler.prediction_type` names, with x
        (N, C, H, W), t an (N,) long tensor on x's device and y (N,) long labels or None. An nn.Module whose
        parameters are half precision gets x in that dtype; its output is cast back.
    shape: (N, C, H, W) of x_T drawn from `generator`, or `noise`: x_T itself; exactly one of the two.
        Drawn noise is float32 on the generator's device (so a CPU generator gives the same images on any
        device), then moved to the model's device (the device of its first parameter; else the generator's).
    sampler: a key of SAMPLERS. steps: network calls (without guidance), 1..num_train_timesteps, spaced by
        `scheduler.timestep_spacing` as diffusers' scheduler of the same sampler spaces them.
    eta: DDIM stochasticity in [0, 1] (Song et al. 2021, Eq. 16); only the "ddim" sampler takes a nonzero eta.
        sampler, steps, eta and guidance_scale are checked by `check_sample_options`.
    variance: "fixed_small" (posterior variance beta-tilde) or "fixed_large" (beta); used by "ddpm" only.
    y: (N,) class labels or None; with a `model.num_classes` (not None) they, and the null label, must lie in
        [0, num_classes] (checked once here, not at every network call). guidance_scale: classifier-free
        guidance weight s >= 0 (Ho & Salimans 2022); with s != 1 each step makes one batched call on [x, x]
        with labels [y, null] and uses uncond + s * (cond - uncond). The null label is `null_class`, else
        `model.null_class`.
    Returns x0, (N, C, H, W), float32 (float64 when `noise` is float64).
    """
    check_sample_options(
        sampler=sampler,
        steps=steps,
        eta=eta,
        guidance_scale=guidance_scale,
        num_train_timesteps=scheduler.num_train_timesteps,
    )
    if variance not in VARIANCES:
        raise ValueError(f"unknown variance {variance!r}; valid: {', '.join(VARIANCES)}")
    # DPM-Solver++ ends with a first-order step to alpha_bar = 1 and needs no network call at t = 0: it takes
    # diffusers' DPMSolverMultistepScheduler grid. DDPM and DDIM keep DDPMScheduler's and DDIMScheduler's.
    timesteps = scheduler.inference_timesteps(steps, drop_last=sampler == "dpm++")
    x = _initial_noise(model, shape, noise, generator)
    if guidance_scale != 1.0:
        null_class = null_class if null_class is not None else getattr(model, "null_class", None)
        if null_class is None:
            raise ValueError(
                f"guidance_scale={guidance_scale} needs a null label: the model has no `null_class` "
                "(or it is None); pass null_class=<label id> or use guidance_scale=1.0"
            )
    y = _check_labels(y, x, guidance_scale, null_class, getattr(model, "num_classes", None))
    param = _first_parameter(model)
    model_dtype = param.dtype if param is not None and param.is_floating_point() else x.dtype

    def denoise(x_t: Tensor, t: Tensor) -> tuple[Tensor, Tensor]:
        t_batch = t.to(x_t.device).repeat(x_t.shape[0])  # (N,) long
        if guidance_scale == 1.0:
            out = model(x_t.to(model_dtype), t_batch, y)
        else:  # one batched call: first half conditional, second half with the null label
            null = torch.full_like(y, null_class)
            x_in = x_t.to(model_dtype)
            both = model(torch.cat([x_in, x_in]), torch.cat([t_batch, t_batch]), torch.cat([y, null]))
            cond, uncond = both.chunk(2)
            out = uncond + guidance_scale * (cond - uncond)
        return scheduler.predict_x0_and_eps(out.to(x_t.dtype), x_t, t_batch)

    return SAMPLERS[sampler](
        denoise,
        x,
        timesteps,
        scheduler,
        eta=eta,
        variance=variance,
        generator=generator,
        disable=not progress,
    )


class SampleOptionError(ValueError):
    """A sampling option outside its valid values: `option` is its keyword in `sample()` (e.g. "eta"),
    `value` what was given and `expected` what is valid, all three in the message."""

    def __init__(self, option: str, value, expected: str):
        super().__init__(f"invalid {option}={value!r}: expected {expected}")
        self.option, self.value, self.expected = option, value, expected


def check_sample_options(
    *, sampler: str, steps: int, eta: float, guidance_scale: float, num_train_timesteps: int | None = None
) -> None:
    """The one check of the sampling settings, for `sample()`, a config's `sample:` section and the CLI.

    sampler: a key of SAMPLERS. steps: an integer in 1..num_train_timesteps (>= 1 when that is None).
    eta: a number in [0, 1] (Song et al. 2021, Eq. 16), nonzero only for sampler "ddim". guidance_scale: a
    finite number >= 0 (Ho & Salimans 2022; 1 is the conditional model alone). Raises SampleOptionError (a
    ValueError) naming the first option out of range and its valid values.
    """
    if sampler not in SAMPLERS:
        raise SampleOptionError("sampler", sampler, f"one of {', '.join(SAMPLERS)}")
    top = num_train_timesteps if num_train_timesteps is not None else math.inf
    if not isinstance(steps, int) or isinstance(steps, bool) or not 1 <= steps <= top:
        valid = f"in 1..num_train_timesteps={top}" if num_train_timesteps is not None else ">= 1"
        raise SampleOptionError("steps", steps, f"an integer {valid}")
    if not _is_real(eta) or not 0 <= eta <= 1:
        raise SampleOptionError("eta", eta, "a number in [0, 1] (DDIM stochasticity)")
    if eta != 0 and sampler != "ddim":
        raise SampleOptionError(
            "eta", eta, f"0 with sampler {sampler!r} (eta applies only to sampler 'ddim')"
        )
    if not _is_real(guidance_scale) or not math.isfinite(guidance_scale) or guidance_scale < 0:
        raise SampleOptionError("guidance_scale", guidance_scale, "a finite number >= 0 (1: no guidance)")


def sample_ddpm(
    denoise: Denoiser,
    x: Tensor,
    timesteps: Tensor,
    scheduler: NoiseScheduler,
    *,
    eta: float = 0.0,
    variance: str = "fixed_small",
    generator: torch.Generator | None = None,
    disable: bool = False,
) -> Tensor:
    """Ancestral sampling from the posterior q(x_s | x_t, x0) (Ho et al. 2020, Eq. 6-7 and Algorithm 2), with
    s the next timestep of the list, generalised to skipped steps as diffusers' DDPMScheduler does
    (beta_t := 1 - alpha_bar_t / alpha_bar_s). Uses `variance`; ignores eta."""
    alpha_bars = _alpha_bars(scheduler, timesteps)
    for i in tqdm(range(len(timesteps)), disable=disable):
        ab_t, ab_s = alpha_bars[i], alpha_bars[i + 1]
        x0, _ = denoise(x, timesteps[i])
        mean, var_small, beta = posterior(x0, x, ab_t, ab_s)
        if i == len(timesteps) - 1:  # alpha_bar_s = 1: the mean is x0 and no noise is added (z = 0 at t = 1)
            x = mean
        else:
            std = (var_small if variance == "fixed_small" else beta) ** 0.5
            x = mean + std * _randn(x.shape, x.dtype, x.device, generator)
    return x


def sample_ddim(
    denoise: Denoiser,
    x: Tensor,
    timesteps: Tensor,
    scheduler: NoiseScheduler,
    *,
    eta: float = 0.0,
    variance: str = "fixed_small",
    generator: torch.Generator | None = None,
    disable: bool = False,
) -> Tensor:
    """DDIM (Song et al. 2021, Eq. 12) with sigma_t = eta * sqrt(beta-tilde) (Eq. 16): eta = 0 is the
    deterministic DDIM, eta = 1 the DDPM posterior with fixed_small variance. Ignores `variance`."""
    alpha_bars = _alpha_bars(scheduler, timesteps)
    for i in tqdm(range(len(timesteps)), disable=disable):
        ab_t, ab_s = alpha_bars[i], alpha_bars[i + 1]
        x0, eps = denoise(x, timesteps[i])
        sigma2 = eta**2 * (1 - ab_s) / (1 - ab_t) * (1 - ab_t / ab_s)
        # x_s = sqrt(ab_s) x0 + sqrt(1 - ab_s - sigma^2) eps + sigma z. At eta = 1 the root's argument is
        # (1 - ab_s)^2 ab_t / (ab_s (1 - ab_t)) >= 0, which rounding may push just below 0: hence the max().
        x = ab_s**0.5 * x0 + max(1 - ab_s - sigma2, 0.0) ** 0.5 * eps
        if sigma2 > 0:
            x = x + sigma2**0.5 * _randn(x.shape, x.dtype, x.device, generator)
    return x


def sample_dpmpp_2m(
    denoise: Denoiser,
    x: Tensor,
    timesteps: Tensor,
    scheduler: NoiseScheduler,
    *,
    eta: float = 0.0,
    variance: str = "fixed_small",
    generator: torch.Generator | None = None,
    disable: bool = False,
) -> Tensor:
    """DPM-Solver++(2M) (Lu et al. 2022, Algorithm 2): multistep second order in the data prediction x0,
    first order on the first step and on the final step to alpha_bar = 1. Deterministic; ignores eta,
    variance and generator.

    With alpha_t = sqrt(alpha_bar_t), sigma_t = sqrt(1 - alpha_bar_t), lambda_t = log(alpha_t / sigma_t) and
    h_i = lambda_{t_i} - lambda_{t_{i-1}}, a step is
        x_{t_i} = (sigma_{t_i} / sigma_{t_{i-1}}) x_{t_{i-1}} - alpha_{t_i} (e^{-h_i} - 1) D_i,
        D_i = (1 + 1/(2 r_i)) x0_{i-1} - 1/(2 r_i) x0_{i-2},  r_i = h_{i-1} / h_i,
    and D_i = x0_{i-1} for a first-order step.
    alpha_t (e^{-h} - 1) is computed as sigma_{t_i} alpha_{t_{i-1}} / sigma_{t_{i-1}} - alpha_{t_i}, finite at
    alpha_bar = 0 (zero terminal SNR, lambda = -inf) and at alpha_bar = 1 (lambda = +inf); there r = +inf
    makes D_i = x0_{i-1}.
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


SAMPLERS: dict[str, Callable[..., Tensor]] = {
    "ddpm": sample_ddpm,
    "ddim": sample_ddim,
    "dpm++": sample_dpmpp_2m,
}


def posterior(x0: Tensor, x_t: Tensor, ab_t: float, ab_s: float) -> tuple[Tensor, float, float]:
    """q(x_s | x_t, x0) for s < t, alpha_bar_t = ab_t, alpha_bar_s = ab_s (Ho et al. 2020, Eq. 6-7, with
    beta_t generalised to 1 - ab_t / ab_s for skipped steps). Returns the mean (N, ...), the posterior
    variance beta-tilde = (1 - ab_s) / (1 - ab_t) beta_t ("fixed_small") and beta_t ("fixed_large").

    beta-tilde is 0 where ab_s = 1; the samplers add no noise there, so the log-variance clipping that
    diffusers and improved-diffusion apply at that step is not needed.
    """
    alpha = ab_t / ab_s
    beta = 1 - alpha
    mean = (ab_s**0.5 * beta / (1 - ab_t)) * x0 + (alpha**0.5 * (1 - ab_s) / (1 - ab_t)) * x_t
    return mean, (1 - ab_s) / (1 - ab_t) * beta, beta


def _alpha_bars(scheduler: NoiseScheduler, timesteps: Tensor) -> list[float]:
    """alpha_bar (float64) at each timestep of the list, then 1 for the final x0: steps + 1 floats."""
    return scheduler.alphas_cumprod[timesteps].tolist() + [1.0]


def _scales(alpha_bar: float) -> tuple[float, float]:
    """(alpha, sigma) = (sqrt(alpha_bar), sqrt(1 - alpha_bar))."""
    return alpha_bar**0.5, (1 - alpha_bar) ** 0.5


def _randn(shape, dtype: torch.dtype, device: torch.device, generator: torch.Generator | None) -> Tensor:
    """Standard normal noise drawn on the generator's device (so results do not depend on x's device)."""
    draw_device = generator.device if generator is not None else device
    return torch.randn(tuple(shape), generator=generator, device=draw_device, dtype=dtype).to(device)


def _initial_noise(model, shape, noise: Tensor | None, generator: torch.Generator | None) -> Tensor:
    """x_T: `noise` (as float32 at least) or standard normal of `shape`; exactly one must be given."""
    if (shape is None) == (noise is None):
        raise ValueError("pass exactly one of shape=(N, C, H, W) and noise=<x_T tensor>")
    if noise is not None:
        return noise.to(torch.promote_types(noise.dtype, torch.float32))
    param = _first_parameter(model)
    device = param.device if param is not None else generator.device if generator is not None else "cpu"
    return _randn(shape, torch.float32, torch.device(device), generator)


def _check_labels(
    y, x: Tensor, guidance_scale: float, null_class: int | None, num_classes: int | None
) -> Tensor | None:
    """y as an (N,) long tensor on x's device, or None; guidance needs labels. With num_classes, y and the
    null label must lie in [0, num_classes]: one host sync per sample() call, none per network call."""
    if y is None:
        if guidance_scale != 1.0:
            raise ValueError(f"guidance_scale={guidance_scale} needs class labels y; pass y or use 1.0")
        return None
    y = torch.as_tensor(y, device=x.device).long()
    if y.shape != (x.shape[0],):
        raise ValueError(f"y must have shape ({x.shape[0]},), one label per image, got {tuple(y.shape)}")
    if num_classes is not None:
        labels = y if guidance_scale == 1.0 else torch.cat([y, y.new_tensor([null_class])])
        outside = (labels < 0) | (labels > num_classes)
        if bool(outside.any()):
            raise ValueError(
                f"labels must lie in [0, num_classes] = [0, {num_classes}] ({num_classes}: the null label), "
                f"got {labels[outside].unique().tolist()} (in y or null_class)"
            )
    return y


def _is_real(value) -> bool:
    """A real number (Python or numpy scalar), not a bool."""
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def _first_parameter(model) -> Tensor | None:
    """The first parameter of an nn.Module (its dtype and device stand for the model's); None otherwise."""
    return next(model.parameters(), None) if isinstance(model, nn.Module) else None
