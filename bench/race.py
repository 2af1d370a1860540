"""Sample quality per second of training on the digits: our Trainer, its variants and two peers, each trained
for the same CPU time on this machine, over several seeds, scored at several times on the way.

    python bench/race.py [--marks 15,30,60] [--seeds 0,1,2] [--n-samples 900]
        [--runs ours,diffusers,lucidrains,diffusers-our-settings] [--variant NAME [CONFIG] KEY=VALUE ...]
        [--posthoc-sigma-rels 0.05,0.1,0.15,0.2] [--json OUT]
    python bench/race.py --merge A.json B.json ... [--json OUT]      # one report from several invocations

Per seed s (--seeds), every run trains from scratch with training seed s, all in one process and in turns:
one optimizer step at a time, always the run with the least training time so far (`TrainingClock`). A run's
training time is the CPU time of the process during its turns, over torch's thread count (`cpu_seconds`):
only one run computes at a time and idle OpenMP threads sleep, so that CPU time is the run's own, and other
work on the machine does not change it as it changes wall-clock time (on an idle machine with every thread
busy the two are equal; each result records the wall time too). At each time mark (--marks, seconds of
training; the last one ends the run) the run's weights are copied off the clock, and afterwards sampled
--n-samples images each (image i from noise seeded 1,000,000 s + i, label i mod 10 for a class-conditional
model). Training time excludes building a run and scoring it, and includes all that its loop does per step.
The runs share the global RNG, so a seed's results depend on the interleaving (fixed seeds, not
bit-reproducible runs).

Every run is sampled with the same best sampler: the config's (UniPC, 20 network calls) through
`ddpm.sample` on the timestep spacing with which it errs least on the run's own noise schedule
(`BestSpacing`: the exact-score measure of BENCHMARKS.md section 5, computed here for each schedule); a peer
with a sampler of its own is sampled with that too, and so is a run whose config asks for another spacing.
Each (weights, sampler) pair of a run is a candidate; at each mark a run is scored by its best candidate (the
lower mean over the seeds), and the report names it and lists them all. Choosing the best of two favours the
runs that have two.

The runs:
- "ours": `ddpm.training.Trainer` on configs/digits.yaml, float32, no in-training grids or trackers, driven by
  its own training loop; its EMA (train.ema_decay 0.999 with the (1 + n) / (10 + n) warm-up).
- a variant (--variant NAME [CONFIG] KEY=VALUE ...): "ours" with those config overrides, on CONFIG instead of
  --config when given, e.g. `--variant edm bench/configs/digits_edm.yaml` or `--variant b32
  data.batch_size=32`. A variant that sets train.posthoc_ema_every is also scored with the post-hoc EMA of
  each --posthoc-sigma-rels value, reconstructed at each mark from its snapshots (run NAME@SIGMA_REL).
- "diffusers": bench/quality.py's baseline: `UNet2DModel` with the layers of our network, `DDPMScheduler`
  with our schedule and prediction type, in the loop of diffusers' unconditional-generation example,
  class-conditional without label dropout. Two EMAs of its weights: "ema", `EMAModel`'s default warm-up,
  decay min(0.999, k / (9 + k)) at step k (PEER_SETTINGS; ours: (1 + k) / (10 + k)), and "example-ema", the
  example's own: `EMAModel(decay=0.9999, use_ema_warmup=True, inv_gamma=1.0, power=3/4)`, updated every step
  from step 0, so at these lengths its decay is 1 - k^(-3/4) (0.97 at 100 steps, 0.98 at 200), never near
  0.9999.
  Its sampler is ours: diffusers' UniPCMultistepScheduler computes the same update on the same grid
  (BENCHMARKS.md section 5; it rounds sigma-spaced timesteps to integers, ours keeps them continuous); the
  example itself samples with DDPMPipeline at 1,000 steps, 50 times the calls, not raced.
- "lucidrains": denoising-diffusion-pytorch's `GaussianDiffusion` with its defaults (sigmoid schedule,
  v-objective and its loss weights, T = 1000) around its `Unet` (dim = our base_channels, dim_mults = our
  channel_mult), unconditional (it has no labels), trained as its `Trainer` does (Adam betas (0.9, 0.99),
  gradient norm clipped to 1), with its Trainer's EMA (`ema_pytorch.EMA`, beta 0.995, inv_gamma 1, power
  2/3) scaled to the run: started at step 0 and updated every step. Its Trainer keeps ema_pytorch's
  update_after_step=100 and update_every=10, a thousandth and a ten-thousandth of its default 100,000 steps:
  in a run of about 100 steps they leave the "EMA" a copy of the raw weights at the last multiple of 10
  steps; and started at once but updated every 10 steps, its warm-up (counted in steps) would keep 44% of
  the first step's weights after 90 steps (every step: 0.001%). Sampled with our sampler (its network
  wrapped as `model(x, t, y)` by `LucidrainsDenoiser`, its schedule by `TabulatedScheduler`: its sigmoid
  alpha_bar, which is not ours, checked equal) and with its own DDIM (`GaussianDiffusion.ddim_sample`, eta 0,
  its own timesteps) at the config's number of steps.
Both peers use PEER_SETTINGS (the network size, batch, learning rate, warm-up, clipping and EMA decay of
configs/digits.yaml before this race), not our current defaults. "diffusers-our-settings" is the diffusers
run with our current config's settings instead, and only its "ema": against "ours" it is the library alone
(network code and initialisation, loop; and label dropout, which it lacks), the rest of a difference being
the settings.

Scoring (bench/quality.py's Scorer): the kernel distance (KID) between the samples' classifier conv features
and the real digits', with the real-vs-real floor at --n-samples. Per run and mark: mean and std over seeds of
its best candidate; per pair "ours" against each other run: the difference of the means with its standard
error and the ratio of the means, called a difference only beyond both 3 standard errors and the floor's 95th
percentile (and never from one seed).
"""

