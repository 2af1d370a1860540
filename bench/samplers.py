"""Sampling error per network call, on a problem whose exact answer is known: every sampler of ours against
every diffusers scheduler, each with every option its documentation lists for the job, driven by the same
exact noise predictor from the same x_T (DDPM issues 12 and 24).

    python bench/samplers.py [--quick] [--budgets 5,8,10,15,20,50] [--seeds 3] [--pixels 16384]
        [--screen-pixels 4096] [--finalists 8] [--schedules linear,cosine] [--families unipc,UniPC 3,...]
        [--out bench/results/samplers] [--dry-run]
    python bench/samplers.py --overhead [--config configs/cifar10.yaml] [--batch 1] [--steps 50] [--repeats 5]
    python bench/samplers.py --export [--budgets ...] [--seeds 3] [--out bench/results/export]

The problem (`ddpm.exact_score`): images whose pixels are independent draws of a three-mode 1-D Gaussian
mixture, so that E[eps | x_t] is closed form; the "network" is that exact predictor, so a sampler errs only
by its discretisation. The error of a run is the Wasserstein-1 distance between its pooled output pixels
and the mixture (from the CDF). Seed s draws x_T (float64, standard normal, the same for every sampler) and
seeds the stochastic samplers' noise with 1,000 + s.

Who runs, each combination below a "variant" of its sampler ("family"):
- ours: every sampler in `ddpm.SAMPLERS` with every spacing in `ddpm.schedule.TIMESTEP_SPACINGS`, both read
  at run time, with and without `clip_sample` (x0 clamped to the data's [-1, 1]), through
  `ddpm.sample(model, NoiseScheduler(...), ...)`, its defaults otherwise;
- diffusers: the families of DIFFUSERS_SCHEDULERS (DPMSolverMultistep as DPM-Solver++ and, deprecated but
  there, DPM-Solver, orders 1-3, ODE and SDE; UniPC orders 1-3; DEIS orders 2-3; Heun; Euler; Euler
  ancestral), each with every combination of DIFFUSERS_OPTIONS and of its spacings (`diffusers_spacings`:
  timestep_spacing linspace / leading / leading with steps_offset 1 / trailing, and the sigma spacings its
  class has: use_karras_sigmas, use_exponential_sigmas, use_beta_sigmas, use_lu_lambdas), less the
  combinations that compute what another does (`same_maths_as_another`). A combination diffusers refuses or
  fails on is run all the same: its exception is recorded, with its message, in the grid and in the skip
  list. The loop is that of diffusers' pipelines (StableDiffusionXLPipeline's): set_timesteps,
  set_begin_index(0), x = x_T * init_noise_sigma, then model(scale_model_input(x, t), t) and step() for t in
  timesteps. The schedule is ours (linear 1e-4..0.02, or cosine = "squaredcos_cap_v2"), alpha_bar checked
  equal.
Not run, being for other jobs: flow-matching sigmas and shifts (use_flow_sigmas, flow_shift,
use_dynamic_shifting: for flow-matching models), rescale_betas_zero_snr and variance_type (they change the
model's schedule or output), UniPC's disable_corrector (for large guidance scales) and solver_p (a second
scheduler), Euler's timestep_type "continuous" (for v-prediction only), thresholding's and Euler's continuous
knobs (dynamic_thresholding_ratio, sample_max_value, sigma_min, sigma_max: left at their defaults, the
schedule's ends; thresholding then clips x0 to [-1, 1], the data's range). The same maths: DEIS order 1 and
DPM-Solver order 1 are DDIM, as "DPM++ 1" is.

Network calls are counted, not assumed: the predictor counts its calls, and for each variant and budget the
step count is the one whose run makes exactly that many calls (tried at one step per call, else found by
bisection), checked again on every measured run. A variant that no step count takes to the budget exactly
(Heun calls the model 2 * steps - 1 times: odd budgets only) is skipped there, and the output says so.

Two rounds, as the grid is large (about 2,000 variants a schedule): the screen runs every variant at every
budget once, on --screen-pixels pixels from seed --seeds (a seed the final round does not use); variants
whose screening output is identical to an earlier one's are the same computation there and are counted once.
The final round measures the --finalists lowest screening errors per library, budget and schedule, of the
deterministic and of the stochastic samplers apart (`finalists`), on --pixels pixels for each of the --seeds
seeds 0, 1, ...; the table takes each library's lowest mean among them.

Noise floor: the W1 of n exact draws of the mixture (E ~ 0.514 / sqrt(n)), per seed at the final round's n,
and over SCREEN_FLOOR_DRAWS draws at the screen's; errors near it are not resolved. Output: the markdown
table (best of ours against best of diffusers per budget and schedule, with the verdict of `verdict`) on
stdout and in OUT.md, the full grid (every variant's screening error, the finalists' errors per seed, every
skip) in OUT.csv, and the log-log plot of the screen's error against calls in OUT.png (each library's six
best families, each at its best variant per budget).

--overhead: each registered sampler's own time per step, from `ddpm.sample` with a free model (it returns a
stored tensor) for --steps steps, against one forward of `UNet(**config.model)` (configs/cifar10.yaml: DDPM's
35.7M-parameter CIFAR-10 network) at --batch, in eval mode without gradients, on the CPU; --repeats
interleaved rounds (common.interleaved_times), medians. The issue's target: under 2% of a network call.

--export: the scheduler that `python -m ddpm.export` writes for a model of each spacing in TIMESTEP_SPACINGS
(`ddpm.interop.diffusers.pipeline_scheduler`: its class and the spacing it runs), in DDPMPipeline's loop, on
the same problem and seeds, against ours: the sampler of the same maths ("ddpm" for DDPMScheduler, "dpm++"
for DPM-Solver++ 2M) on the model's own spacing, and sample.py's default ("unipc", on "exponential", the
shipped configs' spacing). Output: the table on stdout and in OUT.md, the grid in OUT.csv.
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import inspect
import itertools
import math
import re
import statistics
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import common
import diffusers
import torch
from diffusers import (
    DEISMultistepScheduler,
    DPMSolverMultistepScheduler,
    EulerAncestralDiscreteScheduler,
    EulerDiscreteScheduler,
    HeunDiscreteScheduler,
    UniPCMultistepScheduler,
)
from PIL import Image, ImageDraw, ImageFont
from torch import Tensor

import ddpm
from ddpm import NoiseScheduler, UNet, load_config
from ddpm.exact_score import MIXTURE, exact_predictor, wasserstein1
from ddpm.interop.diffusers import DIFFUSERS_SCHEDULE_NAMES, diffusers_scheduler_config, pipeline_scheduler
from ddpm.schedule import TIMESTEP_SPACINGS

BUDGETS = (5, 8, 10, 15, 20, 50)
SCHEDULES = ("linear", "cosine")
NOISE_SEED = 1_000  # + the seed: the stochastic samplers' noise
PLOTTED_FAMILIES = 6  # per library and schedule
SCREEN_FLOOR_DRAWS = 10  # of the screen's floor: one draw spreads by half its mean, with a long tail
DPM = DPMSolverMultistepScheduler
# family: (scheduler class, the settings that make it that sampler)
DIFFUSERS_SCHEDULERS = {
    "DPM++ 1": (DPM, {"solver_order": 1}),  # DDIM
    "DPM++ 2M": (DPM, {}),
    "DPM++ 3M": (DPM, {"solver_order": 3}),
    "DPM++ 1 SDE": (DPM, {"algorithm_type": "sde-dpmsolver++", "solver_order": 1}),
    "DPM++ 2M SDE": (DPM, {"algorithm_type": "sde-dpmsolver++"}),
    "DPM++ 3M SDE": (DPM, {"algorithm_type": "sde-dpmsolver++", "solver_order": 3}),
    # DPM-Solver on the noise prediction, which the DPM-Solver paper recommends at order 3 for unconditional
    # sampling (deprecated in diffusers 0.42, still there); its order 1 is DDIM again
    "DPM 2M": (DPM, {"algorithm_type": "dpmsolver"}),
    "DPM 3M": (DPM, {"algorithm_type": "dpmsolver", "solver_order": 3}),
    "DPM 1 SDE": (DPM, {"algorithm_type": "sde-dpmsolver", "solver_order": 1}),
    "DPM 2M SDE": (DPM, {"algorithm_type": "sde-dpmsolver"}),
    "DPM 3M SDE": (DPM, {"algorithm_type": "sde-dpmsolver", "solver_order": 3}),
    "UniPC 1": (UniPCMultistepScheduler, {"solver_order": 1}),
    "UniPC 2": (UniPCMultistepScheduler, {}),
    "UniPC 3": (UniPCMultistepScheduler, {"solver_order": 3}),  # the docs' choice for unconditional sampling
    "DEIS 2": (DEISMultistepScheduler, {}),
    "DEIS 3": (DEISMultistepScheduler, {"solver_order": 3}),
    "Heun": (HeunDiscreteScheduler, {}),
    "Euler": (EulerDiscreteScheduler, {}),
    "Euler a": (EulerAncestralDiscreteScheduler, {}),
}
# The options each class's docstring lists for this job (an unconditional pixel-space model predicting
# epsilon on a discrete VP schedule, data in [-1, 1]) besides the spacings; every combination runs. The
# class's default first (a variant's name lists only the others).
DIFFUSERS_OPTIONS: dict[type, dict[str, tuple]] = {
    DPM: {
        "solver_type": ("midpoint", "heun"),
        "lower_order_final": (True, False),
        "final_sigmas_type": ("zero", "sigma_min"),
        "euler_at_final": (False, True),
        "thresholding": (False, True),
    },
    UniPCMultistepScheduler: {
        "solver_type": ("bh2", "bh1"),
        "predict_x0": (True, False),
        "lower_order_final": (True, False),
        "final_sigmas_type": ("zero", "sigma_min"),
        "thresholding": (False, True),
    },
    DEISMultistepScheduler: {"lower_order_final": (True, False), "thresholding": (False, True)},
    HeunDiscreteScheduler: {"clip_sample": (False, True)},
    EulerDiscreteScheduler: {
        "interpolation_type": ("linear", "log_linear"),
        "final_sigmas_type": ("zero", "sigma_min"),
    },
    EulerAncestralDiscreteScheduler: {},
}
DIFFUSERS_TIMESTEP_SPACINGS = {
    "linspace": {"timestep_spacing": "linspace"},
    "leading": {"timestep_spacing": "leading"},
    "leading+1": {"timestep_spacing": "leading", "steps_offset": 1},  # Stable Diffusion's setting
    "trailing": {"timestep_spacing": "trailing"},
}
DIFFUSERS_SIGMA_SPACINGS = {
    "karras": {"use_karras_sigmas": True},
    "exponential": {"use_exponential_sigmas": True},
    "beta": {"use_beta_sigmas": True},  # Beta(0.6, 0.6) quantiles between the ends (Lee et al. 2024)
    "lu": {"use_lu_lambdas": True},  # uniform in log sigma as "exponential", t rounded (but on cosine)
}
# Heun's and Euler's sigma spacings run between the ends of their timestep spacing's grid; the multistep
# classes' between the schedule's ends, replacing the timesteps (their set_timesteps).
SIGMAS_WITHIN_SPACING = (HeunDiscreteScheduler, EulerDiscreteScheduler)
# DPMSolverMultistep's lambda_min_clipped, "critical for the cosine schedule" (its docstring): -5.1, the
# value its author chose from the linear schedule's lambda_T = -5.02 (diffusers PR 3314). Run on schedules
# whose lambda_T is below it (cosine: -9.9); above it, it changes nothing.
LAMBDA_MIN_CLIPPED = -5.1

Model = Callable[..., Tensor]


@dataclass(frozen=True)
class Method:
    """One sampler with one setting: `run(model, x_T, steps, generator) -> x0`. family names a sampler (a
    curve of the plot), variant its setting (spacing, options)."""

    library: str  # "ddpm" or "diffusers"
    family: str
    variant: str
    run: Callable[[Model, Tensor, int, torch.Generator], Tensor] = field(repr=False)

    @property
    def name(self) -> str:
        return f"{self.family} ({self.variant})"


@dataclass
class Result:
    """One method at one budget: its screening error, the final round's errors (one per seed; finalists
    only), or why it was skipped."""

    schedule: str
    method: Method
    budget: int
    steps: int | None
    screen: float = math.nan
    errors: list[float] = field(default_factory=list)
    skipped: str = ""
    same_as: str = ""  # the method whose screening output was identical
    stochastic: bool = False  # its output depends on the seed of its noise
    digest: str = field(default="", repr=False)  # of the screening output

    @property
    def mean(self) -> float:
        return statistics.fmean(self.errors) if self.errors else math.nan

    @property
    def std(self) -> float:
        return statistics.stdev(self.errors) if len(self.errors) > 1 else 0.0


def main() -> None:
    args = parse_args()
    torch.set_num_threads(args.threads)
    if args.overhead:
        overhead(args)
        return
    if args.dry_run:
        for schedule in args.schedules:
            for method in methods(schedule, args.families):
                print(f"{schedule}\t{method.library}\t{method.family}\t{method.variant}")
        return
    floor = [
        wasserstein1(MIXTURE.sample(image_shape(args.pixels), seeded(s)), MIXTURE) for s in range(args.seeds)
    ]
    screen_floor = [
        wasserstein1(MIXTURE.sample(image_shape(args.screen_pixels), seeded(s)), MIXTURE)
        for s in range(SCREEN_FLOOR_DRAWS)
    ]
    results = []
    for schedule in args.schedules:
        model = exact_predictor(MIXTURE, NoiseScheduler(beta_schedule=schedule))
        chosen = export_methods(schedule) if args.export else methods(schedule, args.families)
        screened = [r for method in chosen for r in screen(method, schedule, model, args)]
        mark_duplicates(screened)
        # --export measures each of its few methods; the full grid only its finalists
        measured = [r for r in screened if r.steps] if args.export else finalists(screened, args.finalists)
        for result in measured:
            measure(result, model, args)
        results += screened
    if args.export:
        export_report(args, results, floor)
    else:
        report(args, results, floor, screen_floor)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help="budgets 5,10,20, 1 seed, 4,096 pixels, screen 1,024, 3 finalists",
    )
    parser.add_argument("--budgets", default=None, help="network calls, comma-separated (default: 5,...,50)")
    parser.add_argument("--seeds", type=int, default=None, help="seeds of the final round (default: 3)")
    parser.add_argument("--pixels", type=int, default=None, help="pixels per final run (default: 16,384)")
    parser.add_argument("--screen-pixels", type=int, default=None, help="pixels per screening run (4,096)")
    parser.add_argument(
        "--finalists", type=int, default=None, help="per library, budget and schedule (default: 8)"
    )
    parser.add_argument("--schedules", default=",".join(SCHEDULES), help="beta schedules (linear,cosine)")
    parser.add_argument(
        "--families",
        default=None,
        help="only these samplers, comma-separated (ours or diffusers'; default: all)",
    )
    # One thread: the predictor's elementwise work on 16k pixels is too small to split, and on a loaded
    # machine two threads wait on each other (100x slower per operation, measured). --overhead times the
    # solvers and the UNet with the same threads.
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default: 1)")
    parser.add_argument("--out", default=None, help="output prefix (default: bench/results/samplers[-quick])")
    parser.add_argument(
        "--dry-run",
        action="store_true",
        help="list the variants (schedule, library, family, variant) and stop",
    )
    parser.add_argument("--overhead", action="store_true", help="time the solvers against a UNet forward")
    parser.add_argument("--export", action="store_true", help="ddpm.export's schedulers against ours")
    parser.add_argument(
        "--config",
        default=str(common.REPO / "configs/cifar10.yaml"),
        help="--overhead's model: and diffusion:",
    )
    parser.add_argument("--batch", type=int, default=1, help="--overhead: images per call (default: 1)")
    parser.add_argument("--steps", type=int, default=50, help="--overhead: sampler steps (default: 50)")
    parser.add_argument("--repeats", type=int, default=5, help="--overhead: timed rounds (default: 5)")
    args = parser.parse_args()
    quick = {"budgets": "5,10,20", "seeds": 1, "pixels": 4096, "screen_pixels": 1024, "finalists": 3}
    full = {
        "budgets": ",".join(map(str, BUDGETS)),
        "seeds": 3,
        "pixels": 16384,
        "screen_pixels": 4096,
        "finalists": 8,
    }
    for key, value in (quick if args.quick else full).items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    args.budgets = [int(b) for b in args.budgets.split(",")]
    args.schedules = args.schedules.split(",")
    name = "export" if args.export else "samplers"
    args.out = args.out or str(common.REPO / (f"bench/results/{name}" + ("-quick" if args.quick else "")))
    pixels_ok = all(p >= 1024 and p % 1024 == 0 for p in (args.pixels, args.screen_pixels))
    if min(args.budgets) < 1 or args.seeds < 1 or args.finalists < 1 or not pixels_ok:
        parser.error(
            "--budgets, --seeds and --finalists must be >= 1, --pixels and --screen-pixels positive multiples"
            " of 1024"
        )
    if unknown := set(args.schedules) - set(SCHEDULES):
        parser.error(f"unknown --schedules {sorted(unknown)}; valid: {', '.join(SCHEDULES)}")
    if args.families is not None:
        args.families = args.families.split(",")
        if unknown := set(args.families) - {*ddpm.SAMPLERS, *DIFFUSERS_SCHEDULERS}:
            valid = ", ".join([*ddpm.SAMPLERS, *DIFFUSERS_SCHEDULERS])
            parser.error(f"unknown --families {sorted(unknown)}; valid: {valid}")
    return args


def image_shape(pixels: int) -> tuple[int, ...]:
    return (pixels // 1024, 1, 32, 32)


def seeded(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def starting_noise(pixels: int, seed: int) -> Tensor:
    """x_T of seed `seed`: the same for every method."""
    return torch.randn(image_shape(pixels), generator=seeded(seed), dtype=torch.float64)


# --- the methods --------------------------------------------------------------------------------------------


def methods(schedule: str, families: list[str] | None = None) -> list[Method]:
    """Ours and diffusers' variants on `schedule`; only those of `families`, when given."""
    every = [*our_methods(schedule), *diffusers_methods(NoiseScheduler(beta_schedule=schedule))]
    return [method for method in every if families is None or method.family in families]


