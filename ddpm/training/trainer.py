"""The training loop on Hugging Face Accelerate: one process or many, CPU or GPU, with the same code.

`Trainer(config).train()` builds the network, the NoiseScheduler and the dataset from a `Config`, then runs
AdamW with learning-rate warm-up and decay (`ddpm.lr_schedule`), gradient clipping and accumulation, mixed
precision, an EMA of the weights, label dropout for classifier-free guidance and the scheduler's loss
weighting. It writes the run directory
described in `ddpm.run_dir` and can resume it exactly.

The loop puts together: the loss (`ddpm.losses`), the Accelerator (`.accelerator`), checkpoints and what
--resume means (`.checkpoints`), the log (`.run_log`), stop signals and failed processes (`.interruption`),
NaN and inf losses (`.nan_policy`), sample grids and FID (`.evaluation`), and importance sampling of t
(`.timestep_sampler`, train.timestep_sampling).
"""

from __future__ import annotations

import dataclasses
import signal
import sys
from pathlib import Path

import torch
from accelerate.utils import set_seed

from ddpm.compiled import compile_network, enabled, training_compile_pays
from ddpm.conditions import Conditions, network_argument
from ddpm.config import (
    DATASET_CONDITIONS,
    Config,
    ConfigError,
    TrainConfig,
    build_model,
    build_schedule,
    check_diffusion_model,
    conflicts,
    raise_problems,
    save_config,
    task_settings,
)
from ddpm.data import (
    batch_conditions,
    build_dataset,
    collate_batch,
    loader_workers,
    num_classes_of,
    with_attribute_statistics,
)
from ddpm.ema import EMA, PowerFunctionEMA
from ddpm.ema.posthoc import abandon_newer_snapshots, save_snapshot, snapshot_path
from ddpm.losses import diffusion_losses, drop_conditions
from ddpm.lr_schedule import learning_rate
from ddpm.run_dir import RUN_CONFIG, TrainerState, latest_checkpoint
from ddpm.training.accelerator import build_accelerator
from ddpm.training.checkpoints import (
    abandon_newer_checkpoints,
    checkpoint_to_resume,
    load_training_state,
    save_checkpoint,
)
from ddpm.training.evaluation import Evaluation
from ddpm.training.interruption import StopSignals, raise_if_peer_failed
from ddpm.training.nan_policy import finite_on_every_process, raise_if_nonfinite, skip_step
from ddpm.training.run_log import RunLog, RunningLoss
from ddpm.training.timestep_sampler import LossSecondMomentSampler