from __future__ import annotations

import os

# The runs take turns in threads, each with its own OpenMP team: idle teams must sleep, not spin on the cores
# (which would also count as CPU time of the run whose turn it is).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse
import contextlib
import copy
import dataclasses
import json
import math
import statistics
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

import common
import quality
import torch
from accelerate.state import AcceleratorState
from diffusers import UNet2DModel
from diffusers.training_utils import EMAModel
from torch import Tensor, nn

from ddpm import NoiseScheduler, load_config, sample
from ddpm.config import build_schedule
from ddpm.ema.posthoc import posthoc_model, reconstruct
from ddpm.exact_score import MIXTURE, exact_predictor, wasserstein1
from ddpm.schedule import TIMESTEP_SPACINGS
from ddpm.training.trainer import Trainer

PEERS = ("diffusers", "lucidrains", "diffusers-our-settings")
UNLIMITED_STEPS = 10**8  # "ours" runs stop at the time marks, not at train.steps (unless a variant sets it)
# The peers' network size, batch, learning rate, warm-up, clipping and EMA: configs/digits.yaml's before the
# race (tuned on these digits), pinned so that changing our defaults does not change the peers.
PEER_SETTINGS = [
    "model.base_channels=32",
    "model.channel_mult=[1,2,2]",
    "model.num_res_blocks=1",
    "data.batch_size=64",
    "train.lr=1e-3",
    "train.warmup_steps=100",
    "train.grad_clip=1.0",
    "train.ema_decay=0.999",
    "train.ema_warmup=true",
]
# diffusers' examples/unconditional_image_generation/train_unconditional.py: its EMAModel arguments
# (--ema_max_decay, --ema_inv_gamma, --ema_power defaults; use_ema_warmup=True).
DIFFUSERS_EXAMPLE_EMA = {"decay": 0.9999, "use_ema_warmup": True, "inv_gamma": 1.0, "power": 3 / 4}
# denoising-diffusion-pytorch's Trainer: EMA(beta=ema_decay=0.995, update_every=ema_update_every=10) with
# ema_pytorch's warm-up defaults; update_after_step (100) and update_every (10) scaled to a run of ~100 steps.
LUCIDRAINS_EMA = {"beta": 0.995, "inv_gamma": 1.0, "power": 2 / 3, "update_after_step": 0, "update_every": 1}
Draw = Callable[[int, int], tuple[Tensor, Tensor | None]]  # (n, seed) -> (images in [-1, 1], labels or None)