def our_methods(schedule: str) -> list[Method]:
    """Every sampler of `ddpm.SAMPLERS` with every spacing of TIMESTEP_SPACINGS, as registered now, with and
    without clip_sample; but "consistency", the sampler of consistency models, not of a diffusion model."""
    methods = []
    diffusion_samplers = [name for name in ddpm.SAMPLERS if name != "consistency"]
    for sampler, spacing, clip in itertools.product(diffusion_samplers, TIMESTEP_SPACINGS, (False, True)):
        scheduler = NoiseScheduler(beta_schedule=schedule, timestep_spacing=spacing, clip_sample=clip)

        def run(model, x, steps, generator, scheduler=scheduler, sampler=sampler):
            return ddpm.sample(
                model,
                scheduler,
                noise=x,
                sampler=sampler,
                steps=steps,
                generator=generator,
                progress=False,
            )

        methods.append(Method("ddpm", sampler, spacing + (", clip_sample" if clip else ""), run))
    return methods


def diffusers_methods(ours: NoiseScheduler) -> list[Method]:
    """Every DIFFUSERS_SCHEDULERS family with every combination of its class's DIFFUSERS_OPTIONS and
    `diffusers_spacings`, less `same_maths_as_another`, on `ours`'s schedule."""
    base = {
        "num_train_timesteps": ours.num_train_timesteps,
        "beta_schedule": DIFFUSERS_SCHEDULE_NAMES.get(
            ours.config["beta_schedule"], ours.config["beta_schedule"]
        ),
        "beta_start": ours.config["beta_start"],
        "beta_end": ours.config["beta_end"],
        "prediction_type": ours.prediction_type,
    }
    alpha_bar_last = ours.alphas_cumprod[-1].item()
    clip_lambda = 0.5 * math.log(alpha_bar_last / (1 - alpha_bar_last)) < LAMBDA_MIN_CLIPPED
    for cls in DIFFUSERS_OPTIONS:
        common.check_same_schedule(ours, cls(**base))
    methods = []
    for family, (cls, settings) in DIFFUSERS_SCHEDULERS.items():
        options = DIFFUSERS_OPTIONS[cls]
        defaults = {name: parameter.default for name, parameter in inspect.signature(cls).parameters.items()}
        for spacing, spacing_config in diffusers_spacings(cls, clip_lambda=clip_lambda).items():
            for values in itertools.product(*options.values()):
                chosen = dict(zip(options, values, strict=True))
                config = {**base, **settings, **spacing_config, **chosen}
                if same_maths_as_another(cls, config):
                    continue
                variant = ", ".join(
                    [spacing, *(f"{key}={value}" for key, value in chosen.items() if value != defaults[key])]
                )

                def run(model, x, steps, generator, cls=cls, config=config):
                    return diffusers_loop(cls(**config), model, x, steps, generator)

                methods.append(Method("diffusers", family, variant, run))
    return methods


