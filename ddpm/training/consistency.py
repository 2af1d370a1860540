"""Consistency distillation (Song et al. 2023, "Consistency Models", Algorithm 2) on the training loop: a
student, started from the teacher's weights, learns the consistency function of the teacher's
probability-flow ODE, so that `ddpm.samplers.consistency` (their Algorithm 1) samples it in 1 to 4 calls.

Why this and not easy consistency tuning (ECT, Geng et al. 2024): ECT needs no teacher call but its own
training schedule (a continuous-time pair gap annealed towards 0 over a long run, adaptive weights) to
converge; distillation has the teacher's ODE as its target from the first step, which is what a short CPU
run on a trained model can use, and its loss has a known answer to test against (the exact ODE's endpoint).

`start_consistency_distillation(RUN, OUT, ...)` returns a `ConsistencyDistiller`, a `Trainer` whose loss is
`ddpm.losses.consistency_distillation_losses`, so that the Trainer's Accelerate, checkpoints, exact resume,
interruption, log and sample grids serve it unchanged. Each step:

    n ~ U{0, ..., N-2}, x_{n} = x0 + sigma_n eps on the Karras discretisation sigma_0 = sigma_max > ... >
    sigma_{N-1} = sigma_min of the teacher's schedule (rho = 7, its levels capped at GRID_SIGMA_MAX;
    `ConsistencySettings.timesteps`);
    x^_{n+1} = one Heun (or Euler) step of the teacher's ODE from sigma_n to sigma_{n+1};
    loss = pseudo-Huber(f_student(x_n, sigma_n), f_target(x^_{n+1}, sigma_{n+1}));
    after the optimizer step, target <- mu target + (1 - mu) student  (the target network, --target-ema)

OUT is an ordinary run directory (`ddpm.run_dir`): its config.yaml is the teacher run's with

    diffusion.timestep_spacing: trailing      the consistency sampler re-noises to the grid's timesteps:
                                              T-1, then evenly spaced t (at 2 calls T-1 and T/2 - 1); for
                                              the EDM formulation sigma_max, then the Karras grid of
                                              CALLS + 1 levels without sigma_min (`ddpm.edm`)
    sample: {sampler: consistency, steps: CALLS, eta: 0, guidance_scale: 1}   what sample.py uses
    train: {steps: STEPS, lr: LR, lr_schedule: constant, warmup_steps: 0}

and beside it distill.json (the `ConsistencySettings`, what --resume must repeat) and teacher/ (the teacher
run's EMA weights, a model folder). Every checkpoint holds the target network in target/ besides the student
and its EMA (the weights sampled). A conditioned teacher (class labels, data.task's image or vector,
conditions read from files or given by the data set) is distilled as in progressive distillation: the
student, the target network and the teacher get each batch's conditions as the Trainer gives its network,
with one guidance scale baked into the teacher's ODE steps, and the student is sampled without guidance,
with the conditions the teacher is sampled with.

Teachers of the EDM formulation (`ddpm.edm.EDMScheduler`) are distilled as they are: the loss, the grid and
the sampler work in the samplers' frame, the data over sigma_data, where the consistency function's sigma_data
and sigma_min are divided by it too (`ddpm.samplers.consistency.frame_sigma_data`, `sigma_range`), and the
pseudo-Huber distance is taken back in data units.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import torch

from ddpm.conditions import Conditions
from ddpm.config import Config, ConfigError
from ddpm.ema import EMA
from ddpm.losses import consistency_distillation_losses
from ddpm.samplers.consistency import ODE_SOLVERS, sigma_range
from ddpm.schedule import KARRAS_RHO, NoiseScheduler, sigma_grid
from ddpm.training.distiller import (
    SETTINGS_FILE,
    DistillationKind,
    DistillationTrainer,
    _check_teacher,
    distilled_config,
    start_student,
)

CONSISTENCY_LR = 2e-4  # AdamW's constant learning rate (Song et al. 2023 used 4e-4 at batch 512 on CIFAR-10)
# The top of the Karras grid below the schedule's sigma_max, in data units: EDM's and Song et al.'s sigma_max
# for data in [-1, 1]. Above it the data no longer shows; the digits' cosine schedule reaches 2e4, where a
# grid to sigma_max put 25 of 40 levels, and as many hops the target network's EMA must pass the boundary
# condition through before it reaches the first call (BENCHMARKS.md section 9).
GRID_SIGMA_MAX = 80.0
TEACHER = "teacher"
TARGET = "target"  # the target network's folder in each checkpoint


@dataclass(frozen=True)
class ConsistencySettings:
    """What a consistency distillation is, saved as OUT/distill.json; a --resume must give the same."""

    calls: int  # the network calls the student is sampled with (`ddpm.samplers.consistency`)
    # Optimizer steps: on the digits 700 cost less than the teacher's 1,500 training steps on the same CPU
    # (800 about as much: a step makes two teacher calls and one target call besides the student's),
    # BENCHMARKS.md section 9.
    steps: int = 700
    # N, the noise levels of the discretisation (Song et al. 2023 used 18 on CIFAR-10, 40 on ImageNet 64).
    # On the digits 20 beat 40 at 800 steps: fewer hops for the boundary condition to travel through.
    sigmas: int = 20
    target_ema: float = 0.95  # mu, the target network's EMA decay (Song et al. 2023, CIFAR-10)
    solver: str = "heun"  # the teacher's ODE step, one of ODE_SOLVERS (Heun: two calls, EDM's)
    guidance_scale: float = 1.0  # the teacher's classifier-free guidance, baked into the student
    method: str = "consistency"

    def check(self, num_train_timesteps: int) -> None:
        """Raise ConfigError, naming the option and its fix, for settings that cannot be distilled on a
        schedule of `num_train_timesteps` timesteps."""
        if not _positive_int(self.calls) or self.calls > num_train_timesteps:
            raise ConfigError(
                f"--calls {self.calls}: expected an integer in 1..num_train_timesteps={num_train_timesteps} "
                "(1 to 4 is what consistency models are for)"
            )
        if not _positive_int(self.steps):
            raise ConfigError(f"--steps {self.steps}: expected a positive integer")
        if not _positive_int(self.sigmas) or self.sigmas < 2:
            raise ConfigError(f"--sigmas {self.sigmas}: expected an integer >= 2 (N of the Karras grid)")
        if not 0 <= self.target_ema < 1:
            raise ConfigError(f"--target-ema {self.target_ema}: expected a number in [0, 1)")
        if self.solver not in ODE_SOLVERS:
            raise ConfigError(f"--solver {self.solver}: expected one of {', '.join(ODE_SOLVERS)}")
        if not math.isfinite(self.guidance_scale) or self.guidance_scale < 0:
            raise ConfigError(f"--guidance-scale {self.guidance_scale}: expected a finite number >= 0")

    def timesteps(self, scheduler: NoiseScheduler) -> torch.Tensor:
        """(sigmas,) float64, descending: the schedule's noise levels from its sigma_max to its sigma_min as
        continuous timesteps (`sigma_to_t`: the ends are t = T-1 and 0; for the EDM formulation c_noise of
        sigma_max and sigma_min). They are the Karras discretisation (Karras et al. 2022, Eq. 5, rho = 7) of
        `sigmas` levels; where sigma_max is above GRID_SIGMA_MAX (in the samplers' frame), sigma_max and then
        that discretisation of `sigmas` - 1 levels from GRID_SIGMA_MAX down."""
        sigma_min, sigma_max = sigma_range(scheduler)
        top = GRID_SIGMA_MAX / scheduler.data_scale
        if sigma_max <= top or self.sigmas < 3:
            sigmas = sigma_grid("karras", self.sigmas, sigma_min, sigma_max, KARRAS_RHO)
        else:
            below = sigma_grid("karras", self.sigmas - 1, sigma_min, top, KARRAS_RHO)
            sigmas = torch.cat([below.new_tensor([sigma_max]), below])
        return scheduler.sigma_to_t(sigmas)


class ConsistencyDistiller(DistillationTrainer):
    """Consistency distillation of `settings` into the run directory config.output_dir (see the module
    docstring); `start_consistency_distillation` builds it from a teacher run. `teacher`: the teacher's
    network on a fresh start (copied to teacher/), None to resume the latest checkpoint."""

    def __init__(self, config: Config, settings: ConsistencySettings, *, teacher: torch.nn.Module | None):
        super().__init__(config, settings, teacher=teacher)
        self.teacher = self._load_teacher_from(self.run_dir / TEACHER, "the teacher")
        self.timesteps = settings.timesteps(self.scheduler)

    def _first_teacher_folder(self) -> Path:
        return self.run_dir / TEACHER

    def _build_model(self) -> torch.nn.Module:
        """The student and the target network, both the teacher's weights (on a resume, the checkpoint's,
        which `_resume` loads)."""
        model = super()._build_model()
        self.target = EMA(model, self.settings.target_ema, warmup=False)
        self.target.module.to(self.accelerator.device)
        return model

    def _checkpointed_networks(self) -> dict[str, torch.nn.Module]:
        return {TARGET: self.target.module}

    def _loss(self, x0: torch.Tensor, labels: torch.Tensor, files: Conditions | None = None) -> torch.Tensor:
        """The mean `consistency_distillation_losses` of one micro-batch, x0: (N, C, H, W), labels: (N,),
        files: the conditions read from files or given by the data set (or None); the student, the target
        network and the teacher get the same conditions (`_conditioned`). Its random draws come from the
        global RNG, which checkpoints restore, in this order: eps ~ N(0, I), each image's pair n, uniform in
        0..N-2, then data.task inpaint's masks (from the global CPU RNG)."""
        if self.channels_last:
            x0 = x0.contiguous(memory_format=torch.channels_last)
        noise = torch.randn_like(x0)
        index = torch.randint(0, len(self.timesteps) - 1, (x0.shape[0],), device=x0.device)
        y, teacher = self._conditioned(x0, labels, files)
        return consistency_distillation_losses(
            self._predict,
            self._target_call,
            teacher,
            self.scheduler,
            x0,
            noise,
            index,
            self.timesteps,
            y,
            solver=self.settings.solver,
        ).mean()

    def _target_call(
        self, x_t: torch.Tensor, t: torch.Tensor, y: Conditions | torch.Tensor | None
    ) -> torch.Tensor:
        """The target network's output under the run's autocast."""
        with self.accelerator.autocast():
            return self.target.module(x_t, t, y)

    def _step(self, x0: torch.Tensor, labels: torch.Tensor, *files: Conditions) -> bool:
        """The Trainer's step, then the target network's EMA update (Algorithm 2's last line)."""
        finished = super()._step(x0, labels, *files)
        if finished:
            self.target.update(self.accelerator.unwrap_model(self.model))
        return finished


