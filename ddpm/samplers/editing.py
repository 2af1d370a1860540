"""Editing images with a diffusion model, through the samplers' own network call (`model_denoiser`: the
conditions, labels y or a `ddpm.conditions.Conditions` cond, and classifier-free guidance against their null)
and steps:

- `inpaint`: RePaint (Lugmayr et al. 2022), the known region replaced by the noised original at every step,
  with resampling jumps; `jump_n_sample=1` is the plain replacement method.
- `img2img`: SDEdit (Meng et al. 2022), the image noised to a level set by `strength`, then any sampler of
  SAMPLERS from there (`sample(..., start_step=...)`).
- `invert`: deterministic DDIM inversion to x_T (Song et al. 2021, Sec. 4.3).
- `interpolate`: spherical interpolation of two noises x_T (Shoemake 1985), for latent walks.

Images go in and come out as (N, C, H, W) tensors in [-1, 1] (for the EDM formulation, whose samplers work
on the data over sigma_data, they are scaled into that frame and back); a mask is (N, 1, H, W) or (H, W) of 0
and 1, 1 where the pixel is known (kept). What cannot be used is refused with a ValueError saying what was
expected.
"""

import math
import numbers
from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from ddpm.conditions import Conditions
from ddpm.progress import progress_bar
from ddpm.samplers.sampling import (
    SampleOptionError,
    check_sample_options,
    model_denoiser,
    sample,
    sampling_timesteps,
)
from ddpm.samplers.solvers import alpha_bars, ancestral_step, ddim_step, gaussian_noise
from ddpm.schedule import NoiseScheduler

Model = Callable[[Tensor, Tensor, Conditions | Tensor | None], Tensor]
# RePaint's one-step samplers: a resampling jump goes back up a level, which a multistep solver's history
# (or Heun's and the Euler family's sigma grid) cannot follow.
INPAINT_SAMPLERS = ("ddpm", "ddim")


@torch.no_grad()
def inpaint(
    model: Model,
    scheduler: NoiseScheduler,
    image: Tensor,
    mask: Tensor,
    *,
    steps: int,
    jump_length: int = 10,
    jump_n_sample: int = 10,
    sampler: str = "ddpm",
    eta: float = 0.0,
    y: Tensor | None = None,
    cond: Conditions | None = None,
    guidance_scale: float = 1.0,
    null_class: int | None = None,
    generator: torch.Generator | None = None,
    progress: bool = True,
) -> Tensor:
    """Fill in the pixels of `image` where `mask` is 0 (RePaint, Lugmayr et al. 2022, Algorithm 1 with the
    jump schedule of their Sec. 4.2).

    Down the `steps`-step grid of `sampler` (`sampling_timesteps`) from x_T ~ N(0, I), each step from level t
    to the next level s is the sampler's step for the unknown pixels (Eq. 7; "ddpm": ancestral, with the
    schedule's variance, learned too; "ddim": DDIM with `eta`) and, for the known ones, a fresh draw of
    q(x_s | x0) = N(sqrt(alpha_bar_s) image, (1 - alpha_bar_s) I) (Eq. 6), joined by the mask (Eq. 8). A
    resampling jump (Eq. 9) takes x_s back up to level t by q(x_t | x_s) = N(sqrt(alpha_bar_t /
    alpha_bar_s) x_s, (1 - alpha_bar_t / alpha_bar_s) I), so that the next step down harmonises the two
    regions: after every `jump_length` steps down (counted from the end of the grid), the last `jump_length`
    steps are undone and redone `jump_n_sample - 1` times. jump_n_sample = 1 is the plain replacement method;
    each jump costs `jump_length` more network calls (`repaint_schedule` gives the path).

    image: (N, C, H, W) in [-1, 1] (the model's channels and size, when the model says them). mask:
    (N, 1, H, W) or (H, W), 0 or 1 (bool or numbers), 1 = known. y or cond (the N images' conditions, of any
    kinds the model takes: each row edits its own image), guidance_scale, null_class: as in `ddpm.sample`
    (guidance against cond.null()). Returns (N, C, H, W) in image's dtype (at least float32), equal to
    `image`, bit for bit, where mask is 1.
    """
    if sampler not in INPAINT_SAMPLERS:
        raise ValueError(
            f"inpaint takes sampler {' or '.join(map(repr, INPAINT_SAMPLERS))}, got {sampler!r}: RePaint's "
            "resampling jumps need a one-step sampler"
        )
    for name, value in (("jump_length", jump_length), ("jump_n_sample", jump_n_sample)):
        if not isinstance(value, numbers.Integral) or isinstance(value, bool) or value < 1:
            raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
    _check_settings(scheduler, sampler=sampler, steps=steps, eta=eta, guidance_scale=guidance_scale)
    image = _check_image(image, model)
    known = _check_mask(mask, image)
    timesteps = sampling_timesteps(scheduler, sampler, steps)
    denoise = model_denoiser(
        model, scheduler, image, y=y, cond=cond, guidance_scale=guidance_scale, null_class=null_class
    )
    abars = alpha_bars(scheduler, timesteps)
    path = repaint_schedule(steps, jump_length, jump_n_sample)
    scale = scheduler.data_scale
    target = image / scale  # the known pixels in the samplers' frame
    x = gaussian_noise(image.shape, image.dtype, image.device, generator)
    for p, q in progress_bar(list(zip(path[:-1], path[1:], strict=True)), show=progress):
        if q < p:  # a resampling jump up from level abars[p] to abars[q]
            ratio = abars[q] / abars[p]
            x = ratio**0.5 * x + (1 - ratio) ** 0.5 * gaussian_noise(x.shape, x.dtype, x.device, generator)
            continue
        denoised = denoise(x, timesteps[p])
        if sampler == "ddpm":
            unknown = ancestral_step(x, denoised, abars[p], abars[q], scheduler, generator)
        else:
            unknown = ddim_step(denoised.x0, denoised.eps, abars[p], abars[q], eta=eta, generator=generator)
        if q == steps:  # alpha_bar = 1: the known pixels are the image itself
            noised = target
        else:
            noise = gaussian_noise(x.shape, x.dtype, x.device, generator)
            noised = abars[q] ** 0.5 * target + (1 - abars[q]) ** 0.5 * noise
        x = torch.where(known, noised, unknown)
    return torch.where(known, image, x * scale)