# The sampler of ours with the maths of each scheduler class the export writes.
EXPORT_SAMPLERS = {"DDPMScheduler": "ddpm", "DDIMScheduler": "ddim", "DPMSolverMultistepScheduler": "dpm++"}


def export_methods(schedule: str) -> list[Method]:
    """For each spacing of TIMESTEP_SPACINGS: the scheduler `python -m ddpm.export` writes for a model with
    it (in DDPMPipeline's loop), and our sampler of the same maths on that model's spacing; then sample.py's
    default, "unipc" on "exponential"."""
    methods = []
    for spacing in TIMESTEP_SPACINGS:
        model_schedule = NoiseScheduler(beta_schedule=schedule, timestep_spacing=spacing)
        name, runs = pipeline_scheduler(model_schedule)
        config = diffusers_scheduler_config(runs, name)
        cls = getattr(diffusers, name)
        common.check_same_schedule(model_schedule, cls.from_config(config))

        def exported(model, x, steps, generator, cls=cls, config=config):
            return diffusers_loop(cls.from_config(config), model, x, steps, generator)

        variant = f"{spacing} model, runs {runs.timestep_spacing}"
        methods.append(Method("diffusers", f"ddpm.export: {name}", variant, exported))
        methods.append(our_method(EXPORT_SAMPLERS[name], model_schedule))
    methods.append(
        our_method("unipc", NoiseScheduler(beta_schedule=schedule, timestep_spacing="exponential"))
    )
    return methods


