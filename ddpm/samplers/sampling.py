"""`sample(model, scheduler, ...)`: x_T, the denoiser around the model (with classifier-free guidance or
autoguidance) and the solver of `ddpm.samplers.solvers` that the registry SAMPLERS names, for a number of
steps or of network calls (`sampling_budget`); `check_sample_options`, the one check of the sampling
settings; `check_autoguide`, of autoguidance's weak model."""

import functools
import inspect
import math
import numbers
from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple

import torch
from torch import Tensor, nn

from ddpm.conditions import Conditions, conditions_of, network_argument
from ddpm.samplers.consistency import consistency
from ddpm.samplers.multistep import dpmpp_2m, dpmpp_2m_sde, dpmpp_3m, unipc
from ddpm.samplers.solvers import (
    Denoised,
    Denoiser,
    ddim,
    ddpm_ancestral,
    euler,
    euler_ancestral,
    gaussian_noise,
    heun,
    network_calls,
    steps_for_calls,
)
from ddpm.schedule import NoiseScheduler

SAMPLERS: dict[str, Callable[..., Tensor]] = {
    "ddpm": ddpm_ancestral,
    "ddim": ddim,
    "dpm++": dpmpp_2m,  # the name before there were several DPM-Solver++ variants
    "dpm++2m": dpmpp_2m,
    "dpm++3m": dpmpp_3m,
    "dpm++2m_sde": dpmpp_2m_sde,
    "unipc": unipc,
    "euler": euler,
    "euler_a": euler_ancestral,
    "heun": heun,
    # Consistency models only (a student of `ddpm.distill --method consistency`): not a diffusion solver
    "consistency": consistency,
}
# Solvers on diffusers' DPMSolverMultistepScheduler and UniPCMultistepScheduler grid: steps + 1 timesteps
# laid out, the last dropped (`NoiseScheduler.inference_timesteps(drop_last=True)`); the others take
# DDPM/DDIM/Euler's grid.
DROP_LAST: frozenset[Callable[..., Tensor]] = frozenset({dpmpp_2m, dpmpp_3m, dpmpp_2m_sde, unipc})
DEFAULT_STEPS = 50  # when neither steps nor calls is given
# The options of sample() itself that a solver may declare; any other keyword-only parameter of a solver (but
# `disable`) is a solver option, given in sample()'s `options` mapping.
SAMPLE_KEYWORDS = ("eta", "generator")
# The settings of a network's `config` in which autoguidance's weak model must equal the model
# (`check_autoguide`): what it is given (image shape, conditions) and what it returns.
AUTOGUIDE_MATCH = (
    "in_channels",
    "out_channels",
    "image_size",
    "num_classes",
    "null_label",
    "cond_channels",
    "cond_dim",
    "context_dim",
)
# Ranges of solver options, checked by check_sample_options: name -> (is it valid, what is expected).
OPTION_RANGES: dict[str, tuple[Callable[[Any], bool], str]] = {
    "s_churn": (lambda v: v >= 0, "a number >= 0 (EDM's S_churn; 0: deterministic)"),
    "s_tmin": (lambda v: v >= 0, "a noise level sigma >= 0"),
    "s_tmax": (lambda v: v >= 0, "a noise level sigma >= 0"),
    "s_noise": (lambda v: v >= 0, "a number >= 0 (EDM's S_noise)"),
}


class Budget(NamedTuple):
    """What a sampling run costs: `steps` of the solver and the `calls` to the network they make (without
    guidance, which batches each call), and which of the two was asked for (`asked`: "steps" or "calls")."""

    steps: int
    calls: int
    asked: str

    def __str__(self) -> str:
        return f"{self.steps} steps, {self.calls} network calls (from the {self.asked} asked for)"


