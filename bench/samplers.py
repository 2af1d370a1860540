"""Sampling error per network call, on a problem whose exact answer is known: every sampler of ours against
every diffusers scheduler, driven by the same exact noise predictor from the same x_T (DDPM issue 12).

    python bench/samplers.py [--quick] [--budgets 5,8,10,15,20,50] [--seeds 3] [--pixels 16384]
        [--schedules linear,cosine] [--out bench/results/samplers]
    python bench/samplers.py --overhead [--config configs/cifar10.yaml] [--batch 1] [--steps 50] [--repeats 5]
    python bench/samplers.py --export [--budgets ...] [--seeds 3] [--out bench/results/export]

The problem (`ddpm.exact_score`): images whose pixels are independent draws of a three-mode 1-D Gaussian
mixture, so that E[eps | x_t] is closed form; the "network" is that exact predictor, so a sampler errs only
by its discretisation. The error of a run is the Wasserstein-1 distance between its pooled output pixels
and the mixture (from the CDF), averaged over --seeds seeds: seed s draws x_T (float64, standard normal, the
same for every sampler) and seeds the stochastic samplers' noise.

Who runs:
- ours: every sampler in `ddpm.SAMPLERS` with every spacing in `ddpm.schedule.TIMESTEP_SPACINGS`, both read
  at run time, through `ddpm.sample(model, NoiseScheduler(beta_schedule=..., timestep_spacing=...), ...)`
  with its defaults otherwise; a combination that `sample` refuses is skipped with its message;
- diffusers: DPMSolverMultistepScheduler (DPM-Solver++ 2M, 3M and SDE 2M), UniPCMultistepScheduler (bh2),
  DEISMultistepScheduler, HeunDiscreteScheduler, EulerDiscreteScheduler and EulerAncestralDiscreteScheduler,
  each with its defaults and with each timestep_spacing ("leading", "trailing", "linspace"), with and
  without use_karras_sigmas (Euler-ancestral has no Karras option), in the loop of diffusers' pipelines:
  x = x_T * init_noise_sigma, then model(scale_model_input(x, t), t) and step() for t in timesteps.
  The schedule is ours (linear 1e-4..0.02, or cosine = "squaredcos_cap_v2"), alpha_bar checked equal.

Network calls are counted, not assumed: the predictor counts its calls, and for each method and budget the
step count is the one whose run makes exactly that many calls (found by bisection on a one-pixel run, then
checked on every measured run). A method that no step count takes to the budget exactly (diffusers' Heun
calls the model 2 * steps - 1 times: odd budgets only) is skipped there, and the output says so.

Noise floor: the W1 of n = --pixels exact draws of the mixture, per seed (E ~ 0.514 / sqrt(n)); errors near
it are not resolved. Output: the markdown table (best of ours against best of diffusers per budget and
schedule) on stdout and in OUT.md, the full grid in OUT.csv, the log-log plot of error against calls in
OUT.png (one curve per sampler: its variant with the lowest geometric-mean error over the budgets).

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
import inspect
import math
import statistics
from collections.abc import Callable, Sequence
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
# family: (scheduler class, its settings besides the defaults)
DIFFUSERS_SCHEDULERS = {
    "DPM++ 2M": (DPMSolverMultistepScheduler, {}),
    "DPM++ 3M": (DPMSolverMultistepScheduler, {"solver_order": 3}),
    "DPM++ 2M SDE": (DPMSolverMultistepScheduler, {"algorithm_type": "sde-dpmsolver++"}),
    "UniPC": (UniPCMultistepScheduler, {}),
    "DEIS": (DEISMultistepScheduler, {}),
    "Heun": (HeunDiscreteScheduler, {}),
    "Euler": (EulerDiscreteScheduler, {}),
    "Euler a": (EulerAncestralDiscreteScheduler, {}),
}
DIFFUSERS_SPACINGS = ("leading", "trailing", "linspace")

Model = Callable[..., Tensor]


@dataclass(frozen=True)
class Method:
    """One sampler with one setting: `run(model, x_T, steps, generator) -> x0`. family names a curve of the
    plot (a sampler), variant its setting (spacing, sigmas)."""

    library: str  # "ddpm" or "diffusers"
    family: str
    variant: str
    run: Callable[[Model, Tensor, int, torch.Generator], Tensor] = field(repr=False)

    @property
    def name(self) -> str:
        return f"{self.family} ({self.variant})"


@dataclass
class Result:
    """The errors of one method at one budget (one per seed), or why it was skipped."""

    schedule: str
    method: Method
    budget: int
    steps: int | None
    errors: list[float]
    skipped: str = ""

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
    shape = (args.pixels // 1024, 1, 32, 32)
    floor = [
        wasserstein1(MIXTURE.sample(shape, torch.Generator().manual_seed(s)), MIXTURE) for s in seeds(args)
    ]
    results = []
    for schedule in args.schedules:
        ours = NoiseScheduler(beta_schedule=schedule)
        model = exact_predictor(MIXTURE, ours)
        methods = (
            export_methods(schedule) if args.export else [*our_methods(schedule), *diffusers_methods(ours)]
        )
        for method in methods:
            results += measure(method, schedule, model, shape, args)
    (export_report if args.export else report)(args, results, floor)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="budgets 5,10,20, 1 seed, 4,096 pixels")
    parser.add_argument("--budgets", default=None, help="network calls, comma-separated (default: 5,...,50)")
    parser.add_argument("--seeds", type=int, default=None, help="seeds of x_T per run (default: 3)")
    parser.add_argument("--pixels", type=int, default=None, help="pixels per run (default: 16,384)")
    parser.add_argument("--schedules", default=",".join(SCHEDULES), help="beta schedules (linear,cosine)")
    # One thread: the predictor's elementwise work on 16k pixels is too small to split, and on a loaded
    # machine two threads wait on each other (100x slower per operation, measured). --overhead times the
    # solvers and the UNet with the same threads.
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default: 1)")
    parser.add_argument("--out", default=None, help="output prefix (default: bench/results/samplers[-quick])")
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
    quick = {"budgets": "5,10,20", "seeds": 1, "pixels": 4096}
    full = {"budgets": ",".join(map(str, BUDGETS)), "seeds": 3, "pixels": 16384}
    for key, value in (quick if args.quick else full).items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    args.budgets = [int(b) for b in args.budgets.split(",")]
    args.schedules = args.schedules.split(",")
    name = "export" if args.export else "samplers"
    args.out = args.out or str(common.REPO / (f"bench/results/{name}" + ("-quick" if args.quick else "")))
    if min(args.budgets) < 1 or args.seeds < 1 or args.pixels < 1024 or args.pixels % 1024:
        parser.error("--budgets must be >= 1, --seeds >= 1 and --pixels a positive multiple of 1024")
    if unknown := set(args.schedules) - set(SCHEDULES):
        parser.error(f"unknown --schedules {sorted(unknown)}; valid: {', '.join(SCHEDULES)}")
    return args


def seeds(args: argparse.Namespace) -> range:
    return range(args.seeds)


# --- the methods --------------------------------------------------------------------------------------------


def our_methods(schedule: str) -> list[Method]:
    """Every sampler of `ddpm.SAMPLERS` with every spacing of TIMESTEP_SPACINGS, as registered now."""
    methods = []
    for sampler in ddpm.SAMPLERS:
        for spacing in TIMESTEP_SPACINGS:
            scheduler = NoiseScheduler(beta_schedule=schedule, timestep_spacing=spacing)

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

            methods.append(Method("ddpm", sampler, spacing, run))
    return methods


def diffusers_methods(ours: NoiseScheduler) -> list[Method]:
    """Every DIFFUSERS_SCHEDULERS entry with every DIFFUSERS_SPACINGS, with and without Karras sigmas where
    the class has them, on `ours`'s schedule."""
    base = {
        "num_train_timesteps": ours.num_train_timesteps,
        "beta_schedule": DIFFUSERS_SCHEDULE_NAMES.get(
            ours.config["beta_schedule"], ours.config["beta_schedule"]
        ),
        "beta_start": ours.config["beta_start"],
        "beta_end": ours.config["beta_end"],
        "prediction_type": ours.prediction_type,
    }
    methods = []
    for family, (cls, settings) in DIFFUSERS_SCHEDULERS.items():
        karras_options = (
            (False, True) if "use_karras_sigmas" in inspect.signature(cls).parameters else (False,)
        )
        for karras in karras_options:
            for spacing in DIFFUSERS_SPACINGS:
                config = {**base, **settings, "timestep_spacing": spacing}
                if karras:
                    config["use_karras_sigmas"] = True
                common.check_same_schedule(ours, cls(**config))

                def run(model, x, steps, generator, cls=cls, config=config):
                    return diffusers_loop(cls(**config), model, x, steps, generator)

                methods.append(Method("diffusers", family, spacing + (", karras" if karras else ""), run))
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