def our_method(sampler: str, scheduler: NoiseScheduler) -> Method:
    """`ddpm.sample` with `sampler` on `scheduler`, its defaults otherwise."""

    def run(model, x, steps, generator):
        return ddpm.sample(
            model, scheduler, noise=x, sampler=sampler, steps=steps, generator=generator, progress=False
        )

    return Method("ddpm", sampler, scheduler.timestep_spacing, run)


def diffusers_spacings(cls: type, *, clip_lambda: bool) -> dict[str, dict]:
    """{name: settings} of every spacing `cls` has: DIFFUSERS_TIMESTEP_SPACINGS (with lambda_min_clipped too,
    where clip_lambda and the class has it) and the DIFFUSERS_SIGMA_SPACINGS the class takes, on each
    timestep spacing for SIGMAS_WITHIN_SPACING."""
    parameters = inspect.signature(cls).parameters
    timestep = dict(DIFFUSERS_TIMESTEP_SPACINGS)
    if clip_lambda and "lambda_min_clipped" in parameters:
        timestep |= {
            f"{name}, lambda_min_clipped={LAMBDA_MIN_CLIPPED}": {
                **config,
                "lambda_min_clipped": LAMBDA_MIN_CLIPPED,
            }
            for name, config in DIFFUSERS_TIMESTEP_SPACINGS.items()
        }
    sigma = {
        name: config
        for name, config in DIFFUSERS_SIGMA_SPACINGS.items()
        if config.keys() <= parameters.keys()
    }
    if cls in SIGMAS_WITHIN_SPACING:
        return timestep | {
            f"{t_name}, {s_name}": {**t_config, **s_config}
            for t_name, t_config in timestep.items()
            for s_name, s_config in sigma.items()
        }
    return timestep | sigma