def main() -> None:
    args = parse_args()
    if args.merge:
        report([json.loads(Path(p).read_text()) for p in args.merge], args.json)
        return
    variants = {"ours": []} | {name: overrides for name, *overrides in args.variant}
    runs = [*args.runs, *(v for v in variants if v not in args.runs)]
    config = load_config(args.config, ["train.mixed_precision='no'", "train.sample_every=0"])
    scorer = quality.Scorer(config, splits=args.floor_splits, size=args.n_samples)
    spacing = BestSpacing()
    results = []
    for seed in args.seeds:
        with tempfile.TemporaryDirectory(prefix="ddpm-race-") as tmp:
            marks = race(args, runs, variants, seed, Path(tmp), spacing)
        for mark in marks:
            for (weights, sampler), draw in mark.pop("samplers").items():
                images, labels = draw(args.n_samples, quality.SAMPLING_SEED_STRIDE * seed)
                scores = scorer.score(images, labels)
                result = {"seed": seed, **mark, "weights": weights, "sampler": sampler, **scores}
                results.append(result)
                print(
                    f"seed {seed} {result['run']:<24} {result['mark']:>6.0f} s: step {result['steps']:>5} "
                    f"({result['seconds']:.1f} s, wall {result['wall_seconds']:.1f} s) {weights:<11} "
                    f"{sampler:<22} KID conv {result['kid_conv']:+.4f}",
                    flush=True,
                )
        payload = {
            "options": {k: v for k, v in vars(args).items() if k not in ("merge", "json")},
            "variants": variants,
            "floor": scorer.floor,
            "classifier_accuracy": scorer.accuracy,
            "environment": common.environment(torch.device("cpu")),
            "clock": "CPU time of the process during the run's turns / torch.get_num_threads()",
            "spacings": spacing.record,
            "results": results,
        }
        common.write_json(args.json, payload)
    report([payload], None)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--config", default=str(common.REPO / "configs/digits.yaml"), help="our run's config")
    parser.add_argument(
        "--marks", type=_floats, default=[15.0, 30.0, 60.0], help="seconds of training (CPU time / threads)"
    )
    parser.add_argument("--seeds", type=lambda s: [int(x) for x in s.split(",")], default=[0, 1, 2])
    parser.add_argument("--n-samples", type=int, default=900, help="samples scored per run/mark/candidate")
    parser.add_argument("--floor-splits", type=int, default=100, help="real-vs-real splits for the floor")
    parser.add_argument(
        "--runs", type=lambda s: s.split(","), default=["ours", *PEERS], help=f"ours, {', '.join(PEERS)}"
    )
    parser.add_argument(
        "--variant",
        nargs="+",
        action="append",
        default=[],
        metavar="NAME [CONFIG] KEY=VALUE",
        help="a run of our Trainer with these config overrides, on CONFIG if given (repeatable)",
    )
    parser.add_argument(
        "--posthoc-sigma-rels", type=_floats, default=[0.05, 0.1, 0.15, 0.2], help="for posthoc variants"
    )
    parser.add_argument("--merge", nargs="+", help="report from these --json files instead of training")
    parser.add_argument("--json", help="write the results here (rewritten after every seed)")
    args = parser.parse_args()
    if args.marks != sorted(args.marks) or args.marks[0] <= 0:
        parser.error("--marks must be increasing positive seconds")
    return args


def race(
    args: argparse.Namespace, runs: list[str], variants: dict, seed: int, tmp: Path, spacing: BestSpacing
) -> list[dict]:
    """Train every run of one seed in turns until each has had the last mark's seconds of training; per run
    and mark its step, seconds (CPU and wall) and its candidates' samplers of the weights it had then."""
    clock = TrainingClock()
    threads, marks = [], []
    for name in runs:
        step_loop = (
            peer_loop(name, args, seed, spacing)
            if name in PEERS
            else trainer_loop(name, args, variants, seed, tmp, spacing)
        )
        clock.enter(name)
        threads.append(Contestant(name, step_loop, clock, args.marks, marks))
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
        if thread.error is not None:
            raise thread.error
    AcceleratorState._reset_state(reset_partial_state=True)  # the next seed's Trainers build their own
    return sorted(marks, key=lambda m: (runs.index(m["run"].split("@")[0]), m["run"], m["mark"]))


def cpu_seconds() -> float:
    """The CPU time of this process (all its threads) over torch's intra-op thread count: the wall time of
    work that keeps every thread busy, and unlike wall time unchanged by other processes on the machine."""
    return time.process_time() / torch.get_num_threads()