def diffusers_loop(scheduler, model: Model, x_T: Tensor, steps: int, generator: torch.Generator) -> Tensor:
    """The loop of diffusers' pipelines: x_T scaled by init_noise_sigma, then step() on the model's output
    at scale_model_input(x, t) for each t of the scheduler's timesteps (`generator` to those that take it)."""
    scheduler.set_timesteps(steps)
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


def calls_per_run(method: Method, model: Model, steps: int) -> int:
    """The network calls `method` makes in `steps` steps, counted on a one-pixel run."""
    counting = CountingModel(model)
    method.run(
        counting, torch.zeros(1, 1, 1, 1, dtype=torch.float64), steps, torch.Generator().manual_seed(0)
    )
    return counting.calls


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


def measure(method: Method, schedule: str, model: Model, shape: Sequence[int], args) -> list[Result]:
    """`method`'s W1 error at each budget of args.budgets, one per seed (or why it was skipped)."""
    counted: dict[int, int] = {}

    def calls_of(steps: int) -> int:
        if steps not in counted:
            counted[steps] = calls_per_run(method, model, steps)
        return counted[steps]

    results = []
    for budget in args.budgets:
        try:
            steps, why = steps_for_budget(calls_of, budget)
        except Exception as error:  # ddpm.sample refusing a combination, or a scheduler failing: reported
            steps, why = None, f"raised {type(error).__name__}: {error}"
        result = Result(schedule, method, budget, steps, [], why)
        for seed in seeds(args) if steps is not None else ():
            x_T = torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
            counting = CountingModel(model)
            x0 = method.run(counting, x_T, steps, torch.Generator().manual_seed(1_000 + seed))
            if counting.calls != budget:
                raise RuntimeError(
                    f"{method.name}: {counting.calls} calls in {steps} steps, expected {budget}"
                )
            result.errors.append(wasserstein1(x0, MIXTURE))
        results.append(result)
        print(
            f"{schedule:6} {method.library:9} {method.name:32} {budget:3} calls: "
            + (f"W1 {result.mean:.4f} +- {result.std:.4f} ({steps} steps)" if steps else f"skipped, {why}"),
            flush=True,
        )
    return results