@torch.no_grad()
def sample(
    model: Callable[[Tensor, Tensor, Conditions | Tensor | None], Tensor],
    scheduler: NoiseScheduler,
    shape: Sequence[int] | None = None,
    *,
    noise: Tensor | None = None,
    sampler: str = "ddim",
    steps: int | None = None,
    calls: int | None = None,
    eta: float = 0.0,
    options: Mapping[str, Any] | None = None,
    y: Tensor | None = None,
    cond: Conditions | None = None,
    guidance_scale: float = 1.0,
    guidance_interval: tuple[float, float] | None = None,
    guidance_rescale: float = 0.0,
    null_class: int | None = None,
    autoguide: Callable[[Tensor, Tensor, Conditions | Tensor | None], Tensor] | None = None,
    generator: torch.Generator | None = None,
    progress: bool = True,
    start_step: int = 0,
) -> Tensor:
    """Draw images by running `sampler` for `steps` steps, or as many as `calls` network calls allow, from x_T
    to x0.

    model: any callable `model(x, t, y)` returning the prediction `scheduler.prediction_type` names (followed
        by C variance channels when `scheduler.variance_type` is "learned_range": 2C channels), with x
        (N, C, H, W), t an (N,) tensor on x's device (long; float64, continuous, for the spacings "karras" and
        "exponential") and y the conditions as `ddpm.conditions.network_argument` gives them: (N,) long
        labels when they are all there is, None without conditions, else a Conditions. An nn.Module whose
        parameters are half precision gets x in that dtype; its output is cast back.
    shape: (N, C, H, W) of x_T drawn from `generator`, or `noise`: x_T itself; exactly one of the two.
        Drawn noise is float32 on the generator's device (so a CPU generator gives the same images on any
        device), then moved to the model's device (the device of its first parameter; else the generator's).
    sampler: a key of SAMPLERS. steps: solver steps, 1..num_train_timesteps, spaced by
        `scheduler.timestep_spacing` as diffusers' scheduler of the same sampler spaces them (the DPM-Solver
        grid, `DROP_LAST`, for those solvers). calls: instead of steps, a budget of network calls (without
        guidance): the most steps that cost at most that many (`sampling_budget`; a Heun step costs two
        calls, its last one). Neither: DEFAULT_STEPS steps. `sampling_budget` says the steps and calls used.
    eta: DDIM stochasticity in [0, 1] (Song et al. 2021, Eq. 16); only the "ddim" sampler takes a nonzero eta.
        The variance of the "ddpm" sampler's steps is the schedule's (`scheduler.variance_type`); the other
        samplers use the prediction channels alone. options: the solver's own options by name, e.g.
        {"s_churn": 40} for "heun"; a name the solver does not declare is refused. sampler, steps, calls, eta,
        options and the guidance settings are checked by `check_sample_options`; the solver gets those of eta
        and generator it declares, and `options`.
    y: (N,) class labels or None, the same as cond=Conditions.from_labels(y); with a `model.num_classes`
        (not None) they, and the null label, must lie in [0, num_classes] (checked once here, not at every
        network call). cond: instead of y, the conditions of the N images, a `ddpm.conditions.Conditions`
        (any kinds the model takes, some rows maybe dropped already); the network checks them at its call.
        guidance_scale: classifier-free guidance weight s >= 0 (Ho & Salimans 2022); with s != 1 each step
        makes one batched call on [x, x] with the conditions [cond, cond.null()] (every kind dropped to its
        null; labels to the null label `null_class`, else `model.null_class`) and uses
        uncond + s * (cond - uncond); with `autoguide` it is autoguidance's weight instead.
    guidance_interval: (sigma_lo, sigma_hi), 0 <= sigma_lo <= sigma_hi (inf allowed): guidance only at the
        steps whose noise level sigma = sqrt((1 - alpha_bar_t) / alpha_bar_t) lies in [sigma_lo, sigma_hi],
        the conditional prediction alone elsewhere (Kynkaanniemi et al. 2024, "Applying guidance in a limited
        interval improves sample and distribution quality"); None: at every step.
    guidance_rescale: phi in [0, 1], rescaled guidance (Lin et al. 2023, "Common Diffusion Noise Schedules
        and Sample Steps are Flawed", Sec. 3.4, Eq. 15-16): the guided prediction's per-image std brought
        to the conditional one's, mixed by phi; 0: plain guidance. See `denoiser`.
    autoguide: instead of the unconditional pass, a weak version of the model (an early checkpoint, or a
        smaller or shorter run on the same data; an nn.Module or any callable as `model`), called with the
        same x_t, t and conditions: autoguidance (Karras et al. 2024, "Guiding a diffusion model with a bad
        version of itself", Eq. 1), D = D_weak + s (D - D_weak) with s = guidance_scale (!= 1), its interval
        and rescale as for classifier-free guidance; it guides an unconditional model too. It must share
        `scheduler` (its output is read as the model's is) and the model's image shape and conditions
        (`check_autoguide`). Classifier-free guidance is not applied with it.
    start_step: run only the grid's timesteps from index start_step on (0 <= start_step < steps), from
        `noise` = x at the noise level of that timestep (`sampling_timesteps(...)[start_step]`): SDEdit's
        start (Meng et al. 2022), used by `ddpm.samplers.editing.img2img`. The solver sees those
        steps - start_step timesteps as its grid (a multistep solver warms up again from its first).
    Returns x0, (N, C, H, W), float32 (float64 when `noise` is float64).
    """
    _refuse_time_free(model)  # before any noise is drawn or any call made
    options = dict(options or {})
    check_sample_options(
        sampler=sampler,
        steps=steps,
        calls=calls,
        eta=eta,
        guidance_scale=guidance_scale,
        guidance_interval=guidance_interval,
        guidance_rescale=guidance_rescale,
        autoguide=autoguide is not None,
        options=options,
        num_train_timesteps=scheduler.num_train_timesteps,
    )
    solver = SAMPLERS[sampler]
    budget = sampling_budget(sampler, steps=steps, calls=calls)
    if not (_is_int(start_step) and 0 <= start_step < budget.steps):
        raise ValueError(
            f"start_step must be an integer in 0..steps-1 = 0..{budget.steps - 1}, got {start_step!r}"
        )
    if start_step and noise is None:
        raise ValueError(
            f"start_step={start_step} needs noise=<x at the level of that timestep>, not a shape"
        )
    timesteps = sampling_timesteps(scheduler, sampler, budget.steps)[start_step:]
    x = _initial_noise(model, shape, noise, generator)
    denoise = model_denoiser(
        model,
        scheduler,
        x,
        y=y,
        cond=cond,
        guidance_scale=guidance_scale,
        guidance_interval=guidance_interval,
        guidance_rescale=guidance_rescale,
        null_class=null_class,
        autoguide=autoguide,
    )
    given = {"eta": eta, "generator": generator, **options}
    kwargs = {name: given[name] for name in solver_options(solver) if name in given}
    x0 = solver(denoise, x, timesteps, scheduler, **kwargs, disable=not progress)
    # The EDM formulation's samplers work on the data over sigma_data (ddpm.edm): back to the data's scale
    return x0 if scheduler.data_scale == 1.0 else x0 * scheduler.data_scale