def same_maths_as_another(cls: type, config: dict) -> bool:
    """Whether this combination computes what another of the grid computes (read from diffusers 0.42's
    step functions): an order-1 multistep solver has no higher order to lower on its last steps (nor to
    replace by Euler on the last), and
    DPM-Solver's solver_type chooses between second-order updates; DPMSolverMultistep's euler_at_final acts
    only when the final sigma is sigma_min (towards zero its last step is first order anyway); UniPC
    thresholds only its x0 prediction (predict_x0=True)."""
    order = config.get("solver_order", 2)
    if order == 1 and (config.get("lower_order_final") is False or config.get("euler_at_final")):
        return True
    if order == 1 and cls is DPM and config.get("solver_type") != "midpoint":
        return True
    if cls is DPM and config.get("euler_at_final") and config.get("final_sigmas_type") == "zero":
        return True
    return bool(
        cls is UniPCMultistepScheduler and config.get("thresholding") and not config.get("predict_x0")
    )


def diffusers_loop(scheduler, model: Model, x_T: Tensor, steps: int, generator: torch.Generator) -> Tensor:
    """The loop of diffusers' pipelines: x_T scaled by init_noise_sigma, then step() on the model's output
    at scale_model_input(x, t) for each t of the scheduler's timesteps (`generator` to those that take it).

    set_begin_index(0), as StableDiffusionXLPipeline and the later pipelines call it: with a sigma spacing
    on a 1000-step schedule several sigmas can map to the same integer t, and without it step() takes the
    step index from the second of them, then runs past the end (IndexError or AssertionError on the
    cosine schedule, as StableDiffusionPipeline's loop, which lacks the call, fails)."""
    scheduler.set_timesteps(steps)
    if hasattr(scheduler, "set_begin_index"):
        scheduler.set_begin_index(0)
    extra = {"generator": generator} if "generator" in inspect.signature(scheduler.step).parameters else {}
    x = x_T * scheduler.init_noise_sigma
    for t in scheduler.timesteps:
        x = scheduler.step(model(scheduler.scale_model_input(x, t), t), t, x, **extra).prev_sample
    return x


class CountingModel:
    """model(x, t, y) that counts its calls."""

    def __init__(self, model: Model) -> None:
        self.model, self.calls = model, 0

    def __call__(self, x: Tensor, t: Tensor, y: Tensor | None = None) -> Tensor:
        self.calls += 1
        return self.model(x, t, y)


def steps_for_budget(calls_of: Callable[[int], int], budget: int) -> tuple[int | None, str]:
    """(steps, "") with calls_of(steps) == budget (calls nondecreasing in steps); else (None, the reason).

    One call per step is tried first; else bisection for the fewest steps in 1..budget that make at least
    `budget` calls."""
    low, high = 1, budget
    if calls_of(high) == budget:
        return budget, ""
    if calls_of(high) < budget:
        return None, f"{budget} steps make only {calls_of(high)} calls"
    while low < high:
        middle = (low + high) // 2
        if calls_of(middle) >= budget:
            high = middle
        else:
            low = middle + 1
    if calls_of(low) != budget:
        below = f"{calls_of(low - 1)} calls at {low - 1} steps, " if low > 1 else ""
        return None, f"no step count makes exactly {budget} calls ({below}{calls_of(low)} at {low})"
    return low, ""


# --- the two rounds -----------------------------------------------------------------------------------------


def screen(method: Method, schedule: str, model: Model, args: argparse.Namespace) -> list[Result]:
    """`method` at each budget of args.budgets, once, on args.screen_pixels pixels of seed args.seeds: its
    step count, its screening error and the digest of its output (or why it was skipped); and whether it is
    stochastic (its output at the first budget it runs changes with the seed of its noise)."""
    x_T = starting_noise(args.screen_pixels, args.seeds)
    runs: dict[int, tuple[int, Tensor]] = {}  # steps: (calls, x0)

    def calls_of(steps: int) -> int:
        if steps not in runs:
            counting = CountingModel(model)
            x0 = method.run(counting, x_T, steps, seeded(NOISE_SEED + args.seeds))
            runs[steps] = counting.calls, x0
        return runs[steps][0]

    results = []
    for budget in args.budgets:
        try:
            steps, why = steps_for_budget(calls_of, budget)
        except Exception as error:  # a combination refused, or a scheduler failing: reported
            steps, why = None, f"raised {type(error).__name__}: {error}"
        result = Result(schedule, method, budget, steps, skipped=why)
        if steps is not None:
            x0 = runs[steps][1]
            if torch.isfinite(x0).all():
                result.screen = wasserstein1(x0, MIXTURE)
                result.digest = hashlib.sha1(x0.double().numpy().tobytes()).hexdigest()
            else:
                result.steps, result.skipped = None, "output not finite"
        results.append(result)
        print(
            f"{schedule:6} {method.library:9} {method.name:60} {budget:3} calls: "
            + (f"W1 {result.screen:.4f} ({steps} steps)" if result.steps else f"skipped, {result.skipped}"),
            flush=True,
        )
    if first := next((r for r in results if r.digest), None):
        other_noise = method.run(model, x_T, first.steps, seeded(NOISE_SEED + args.seeds + 1))
        for r in results:
            r.stochastic = not torch.equal(other_noise, runs[first.steps][1])
    return results


def mark_duplicates(results: list[Result]) -> None:
    """Set same_as on each result whose screening output equals an earlier one's of its library and budget,
    bit for bit (the same computation there, whatever the settings' names)."""
    first: dict[tuple[str, int, str], str] = {}
    for r in results:
        if r.digest:
            key = (r.method.library, r.budget, r.digest)
            if key in first:
                r.same_as = first[key]
            else:
                first[key] = r.method.name