class TrainingClock:
    """Lets one run train at a time, always the one with the least training time so far, and counts each
    run's time by `timer` (default `cpu_seconds`; its wall time besides): with one run computing at a time
    and idle threads asleep, the process's CPU time during a run's turn is that run's."""

    def __init__(self, timer: Callable[[], float] = cpu_seconds) -> None:
        self.timer = timer
        self.seconds: dict[str, float] = {}
        self.wall: dict[str, float] = {}
        self._turn = threading.Condition()
        self._running: str | None = None
        self._since = self._wall_since = 0.0

    def enter(self, name: str) -> None:
        self.seconds[name] = self.wall[name] = 0.0

    def acquire(self, name: str) -> None:
        with self._turn:
            self._turn.wait_for(
                lambda: self._running is None and name == min(self.seconds, key=self.seconds.get)
            )
            self._running = name
            self._since, self._wall_since = self.timer(), time.perf_counter()

    def elapsed(self, name: str) -> float:
        """The run's training time so far, including the current turn."""
        return self.seconds[name] + self.timer() - self._since

    def wall_elapsed(self, name: str) -> float:
        """The run's wall-clock time in its turns so far, including the current one."""
        return self.wall[name] + time.perf_counter() - self._wall_since

    @contextlib.contextmanager
    def off_clock(self, name: str):
        """Time spent inside is counted to no run; `name` keeps its turn (nothing else computes meanwhile)."""
        self._count(name)
        yield
        self._since, self._wall_since = self.timer(), time.perf_counter()

    def release(self, name: str) -> None:
        with self._turn:
            self._count(name)
            self._running = None
            self._turn.notify_all()

    def leave(self, name: str) -> None:
        with self._turn:
            self.seconds.pop(name, None)
            if self._running == name:
                self._running = None
            self._turn.notify_all()

    def _count(self, name: str) -> None:
        """Add the current turn's time so far to `name`'s and restart the turn's count."""
        now, wall_now = self.timer(), time.perf_counter()
        self.seconds[name] += now - self._since
        self.wall[name] += wall_now - self._wall_since
        self._since, self._wall_since = now, wall_now


class Contestant(threading.Thread):
    """Runs `step_loop(self)`, a training loop that calls `tick` after each optimizer step, on `clock` (its
    first turn taken before the loop starts), appending to `out` a run's candidate samplers (scored later) at
    each time mark."""

    def __init__(self, name: str, step_loop, clock: TrainingClock, marks: list[float], out: list[dict]):
        super().__init__(name=name, daemon=True)
        self.step_loop, self.clock, self.marks, self.out = step_loop, clock, list(marks), out
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            self.clock.acquire(self.name)
            self.step_loop(self)
        except BaseException as error:  # re-raised by the main thread
            self.error = error
        finally:
            self.clock.leave(self.name)

    def tick(self, steps: int, snapshot) -> bool:
        """Called after each optimizer step, holding the clock (taken in `run`); returns whether to go on.
        At a mark, `snapshot()` -> [(run name, {(weights, sampler): draw})] is taken off the clock."""
        if self.clock.elapsed(self.name) >= self.marks[0]:
            self._record([self.marks.pop(0)], steps, snapshot)
        self.clock.release(self.name)
        if not self.marks:
            return False
        self.clock.acquire(self.name)
        return True

    def finish(self, steps: int, snapshot) -> None:
        """The run stopped on its own (train.steps) before the last mark: its final weights stand for the
        marks left, at the time it took."""
        if self.marks:
            self._record(self.marks, steps, snapshot)

    def _record(self, marks: list[float], steps: int, snapshot) -> None:
        seconds, wall = self.clock.elapsed(self.name), self.clock.wall_elapsed(self.name)
        with self.clock.off_clock(self.name):
            for run, samplers in snapshot():
                for mark in marks:
                    self.out.append(
                        {
                            "run": run,
                            "mark": mark,
                            "steps": steps,
                            "seconds": seconds,
                            "wall_seconds": wall,
                            "samplers": samplers,
                        }
                    )