def sampling_timesteps(scheduler: NoiseScheduler, sampler: str, steps: int) -> Tensor:
    """The (steps,) descending timesteps `sampler` (a key of SAMPLERS) visits in `steps` steps: the grid of
    diffusers' scheduler of the same maths. DPM-Solver++ and UniPC end with a first-order step to
    alpha_bar = 1 and need no network call at t = 0: they take DPMSolverMultistepScheduler's grid
    (`DROP_LAST`); DDPM, DDIM and the Euler family keep their schedulers'."""
    return scheduler.inference_timesteps(steps, drop_last=SAMPLERS[sampler] in DROP_LAST)


def model_denoiser(
    model: Callable[[Tensor, Tensor, Conditions | Tensor | None], Tensor],
    scheduler: NoiseScheduler,
    x: Tensor,
    *,
    y: Tensor | None = None,
    cond: Conditions | None = None,
    guidance_scale: float = 1.0,
    guidance_interval: tuple[float, float] | None = None,
    guidance_rescale: float = 0.0,
    null_class: int | None = None,
    autoguide: Callable[[Tensor, Tensor, Conditions | Tensor | None], Tensor] | None = None,
) -> Denoiser:
    """The `denoise(x_t, t) -> (x0, eps)` of `sample()` for images like x (N, C, H, W): the model call with
    the conditions (labels y (N,), or cond) and classifier-free guidance or autoguidance (see `sample`; its
    interval and rescale as `denoiser` applies them), then the scheduler's conversion of its prediction; what
    every sampler and `ddpm.samplers.editing` call the network through. Checks the conditions' batch, the
    labels, the null label and the weak model (`check_autoguide`) (ValueError), and refuses a time-free
    network, before any network call; the conditions are moved to x's device."""
    _refuse_time_free(model)
    if autoguide is not None:
        check_autoguide(model, autoguide)
    classifier_free = guidance_scale != 1.0 and autoguide is None
    if y is not None:
        y = torch.as_tensor(y, device=x.device).long()
        if y.shape != (x.shape[0],):
            raise ValueError(f"y must have shape ({x.shape[0]},), one label per image, got {tuple(y.shape)}")
    cond = conditions_of(cond, y).to(x.device)
    if cond and cond.batch_size != x.shape[0]:
        raise ValueError(
            f"the conditions hold {cond.batch_size} rows for {x.shape[0]} images: give one row per image"
        )
    if classifier_free and not cond:
        raise ValueError(
            f"guidance_scale={guidance_scale} needs class labels y or conditions cond (or a weak model, "
            "autoguide); pass one or use 1.0"
        )
    if "label" in cond and (classifier_free or "label" in cond.dropped):
        null_class = null_class if null_class is not None else getattr(model, "null_class", None)
        if null_class is None:
            guided = classifier_free
            raise ValueError(
                f"{f'guidance_scale={guidance_scale}' if guided else 'a dropped label'} needs a null label: "
                "the model has no `null_class` (or it is None), as a class-conditional model loaded from "
                "OpenAI's or diffusers' weights; fine-tune it with label dropout to a null label first, pass "
                f"null_class=<label id>, or {'use guidance_scale=1.0' if guided else 'drop no label'}"
            )
    else:
        null_class = None  # not needed: no label is ever dropped
    has_null = getattr(model, "null_class", None) is not None
    if "label" in cond:
        _check_labels(cond, null_class, getattr(model, "num_classes", None), has_null)
    return denoiser(
        model,
        scheduler,
        cond=cond,
        guidance_scale=guidance_scale,
        guidance_interval=guidance_interval,
        guidance_rescale=guidance_rescale,
        null_class=null_class,
        autoguide=autoguide,
        dtype=x.dtype,
    )


