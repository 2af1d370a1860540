"""Progressive distillation (Salimans & Ho 2022, Algorithm 2) on the training loop: a student, started from
the teacher's weights, learns to take in one DDIM step the teacher's two; it then teaches the next stage, and
so on, halving the steps from the teacher's budget down to the network calls asked for.

`start_distillation(RUN, OUT, ...)` returns a `Distiller`, a `Trainer` whose loss is
`ddpm.losses.progressive_distillation_losses` and whose learning rate restarts at every stage, so that the
Trainer's Accelerate, checkpoints, exact resume, interruption, log and sample grids serve it unchanged. What
it shares with consistency distillation (`ddpm.training.consistency`) lives here: `DistillationTrainer` (the
student started from the teacher, teachers loaded from model folders), `start_student` (the checks and
loading both start with) and `distilled_config` (the student's run config).

OUT is an ordinary run directory (`ddpm.run_dir`): its config.yaml is the teacher run's with

    diffusion.timestep_spacing: trailing      the DDIM grids distilled: the student's n timesteps are every
                                              other one of the teacher's 2n (trailing grids nest; for the
                                              EDM formulation, the Karras grid of n + 1 levels without
                                              sigma_min, `ddpm.edm.EDMScheduler.inference_timesteps`)
    sample: {sampler: ddim, steps: CALLS, eta: 0, guidance_scale: 1}   what sample.py uses with no flags
    train.steps: STAGES x STAGE_STEPS         the learning rate decays linearly to 0 within each stage

and beside it

    distill.json                the distillation's settings (`DistillSettings`), what --resume must repeat
    teachers/steps-NNNN/        the teacher of each stage, a model folder (`ddpm.io.save_pretrained`):
                                the first the teacher run's EMA weights, then each stage's student (its EMA)

A teacher with a learned variance (train.learn_sigma): the student keeps its network of 2C output channels and
learns the mean, the first C, alone; the variance channels get no gradient and drift with the shared layers,
so they mean nothing after distillation, and the student's sampler, DDIM with eta = 0, never reads them (nor
should any other: sample it deterministically, as its config says).

Conditioned teachers: the student and the teacher get each batch's conditions as the Trainer gives its
network (`Trainer._conditions`: class labels, data.task's image or vector, conditions read from files,
what the data set gives with each image), none dropped, and one guidance scale is baked in. The teacher's
two steps use classifier-free guidance at `guidance_scale` (default: the teacher run's
sample.guidance_scale), its unconditional half every condition dropped to its null (labels to the null
label, the other kinds to the network's learned nulls, as sampling guides); the student learns them with the
batch's conditions and is sampled without guidance (its sample.guidance_scale is 1), with the conditions the
teacher is sampled with (its config keeps the teacher's data section: sample.py --cond-image, --mask,
--cond).

Teachers of the EDM formulation (`ddpm.edm.EDMScheduler`, whose F is a v-prediction in the samplers' frame)
are distilled as they are: the DDIM steps, the target and the truncated SNR weighting are those of the
samplers' frame, the data over sigma_data (`ddpm.losses.progressive_distillation_losses`).
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import torch

from ddpm.conditions import Conditions, network_argument
from ddpm.config import Config, ConfigError, build_schedule, load_config
from ddpm.inference import load_for_sampling
from ddpm.io import CheckpointError, atomic_write, load_unet, save_pretrained
from ddpm.losses import progressive_distillation_losses
from ddpm.models.unet import CONDITION_ARGUMENTS
from ddpm.run_dir import RUN_CONFIG, latest_checkpoint
from ddpm.samplers import denoiser
from ddpm.samplers.solvers import Denoiser
from ddpm.source import resolve_source
from ddpm.training.trainer import Trainer

METHODS = ("progressive",)
LR = 5e-4  # AdamW's learning rate at the start of each stage, the one measured on the digits
SETTINGS_FILE = "distill.json"
TEACHERS = "teachers"
DISTILLED_SPACING = "trailing"  # the student's timestep_spacing: its grid of n steps is the 2n one's halves


@dataclass(frozen=True)
class DistillSettings:
    """What a distillation is, saved as OUT/distill.json; a --resume must give the same."""

    calls: int  # the student's network calls per image (DDIM steps): a power of two
    # The DDIM steps of the first teacher: calls x 2^stages. The default digits run at 16 trailing DDIM steps
    # is at the kernel distance's floor already (bench/distill.py).
    teacher_steps: int = 16
    # Optimizer steps of each stage: 4 stages of 200 (16 -> 1) cost the digits less than their teacher's 1,500
    # training steps on the same CPU (a distillation step makes two teacher calls besides the student's).
    stage_steps: int = 200
    guidance_scale: float = 1.0  # the teachers' classifier-free guidance, baked into the student
    method: str = "progressive"  # one of METHODS

    @property
    def stages(self) -> int:
        """The halvings from teacher_steps to calls."""
        return round(math.log2(self.teacher_steps // self.calls))

    def student_steps(self, stage: int) -> int:
        """The DDIM steps the student of `stage` (0 = the first) learns: teacher_steps / 2^(stage + 1)."""
        return self.teacher_steps >> (stage + 1)

    def check(self, num_train_timesteps: int) -> None:
        """Raise ConfigError, naming the option and its fix, for settings that cannot be distilled on a
        schedule of `num_train_timesteps` timesteps."""
        if self.method not in METHODS:
            raise ConfigError(f"--method {self.method}: expected one of {', '.join(METHODS)}")
        if not _power_of_two(self.calls):
            raise ConfigError(f"--calls {self.calls}: expected a power of two (1, 2, 4, ...)")
        if not _power_of_two(self.teacher_steps) or self.teacher_steps > num_train_timesteps:
            raise ConfigError(
                f"--teacher-steps {self.teacher_steps}: expected a power of two of at most "
                f"num_train_timesteps={num_train_timesteps}"
            )
        if self.calls >= self.teacher_steps:
            raise ConfigError(
                f"--calls {self.calls} must be below --teacher-steps {self.teacher_steps}: each stage halves "
                "the teacher's steps; lower --calls or raise --teacher-steps"
            )
        if self.stage_steps < 1:
            raise ConfigError(f"--stage-steps {self.stage_steps}: expected a positive integer")
        if not math.isfinite(self.guidance_scale) or self.guidance_scale < 0:
            raise ConfigError(f"--guidance-scale {self.guidance_scale}: expected a finite number >= 0")


class DistillationTrainer(Trainer):
    """A Trainer whose network, the student, starts from a teacher's weights and learns from teachers loaded
    from model folders in its run directory: what progressive (`Distiller`) and consistency distillation
    (`ddpm.training.consistency.ConsistencyDistiller`) share. `settings`, a dataclass, is written to
    OUT/distill.json on a fresh start. `teacher`: the first teacher's network on a fresh start (copied to
    `_first_teacher_folder`), None to resume the latest checkpoint."""

    def __init__(self, config: Config, settings, *, teacher: torch.nn.Module | None):
        self.settings = settings
        self._first_teacher = teacher
        super().__init__(config, resume=None if teacher is not None else "latest")
        if self.accelerator.is_main_process and teacher is not None:
            with atomic_write(self.run_dir / SETTINGS_FILE) as tmp:
                tmp.write_text(json.dumps(dataclasses.asdict(settings), indent=2))

    def _first_teacher_folder(self) -> Path:
        """The model folder the first teacher is copied to."""
        raise NotImplementedError

    def _build_model(self) -> torch.nn.Module:
        """The student: the first teacher's weights (on a resume, the checkpoint's, which `_resume` loads)."""
        model = super()._build_model()
        if self._first_teacher is not None:
            if self.accelerator.is_main_process:
                save_pretrained(self._first_teacher_folder(), self._first_teacher, self.scheduler)
            model.load_state_dict(self._first_teacher.state_dict())
        return model

    def _load_teacher_from(self, folder: Path, what: str) -> torch.nn.Module:
        """The frozen network of the model folder `folder` (`what` names it when it is missing)."""
        self.accelerator.wait_for_everyone()  # the main process wrote it
        if not folder.is_dir():
            raise CheckpointError(
                f"{folder}, {what}, is missing: restart the distillation into an empty --out folder"
            )
        # Building the network draws its initial weights from the global RNG, which checkpoints restore and
        # the loss draws from: forked, so that loading a teacher before or after a resume shifts nothing.
        with torch.random.fork_rng(devices=[]):
            return load_unet(folder, device=self.accelerator.device).requires_grad_(False)

    def _conditioned(
        self, x0: torch.Tensor, labels: torch.Tensor, files: Conditions | None
    ) -> tuple[Conditions | torch.Tensor | None, Denoiser]:
        """The student's network argument for the micro-batch x0: (N, C, H, W), labels: (N,) and files (the
        conditions read from files or given by the data set, or None), and the teacher's denoiser on the
        same conditions, guided at settings.guidance_scale: the Trainer's conditions (`_conditions`, none
        dropped; data.task inpaint's masks drawn from the global CPU RNG), the guided teacher's unconditional
        half every kind's null (`Conditions.null`, labels the null label), as `ddpm.samplers.denoiser` guides
        when sampling."""
        cond = self._conditions(x0, labels, files)
        teacher = denoiser(
            self._teacher_call,
            self.scheduler,
            cond=cond,
            guidance_scale=self.settings.guidance_scale,
            null_class=self.null_class,
        )
        return network_argument(cond, self.null_class), teacher

    def _teacher_call(
        self, x_t: torch.Tensor, t: torch.Tensor, y: Conditions | torch.Tensor | None
    ) -> torch.Tensor:
        """The teacher's output under the run's autocast."""
        with self.accelerator.autocast():
            return self.teacher(x_t, t, y)


class Distiller(DistillationTrainer):
    """Progressive distillation of `settings` into the run directory config.output_dir (see the module
    docstring); `start_distillation` builds it from a teacher run. `teacher`: the first teacher's network on
    a fresh start (copied to teachers/), None to resume the latest checkpoint."""

    def __init__(self, config: Config, settings: DistillSettings, *, teacher: torch.nn.Module | None):
        super().__init__(config, settings, teacher=teacher)
        self.teacher = self._load_teacher(self._stage())

    def _first_teacher_folder(self) -> Path:
        return self._teacher_folder(0)

    def _stage(self) -> int:
        """The stage the next optimizer step belongs to (the last one once done)."""
        return min(self.state.step // self.settings.stage_steps, self.settings.stages - 1)

    def _teacher_folder(self, stage: int) -> Path:
        """teachers/steps-NNNN: the teacher of `stage`, with teacher_steps / 2^stage DDIM steps."""
        return self.run_dir / TEACHERS / f"steps-{self.settings.teacher_steps >> stage:04d}"

    def _load_teacher(self, stage: int) -> torch.nn.Module:
        return self._load_teacher_from(self._teacher_folder(stage), f"the teacher of stage {stage + 1}")

    def _schedule_position(self) -> tuple[int, int]:
        """train.lr_schedule within the current stage: every stage starts again from train.lr."""
        stage_steps = self.settings.stage_steps
        return self.state.step % stage_steps, stage_steps

    def _loss(self, x0: torch.Tensor, labels: torch.Tensor, files: Conditions | None = None) -> torch.Tensor:
        """The mean `progressive_distillation_losses` of one micro-batch, x0: (N, C, H, W), labels: (N,),
        files: the conditions read from files or given by the data set (or None), at the current stage; the
        student and the teacher get the same conditions (`_conditioned`). Its random draws come from the
        global RNG, which checkpoints restore, in this order: eps ~ N(0, I), the student step of each image,
        uniform in 0..n-1, then data.task inpaint's masks (from the global CPU RNG)."""
        if self.channels_last:
            x0 = x0.contiguous(memory_format=torch.channels_last)
        stage = self._stage()
        teacher_grid = self.scheduler.inference_timesteps(self.settings.student_steps(stage) * 2)
        noise = torch.randn_like(x0)
        index = torch.randint(0, len(teacher_grid) // 2, (x0.shape[0],), device=x0.device)
        y, teacher = self._conditioned(x0, labels, files)
        return progressive_distillation_losses(
            self._predict, teacher, self.scheduler, x0, noise, index, teacher_grid, y
        ).mean()

    def _step(self, x0: torch.Tensor, labels: torch.Tensor, *files: Conditions) -> bool:
        """The Trainer's step; at the end of a stage, the student (its EMA weights) becomes the next
        stage's teacher and the next stage's student starts from it, with a fresh EMA."""
        finished = super()._step(x0, labels, *files)
        step = self.state.step
        if finished and step % self.settings.stage_steps == 0 and step < self.config.train.steps:
            self._next_stage()
        return finished

    def _next_stage(self) -> None:
        stage = self._stage()
        self.accelerator.unwrap_model(self.model).load_state_dict(self.ema.module.state_dict())
        self.ema.updates = self.state.ema_updates = 0
        if self.accelerator.is_main_process:
            save_pretrained(self._teacher_folder(stage), self.ema.module, self.scheduler)
        self.teacher = self._load_teacher(stage)


class DistillationKind(NamedTuple):
    """What one distillation method brings to `start_student`."""

    settings_class: type  # its settings, a dataclass with check(num_train_timesteps) and guidance_scale
    check_teacher: Callable[[Config, str | Path], None]  # ConfigError for a teacher run it cannot take
    config_builder: Callable[..., Config]  # (teacher_config, settings, out, *, lr, batch_size) -> student's
    trainer_class: type[DistillationTrainer]  # (config, settings, *, teacher) -> the trainer


def start_distillation(
    run: str | Path,
    out: str | Path,
    *,
    calls: int,
    teacher_steps: int = DistillSettings.teacher_steps,
    stage_steps: int = DistillSettings.stage_steps,
    guidance_scale: float | None = None,
    method: str = "progressive",
    lr: float = LR,
    batch_size: int | None = None,
    resume: bool = False,
) -> Distiller:
    """A `Distiller` of the teacher `run` (a run directory, meaning its latest checkpoint, or a checkpoint of
    one; its EMA weights where it has them) into the run directory `out`, ready to `train()`.

    calls, teacher_steps, stage_steps, guidance_scale (None: the teacher run's sample.guidance_scale) and
    method: the `DistillSettings`. lr: AdamW's learning rate at the start of each stage, decaying linearly
    to 0 by its end; batch_size: images per step and process (default: the teacher run's). resume: continue
    `out`, whose distill.json must hold the same settings.

    The teacher may be of either formulation, the discrete-time schedule or EDM's (`ddpm.edm`). Raises
    ConfigError or CheckpointError, on one line naming the problem and its fix, for settings that cannot be
    distilled, a teacher that is not a ddpm run or that progressive distillation cannot take (an epsilon
    prediction; guidance of a teacher without conditions, or of labels without a null label), an `out` that
    holds a distillation already (without `resume`) or another one or none (with it). A conditioned teacher
    is distilled on each batch's conditions, whatever their kinds (see the module docstring).
    """
    kind = DistillationKind(DistillSettings, _check_teacher, student_config, Distiller)
    settings = {"calls": calls, "teacher_steps": teacher_steps, "stage_steps": stage_steps, "method": method}
    return start_student(
        kind, run, out, settings, guidance_scale, lr=lr, batch_size=batch_size, resume=resume
    )


def start_student(
    kind: DistillationKind,
    run: str | Path,
    out: str | Path,
    settings: dict[str, Any],
    guidance_scale: float | None,
    *,
    lr: float,
    batch_size: int | None,
    resume: bool,
) -> DistillationTrainer:
    """A `kind.trainer_class` distilling the teacher `run` (a run directory, meaning its latest checkpoint,
    or a checkpoint of one; its EMA weights where it has them) into the run directory `out`: what
    `start_distillation` and `start_consistency_distillation` share.

    kind.settings_class(**settings, guidance_scale=...) is the distillation's settings, guidance_scale None
    meaning the teacher run's sample.guidance_scale; kind.check_teacher refuses a teacher the method cannot
    take; kind.config_builder gives the student's run config, with learning rate `lr` and `batch_size`
    images a step (None: the teacher run's). Raises ConfigError or CheckpointError as those functions say.
    """
    source = resolve_source(run)
    if source.run_dir is None:
        raise CheckpointError(
            f"{run} is a model folder outside a run: distillation needs a run directory trained with ddpm "
            "(or one of its checkpoints), whose config.yaml names the data to distil on"
        )
    teacher_config = load_config(source.run_dir / RUN_CONFIG)
    kind.check_teacher(teacher_config, run)
    if guidance_scale is None:
        guidance_scale = teacher_config.sample.guidance_scale
    chosen = kind.settings_class(**settings, guidance_scale=guidance_scale)
    chosen.check(build_schedule(teacher_config.diffusion).num_train_timesteps)
    out = Path(out)
    if out.resolve() == source.run_dir.resolve():
        raise ConfigError(f"--out {out} is the teacher's run directory: name a new folder for the student")
    config = kind.config_builder(teacher_config, chosen, out, lr=lr, batch_size=batch_size)
    _check_out(out, chosen, resume=resume)
    if resume:
        return kind.trainer_class(config, chosen, teacher=None)
    teacher = load_for_sampling(source).model
    _check_guidance(teacher, chosen.guidance_scale)
    return kind.trainer_class(config, chosen, teacher=teacher)


def student_config(
    teacher: Config, settings: DistillSettings, out: Path, *, lr: float, batch_size: int | None
) -> Config:
    """The run config of the student (see the module docstring), every value checked as a config file's."""
    steps = settings.stages * settings.stage_steps
    train = {"steps": steps, "lr": lr, "lr_schedule": "linear", "checkpoint_at_most": settings.stage_steps}
    return distilled_config(teacher, out, "ddim", settings.calls, batch_size, **train)


def distilled_config(
    teacher: Config,
    out: Path,
    sampler: str,
    calls: int,
    batch_size: int | None,
    *,
    steps: int,
    lr: float,
    lr_schedule: str,
    checkpoint_at_most: int,
) -> Config:
    """The teacher run's config made a student's, every value checked as a config file's: output_dir `out`,
    the DISTILLED_SPACING grid, `steps` optimizer steps at learning rate `lr` under `lr_schedule` (no
    warm-up, decaying to 0), a checkpoint at least every `checkpoint_at_most` steps, `batch_size` images a
    step (None: the teacher's), no condition dropout, FID or post-hoc EMA, uniform timesteps, one sample
    grid at the end, and sample.py's default `sampler` at `calls` steps, eta 0, unguided; the data section
    is the teacher's, so that the student is sampled with the conditions the teacher is."""
    config = teacher.to_dict()
    config["diffusion"]["timestep_spacing"] = DISTILLED_SPACING
    config["data"]["batch_size"] = batch_size if batch_size is not None else teacher.data.batch_size
    config["train"].update(
        steps=steps,
        lr=lr,
        lr_schedule=lr_schedule,
        lr_min=0.0,
        warmup_steps=0,
        label_dropout=0.0,
        cond_dropout=None,
        checkpoint_every=min(teacher.train.checkpoint_every, checkpoint_at_most),
        sample_every=steps,
        fid_every=0,
        posthoc_ema_every=0,
        timestep_sampling="uniform",
    )
    config["sample"].update(sampler=sampler, steps=calls, calls=None, eta=0.0, guidance_scale=1.0)
    config["sample"]["options"] = {}
    config["output_dir"] = str(out)
    return Config.from_dict(config)


def _check_teacher(config: Config, run: str | Path) -> None:
    """ConfigError for a teacher run whose model progressive distillation cannot take."""
    if build_schedule(config.diffusion).prediction_type == "epsilon":
        raise ConfigError(
            f"{run} predicts epsilon, whose x0 estimate diverges at the few noisy steps a student takes "
            "(Salimans & Ho 2022, Sec. 4): distil a run trained with diffusion.prediction_type=v_prediction "
            "(or sample)"
        )


def _check_guidance(model: torch.nn.Module, guidance_scale: float) -> None:
    """ConfigError for a guidance scale the teacher cannot take: guidance drops the conditions to their
    nulls, so it needs a teacher that takes some, and labels a null label to be dropped to."""
    if guidance_scale == 1:
        return
    if not any(getattr(model, name, None) is not None for name in CONDITION_ARGUMENTS.values()):
        raise ConfigError(
            f"--guidance-scale {guidance_scale:g} needs a conditioned teacher; this one takes no conditions: "
            "pass --guidance-scale 1"
        )
    if getattr(model, "num_classes", None) is not None and getattr(model, "null_class", None) is None:
        raise ConfigError(
            f"--guidance-scale {guidance_scale:g} needs a null label to drop the labels to; this "
            "class-conditional teacher has none (model.null_label=false): pass --guidance-scale 1"
        )


def _check_out(out: Path, settings: DistillSettings, *, resume: bool) -> None:
    """Refuse a fresh start into a folder that holds a distillation's checkpoints, and a resume of anything
    but a distillation with the same settings."""
    saved = out / SETTINGS_FILE
    if not resume:
        if latest_checkpoint(out) is not None:
            raise CheckpointError(
                f"{out} already holds a distillation: continue it with --resume, or pass another --out"
            )
        return
    if not saved.is_file() or latest_checkpoint(out) is None:
        raise CheckpointError(f"no distillation to resume in {out}: start one without --resume")
    before = json.loads(saved.read_text())
    for name, value in dataclasses.asdict(settings).items():
        if before.get(name) != value:
            option = "--" + name.replace("_", "-")
            raise ConfigError(
                f"{option} {value} differs from the {before.get(name)} that {out} was started with: resume "
                f"with {option} {before.get(name)}, or start again in another --out"
            )


def _power_of_two(n: int) -> bool:
    return isinstance(n, int) and n >= 1 and n & (n - 1) == 0