def repaint_schedule(steps: int, jump_length: int, jump_n_sample: int) -> list[int]:
    """The path of RePaint's sampling through the grid (Lugmayr et al. 2022, Sec. 4.2, their code's
    `get_schedule_jump`), as positions 0..steps: 0 is the first timestep of the grid (x_T), steps the clean
    image after the last. A step +1 is a denoising step (one network call), a step -1 a resampling jump up.
    Counting levels L = steps - 1 - position from the end of the grid, after arriving at each
    L in {0, jump_length, 2 jump_length, ...} below steps - jump_length, the path goes back up jump_length
    levels, jump_n_sample - 1 times. Starts at 0 and ends at steps."""
    remaining = {L: jump_n_sample - 1 for L in range(0, steps - jump_length, jump_length)}
    path, position = [0], 0
    while position < steps:
        position += 1
        path.append(position)
        level = steps - 1 - position
        if remaining.get(level, 0) > 0:
            remaining[level] -= 1
            path += [position - k for k in range(1, jump_length + 1)]
            position -= jump_length
    return path


@torch.no_grad()
def img2img(
    model: Model,
    scheduler: NoiseScheduler,
    image: Tensor,
    strength: float,
    *,
    sampler: str = "ddim",
    steps: int = 50,
    eta: float = 0.0,
    options: dict | None = None,
    y: Tensor | None = None,
    cond: Conditions | None = None,
    guidance_scale: float = 1.0,
    null_class: int | None = None,
    generator: torch.Generator | None = None,
    progress: bool = True,
) -> Tensor:
    """SDEdit (Meng et al. 2022, Algorithm 1): noise `image` to the level of a timestep of the sampler's grid
    and sample back from there.

    Of the `steps`-step grid of `sampler` (`sampling_timesteps`), the last k = round(strength * steps)
    (halves up) are run (diffusers' img2img pipelines do the same, with the floor): x = sqrt(alpha_bar_t)
    image + sqrt(1 - alpha_bar_t) z at the first of them, t (z ~ N(0, I) from `generator`), then
    `sample(..., noise=x, start_step=steps - k)`. strength 0 (k = 0) returns the image itself; strength 1
    runs the whole grid from q(x_T | image), which is ordinary sampling up to the sqrt(alpha_bar_T) image
    left in x_T (5e-5 on the cosine schedule, 6e-3 on the linear one, 0 at zero terminal SNR).

    image: (N, C, H, W) in [-1, 1]. strength: a number in [0, 1]. sampler, steps, eta, options, y or cond
    (one row per image), guidance_scale, null_class, generator: as in `ddpm.sample`. Returns (N, C, H, W) in
    image's dtype (at least float32).
    """
    if not isinstance(strength, numbers.Real) or isinstance(strength, bool) or not 0 <= strength <= 1:
        raise ValueError(
            f"strength must be a number in [0, 1] (0: the image, 1: a new sample), got {strength!r}"
        )
    _check_settings(
        scheduler, sampler=sampler, steps=steps, eta=eta, guidance_scale=guidance_scale, options=options
    )
    image = _check_image(image, model)
    run = math.floor(strength * steps + 0.5)  # rounded half up
    if run == 0:
        return image.clone()
    start = steps - run
    t = sampling_timesteps(scheduler, sampler, steps)[start]
    noise = gaussian_noise(image.shape, image.dtype, image.device, generator)
    x = scheduler.add_noise(image, noise, t.expand(image.shape[0]))
    return sample(
        model,
        scheduler,
        noise=x,
        sampler=sampler,
        steps=steps,
        eta=eta,
        options=options,
        y=y,
        cond=cond,
        guidance_scale=guidance_scale,
        null_class=null_class,
        generator=generator,
        progress=progress,
        start_step=start,
    )