def trainer_loop(
    name: str, args: argparse.Namespace, variants: dict, seed: int, tmp: Path, spacing: BestSpacing
):
    """Our Trainer for run `name` (a variant's config and overrides), ticking after each of its steps."""
    overrides = variants[name]
    base = args.config
    if overrides and overrides[0].endswith((".yaml", ".yml")):
        base, *overrides = overrides
    config = load_config(
        base,
        [
            "train.mixed_precision='no'",
            "train.sample_every=0",
            "train.log_with=none",
            f"train.steps={UNLIMITED_STEPS}",
            f"train.checkpoint_every={UNLIMITED_STEPS}",
            *overrides,
            f"train.seed={seed}",
            f"output_dir={tmp / name}",
        ],
    )
    trainer = Trainer(config)
    settings = dataclasses.replace(config.sample, guidance_scale=1.0)
    best = spacing(trainer.scheduler, settings)  # before the clock starts

    def candidates(model: nn.Module) -> dict:
        return {("ema", s): draw for s, draw in samplers(model, trainer.scheduler, settings, best).items()}

    def snapshot() -> list:
        model = copy.deepcopy(trainer.ema.module).eval()
        taken = [(name, candidates(model))]
        if config.train.posthoc_ema_every and trainer.state.step >= config.train.posthoc_ema_every:
            states = reconstruct(tmp / name, model, args.posthoc_sigma_rels)
            for sigma_rel, state in zip(args.posthoc_sigma_rels, states, strict=True):
                taken.append((f"{name}@{sigma_rel:g}", candidates(posthoc_model(config, state))))
        return taken

    def loop(contestant: Contestant) -> None:
        batches = trainer._batches

        def ticking_batches():
            for batch in batches():
                yield batch  # the Trainer runs one optimizer step on it before asking for the next
                if not contestant.tick(trainer.state.step, snapshot):
                    return

        trainer._batches = ticking_batches
        trainer.train()
        contestant.finish(trainer.state.step, snapshot)

    return loop


def peer_loop(name: str, args: argparse.Namespace, seed: int, spacing: BestSpacing):
    """Peer `name` (module docstring) on the peers' settings, ticking after each of its steps."""
    overrides = [] if name == "diffusers-our-settings" else PEER_SETTINGS
    config = load_config(args.config, ["train.mixed_precision='no'", *overrides, f"train.seed={seed}"])
    settings = dataclasses.replace(config.sample, guidance_scale=1.0)
    if name == "lucidrains":
        run = LucidrainsRun(config, seed)
    else:
        run = DiffusersPeer(config, example_ema=name == "diffusers")
    best = spacing(run.scheduler, settings)  # before the clock starts

    def snapshot() -> list:
        return [(name, run.samplers(settings, best))]

    def loop(contestant: Contestant) -> None:
        steps = 1
        while True:
            run.step()
            if not contestant.tick(steps, snapshot):
                return
            steps += 1

    return loop


def samplers(model: nn.Module, scheduler, settings, best: str | None) -> dict[str, Draw]:
    """{label: draw} for `model` (called as model(x, t, y)) sampled by `ddpm.sample` with `settings`' sampler
    and steps on the spacing `best`, and on `scheduler`'s own spacing when that differs (a schedule without
    spacings to choose from, `best` None: on its own). Labels read "unipc20-exponential"."""
    spacings = [best, scheduler.timestep_spacing] if best is not None else [scheduler.timestep_spacing]
    out = {}
    for timestep_spacing in dict.fromkeys(spacings):
        on = scheduler if timestep_spacing == scheduler.timestep_spacing else with_spacing(scheduler, best)
        out[f"{settings.sampler}{settings.steps}-{timestep_spacing}"] = _draw(model, on, settings)
    return out


def _draw(model: nn.Module, scheduler, settings) -> Draw:
    def draw(n: int, seed: int) -> tuple[Tensor, Tensor | None]:
        return quality.sample_images(model, scheduler, settings, n, seed)

    return draw


def with_spacing(scheduler: NoiseScheduler, timestep_spacing: str) -> NoiseScheduler:
    """`scheduler` (a NoiseScheduler or a TabulatedScheduler) with another timestep spacing."""
    config = {**scheduler.config, "timestep_spacing": timestep_spacing}
    if isinstance(scheduler, TabulatedScheduler):
        return TabulatedScheduler(scheduler.betas, **config)
    return NoiseScheduler(**config)