def check_autoguide(model: Callable[..., Tensor], weak: Callable[..., Tensor]) -> None:
    """ValueError, in one line naming the setting and the fix, when `weak` cannot guide `model` by
    autoguidance: a time-free network, or one whose image shape or conditions differ from the model's (the
    settings AUTOGUIDE_MATCH of their `config`, and their `num_classes` and `null_class`, where both have
    them: a plain callable has none to compare)."""
    if weak is model:
        raise ValueError("autoguide is the model itself, which guides nothing: pass a weaker version of it")
    _refuse_time_free(weak)
    config, weak_config = getattr(model, "config", None), getattr(weak, "config", None)
    settings = {
        name: (config[name], weak_config[name])
        for name in AUTOGUIDE_MATCH
        if isinstance(config, Mapping) and isinstance(weak_config, Mapping)
        if name in config and name in weak_config
    }
    for name in ("num_classes", "null_class"):
        if hasattr(model, name) and hasattr(weak, name):
            settings[name] = getattr(model, name), getattr(weak, name)
    for name, (own, weaks) in settings.items():
        if own != weaks:
            raise ValueError(
                f"autoguide: the weak model's {name}={weaks!r} differs from the model's {name}={own!r}; it "
                "must take the same images and conditions: guide with an earlier checkpoint or a smaller run "
                "of the same data"
            )


def sampling_budget(sampler: str, *, steps: int | None = None, calls: int | None = None) -> Budget:
    """The steps and network calls of `sampler` for `steps` steps or, instead, a budget of `calls` network
    calls (the most steps whose calls fit in it); neither: DEFAULT_STEPS steps. Unchecked: see
    `check_sample_options`."""
    solver = SAMPLERS[sampler]
    if calls is not None:
        steps = steps_for_calls(solver, calls)
        return Budget(steps, network_calls(solver, steps), "calls")
    steps = DEFAULT_STEPS if steps is None else steps
    return Budget(steps, network_calls(solver, steps), "steps")