@torch.no_grad()
def invert(
    model: Model,
    scheduler: NoiseScheduler,
    image: Tensor,
    *,
    steps: int,
    y: Tensor | None = None,
    cond: Conditions | None = None,
    guidance_scale: float = 1.0,
    null_class: int | None = None,
    progress: bool = True,
) -> Tensor:
    """Deterministic DDIM inversion (Song et al. 2021, Sec. 4.3): the x_T from which DDIM at eta = 0 with the
    same `steps` (`sample(..., noise=invert(...), sampler="ddim", steps=steps)`) gives `image` back.

    The DDIM grid t_1 > ... > t_steps (`sampling_timesteps(scheduler, "ddim", steps)`) is walked upwards from
    alpha_bar = 1: each step from level s to the next higher t is the DDIM step of Eq. 12 run backwards,
    x_t = sqrt(alpha_bar_t) x0 + sqrt(1 - alpha_bar_t) eps, with (x0, eps) the estimates at x_s from the
    network called at t, the timestep whose DDIM step comes back to s (eps(x_s, t) for the unknown
    eps(x_t, t): the error of the reconstruction falls with the step size). image: (N, C, H, W) in [-1, 1].
    y or cond (one row per image; sample back with the same), guidance_scale, null_class: as in
    `ddpm.sample`. Returns x_T (N, C, H, W), image's dtype (at least
    float32).
    """
    _check_settings(scheduler, sampler="ddim", steps=steps, eta=0.0, guidance_scale=guidance_scale)
    image = _check_image(image, model)
    timesteps = sampling_timesteps(scheduler, "ddim", steps)
    denoise = model_denoiser(
        model, scheduler, image, y=y, cond=cond, guidance_scale=guidance_scale, null_class=null_class
    )
    abars = alpha_bars(scheduler, timesteps)
    x = image / scheduler.data_scale  # in the samplers' frame
    for i in progress_bar(reversed(range(steps)), total=steps, show=progress):
        _, eps = denoise(x, timesteps[i])
        x0 = (x - (1 - abars[i + 1]) ** 0.5 * eps) / abars[i + 1] ** 0.5  # the x0 that eps implies at x_s
        x = ddim_step(x0, eps, abars[i + 1], abars[i])
    return x