class Trainer:
    """Train a network (`ddpm.config.build_model`: a UNet, or a time-conditioned ClassicUNet) as a denoising
    diffusion model under Accelerate; a time-free network is refused before anything is built.

    Args:
        config: the resolved run configuration (see `ddpm.config`).
        resume: None to start fresh (the run directory must then hold no checkpoint), "latest" for the newest
            checkpoint in `config.output_dir`, or the path of a checkpoint folder or of a run directory.

    SIGINT and SIGTERM stop training at the end of the current step after saving a checkpoint; `stopped_by`
    then holds the signal (`interruption.StopSignals`).
    """

    def __init__(self, config: Config, *, resume: str | None = None):
        check_diffusion_model(config.model)
        self.config, self.run_dir, train = config, Path(config.output_dir), config.train
        self.accelerator = accelerator = build_accelerator(train, self.run_dir)
        # The same initial weights on every process (so the EMA starts from what DDP trains), then different
        # noise on each; the seedable sampler shares one data permutation that Accelerate then shards.
        set_seed(train.seed)
        self.dataset = build_dataset(config.data, config.model)
        # data.task=attributes: the vector's units measured on the training set, saved with the run
        self.config = config = dataclasses.replace(
            config, data=with_attribute_statistics(config.data, self.dataset)
        )
        self.scheduler = build_schedule(config.diffusion)
        model = self._build_model()
        _check_compatible(model, self.dataset, config)
        self.channels_last = enabled(train.channels_last, accelerator.device)
        if self.channels_last:
            model = model.to(memory_format=torch.channels_last)
        self.null_class = model.null_class
        self.conditional = model.num_classes is not None
        self.ema = EMA(model, train.ema_decay, warmup=train.ema_warmup)
        # Post-hoc EMA (ddpm.ema.posthoc): power-function EMAs, their snapshots combined after training.
        self.posthoc_ema = (
            PowerFunctionEMA(model, train.posthoc_ema_sigma_rels) if train.posthoc_ema_every else None
        )
        set_seed(train.seed, device_specific=True)
        self.model, self.optimizer, self.loader = accelerator.prepare(
            model, _optimizer(model, train), _loader(self.dataset, config, accelerator.num_processes)
        )
        self.ema.module.to(accelerator.device)
        if self.posthoc_ema is not None:
            self.posthoc_ema.to(accelerator.device)
        # Static shapes: the loader drops each epoch's last partial batch (`_loader`), so it compiles once.
        compile_on = training_compile_pays(train.compile, steps=train.steps, device=accelerator.device)
        self.forward = compile_network(self.model, mode=train.compile_mode) if compile_on else self.model
        self.losses = RunningLoss(train.grad_accum, accelerator.device)
        images_per_step = config.data.batch_size * train.grad_accum * accelerator.num_processes
        self.log = RunLog(accelerator, self.run_dir, images_per_step=images_per_step)
        self.evaluation = Evaluation(config, self.run_dir, accelerator, grid_cond=self._grid_conditions())
        self.signals = StopSignals(accelerator, check_every=train.log_every)
        self.state = TrainerState(step=0, ema_updates=0)
        self.timestep_sampler = (
            LossSecondMomentSampler(self.scheduler.num_train_timesteps)
            if train.timestep_sampling == "loss_second_moment"
            else None
        )
        # The current step's (t, loss) pairs of every process, one (t, losses) pair of (N x P,) tensors per
        # micro-batch, given to the timestep sampler once the step is applied (`_end_sampler_step`).
        self._step_t_losses: list[tuple[torch.Tensor, torch.Tensor]] = []
        checkpoint = checkpoint_to_resume(self.run_dir, resume)
        if checkpoint is not None:
            self._resume(checkpoint)

    @property
    def stopped_by(self) -> signal.Signals | None:
        """The signal that stopped training (the same on every process), or None."""
        return self.signals.stopped_by

    def train(self) -> Path | None:
        """Run until `train.steps` optimizer steps, or a stop signal; returns the last checkpoint written.

        Raises NonFiniteLossError (nan_policy "stop"), CheckpointError when a checkpoint cannot be written,
        and DistributedTimeoutError when another process stopped answering.
        """
        train, accelerator = self.config.train, self.accelerator
        if self.state.step >= train.steps:
            accelerator.print(f"nothing to do: at step {self.state.step} of train.steps={train.steps}")
            return latest_checkpoint(self.run_dir)
        if accelerator.is_main_process:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            save_config(self.config, self.run_dir / RUN_CONFIG)
        last_saved = latest_checkpoint(self.run_dir)
        if (hint := self.signals.hint()) and accelerator.is_main_process:
            print(hint, file=sys.stderr)  # beside the progress bar; stdout is for what scripts read
        try:
            with self.log.open(self.config, step=self.state.step), self.signals:
                for x0, labels, *files in self._batches():  # files: the conditions read from files
                    if not self._step(x0, labels, *files):
                        continue  # more micro-batches to accumulate, or a skipped step
                    step = self.state.step
                    done = step >= train.steps or self.signals.stop_requested(step)
                    if step % train.log_every == 0 or done or step % train.checkpoint_every == 0:
                        raise_if_nonfinite(
                            accelerator, self.losses.first_bad_step, step=step, last_saved=last_saved
                        )
                        lr = self.optimizer.param_groups[0]["lr"]
                        self.log.log_steps(step, self.losses, lr=lr, skipped_steps=self.state.skipped_steps)
                    self.log.advance()
                    if step % train.checkpoint_every == 0 or done:
                        last_saved = self._save()
                    evaluate = not self.stopped_by  # nothing delays a pre-empted job
                    if evaluate and train.sample_every and (step % train.sample_every == 0 or done):
                        grid = self.evaluation.sample_grid(step, self.ema.module, self.scheduler)
                        self.log.write_image("samples/ema", grid, step=step)
                    if evaluate and train.fid_every and (step % train.fid_every == 0 or done):
                        metrics = self.evaluation.metrics(self.ema.module, self.scheduler)
                        self.log.write({"step": step, **metrics})
                    if done:
                        break
        except RuntimeError as error:
            raise_if_peer_failed(
                error,
                accelerator,
                timeout_s=train.dist_timeout_s,
                step=self.state.step,
                last_saved=last_saved,
            )
            raise
        if self.stopped_by:
            accelerator.print(
                f"stopped by {self.stopped_by.name} at step {self.state.step} of {train.steps}; saved "
                f"checkpoint {last_saved}; continue with --resume"
            )
        return last_saved

    def _step(self, x0: torch.Tensor, labels: torch.Tensor, *files: Conditions) -> bool:
        """Train on one micro-batch; True when that finished an optimizer step, which then has updated the
        EMAs and counted its loss. What runs at every step, and reads nothing back from the device: the
        logging, checks and checkpoints of `train` that do come every log_every steps or more. `files`: the
        conditions read from files or given by the data set (one Conditions), passed on only when there are
        some, so that `_loss` is called as (x0, labels) otherwise (subclasses and wrappers rely on it)."""
        applied = self._train_micro_step(x0, labels, *files)
        if not self.accelerator.sync_gradients:
            return False
        self._end_sampler_step(applied)
        if not applied:
            self.state.skipped_steps += 1
            self.losses.drop_step()
            return False
        self.state.step += 1
        self.ema.update(self.accelerator.unwrap_model(self.model))
        self.state.ema_updates = self.ema.updates
        if self.posthoc_ema is not None:
            self._update_posthoc_ema(self.state.step)
        self.losses.end_step(self.state.step)
        return True

    def _train_micro_step(self, x0: torch.Tensor, labels: torch.Tensor, *files: Conditions) -> bool:
        """Forward and backward of one micro-batch and, on the last micro-batch of a step, the optimizer step.

        Returns False only when nan_policy is "skip" and the step's loss was not finite on some process: then
        no process updates its weights, which keeps the replicas identical.
        """
        accelerator, train = self.accelerator, self.config.train
        with accelerator.accumulate(self.model):
            step, steps = self._schedule_position()
            for group in self.optimizer.param_groups:
                group["lr"] = learning_rate(
                    step,
                    lr=train.lr,
                    steps=steps,
                    warmup_steps=train.warmup_steps,
                    schedule=train.lr_schedule,
                    lr_min=train.lr_min,
                )
            loss = self._loss(x0, labels, *files)  # files only when the data set gave conditions
            self.losses.add_micro_batch(loss)
            accelerator.backward(loss)
            if accelerator.sync_gradients:
                # Unscaled on every step, clipped or not, so that a skipped step can still end the fp16 loss
                # scaler's step.
                if train.grad_clip > 0:
                    accelerator.clip_grad_norm_(self.model.parameters(), train.grad_clip)  # unscales first
                else:
                    accelerator.unscale_gradients()
                # A host sync per step, paid under this policy only.
                if train.nan_policy == "skip" and not finite_on_every_process(
                    accelerator, self.losses.current
                ):
                    skip_step(accelerator, self.optimizer)
                    return False
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
        return True

    def _build_model(self) -> torch.nn.Module:
        """The network to train, before Accelerate wraps it: `build_model(config.model)`, freshly initialised
        from the global RNG (seeded with train.seed). A subclass may start it from other weights."""
        return build_model(self.config.model)

    def _schedule_position(self) -> tuple[int, int]:
        """(step, steps): where the next optimizer step stands in the learning-rate schedule, the current
        step of train.steps. A subclass may restart the schedule (a distillation's stages)."""
        return self.state.step, self.config.train.steps

    def _loss(self, x0: torch.Tensor, labels: torch.Tensor, files: Conditions | None = None) -> torch.Tensor:
        """The mean `diffusion_losses` of one micro-batch (the hybrid loss with train.learn_sigma), x0: (N, C,
        H, W), labels: (N,), files: the conditions read from files (`ddpm.data.collate_batch`) or None. Its
        random draws come from the global RNG, which checkpoints restore, in this order: eps ~ N(0, I), t ~
        U{0, ..., T-1} (or the importance sampler's p_t, its losses then weighted by 1 / (T p_t) and
        gathered from every process for `_end_sampler_step`), data.task inpaint's masks (from the global CPU
        RNG, `ddpm.data.inpaint_masks`), the condition dropout (of the labels and data.task's image, all
        together at train.label_dropout, `drop_conditions`, the draws of `drop_labels`; or each kind on its
        own at train.cond_dropout)."""
        train = self.config.train
        if self.channels_last:
            x0 = x0.contiguous(memory_format=torch.channels_last)
        noise = torch.randn_like(x0)
        if self.timestep_sampler is not None:
            t, weights = self.timestep_sampler.sample(x0.shape[0], self.scheduler, x0.device)
        else:
            t, weights = self.scheduler.sample_timesteps(x0.shape[0], device=x0.device), None
        cond = self._conditions(x0, labels, files)
        if self.null_class is not None or not self.conditional:
            cond = drop_conditions(cond, train.condition_dropout(cond.kinds))  # no draw without conditions
        # else: labels without a null label to drop them to (label_dropout is then 0, cond_dropout null)
        y = network_argument(cond, self.null_class)  # labels alone as a tensor, as they always went
        losses = diffusion_losses(
            self._predict,
            self.scheduler,
            x0,
            noise,
            t,
            y,
            weighting=train.loss_weighting,
            min_snr_gamma=train.min_snr_gamma,
        )
        if self.timestep_sampler is None:
            return losses.mean()
        # gather concatenates along dimension 0: each (N,) -> (N x P,), process 0's first on every process (a
        # stacked (2, N) would give (2P, N)); t stays long, exact whatever the loss's dtype.
        all_t, all_losses = self.accelerator.gather((t, losses.detach()))
        self._step_t_losses.append((all_t.cpu(), all_losses.cpu()))
        return (weights * losses).mean()

    def _conditions(self, x0: torch.Tensor, labels: torch.Tensor, files: Conditions | None) -> Conditions:
        """The conditions of a micro-batch before any dropout, what the network is trained on (and, in the
        distillations, the teacher too): `batch_conditions` of x0 (N, C, H, W), its labels (N,) where the
        network takes labels, the conditions read from files or given by the data set (`files`, or None),
        and data.task's (inpaint's masks drawn from the global CPU RNG). `network_argument` makes them the
        network's argument."""
        return batch_conditions(self.config.data, x0, labels if self.conditional else None, files=files)

    def _end_sampler_step(self, applied: bool) -> None:
        """At the end of an optimizer step, give the timestep sampler the step's losses of every process if
        the step was applied (a skipped one leaves its history untouched; the sampler itself refuses a step
        with a NaN or inf loss, which the stop policy lets through until its next check). The same pairs, in
        the same order, on every process, so that the replicas' samplers stay identical."""
        pairs, self._step_t_losses = self._step_t_losses, []
        if applied and pairs:
            t, losses = (torch.cat(parts) for parts in zip(*pairs, strict=True))
            self.timestep_sampler.update(t, losses)

    def _update_posthoc_ema(self, step: int) -> None:
        """Update the power-function EMAs after optimizer step `step` (their t) and write their snapshot
        every `train.posthoc_ema_every` steps and at the last step (main process only)."""
        train = self.config.train
        self.posthoc_ema.update(self.accelerator.unwrap_model(self.model), step)
        if self.accelerator.is_main_process and (step % train.posthoc_ema_every == 0 or step == train.steps):
            save_snapshot(snapshot_path(self.run_dir, step), self.posthoc_ema, step)

    def _predict(
        self, x_t: torch.Tensor, t: torch.Tensor, y: Conditions | torch.Tensor | None
    ) -> torch.Tensor:
        """The network's output under the run's autocast (mixed precision)."""
        with self.accelerator.autocast():
            return self.forward(x_t, t, y)

    def _grid_conditions(self) -> Conditions | None:
        """The conditions of the in-training grids' sample.n images with a data.task, condition files or a
        data set that gives conditions (DATASET_CONDITIONS): those of the data's first images (cycled if
        there are fewer), the same at every grid; None without."""
        data = self.config.data
        gives_conditions = data.conditions or data.paired or data.dataset in DATASET_CONDITIONS
        if data.task == "none" and not gives_conditions:
            return None
        items = [self.dataset[i % len(self.dataset)] for i in range(self.config.sample.n)]
        images, labels, *files = collate_batch(items)  # (n, C, H, W), (n,), the conditions from files
        # Its own generator (inpaint's masks): the same masks at every grid, no draw from the training RNG
        generator = torch.Generator().manual_seed(self.config.train.seed)
        labels = labels if self.conditional else None
        return batch_conditions(data, images, labels, generator=generator, files=files[0] if files else None)

    def _batches(self):
        """Endless batches, starting exactly where the restored step left off (epoch and position in it;
        skipped steps consumed their batches too)."""
        per_epoch = len(self.loader)
        if per_epoch == 0:
            raise ConfigError(
                f"data.batch_size={self.config.data.batch_size} is larger than the dataset "
                f"({len(self.dataset)} images); lower data.batch_size"
            )
        consumed = (self.state.step + self.state.skipped_steps) * self.config.train.grad_accum
        epoch, skip = divmod(consumed, per_epoch)
        while True:
            self.loader.set_epoch(epoch)
            loader = self.accelerator.skip_first_batches(self.loader, skip) if skip else self.loader
            yield from loader
            epoch, skip = epoch + 1, 0

    def _resume(self, checkpoint: Path) -> None:
        """Continue from `checkpoint`: its weights, optimizer, RNG and step; this run's newer checkpoints and
        log records are set aside and dropped (the run continues another branch from here)."""
        self.state = load_training_state(
            self.accelerator,
            checkpoint,
            model=self.accelerator.unwrap_model(self.model),
            ema_model=self.ema.module,
            scheduler=self.scheduler,
            posthoc_ema=self.posthoc_ema,
            extra=self._checkpointed_networks(),
        )
        self.ema.updates = self.state.ema_updates
        if self.timestep_sampler is not None and self.state.timestep_sampler is not None:
            self.timestep_sampler.load_state_dict(self.state.timestep_sampler)
        # The main process moves the snapshots aside before the others pass the barrier in
        # abandon_newer_checkpoints.
        if self.accelerator.is_main_process:
            abandon_newer_snapshots(self.run_dir, self.state.step)
        abandon_newer_checkpoints(self.accelerator, self.run_dir, self.state.step)
        self.log.trim(self.state.step)
        self.accelerator.print(f"resumed from {checkpoint} at step {self.state.step}")

    def _save(self) -> Path:
        if self.timestep_sampler is not None:
            self.state.timestep_sampler = self.timestep_sampler.state_dict()
        return save_checkpoint(
            self.accelerator,
            self.run_dir,
            self.state,
            model=self.accelerator.unwrap_model(self.model),
            ema_model=self.ema.module,
            scheduler=self.scheduler,
            keep=self.config.train.keep_checkpoints,
            posthoc_ema=self.posthoc_ema,
            task=task_settings(self.config.data) if self.config.data.task != "none" else None,
            sampling=dataclasses.asdict(self.config.sample),
            extra=self._checkpointed_networks(),
        )

    def _checkpointed_networks(self) -> dict[str, torch.nn.Module]:
        """Networks a subclass trains beside the model and its EMAs, saved in every checkpoint and restored
        on a resume (folder name -> network): none here."""
        return {}