def start_consistency_distillation(
    run: str | Path,
    out: str | Path,
    *,
    calls: int,
    steps: int = ConsistencySettings.steps,
    sigmas: int = ConsistencySettings.sigmas,
    target_ema: float = ConsistencySettings.target_ema,
    solver: str = ConsistencySettings.solver,
    guidance_scale: float | None = None,
    lr: float = CONSISTENCY_LR,
    batch_size: int | None = None,
    resume: bool = False,
) -> ConsistencyDistiller:
    """A `ConsistencyDistiller` of the teacher `run` (a run directory, meaning its latest checkpoint, or a
    checkpoint of one; its EMA weights where it has them) into the run directory `out`, ready to `train()`.

    calls, steps, sigmas, target_ema, solver and guidance_scale (None: the teacher run's
    sample.guidance_scale): the `ConsistencySettings`. lr: AdamW's constant learning rate; batch_size: images
    per step and process (default: the teacher run's). resume: continue `out`, whose distill.json must hold
    the same settings.

    The teacher may be of either formulation, the discrete-time schedule or EDM's (`ddpm.edm`). Raises
    ConfigError or CheckpointError, on one line naming the problem and its fix, for bad settings, a teacher
    that is not a ddpm run or that consistency distillation cannot take (an epsilon prediction, zero
    terminal SNR; guidance of a teacher without conditions, or of labels without a null label), an `out`
    that holds a distillation already (without `resume`) or another one or none (with it). A conditioned
    teacher is distilled on each batch's conditions, whatever their kinds (see the module docstring).
    """
    kind = DistillationKind(
        ConsistencySettings, _check_consistency_teacher, consistency_student_config, ConsistencyDistiller
    )
    settings = {"calls": calls, "steps": steps, "sigmas": sigmas, "target_ema": target_ema, "solver": solver}
    return start_student(
        kind, run, out, settings, guidance_scale, lr=lr, batch_size=batch_size, resume=resume
    )