class BestSpacing:
    """spacing(scheduler, settings) -> the timestep spacing with which `settings.sampler` at `settings.steps`
    errs least on `scheduler`'s schedule (prediction type and clipping as it has them), None for a schedule
    that is no NoiseScheduler (EDM's). The error is BENCHMARKS.md section 5's: the exact predictor of
    `ddpm.exact_score.MIXTURE` drives the sampler from x_T of shape SHAPE (float64) for each of SEEDS, and
    the Wasserstein-1 distance of the pooled pixels to the mixture is averaged over them. Each schedule is
    measured once; `record` lists every measurement."""

    SHAPE = (16, 1, 32, 32)
    SEEDS = (0, 1, 2)

    def __init__(self) -> None:
        self.record: list[dict] = []
        self._chosen: dict[tuple, str] = {}

    def __call__(self, scheduler, settings) -> str | None:
        if not isinstance(scheduler, NoiseScheduler):
            return None
        key = (
            scheduler.alphas_cumprod.numpy().tobytes(),
            scheduler.prediction_type,
            scheduler.clip_sample,
            settings.sampler,
            settings.steps,
        )
        if key not in self._chosen:
            errors = {}
            for timestep_spacing in TIMESTEP_SPACINGS:
                try:
                    errors[timestep_spacing] = self._error(
                        with_spacing(scheduler, timestep_spacing), settings
                    )
                except ValueError:  # a spacing this schedule refuses (zero terminal SNR with sigma spacings)
                    continue
            self._chosen[key] = min(errors, key=errors.get)
            self.record.append(
                {
                    "schedule": type(scheduler).__name__,
                    "alpha_bar_last": scheduler.alphas_cumprod[-1].item(),
                    "prediction_type": scheduler.prediction_type,
                    "sampler": settings.sampler,
                    "steps": settings.steps,
                    "w1": errors,
                    "chosen": self._chosen[key],
                }
            )
            w1 = ", ".join(f"{spacing} {error:.4f}" for spacing, error in errors.items())
            print(f"{settings.sampler} {settings.steps} on {scheduler!r}: W1 {w1}", flush=True)
        return self._chosen[key]

    def _error(self, scheduler: NoiseScheduler, settings) -> float:
        model = exact_predictor(MIXTURE, scheduler)
        errors = []
        for seed in self.SEEDS:
            x_T = torch.randn(self.SHAPE, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
            x0 = sample(
                model, scheduler, noise=x_T, sampler=settings.sampler, steps=settings.steps, progress=False
            )
            errors.append(wasserstein1(x0, MIXTURE))
        return statistics.fmean(errors)


class TabulatedScheduler(NoiseScheduler):
    """A NoiseScheduler on the given (T,) betas, another library's schedule, instead of a named one; the other
    keyword arguments are NoiseScheduler's (its beta_schedule, beta_start and beta_end unused)."""

    def __init__(self, betas: Tensor, **config) -> None:
        super().__init__(**{**config, "num_train_timesteps": len(betas)})
        self._set_tables(betas.double())

    def __repr__(self) -> str:
        unused = ("beta_schedule", "beta_start", "beta_end")
        args = ", ".join(f"{k}={v!r}" for k, v in self.config.items() if k not in unused)
        return f"TabulatedScheduler(alpha_bar_last={self.alphas_cumprod[-1].item():.3g}, {args})"


class DiffusersPeer:
    """bench/quality.py's DiffusersRun and its EMA ("ema"); for "diffusers" also the EMA of diffusers'
    unconditional example ("example-ema", DIFFUSERS_EXAMPLE_EMA), updated after each step."""

    def __init__(self, config, *, example_ema: bool) -> None:
        self.run = quality.DiffusersRun(config)
        self.scheduler = build_schedule(config.diffusion)
        self.emas = {"ema": self.run.ema}
        if example_ema:
            self.emas["example-ema"] = EMAModel(self.run.unet.parameters(), **DIFFUSERS_EXAMPLE_EMA)

    def step(self) -> None:
        self.run.step()  # updates self.run.ema
        for ema in self.emas.values():
            if ema is not self.run.ema:
                ema.step(self.run.unet.parameters())

    def samplers(self, settings, best: str | None) -> dict[tuple[str, str], Draw]:
        """{(weights, sampler label): draw} for each EMA's current weights (module docstring)."""
        out = {}
        for weights, ema in self.emas.items():
            unet = UNet2DModel.from_config(self.run.unet.config).to(self.run.device).eval()
            ema.copy_to(unet.parameters())
            model = common.DiffusersDenoiser(unet)
            out |= {(weights, s): d for s, d in samplers(model, self.scheduler, settings, best).items()}
        return out


class LucidrainsRun:
    """denoising-diffusion-pytorch's GaussianDiffusion and Unet in its Trainer's loop, with its Trainer's EMA
    scaled to the run (LUCIDRAINS_EMA; module docstring)."""

    def __init__(self, config, seed: int) -> None:
        from denoising_diffusion_pytorch import GaussianDiffusion, Unet
        from denoising_diffusion_pytorch.denoising_diffusion_pytorch import sigmoid_beta_schedule
        from ema_pytorch import EMA

        from ddpm import build_dataset

        torch.manual_seed(seed)
        model = config.model
        self.image_size = model["image_size"]
        unet = Unet(dim=model["base_channels"], dim_mults=tuple(model["channel_mult"]), channels=1)
        # its defaults, named: sigmoid schedule (Chen 2023, Fig. 8), v-objective, T = 1000, no min-SNR
        self.diffusion = GaussianDiffusion(
            unet, image_size=self.image_size, timesteps=1000, objective="pred_v", beta_schedule="sigmoid"
        )
        # its x_t is in the data's [-1, 1] (it normalises [0, 1] inputs first), as ours: the same schedule
        # drives it in ddpm.sample, clipping x0 to [-1, 1] as its own samplers do
        self.scheduler = TabulatedScheduler(
            sigmoid_beta_schedule(1000),
            prediction_type="v_prediction",
            clip_sample=True,
            timestep_spacing="trailing",
        )
        common.check_same_schedule(self.scheduler, self.diffusion)
        self.optimizer = torch.optim.Adam(self.diffusion.parameters(), lr=config.train.lr, betas=(0.9, 0.99))
        self.ema = EMA(self.diffusion, **LUCIDRAINS_EMA)
        dataset = build_dataset(config.data)
        self.loader = torch.utils.data.DataLoader(
            dataset,
            batch_size=config.data.batch_size,
            shuffle=True,
            drop_last=True,
            generator=torch.Generator().manual_seed(seed),
        )
        self.batches = self._batches()

    def step(self) -> None:
        x0, _ = next(self.batches)
        loss = self.diffusion((x0 + 1) / 2)  # it normalises [0, 1] images to [-1, 1] itself
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.diffusion.parameters(), 1.0)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.ema.update()

    def samplers(self, settings, best: str | None) -> dict[tuple[str, str], Draw]:
        """{(weights, sampler label): draw} of its EMA weights as they are now: our sampler on the spacing
        `best` of its schedule, and its own DDIM ("own-ddim20") at settings.steps."""
        ema = copy.deepcopy(self.ema.ema_model).eval()
        model = LucidrainsDenoiser(ema.model, self.image_size)
        out = {
            ("ema", s): d
            for s, d in samplers(model, with_spacing(self.scheduler, best), settings, None).items()
        }
        out["ema", f"own-ddim{settings.steps}"] = self._own_ddim(ema, settings.steps)
        return out

    def _own_ddim(self, ema, steps: int) -> Draw:
        from denoising_diffusion_pytorch import GaussianDiffusion

        diffusion = GaussianDiffusion(
            ema.model,
            image_size=self.image_size,
            timesteps=1000,
            sampling_timesteps=steps,
            objective="pred_v",
            beta_schedule="sigmoid",
        )

        @torch.no_grad()
        def draw(n: int, seed: int) -> tuple[Tensor, None]:
            torch.manual_seed(seed)
            images = torch.cat([diffusion.sample(batch_size=b) for b in _batches(n, 500)])
            return images * 2 - 1, None

        return draw

    def _batches(self):
        while True:
            yield from self.loader