# --- the report ---------------------------------------------------------------------------------------------


def report(args: argparse.Namespace, results: list[Result], floor: list[float]) -> None:
    """The table of the best per library on stdout and in OUT.md, the grid in OUT.csv, the plot in OUT.png."""
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    floor_mean, floor_std = statistics.fmean(floor), statistics.stdev(floor) if len(floor) > 1 else 0.0
    rows = []
    for schedule in args.schedules:
        for budget in args.budgets:
            best = {lib: best_result(results, schedule, budget, lib) for lib in ("ddpm", "diffusers")}
            ours, theirs = best["ddpm"], best["diffusers"]
            rows.append(
                [
                    schedule,
                    budget,
                    ours.method.name if ours else "-",
                    error_cell(ours),
                    theirs.method.name if theirs else "-",
                    error_cell(theirs),
                    f"{ours.mean / theirs.mean:.2f}" if ours and theirs else "-",
                ]
            )
    header = ("schedule", "calls", "best of ours", "W1", "best of diffusers", "W1", "ours / diffusers")
    skipped = sorted(
        {
            f"{r.schedule}, {r.method.library} {r.method.name}, {r.budget} calls: {r.skipped}"
            for r in results
            if r.skipped
        }
    )
    text = "\n".join(
        [
            f"W1 of pooled pixels to the mixture, mean +- std over {args.seeds} seed(s), {args.pixels:,} "
            f"pixels per run; {common.describe(common.environment(torch.device('cpu')))}",
            "",
            common.markdown_table(header, rows),
            "",
            f"Noise floor: W1 of {args.pixels:,} exact draws of the mixture, {floor_mean:.4f} +- "
            f"{floor_std:.4f} over {len(floor)} seed(s) ({', '.join(f'{f:.4f}' for f in floor)}).",
            f"Samplers measured: ours {', '.join(ddpm.SAMPLERS)} x spacings {', '.join(TIMESTEP_SPACINGS)}; "
            f"diffusers {', '.join(DIFFUSERS_SCHEDULERS)}.",
            "",
            f"Skipped ({len(skipped)}):" if skipped else "Skipped: none.",
            *(f"- {line}" for line in skipped),
        ]
    )
    print("\n" + text)
    out.with_suffix(".md").write_text(text + "\n")
    write_csv(out.with_suffix(".csv"), results, args)
    plot(out.with_suffix(".png"), results, args, floor_mean)
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


def error_cell(result: Result | None) -> str:
    return f"{result.mean:.4f} +- {result.std:.4f}" if result else "-"


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
                "w1_mean",
                "w1_std",
                *(f"w1_seed{s}" for s in seeds(args)),
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
                    f"{r.mean:.6f}" if r.errors else "",
                    f"{r.std:.6f}" if r.errors else "",
                    *per_seed,
                    r.skipped,
                ]
            )


def curves(results: list[Result], schedule: str) -> dict[tuple[str, str], list[tuple[int, float]]]:
    """{(library, family): [(calls, mean W1), ...]} for each sampler's variant with the lowest geometric-mean
    error over the budgets it was measured at (a variant that misses a budget competes over the rest)."""
    by_method: dict[tuple[str, str, str], list[tuple[int, float]]] = {}
    for r in results:
        if r.schedule == schedule and r.errors and math.isfinite(r.mean) and r.mean > 0:
            by_method.setdefault((r.method.library, r.method.family, r.method.variant), []).append(
                (r.budget, r.mean)
            )
    best: dict[tuple[str, str], list[tuple[int, float]]] = {}
    for (library, family, _), points in by_method.items():
        score = statistics.fmean(math.log(e) for _, e in points)
        current = best.get((library, family))
        if current is None or score < statistics.fmean(math.log(e) for _, e in current):
            best[(library, family)] = points
    return best


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
    """A log-log plot per schedule, side by side: W1 against network calls, ours solid, diffusers dashed, the
    noise floor dotted grey. Drawn with PIL (the bench environment has no matplotlib)."""
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
            (x0, 10), f"{schedule} schedule: W1 to the mixture against network calls", fill="black", font=font
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
            column, row = divmod(i, 10)
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