def consistency_student_config(
    teacher: Config, settings: ConsistencySettings, out: Path, *, lr: float, batch_size: int | None
) -> Config:
    """The run config of the student (see the module docstring), every value checked as a config file's."""
    train = {
        "steps": settings.steps,
        "lr": lr,
        "lr_schedule": "constant",
        "checkpoint_at_most": settings.steps,
    }
    return distilled_config(teacher, out, "consistency", settings.calls, batch_size, **train)


def check_resumed_method(out: str | Path, method: str, *, resume: bool) -> None:
    """ConfigError for a --resume of `out` with another --method than the distillation it holds."""
    saved = Path(out) / SETTINGS_FILE
    if resume and saved.is_file():
        before = json.loads(saved.read_text()).get("method")
        if before != method:
            raise ConfigError(
                f"{out} holds a {before} distillation: resume it with --method {before}, or start again in "
                "another --out"
            )


def _check_consistency_teacher(config: Config, run: str | Path) -> None:
    """ConfigError for a teacher run whose model consistency distillation cannot take: those progressive
    distillation refuses (`_check_teacher`), and a schedule without a finite sigma_max."""
    if config.diffusion.get("rescale_betas_zero_snr", False):
        raise ConfigError(
            f"{run} has zero terminal SNR (diffusion.rescale_betas_zero_snr=true): its sigma_max is "
            "infinite, and the Karras discretisation needs a finite one; distil a run without it"
        )
    _check_teacher(config, run)


def _positive_int(n) -> bool:
    return isinstance(n, int) and not isinstance(n, bool) and n >= 1