def _optimizer(model: torch.nn.Module, train: TrainConfig) -> torch.optim.AdamW:
    return torch.optim.AdamW(
        model.parameters(),
        lr=train.lr,
        betas=tuple(train.adam_betas),
        weight_decay=train.weight_decay,
        fused=torch.cuda.is_available() or None,
    )


def _loader(dataset, config: Config, num_processes: int) -> torch.utils.data.DataLoader:
    data = config.data
    workers = loader_workers(data.num_workers)
    return torch.utils.data.DataLoader(
        dataset,
        batch_size=data.batch_size,
        shuffle=True,
        drop_last=len(dataset) >= data.batch_size * num_processes,
        num_workers=workers,
        pin_memory=torch.cuda.is_available(),
        persistent_workers=workers > 0,
        collate_fn=collate_batch,  # with condition files: their Conditions, sequences padded
        # Its own generator: creating a loader iterator draws a seed, which must not come from the global
        # RNG (that would shift the noise after a resume, which creates the iterator at another moment).
        generator=torch.Generator().manual_seed(config.train.seed),
    )


def _check_compatible(model: torch.nn.Module, dataset, config: Config) -> None:
    """Stop before training when the data cannot go through the network, naming the keys to change: the
    config's conflicts (`ddpm.config.conflicts`, for a Config built in code) and what only the loaded data
    set says, its number of classes. Checked once here, so that the model's forward need not check labels."""
    problems = conflicts(config, model.config)
    classes = num_classes_of(dataset)
    if model.num_classes and config.data.labels and not classes:
        problems.append(
            f"model.num_classes={model.num_classes} but the {config.data.dataset} data has no labels; "
            "set model.num_classes=null"
        )
    elif model.num_classes and classes > model.num_classes:
        problems.append(
            f"the data has {classes} classes but model.num_classes={model.num_classes}; "
            f"set model.num_classes={classes}"
        )
    raise_problems(problems)