class SampleOptionError(ValueError):
    """A sampling option outside its valid values: `option` is its keyword in `sample()` (e.g. "eta"),
    `value` what was given and `expected` what is valid, all three in the message."""

    def __init__(self, option: str, value, expected: str):
        super().__init__(f"invalid {option}={value!r}: expected {expected}")
        self.option, self.value, self.expected = option, value, expected


def check_sample_options(
    *,
    sampler: str,
    steps: int | None,
    eta: float,
    guidance_scale: float,
    num_train_timesteps: int | None = None,
    calls: int | None = None,
    options: Mapping[str, Any] | None = None,
    guidance_interval: Sequence[float] | None = None,
    guidance_rescale: float = 0.0,
    autoguide: bool = False,
) -> None:
    """The one check of the sampling settings, for `sample()`, a config's `sample:` section and the CLI.

    sampler: a key of SAMPLERS. steps: an integer in 1..num_train_timesteps (>= 1 when that is None), or None.
    calls: None, or instead of steps a network-call budget that buys 1..num_train_timesteps steps; not both.
    eta: a number in [0, 1] (Song et al. 2021, Eq. 16), nonzero only for sampler "ddim". guidance_scale: a
    finite number >= 0 (Ho & Salimans 2022; 1 is the conditional model alone). guidance_interval: None or
    two noise levels (sigma_lo, sigma_hi) with 0 <= sigma_lo <= sigma_hi (sigma_hi may be inf).
    guidance_rescale: a number in [0, 1]. Both are refused away from their defaults without guidance
    (guidance_scale 1). autoguide: a weak model guides (autoguidance), which guidance_scale 1 would make the
    model alone at the cost of the weak model's calls: refused. eta is refused away from its
    default with a sampler whose solver does not take it, rather than ignored. options: names of the solver's
    own options (its keyword-only parameters but `disable` and SAMPLE_KEYWORDS), each of the type of its
    default and in OPTION_RANGES' range. Raises SampleOptionError (a ValueError) naming the first option
    out of range (an entry of options as "options.NAME") and its valid values.
    """
    if sampler not in SAMPLERS:
        raise SampleOptionError("sampler", sampler, f"one of {', '.join(SAMPLERS)}")
    top = num_train_timesteps if num_train_timesteps is not None else math.inf
    if steps is not None and calls is not None:
        raise SampleOptionError("calls", calls, "None when steps are given (pass steps or calls, not both)")
    if steps is not None and not (_is_int(steps) and 1 <= steps <= top):
        valid = f"in 1..num_train_timesteps={top}" if num_train_timesteps is not None else ">= 1"
        raise SampleOptionError("steps", steps, f"an integer {valid}")
    solver = SAMPLERS[sampler]
    if calls is not None and not (_is_int(calls) and 1 <= steps_for_calls(solver, calls) <= top):
        fewest = network_calls(solver, 1)
        most = network_calls(solver, num_train_timesteps) if num_train_timesteps is not None else None
        valid = f"an integer in {fewest}..{most}" if most is not None else f"an integer >= {fewest}"
        raise SampleOptionError("calls", calls, f"{valid} (network calls of sampler {sampler!r})")
    if not _is_real(eta) or not 0 <= eta <= 1:
        raise SampleOptionError("eta", eta, "a number in [0, 1] (DDIM stochasticity)")
    _refuse_if_unused("eta", eta, 0, sampler)
    if not _is_real(guidance_scale) or not math.isfinite(guidance_scale) or guidance_scale < 0:
        raise SampleOptionError("guidance_scale", guidance_scale, "a finite number >= 0 (1: no guidance)")
    if autoguide and guidance_scale == 1:
        raise SampleOptionError(
            "guidance_scale",
            guidance_scale,
            "a weight != 1 with autoguidance (at 1 it is the model alone, the weak model's calls wasted: "
            "drop the weak model, sample.py's --autoguide, for that)",
        )
    if guidance_interval is not None and not (
        len(guidance_interval) == 2
        and all(_is_real(sigma) for sigma in guidance_interval)
        and 0 <= guidance_interval[0] <= guidance_interval[1]
    ):
        raise SampleOptionError(
            "guidance_interval",
            guidance_interval,
            "two noise levels sigma_lo sigma_hi with 0 <= sigma_lo <= sigma_hi (sigma_hi may be inf)",
        )
    if not _is_real(guidance_rescale) or not 0 <= guidance_rescale <= 1:
        raise SampleOptionError(
            "guidance_rescale", guidance_rescale, "a number in [0, 1] (0: plain guidance)"
        )
    unused = ("guidance_interval", guidance_interval, None), ("guidance_rescale", guidance_rescale, 0)
    for option, value, default in unused if guidance_scale == 1 else ():
        if value != default:
            raise SampleOptionError(option, value, f"{default} without guidance (guidance_scale=1)")
    _check_solver_options(sampler, options or {})