def finalists(results: list[Result], count: int) -> list[Result]:
    """The `count` lowest screening errors per library and budget, each computation once, among the
    deterministic samplers and among the stochastic ones apart: a stochastic sampler's screening error
    carries the noise of its own draws (only x_T is shared), enough to crowd the deterministic ones out
    where errors are small."""
    groups: dict[tuple[str, int, bool], list[Result]] = {}
    for r in results:
        if r.digest and not r.same_as:
            groups.setdefault((r.method.library, r.budget, r.stochastic), []).append(r)
    return [r for group in groups.values() for r in sorted(group, key=lambda r: r.screen)[:count]]


def measure(result: Result, model: Model, args: argparse.Namespace) -> None:
    """Fill result.errors: W1 on args.pixels pixels for each of seeds 0..args.seeds - 1 (or, where a seed's
    run fails or leaves the reals, none, and result.skipped says why)."""
    method = result.method
    for seed in range(args.seeds):
        counting = CountingModel(model)
        try:
            x0 = method.run(
                counting, starting_noise(args.pixels, seed), result.steps, seeded(NOISE_SEED + seed)
            )
        except Exception as error:  # as in `screen`, but on this seed only
            result.errors, result.skipped = [], f"seed {seed}: raised {type(error).__name__}: {error}"
            return
        if counting.calls != result.budget:
            raise RuntimeError(
                f"{method.name}: {counting.calls} calls in {result.steps} steps, expected {result.budget}"
            )
        if not torch.isfinite(x0).all():
            result.errors, result.skipped = [], f"seed {seed}: output not finite"
            return
        result.errors.append(wasserstein1(x0, MIXTURE))
    print(
        f"{result.schedule:6} {method.library:9} {method.name:60} {result.budget:3} calls: "
        f"final W1 {result.mean:.4f} +- {result.std:.4f}",
        flush=True,
    )


# --- the report ---------------------------------------------------------------------------------------------


def report(
    args: argparse.Namespace, results: list[Result], floor: list[float], screen_floor: list[float]
) -> None:
    """The table of the best per library on stdout and in OUT.md, the grid in OUT.csv, the plot in OUT.png."""
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    floor_mean, floor_std = statistics.fmean(floor), statistics.stdev(floor) if len(floor) > 1 else 0.0
    rows = []
    for schedule in args.schedules:
        for budget in args.budgets:
            ours, theirs = (best_result(results, schedule, budget, lib) for lib in ("ddpm", "diffusers"))
            rows.append(
                [
                    schedule,
                    budget,
                    ours.method.name if ours else "-",
                    error_cell(ours),
                    theirs.method.name if theirs else "-",
                    error_cell(theirs),
                    f"{ours.mean / theirs.mean:.2f}" if ours and theirs else "-",
                    verdict(ours, theirs, floor_mean, floor_std),
                ]
            )
    header = (
        "schedule",
        "calls",
        "best of ours",
        "W1",
        "best of diffusers",
        "W1",
        "ours / diffusers",
        "verdict",
    )
    variants = {
        library: len({(r.schedule, r.method.name) for r in results if r.method.library == library})
        for library in ("ddpm", "diffusers")
    }
    skipped = skip_summary(results)
    text = "\n".join(
        [
            f"W1 of pooled pixels to the mixture, mean +- std over {args.seeds} seed(s), {args.pixels:,} "
            f"pixels per run; {common.describe(common.environment(torch.device('cpu')))}",
            "",
            common.markdown_table(header, rows),
            "",
            f"Noise floor: W1 of {args.pixels:,} exact draws of the mixture, {floor_mean:.4f} +- "
            f"{floor_std:.4f} over {len(floor)} seed(s) ({', '.join(f'{f:.4f}' for f in floor)}).",
            f"Verdict: both at the floor where both means are below the floor's mean + 2 std "
            f"({floor_mean + 2 * floor_std:.4f}); no difference where they differ by at most twice the larger"
            " seed std; else the lower side.",
            f"Samplers measured: ours {', '.join(ddpm.SAMPLERS)} x spacings {', '.join(TIMESTEP_SPACINGS)}"
            f" x clip_sample or not; diffusers {', '.join(DIFFUSERS_SCHEDULERS)}, each with every combination"
            " of its options (bench/samplers.py: DIFFUSERS_OPTIONS, diffusers_spacings).",
            f"Screen: {variants['ddpm']:,} variants of ours and {variants['diffusers']:,} of diffusers'"
            f" (over {len(args.schedules)} schedule(s)), each once at every budget on"
            f" {args.screen_pixels:,} pixels of seed {args.seeds} (noise floor there"
            f" {statistics.fmean(screen_floor):.4f} +- {statistics.stdev(screen_floor):.4f} over"
            f" {len(screen_floor)} draws);"
            f" the {args.finalists} lowest per library, budget and schedule, among the deterministic and"
            f" among the stochastic samplers apart (identical outputs once), measured on seeds"
            f" 0-{args.seeds - 1}.",
            "",
            f"Skipped ({len(skipped)} kinds; every one in the csv):" if skipped else "Skipped: none.",
            *(f"- {line}" for line in skipped),
        ]
    )
    print("\n" + text)
    out.with_suffix(".md").write_text(text + "\n")
    write_csv(out.with_suffix(".csv"), results, args)
    plot(out.with_suffix(".png"), results, args, statistics.fmean(screen_floor))
    print(f"\nwrote {out.with_suffix('.md')}, {out.with_suffix('.csv')} and {out.with_suffix('.png')}")


def export_report(args: argparse.Namespace, results: list[Result], floor: list[float]) -> None:
    """--export: every method's error at every budget, per schedule, on stdout and in OUT.md; OUT.csv."""
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    names = list(dict.fromkeys((r.method.library, r.method.name) for r in results))
    tables = []
    for schedule in args.schedules:
        cells = {(r.method.library, r.method.name, r.budget): r for r in results if r.schedule == schedule}
        rows = [
            [
                library,
                name,
                *(
                    error_cell(cells[library, name, b]) if cells[library, name, b].errors else "-"
                    for b in args.budgets
                ),
            ]
            for library, name in names
        ]
        header = ("library", "sampler (spacing)", *(f"{b} calls" for b in args.budgets))
        tables += [f"{schedule} schedule:", "", common.markdown_table(header, rows), ""]
    floor_mean, floor_std = statistics.fmean(floor), statistics.stdev(floor) if len(floor) > 1 else 0.0
    text = "\n".join(
        [
            f"W1 of pooled pixels to the mixture, mean +- std over {args.seeds} seed(s), {args.pixels:,} "
            f"pixels per run; {common.describe(common.environment(torch.device('cpu')))}",
            "",
            *tables,
            f"Noise floor: W1 of {args.pixels:,} exact draws of the mixture, {floor_mean:.4f} +- "
            f"{floor_std:.4f} over {len(floor)} seed(s).",
        ]
    )
    print("\n" + text)
    out.with_suffix(".md").write_text(text + "\n")
    write_csv(out.with_suffix(".csv"), results, args)
    print(f"\nwrote {out.with_suffix('.md')} and {out.with_suffix('.csv')}")