class LucidrainsDenoiser(nn.Module):
    """denoising-diffusion-pytorch's Unet called as ours is, model(x, t, y) -> its prediction (v for its
    pred_v objective), for `ddpm.sample` through `quality.sample_images` (which reads `config` and
    `num_classes`: unconditional). Its time embedding takes t as a number (trained on integers 0..T-1);
    ddpm's samplers pass long t, or float64 t on sigma spacings, given to it as float32 as its layers are."""

    def __init__(self, net: nn.Module, image_size: int) -> None:
        super().__init__()
        self.net = net
        self.num_classes = None
        self.config = {"in_channels": net.channels, "image_size": image_size}

    def forward(self, x: Tensor, t: Tensor, y: Tensor | None = None) -> Tensor:
        return self.net(x, t.to(torch.float32))


def _batches(n: int, size: int) -> list[int]:
    return [min(size, n - i) for i in range(0, n, size)]


def report(payloads: list[dict], out: str | None) -> None:
    """Print the per-mark table of each run's best candidate, every candidate's means, and the comparisons
    of "ours" with each other run (and write --json if asked)."""
    first = payloads[0]
    results = [r for p in payloads for r in p["results"]]
    floor = first["floor"]["kid_conv"]
    if out:
        common.write_json(out, {**first, "results": results})
    best, candidates = best_candidates(results)
    runs = list(dict.fromkeys(run for run, _ in best))
    marks = sorted({mark for _, mark in best})
    rows = []
    for (run, mark), b in best.items():
        rows.append(
            [
                run,
                f"{mark:g}",
                f"{b['steps']:.0f}",
                f"{b['wall_seconds']:.0f}" if b["wall_seconds"] is not None else "",
                f"{b['weights']}, {b['sampler']}",
                f"{b['mean']:.4f} +- {b['std']:.4f}",
                " / ".join(f"{k:.4f}" for k in b["kids"]),
            ]
        )
    print(f"floor (real vs real, 95th pct. of |KID conv|): {floor['abs_p95']:.4f}")
    header = ["run", "mark (s)", "steps", "wall (s)", "best candidate", "KID conv mean +- std", "per seed"]
    print(common.markdown_table(header, rows))
    rows = [
        [run, weights, sampler, *(f"{means[m]:.4f}" if m in means else "" for m in marks)]
        for (run, weights, sampler), means in candidates.items()
    ]
    print(common.markdown_table(["run", "weights", "sampler", *(f"{m:g} s" for m in marks)], rows))
    pairs = []
    for peer in [r for r in runs if r != "ours"]:
        for mark in marks:
            if ("ours", mark) not in best or (peer, mark) not in best:
                continue
            a, b = best["ours", mark], best[peer, mark]
            se = math.sqrt(a["std"] ** 2 / len(a["kids"]) + b["std"] ** 2 / len(b["kids"]))
            difference = a["mean"] - b["mean"]
            seeds = min(len(a["kids"]), len(b["kids"]))
            called = seeds > 1 and abs(difference) > 3 * se and abs(difference) > floor["abs_p95"]
            verdict = ("ours better" if difference < 0 else "ours worse") if called else "no difference"
            verdict = verdict if seeds > 1 else "one seed: not called"
            ratio = f"{a['mean'] / b['mean']:.2f}"
            pairs.append([f"ours - {peer}", f"{mark:g}", f"{difference:+.4f} ({se:.4f})", ratio, verdict])
    print(common.markdown_table(["pair", "mark (s)", "difference (s.e.)", "ratio", "verdict"], pairs))
    last = marks[-1]
    for peer in [r for r in runs if r != "ours" and (r, last) in best]:
        target = best[peer, last]["mean"]
        reached = [m for m in marks if ("ours", m) in best and best["ours", m]["mean"] <= target]
        when = f"at the {reached[0]:g} s mark" if reached else "at none of the marks"
        print(f"ours reaches {peer}'s {last:g} s mean ({target:.4f}) {when}")