@functools.cache
def solver_options(solver: Callable[..., Tensor]) -> tuple[str, ...]:
    """The options of `sample()` that `solver` takes: its keyword-only parameters other than `disable`,
    read from its signature once."""
    parameters = inspect.signature(solver).parameters.values()
    return tuple(p.name for p in parameters if p.kind is p.KEYWORD_ONLY and p.name != "disable")


def _check_solver_options(sampler: str, options: Mapping[str, Any]) -> None:
    """SampleOptionError for an entry of `options` that the sampler's solver does not declare, or whose value
    is not of its default's type (a real number for a float) or outside OPTION_RANGES."""
    parameters = inspect.signature(SAMPLERS[sampler]).parameters
    own = [name for name in solver_options(SAMPLERS[sampler]) if name not in SAMPLE_KEYWORDS]
    for name, value in options.items():
        if name not in own:
            listed = ", ".join(own) if own else "none"
            hint = f"; pass {name} to sample() itself" if name in SAMPLE_KEYWORDS else ""
            raise SampleOptionError(
                "options", name, f"an option of sampler {sampler!r} (its options: {listed}){hint}"
            )
        default = parameters[name].default
        kind = (bool, "true or false") if isinstance(default, bool) else (_is_real, "a number")
        if isinstance(default, bool) and not isinstance(value, bool) or not kind[0](value):
            raise SampleOptionError(f"options.{name}", value, kind[1])
        if name in OPTION_RANGES and not (value == value and OPTION_RANGES[name][0](value)):
            raise SampleOptionError(f"options.{name}", value, OPTION_RANGES[name][1])
    if options.get("s_tmin", 0.0) > options.get("s_tmax", math.inf):
        raise SampleOptionError("options.s_tmin", options["s_tmin"], "at most options.s_tmax")


def _refuse_if_unused(option: str, value, default, sampler: str) -> None:
    """SampleOptionError for `option` away from its `default` with a sampler whose solver ignores it."""
    if value != default and option not in solver_options(SAMPLERS[sampler]):
        users = ", ".join(repr(name) for name, solver in SAMPLERS.items() if option in solver_options(solver))
        raise SampleOptionError(
            option, value, f"{default!r} with sampler {sampler!r} ({option} applies only to sampler {users})"
        )