def interpolate(x_a: Tensor, x_b: Tensor, alphas: Sequence[float] | Tensor) -> Tensor:
    """Spherical linear interpolation (slerp, Shoemake 1985) from x_a to x_b, each taken as one vector:
    slerp(a) = sin((1 - a) theta) / sin(theta) x_a + sin(a theta) / sin(theta) x_b, theta the angle between
    them. Gaussian noises of high dimension are nearly orthogonal and of nearly equal norm, and slerp keeps
    that norm where a straight line would shrink it (to 1/sqrt(2) half way), which the model would see as
    less noise than it was trained on.

    x_a, x_b: the same shape S, e.g. one x_T each (C, H, W). alphas: K numbers in [0, 1]. Returns (K, *S) in
    x_a's dtype; entry k is exactly x_a at alphas[k] = 0 and exactly x_b at 1. Parallel inputs (theta = 0)
    are interpolated linearly; opposite ones (theta = pi) have no unique great circle and are refused.
    """
    if not isinstance(x_a, Tensor) or not isinstance(x_b, Tensor) or x_a.shape != x_b.shape:
        shapes = [tuple(v.shape) if isinstance(v, Tensor) else type(v).__name__ for v in (x_a, x_b)]
        raise ValueError(f"x_a and x_b must be tensors of the same shape, got {shapes[0]} and {shapes[1]}")
    alphas = torch.as_tensor(alphas, dtype=torch.float64).flatten()
    if alphas.numel() == 0 or not bool(((alphas >= 0) & (alphas <= 1)).all()):
        raise ValueError(f"alphas must be one or more numbers in [0, 1], got {alphas.tolist()}")
    a, b = x_a.double().flatten(), x_b.double().flatten()
    norms = a.norm() * b.norm()
    if norms == 0:
        raise ValueError("x_a and x_b must be nonzero: the angle between them is undefined")
    theta = math.acos(max(-1.0, min(1.0, (a @ b / norms).item())))
    if math.pi - theta < 1e-6:
        raise ValueError("x_a and x_b point in opposite directions: no unique arc joins them")
    if theta < 1e-6:
        w_a, w_b = 1 - alphas, alphas
    else:
        w_a, w_b = (
            torch.sin((1 - alphas) * theta) / math.sin(theta),
            torch.sin(alphas * theta) / math.sin(theta),
        )
    shape = (-1, *([1] * x_a.ndim))
    out = w_a.reshape(shape) * x_a.double() + w_b.reshape(shape) * x_b.double()
    return out.to(x_a.dtype)


def _check_image(image, model) -> Tensor:
    """image as a floating tensor (at least float32) after checking it: (N, C, H, W), finite, in [-1, 1],
    and with the channels and size of the model when it has a `config` (ours) naming them."""
    if not isinstance(image, Tensor) or image.ndim != 4 or not image.is_floating_point():
        got = (
            f"{image.dtype} of shape {tuple(image.shape)}"
            if isinstance(image, Tensor)
            else type(image).__name__
        )
        raise ValueError(f"image must be a floating tensor (N, C, H, W) in [-1, 1], got {got}")
    if image.shape[0] == 0:
        raise ValueError("image must hold at least one image, got N = 0")
    if not bool(torch.isfinite(image).all()) or image.abs().max() > 1:
        lo, hi = image.min().item(), image.max().item()
        raise ValueError(
            f"image values must lie in [-1, 1] (x * 2 - 1 for pixels in [0, 1]), got [{lo:g}, {hi:g}]"
        )
    config = getattr(model, "config", None)
    if isinstance(config, dict) and {"in_channels", "image_size"} <= config.keys():
        expected = (config["in_channels"], config["image_size"], config["image_size"])
        if tuple(image.shape[1:]) != expected:
            raise ValueError(
                f"image must be (N, {expected[0]}, {expected[1]}, {expected[2]}) for this model "
                f"(in_channels={expected[0]}, image_size={expected[1]}), got {tuple(image.shape)}"
            )
    return image.to(torch.promote_types(image.dtype, torch.float32))


def _check_mask(mask, image: Tensor) -> Tensor:
    """The mask as a bool tensor (N or 1, 1, H, W) on image's device, True where the pixel is known, after
    checking that it is (N, 1, H, W) or (H, W) for image's N, H, W and holds only 0 and 1."""
    n, _, h, w = image.shape
    if not isinstance(mask, Tensor) or tuple(mask.shape) not in ((h, w), (n, 1, h, w), (1, 1, h, w)):
        got = tuple(mask.shape) if isinstance(mask, Tensor) else type(mask).__name__
        raise ValueError(f"mask must be a tensor ({n}, 1, {h}, {w}) or ({h}, {w}) for this image, got {got}")
    if not bool(((mask == 0) | (mask == 1)).all()):
        raise ValueError("mask must hold only 0 (pixel to fill in) and 1 (pixel to keep)")
    return mask.to(image.device, torch.bool).reshape(-1, 1, h, w)


def _check_settings(scheduler: NoiseScheduler, **settings) -> None:
    """`check_sample_options` on the sampler settings, which must also be given (steps not None): its
    SampleOptionError (a ValueError) names the first one out of range."""
    if settings["steps"] is None:
        raise SampleOptionError("steps", None, "an integer in 1..num_train_timesteps (the sampler's grid)")
    check_sample_options(**settings, num_train_timesteps=scheduler.num_train_timesteps)