def best_candidates(results: list[dict]) -> tuple[dict, dict]:
    """From the results (one per seed, run, mark and candidate): per (run, mark) the candidate (weights,
    sampler) with the lowest mean KID conv over the seeds, as {"weights", "sampler", "mean", "std", "kids"
    (per seed), "steps" and "wall_seconds" (means over the seeds; wall None where not recorded)}; and per
    (run, weights, sampler) its mean KID conv at each mark. Results of files written before the candidates
    were recorded count as one candidate ("ema", "as run")."""
    groups: dict[tuple, list[dict]] = {}
    for r in results:
        key = (r["run"], r["mark"], r.get("weights", "ema"), r.get("sampler", "as run"))
        groups.setdefault(key, []).append(r)
    best: dict[tuple, dict] = {}
    candidates: dict[tuple, dict] = {}
    for (run, mark, weights, sampler), group in groups.items():
        kids = [r["kid_conv"] for r in group]
        walls = [r["wall_seconds"] for r in group if "wall_seconds" in r]
        entry = {
            "weights": weights,
            "sampler": sampler,
            "mean": statistics.fmean(kids),
            "std": statistics.stdev(kids) if len(kids) > 1 else 0.0,
            "kids": kids,
            "steps": statistics.fmean(r["steps"] for r in group),
            "wall_seconds": statistics.fmean(walls) if walls else None,
        }
        candidates.setdefault((run, weights, sampler), {})[mark] = entry["mean"]
        if (run, mark) not in best or entry["mean"] < best[run, mark]["mean"]:
            best[run, mark] = entry
    return best, candidates


def _floats(text: str) -> list[float]:
    return [float(x) for x in text.split(",")]


if __name__ == "__main__":
    main()