def denoiser(
    model: Callable[[Tensor, Tensor, Conditions | Tensor | None], Tensor],
    scheduler: NoiseScheduler,
    *,
    y: Tensor | None = None,
    cond: Conditions | None = None,
    guidance_scale: float = 1.0,
    guidance_interval: tuple[float, float] | None = None,
    guidance_rescale: float = 0.0,
    null_class: int | None = None,
    autoguide: Callable[[Tensor, Tensor, Conditions | Tensor | None], Tensor] | None = None,
    dtype: torch.dtype = torch.float32,
) -> Denoiser:
    """denoise(x_t, t) -> Denoised (x0, eps, and the variance values v), in x_t's dtype: the one way a model
    output becomes a prediction, for `sample` and for any code that steps the reverse process itself.

    The model call with the conditions (labels y, or cond, on x_t's device; `network_argument` gives the
    model labels alone as a tensor), with classifier-free guidance when guidance_scale != 1 (one batched call
    on [x, x] with the conditions [cond, cond.null()], dropped labels being `null_class`;
    uncond + s (cond - uncond) on the prediction channels; a learned variance is taken from the conditional
    pass, as GLIDE does), then `scheduler.split_output` (the first C channels and, for
    "learned_range", the next C) and `scheduler.predict_x0_and_eps`. x_t: (N, C, H, W); t: a 0-d timestep,
    repeated over the batch on x_t's device (no copy from the host: `_batch_of`), or (N,), one per row (the
    likelihood's rows of many timesteps: `ddpm.vlb`). The model gets x_t in the dtype of its first parameter
    when that is floating point, else in `dtype`. Labels are not checked here (`sample` checks them once).

    With `autoguide`, a weak model (Karras et al. 2024), the reference is its prediction on the same x_t, t
    and conditions (a call of its own, x_t in its parameters' dtype) in place of the unconditional half: one
    guidance formula, with the interval and rescale the same. Guided, the prediction channels (the network's
    own: eps, x0 or v, as trained) are, per image,
        guided = ref + s (main - ref)        (ref: uncond, or the weak model's; main: the model's on cond)
        rescaled = guided * std(main) / std(guided)                (Lin et al. 2023, Eq. 15)
        out = phi * rescaled + (1 - phi) * guided                  (Eq. 16; phi = guidance_rescale)
    std over the image's (C, H, W) (Algorithm 2 there, diffusers' `rescale_noise_cfg`), and out = main at the
    rows whose sigma_t = sqrt((1 - alpha_bar_t) / alpha_bar_t) is outside `guidance_interval`
    [sigma_lo, sigma_hi] (Kynkaanniemi et al. 2024; the calls are made all the same). At fixed x_t and t the
    prediction is an affine function of x0 (the scheduler's conversion), so the combination, whose weights
    sum to 1, is the same in x0: autoguidance's D_weak + s (D - D_weak) on the denoised images, as the
    paper writes it, and classifier-free guidance's on eps. guidance_scale 1 calls `model` alone.
    """
    param = _first_parameter(model)
    model_dtype = param.dtype if param is not None and param.is_floating_point() else dtype
    weak_param = _first_parameter(autoguide)
    weak_dtype = weak_param.dtype if weak_param is not None and weak_param.is_floating_point() else dtype
    cond = conditions_of(cond, y)
    classifier_free = guidance_scale != 1.0 and autoguide is None
    if not classifier_free:  # the model (and the weak model) on the conditions as given
        given = network_argument(cond, null_class)
    else:  # the batch of the guided call: first half conditional, second half every condition dropped
        given = network_argument(Conditions.cat([cond, cond.null()]), null_class)

    def denoise(x_t: Tensor, t: Tensor) -> Denoised:
        t_batch = _batch_of(t, x_t)  # (N,) long, or float64 (continuous timesteps), on x_t's device
        channels = x_t.shape[1]
        if guidance_scale == 1.0:
            out, v = scheduler.split_output(model(x_t.to(model_dtype), t_batch, given), channels)
        else:
            if classifier_free:  # one batched call: first half conditional, second half unconditional
                x_in = x_t.to(model_dtype)
                both = model(torch.cat([x_in, x_in]), torch.cat([t_batch, t_batch]), given)
                both, v_both = scheduler.split_output(both, channels)
                main, reference = both.chunk(2)
                v = v_both.chunk(2)[0] if v_both is not None else None
            else:  # autoguidance: the weak model on the same x_t, t and conditions
                main, v = scheduler.split_output(model(x_t.to(model_dtype), t_batch, given), channels)
                reference, _ = scheduler.split_output(autoguide(x_t.to(weak_dtype), t_batch, given), channels)
            out = reference + guidance_scale * (main - reference)
            if guidance_rescale:
                rescaled = out * _image_std(main) / _image_std(out)  # Lin et al. 2023, Eq. 15
                out = guidance_rescale * rescaled + (1 - guidance_rescale) * out  # Eq. 16
            if guidance_interval is not None:
                alpha_bar = scheduler.alpha_bar(t_batch)  # (N,) float64
                sigma = ((1 - alpha_bar) / alpha_bar).sqrt()  # inf at alpha_bar = 0
                inside = (sigma >= guidance_interval[0]) & (sigma <= guidance_interval[1])
                out = torch.where(inside.view(-1, *[1] * (out.ndim - 1)), out, main)
        x0, eps = scheduler.predict_x0_and_eps(out.to(x_t.dtype), x_t, t_batch)
        return Denoised(x0, eps, v.to(x_t.dtype) if v is not None else None)

    return denoise