def best_result(results: list[Result], schedule: str, budget: int, library: str) -> Result | None:
    """The lowest final-round mean of `library` at `budget` on `schedule`."""
    candidates = [
        r
        for r in results
        if r.schedule == schedule
        and r.budget == budget
        and r.errors
        and r.method.library == library
        and math.isfinite(r.mean)
    ]
    return min(candidates, key=lambda r: r.mean, default=None)


def verdict(ours: Result | None, theirs: Result | None, floor_mean: float, floor_std: float) -> str:
    """ "both at the floor" where both means are below floor_mean + 2 floor_std (not resolved from exact
    draws); "no difference" where they differ by at most twice the larger seed std; else the lower side."""
    if ours is None or theirs is None:
        return "-"
    if max(ours.mean, theirs.mean) <= floor_mean + 2 * floor_std:
        return "both at the floor"
    if abs(ours.mean - theirs.mean) <= 2 * max(ours.std, theirs.std):
        return "no difference"
    return "ours lower" if ours.mean < theirs.mean else "diffusers lower"


def error_cell(result: Result | None) -> str:
    return f"{result.mean:.4f} +- {result.std:.4f}" if result else "-"


def skip_summary(results: list[Result]) -> list[str]:
    """One line per library, family and kind of skip (its reason with the numbers taken out): the reason of
    its first instance, how many variants, at which budgets and on which schedules."""
    groups: dict[tuple[str, str, str], list[Result]] = {}
    for r in results:
        if r.skipped:
            groups.setdefault((r.method.library, r.method.family, re.sub(r"\d+", "#", r.skipped)), []).append(
                r
            )
    lines = []
    for (library, family, _), group in sorted(groups.items()):
        variants = sorted({r.method.variant for r in group})
        shown = "; ".join(variants[:3]) + (f"; and {len(variants) - 3} more" if len(variants) > 3 else "")
        budgets = ", ".join(str(b) for b in sorted({r.budget for r in group}))
        schedules = ", ".join(sorted({r.schedule for r in group}, reverse=True))
        lines.append(
            f"{library} {family}, {len(variants)} variant(s) ({shown}), {budgets} calls, {schedules}: "
            f"{group[0].skipped}"
        )
    return lines


def write_csv(path: Path, results: list[Result], args: argparse.Namespace) -> None:
    with path.open("w", newline="") as file:
        writer = csv.writer(file)
        writer.writerow(
            [
                "schedule",
                "library",
                "sampler",
                "variant",
                "calls",
                "steps",
                "w1_screen",
                "same_as",
                "stochastic",
                "w1_mean",
                "w1_std",
                *(f"w1_seed{s}" for s in range(args.seeds)),
                "skipped",
            ]
        )
        for r in results:
            per_seed = [f"{e:.6f}" for e in r.errors] or [""] * args.seeds
            writer.writerow(
                [
                    r.schedule,
                    r.method.library,
                    r.method.family,
                    r.method.variant,
                    r.budget,
                    r.steps or "",
                    f"{r.screen:.6f}" if math.isfinite(r.screen) else "",
                    r.same_as,
                    int(r.stochastic),
                    f"{r.mean:.6f}" if r.errors else "",
                    f"{r.std:.6f}" if r.errors else "",
                    *per_seed,
                    r.skipped,
                ]
            )


def curves(results: list[Result], schedule: str) -> dict[tuple[str, str], list[tuple[int, float]]]:
    """{(library, family): [(calls, screening W1), ...]}, each family at its best variant per budget, for
    each library's PLOTTED_FAMILIES families with the lowest geometric-mean error over the budgets they
    were measured at (a family that misses a budget competes over the rest)."""
    best: dict[tuple[str, str], dict[int, float]] = {}
    for r in results:
        if r.schedule == schedule and math.isfinite(r.screen) and r.screen > 0:
            points = best.setdefault((r.method.library, r.method.family), {})
            points[r.budget] = min(points.get(r.budget, math.inf), r.screen)
    chosen = {}
    for library in ("ddpm", "diffusers"):
        families = [(key, points) for key, points in best.items() if key[0] == library]
        families.sort(key=lambda item: statistics.fmean(math.log(e) for e in item[1].values()))
        chosen |= {key: sorted(points.items()) for key, points in families[:PLOTTED_FAMILIES]}
    return chosen


PALETTE = (
    "#1f77b4",
    "#d62728",
    "#2ca02c",
    "#9467bd",
    "#ff7f0e",
    "#8c564b",
    "#e377c2",
    "#17becf",
    "#7f7f7f",
    "#bcbd22",
    "#393b79",
    "#637939",
)