def _image_std(x: Tensor) -> Tensor:
    """(N, C, H, W) -> (N, 1, 1, 1): each image's standard deviation over its C x H x W values, in float32 at
    least."""
    return (
        x.to(torch.promote_types(x.dtype, torch.float32)).flatten(1).std(dim=1).view(-1, *[1] * (x.ndim - 1))
    )


def _batch_of(t: Tensor, x: Tensor) -> Tensor:
    """The 0-d timestep t repeated over x's batch, (N,) in t's dtype on x's device, or an (N,) t, one per
    row, moved there. A 0-d timestep on the CPU (the solvers' grid) is written there by a fill from its host
    value: no copy from the host, which would wait for the device at every network call."""
    if t.ndim == 1:
        return t.to(x.device)
    if t.device == x.device:
        return t.repeat(x.shape[0])
    if t.device.type != "cpu":
        return t.to(x.device).repeat(x.shape[0])
    return torch.full((x.shape[0],), t.item(), dtype=t.dtype, device=x.device)


def _initial_noise(model, shape, noise: Tensor | None, generator: torch.Generator | None) -> Tensor:
    """x_T: `noise` (as float32 at least) or standard normal of `shape`; exactly one must be given."""
    if (shape is None) == (noise is None):
        raise ValueError("pass exactly one of shape=(N, C, H, W) and noise=<x_T tensor>")
    if noise is not None:
        return noise.to(torch.promote_types(noise.dtype, torch.float32))
    param = _first_parameter(model)
    device = param.device if param is not None else generator.device if generator is not None else "cpu"
    return gaussian_noise(shape, torch.float32, torch.device(device), generator)


def _check_labels(cond: Conditions, null_class: int | None, num_classes: int | None, has_null: bool) -> None:
    """With num_classes, the labels of cond's rows not dropped and the null label (when one is used,
    null_class not None) must lie in [0, num_classes] ([0, num_classes - 1] for a model without a null label,
    `has_null` False): one host sync per sample() call, none per network call."""
    if num_classes is not None:
        labels = cond["label"][~cond.is_dropped("label")]
        if null_class is not None:
            labels = torch.cat([labels, labels.new_tensor([null_class])])
        top = num_classes if has_null else num_classes - 1
        outside = (labels < 0) | (labels > top)
        if bool(outside.any()):
            bound = (
                f"[0, num_classes] = [0, {top}] ({top}: the null label)"
                if has_null
                else f"[0, num_classes - 1] = [0, {top}] (the model has no null label)"
            )
            raise ValueError(
                f"labels must lie in {bound}, got {labels[outside].unique().tolist()} (in y or null_class)"
            )


def _refuse_time_free(model) -> None:
    """ValueError for a network built with time_conditioning=False (a segmentation network)."""
    if getattr(model, "time_conditioning", True) is False:
        raise ValueError(
            f"this {type(model).__name__} has time_conditioning=False: it is a segmentation network, called "
            "as model(x); sampling needs a diffusion model, built with time_conditioning=True and trained"
        )


def _is_int(value) -> bool:
    """An integer (Python or numpy), not a bool."""
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _is_real(value) -> bool:
    """A real number (Python or numpy scalar), not a bool."""
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def _first_parameter(model) -> Tensor | None:
    """The first parameter of an nn.Module (its dtype and device stand for the model's); None otherwise."""
    return next(model.parameters(), None) if isinstance(model, nn.Module) else None