def plot(path: Path, results: list[Result], args: argparse.Namespace, floor: float) -> None:
    """A log-log plot per schedule, side by side: the screen's W1 against network calls (`curves`), ours
    solid, diffusers dashed, the screen's noise floor dotted grey. Drawn with PIL (the bench environment
    has no matplotlib)."""
    width, height, left, right, top, bottom = 620, 470, 70, 20, 40, 200
    image = Image.new("RGB", (width * len(args.schedules), height + bottom), "white")
    draw = ImageDraw.Draw(image)
    font = ImageFont.load_default(size=13)
    panels = {schedule: sorted(curves(results, schedule).items()) for schedule in args.schedules}
    all_errors = [e for lines in panels.values() for _, points in lines for _, e in points] + [floor]
    y_low, y_high = math.floor(math.log10(min(all_errors))), math.ceil(math.log10(max(all_errors)))
    x_low, x_high = math.log10(min(args.budgets) * 0.9), math.log10(max(args.budgets) * 1.1)
    for panel, schedule in enumerate(args.schedules):
        x0, x1, y0, y1 = panel * width + left, (panel + 1) * width - right, top, height - 40

        def at(calls: float, error: float, x0=x0, x1=x1, y0=y0, y1=y1) -> tuple[float, float]:
            u = (math.log10(calls) - x_low) / (x_high - x_low)
            v = (math.log10(error) - y_low) / (y_high - y_low)
            return x0 + u * (x1 - x0), y1 - v * (y1 - y0)

        draw.rectangle((x0, y0, x1, y1), outline="black")
        draw.text(
            (x0, 10),
            f"{schedule} schedule: screening W1 ({args.screen_pixels:,} pixels) against network calls",
            fill="black",
            font=font,
        )
        for budget in args.budgets:
            x, _ = at(budget, 10.0**y_low)
            draw.line((x, y1, x, y1 + 5), fill="black")
            draw.text((x - 6, y1 + 8), str(budget), fill="black", font=font)
        for decade in range(y_low, y_high + 1):
            for mantissa in range(1, 10):
                if decade == y_high and mantissa > 1:
                    break
                _, y = at(10.0**x_low, mantissa * 10.0**decade)
                draw.line((x0, y, x0 + (8 if mantissa == 1 else 4), y), fill="black")
                if mantissa == 1:
                    draw.line((x0, y, x1, y), fill="#e0e0e0")
                    draw.text((x0 - 50, y - 7), f"1e{decade}", fill="black", font=font)
        dashed_line(draw, [at(10.0**x_low, floor), at(10.0**x_high, floor)], "#909090", 1, dash=3)
        draw.text((x0 + 5, at(10.0**x_low, floor)[1] + 2), "noise floor", fill="#606060", font=font)
        draw.text(((x0 + x1) / 2 - 40, y1 + 24), "network calls", fill="black", font=font)
        legend_y = height
        for i, ((library, family), points) in enumerate(panels[schedule]):
            colour = PALETTE[i % len(PALETTE)]
            xy = [at(c, e) for c, e in sorted(points)]
            if library == "ddpm":
                draw.line(xy, fill=colour, width=3)
            else:
                dashed_line(draw, xy, colour, 2, dash=7)
            for x, y in xy:
                draw.ellipse((x - 3, y - 3, x + 3, y + 3), fill=colour)
            column = 0 if library == "ddpm" else 1  # ours on the left, diffusers' on the right
            row = sum(key[0] == library for key, _ in panels[schedule][:i])
            lx, ly = x0 + column * 270, legend_y + row * 18
            if library == "ddpm":
                draw.line((lx, ly + 7, lx + 30, ly + 7), fill=colour, width=3)
            else:
                dashed_line(draw, [(lx, ly + 7), (lx + 30, ly + 7)], colour, 2, dash=7)
            draw.text(
                (lx + 36, ly),
                f"{'ours' if library == 'ddpm' else 'diffusers'} {family}",
                fill="black",
                font=font,
            )
    image.save(path)


def dashed_line(
    draw: ImageDraw.ImageDraw, xy: list[tuple[float, float]], colour: str, width: int, *, dash: int
):
    """A polyline drawn in dashes of `dash` pixels (PIL has no dash style)."""
    for (xa, ya), (xb, yb) in zip(xy, xy[1:], strict=False):
        length = math.hypot(xb - xa, yb - ya)
        for start in range(0, int(length), 2 * dash):
            a, b = start / length, min(start + dash, length) / length
            draw.line(
                (xa + a * (xb - xa), ya + a * (yb - ya), xa + b * (xb - xa), ya + b * (yb - ya)),
                fill=colour,
                width=width,
            )


# --- --overhead ---------------------------------------------------------------------------------------------


def overhead(args: argparse.Namespace) -> None:
    """Print each sampler's own time per step (and per call) against one forward of the config's UNet."""
    config = load_config(args.config)
    torch.manual_seed(0)
    unet = UNet(**config.model).eval().requires_grad_(False)
    scheduler = NoiseScheduler(**config.diffusion)
    x, t, y = common.random_inputs(config.model, args.batch)
    output = torch.randn_like(x)

    def free_model(x_t: Tensor, t: Tensor, y: Tensor | None = None) -> Tensor:
        return output

    calls = {}
    runs: dict[str, Callable[[], object]] = {"UNet forward": lambda: unet(x, t, y)}
    for sampler in ddpm.SAMPLERS:
        counting = CountingModel(free_model)
        ddpm.sample(counting, scheduler, noise=x, sampler=sampler, steps=args.steps, y=y, progress=False)
        calls[sampler] = counting.calls

        def run(sampler=sampler):
            return ddpm.sample(
                free_model,
                scheduler,
                noise=x,
                sampler=sampler,
                steps=args.steps,
                y=y,
                generator=torch.Generator().manual_seed(0),
                progress=False,
            )

        runs[sampler] = run
    with torch.no_grad():
        times = common.interleaved_times(runs, repeats=args.repeats, warmup=1, device=torch.device("cpu"))
    forward = statistics.median(times["UNet forward"])
    rows = []
    for sampler in ddpm.SAMPLERS:
        total = statistics.median(times[sampler])
        rows.append(
            [
                sampler,
                args.steps,
                calls[sampler],
                total * 1e3 / args.steps,
                total * 1e3 / calls[sampler],
                f"{100 * total / args.steps / forward:.3f}%",
            ]
        )
    print(
        f"Solver overhead, {Path(args.config).name} UNet ({common.parameter_count(unet):,} parameters) at "
        f"batch {args.batch}: forward {forward * 1e3:.1f} ms (median of {args.repeats}); "
        f"{common.describe(common.environment(torch.device('cpu')))}\n"
    )
    header = (
        "sampler",
        "steps",
        "network calls",
        "solver ms / step",
        "solver ms / call",
        "per step / forward",
    )
    print(common.markdown_table(header, rows))


if __name__ == "__main__":
    main()
