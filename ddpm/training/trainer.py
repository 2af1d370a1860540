"""The training loop on Hugging Face Accelerate: one process or many, CPU or GPU, with the same code.

`Trainer(config).train()` builds the UNet, the NoiseScheduler and the dataset from a `Config`, then runs
AdamW with learning-rate warm-up, gradient clipping and accumulation, mixed precision, an EMA of the weights,
label dropout for classifier-free guidance and the scheduler's loss weighting. It writes the run directory
described in `ddpm.run_dir` and can resume it exactly.
"""

from __future__ import annotations

import json
import os
import re
import signal
import time
from datetime import timedelta
from pathlib import Path

import torch
import torch.nn.functional as F
from accelerate import Accelerator
from accelerate.utils import (
    DataLoaderConfiguration,
    GradientAccumulationPlugin,
    InitProcessGroupKwargs,
    set_seed,
)
from tqdm.auto import tqdm

from ddpm.config import Config, ConfigError, conflicts, raise_problems, save_config
from ddpm.data import build_dataset, num_classes_of
from ddpm.ema import EMA
from ddpm.inference import generate, save_grid
from ddpm.io import CheckpointError, atomic_write
from ddpm.models.unet import UNet
from ddpm.run_dir import CHECKPOINTS, TrainerState, latest_checkpoint
from ddpm.schedule import NoiseScheduler
from ddpm.training.checkpoints import abandon_newer_checkpoints, load_training_state, save_checkpoint

# Below this the fp16 loss scale means gradients overflow even unscaled: stop (DeepSpeed's min_loss_scale).
MIN_LOSS_SCALE = 1.0
# With several processes, how often (in steps, at most) they agree on whether a stop signal arrived.
STOP_CHECK_EVERY = 10
# How gloo and NCCL word a collective that timed out or lost its peer.
_PEER_FAILURE = re.compile(r"timed? ?out|connection (closed|reset)", re.I)


class NonFiniteLossError(RuntimeError):
    """The loss became NaN or infinite (or fp16 overflowed for good); nothing after the last good checkpoint
    was saved."""


class DistributedTimeoutError(RuntimeError):
    """A process waited longer than train.dist_timeout_s for the others: one of them crashed or hangs."""


class Trainer:
    """Train a UNet as a denoising diffusion model under Accelerate.

    Args:
        config: the resolved run configuration (see `ddpm.config`).
        resume: None to start fresh (the run directory must then hold no checkpoint), "latest" for the newest
            checkpoint in `config.output_dir`, or the path of a checkpoint folder or of a run directory.

    SIGINT and SIGTERM stop training at the end of the current step after saving a checkpoint; `stopped_by`
    then holds the signal. Repeats are ignored: launchers pass on the signal that the terminal or the cluster
    already sent to every process, and the save must not be cut short (SIGKILL stops at once).
    """

    def __init__(self, config: Config, *, resume: str | None = None):
        self.config = config
        self.run_dir = Path(config.output_dir)
        train = config.train
        self.accelerator = Accelerator(
            # Without GPUs, `accelerate launch --multi_gpu --num_processes N` must still mean N processes
            # over gloo; Accelerate only picks that backend when told it runs on the CPU.
            cpu=not torch.cuda.is_available() and "LOCAL_RANK" in os.environ,
            mixed_precision=_mixed_precision(train.mixed_precision),
            gradient_accumulation_plugin=GradientAccumulationPlugin(
                num_steps=train.grad_accum, sync_with_dataloader=False
            ),
            dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True, data_seed=train.seed),
            log_with=_available_trackers() or None,
            project_dir=str(self.run_dir),
            # A process whose peer crashed or hangs stops with an error instead of waiting forever.
            kwargs_handlers=[InitProcessGroupKwargs(timeout=timedelta(seconds=train.dist_timeout_s))],
        )
        if self.accelerator.device.type == "cpu":
            torch.set_num_threads(train.cpu_threads or _cpu_threads_per_process())
        # The same initial weights on every process (so the EMA starts from what DDP trains), then different
        # noise on each; the seedable sampler shares one data permutation that Accelerate then shards.
        set_seed(train.seed)

        self.dataset = build_dataset(config.data)
        self.noise_scheduler = _construct(NoiseScheduler, "diffusion", config.diffusion)
        self.model = _construct(UNet, "model", config.model)
        _check_compatible(self.model, self.dataset, config)
        if train.channels_last:
            self.model = self.model.to(memory_format=torch.channels_last)
        self.null_class = self.model.null_class
        self.ema = EMA(self.model, train.ema_decay, warmup=train.ema_warmup)
        set_seed(train.seed, device_specific=True)

        optimizer = torch.optim.AdamW(
            self.model.parameters(),
            lr=train.lr,
            betas=tuple(train.adam_betas),
            weight_decay=train.weight_decay,
            fused=torch.cuda.is_available() or None,
        )
        loader = torch.utils.data.DataLoader(
            self.dataset,
            batch_size=config.data.batch_size,
            shuffle=True,
            drop_last=len(self.dataset) >= config.data.batch_size * self.accelerator.num_processes,
            num_workers=config.data.num_workers,
            pin_memory=torch.cuda.is_available(),
            persistent_workers=config.data.num_workers > 0,
            # Its own generator: creating a loader iterator draws a seed, which must not come from the global
            # RNG (that would shift the noise after a resume, which creates the iterator at another moment).
            generator=torch.Generator().manual_seed(train.seed),
        )
        self.model, self.optimizer, self.loader = self.accelerator.prepare(self.model, optimizer, loader)
        self.ema.module.to(self.accelerator.device)
        self.losses = RunningLoss(train.grad_accum, self.accelerator.device)
        self.forward = torch.compile(self.model) if train.compile else self.model

        self.fid_reference = self._fid_reference() if train.fid_every else None
        self._postfix: dict[str, str] = {}  # what the progress bar shows
        self.state = TrainerState(step=0, ema_updates=0)
        self._resume(resume)
        self.stopped_by: signal.Signals | None = None  # the stop signal, once the processes agreed on it
        self._signal: signal.Signals | None = None  # the stop signal this process received

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
            save_config(self.config, self.run_dir / "config.yaml")
        accelerator.init_trackers("ddpm", config=_flat(self.config.to_dict()))
        previous_handlers = self._install_signal_handlers()
        bar = tqdm(
            total=train.steps,
            initial=self.state.step,
            desc="train",
            disable=not accelerator.is_main_process,
            dynamic_ncols=True,
        )
        last_saved = latest_checkpoint(self.run_dir)
        images_per_step = self.config.data.batch_size * train.grad_accum * accelerator.num_processes
        tick, ticks_from = time.perf_counter(), self.state.step
        try:
            for x0, labels in self._batches():
                applied = self._train_micro_step(x0, labels)
                if not accelerator.sync_gradients:
                    continue
                if not applied:
                    self.state.skipped_steps += 1
                    self.losses.drop_step()
                    continue
                self.state.step += 1
                step = self.state.step
                self.ema.update(accelerator.unwrap_model(self.model))
                self.state.ema_updates = self.ema.updates
                self.losses.end_step(step)
                done = step >= train.steps or self._stop_requested(step)
                if step % train.log_every == 0 or done or step % train.checkpoint_every == 0:
                    self._raise_if_nonfinite(self.losses.first_bad_step, last_saved)
                    elapsed = time.perf_counter() - tick
                    record = {
                        "step": step,
                        "loss": self.losses.mean_since_last_call(accelerator, steps=step - ticks_from),
                        "lr": self.optimizer.param_groups[0]["lr"],
                        "images_per_s": images_per_step * (step - ticks_from) / max(elapsed, 1e-9),
                        "skipped_steps": self.state.skipped_steps,
                    }
                    self._log(record, bar)
                    tick, ticks_from = time.perf_counter(), step
                bar.update(1)
                if step % train.checkpoint_every == 0 or done:
                    last_saved = self._save()
                if train.sample_every and not self.stopped_by and (step % train.sample_every == 0 or done):
                    self._sample_grid(step)
                if train.fid_every and not self.stopped_by and (step % train.fid_every == 0 or done):
                    self._log_fid(step, bar)
                if done:
                    break
        except RuntimeError as error:
            if accelerator.num_processes > 1 and _is_peer_failure(error):
                raise DistributedTimeoutError(self._peer_failure_message(error, last_saved)) from error
            raise
        finally:
            bar.close()
            self._restore_signal_handlers(previous_handlers)
            accelerator.end_training()
        if self.stopped_by:
            accelerator.print(
                f"stopped by {self.stopped_by.name} at step {self.state.step} of {train.steps}; saved "
                f"checkpoint {last_saved}; continue with --resume"
            )
        return last_saved

    # -- one step

    def _train_micro_step(self, x0: torch.Tensor, labels: torch.Tensor) -> bool:
        """Forward and backward of one micro-batch and, on the last micro-batch of a step, the optimizer step.

        Returns False only when nan_policy is "skip" and the step's loss was not finite on some process: then
        no process updates its weights, which keeps the replicas identical.
        """
        accelerator = self.accelerator
        with accelerator.accumulate(self.model):
            self._set_learning_rate()
            loss = self._loss(x0, labels)
            self.losses.add_micro_batch(loss)
            accelerator.backward(loss)
            if accelerator.sync_gradients:
                self._unscale_and_clip_gradients()
                if self._must_skip():
                    self._skip_step()
                    return False
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
        return True

    def _unscale_and_clip_gradients(self) -> None:
        """Unscale fp16 gradients (a no-op otherwise) and clip their norm to train.grad_clip (0: no clipping).

        Unscaled on every step, clipped or not, so that a skipped step can still end the loss scaler's step.
        """
        grad_clip = self.config.train.grad_clip
        if grad_clip > 0:
            self.accelerator.clip_grad_norm_(self.model.parameters(), grad_clip)  # unscales first
        else:
            self.accelerator.unscale_gradients()

    def _must_skip(self) -> bool:
        """Whether nan_policy is "skip" and the step's loss is not finite on some process (a host sync per
        step, paid under this policy only)."""
        if self.config.train.nan_policy != "skip":
            return False
        return not bool(self.accelerator.reduce(torch.isfinite(self.losses.current).float(), "min"))

    def _skip_step(self) -> None:
        """Drop the step's gradients without an optimizer step.

        Under fp16 the loss scaler must still end its step, as it does when it skips an overflowing step
        itself: update() lowers the scale (the unscale found the NaN) and lets the next step unscale again.
        """
        self.optimizer.zero_grad(set_to_none=True)
        if self.accelerator.scaler is not None:
            self.accelerator.scaler.update()

    def _loss(self, x0: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """The loss of one micro-batch: draws eps ~ N(0, I), t ~ U{0, ..., T-1} and the label dropout (from
        the global RNG, which checkpoints restore), then returns `_denoising_loss` of them."""
        if self.config.train.channels_last:
            x0 = x0.contiguous(memory_format=torch.channels_last)
        noise = torch.randn_like(x0)
        t = self.noise_scheduler.sample_timesteps(x0.shape[0], device=x0.device)
        y = self._drop_labels(labels) if self.null_class is not None else None
        return self._denoising_loss(x0, noise, t, y)

    def _denoising_loss(
        self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None
    ) -> torch.Tensor:
        """The weighted denoising loss: Ho et al. 2020 Eq. 14, generalised to the configured target.

        mean_i [ w(t_i) * || model(x_t, t_i, y_i) - target(x0_i, eps_i, t_i) ||^2 / (C H W) ] with
        x_t = `NoiseScheduler.add_noise`(x0, eps, t) and w(t) uniform or min-SNR-gamma (Hang et al. 2023).
        x0, noise: (N, C, H, W); t: (N,) long; y: (N,) long labels, or None. Returns a float32 scalar.
        """
        train, scheduler = self.config.train, self.noise_scheduler
        x_t = scheduler.add_noise(x0, noise, t)
        with self.accelerator.autocast():
            prediction = self.forward(x_t, t, y)
        target = scheduler.training_target(x0, noise, t)
        per_sample = F.mse_loss(prediction.float(), target.float(), reduction="none").mean(dim=(1, 2, 3))
        weight = scheduler.loss_weight(t, weighting=train.loss_weighting, min_snr_gamma=train.min_snr_gamma)
        return (weight.to(per_sample.dtype) * per_sample).mean()

    def _drop_labels(self, labels: torch.Tensor) -> torch.Tensor:
        """Replace each label by the null label with probability `label_dropout` (Ho & Salimans 2022)."""
        dropped = torch.rand(labels.shape, device=labels.device) < self.config.train.label_dropout
        return torch.where(dropped, torch.full_like(labels, self.null_class), labels)

    def _set_learning_rate(self) -> None:
        """Linear warm-up over `warmup_steps`, then constant: a function of the step, so resume is exact."""
        train = self.config.train
        scale = min(1.0, (self.state.step + 1) / train.warmup_steps) if train.warmup_steps > 0 else 1.0
        for group in self.optimizer.param_groups:
            group["lr"] = train.lr * scale

    # -- data

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

    # -- checkpoints, samples, logs

    def _resume(self, resume: str | None) -> None:
        if resume is None:
            existing = latest_checkpoint(self.run_dir)
            if existing is not None:
                raise CheckpointError(
                    f"{self.run_dir} already holds checkpoints (latest {existing.name}); continue it with "
                    "--resume, or choose a new output_dir=..."
                )
            return
        source = self.run_dir if resume == "latest" else Path(resume)
        is_run = resume == "latest" or (source / CHECKPOINTS).is_dir()
        checkpoint = latest_checkpoint(source) if is_run else source
        if checkpoint is None:
            raise CheckpointError(
                f"--resume: no checkpoint in {source / CHECKPOINTS}; start without --resume "
                "or set output_dir to the run you want to continue"
            )
        self.state = load_training_state(
            self.accelerator,
            checkpoint,
            model=self.accelerator.unwrap_model(self.model),
            ema_model=self.ema.module,
            noise_scheduler=self.noise_scheduler,
        )
        self.ema.updates = self.state.ema_updates
        self._set_aside_newer_checkpoints()
        self._trim_log(self.state.step)
        self.accelerator.print(f"resumed from {checkpoint} at step {self.state.step}")

    def _set_aside_newer_checkpoints(self) -> None:
        """Move this run's checkpoints later than the resumed step out of --resume's reach, saying where
        (`abandon_newer_checkpoints`): the run continues another branch from here."""
        if self.accelerator.is_main_process:
            moved = abandon_newer_checkpoints(self.run_dir, self.state.step)
            if moved:
                self.accelerator.print(
                    f"moved {', '.join(p.name for p in moved)} (newer than step {self.state.step}) to "
                    f"{moved[0].parent}: --resume no longer picks them; move them back to use them again"
                )
        self.accelerator.wait_for_everyone()

    def _trim_log(self, step: int) -> None:
        """Drop the log records after `step`, which the resumed run logs again, and any line cut short by a
        crash (the file is rewritten whole, atomically)."""
        log = self.run_dir / "log.jsonl"
        if not self.accelerator.is_main_process or not log.is_file():
            return
        kept = [line for line in log.read_text().splitlines() if 0 <= _logged_step(line) <= step]
        with atomic_write(log) as tmp:
            tmp.write_text("".join(line + "\n" for line in kept))

    def _save(self) -> Path:
        self._check_replicas_identical()
        return save_checkpoint(
            self.accelerator,
            self.run_dir,
            self.state,
            model=self.accelerator.unwrap_model(self.model),
            ema_model=self.ema.module,
            noise_scheduler=self.noise_scheduler,
            keep=self.config.train.keep_checkpoints,
        )

    def _check_replicas_identical(self) -> None:
        """Guard against silently diverged data-parallel replicas (one collective per checkpoint)."""
        if self.accelerator.num_processes == 1:
            return
        sums = torch.stack([p.detach().float().sum() for p in self.model.parameters()])
        gathered = self.accelerator.gather(sums[None])
        if not torch.equal(gathered.amin(0), gathered.amax(0)):
            raise RuntimeError(
                "data-parallel replicas hold different weights; gradients were not synchronised. "
                "Launch with `accelerate launch` and do not mix processes of different configs"
            )

    def _fid_reference(self):
        """Inception statistics of the training data, computed once per run directory, shared among the
        processes; the main process holds them, the others None."""
        from ddpm import fid  # torch-fidelity loads only when FID is asked for

        return fid.reference_statistics(
            self.config.data,
            cache=self.run_dir / "fid_reference.npz",
            weights=self.config.train.fid_weights,  # a missing file stops here, before training
            device=self.accelerator.device,
            accelerator=self.accelerator,
        )

    def _log_fid(self, step: int, bar: tqdm) -> None:
        """FID of `train.fid_n` EMA samples against the data, logged as {"step", "fid"}.

        Every process samples and embeds its share of the images (`fid.model_statistics`), so FID takes
        1 / num_processes of the time and no process waits idle in a collective for the whole of it.
        """
        from ddpm import fid

        with self.accelerator.autocast():
            value = fid.fid_of_model(
                self.ema.module,
                self.noise_scheduler,
                self.fid_reference,
                self.config.train.fid_n,
                sample=self.config.sample,
                weights=self.config.train.fid_weights,
                seed=self.config.train.seed,
                progress=False,
                accelerator=self.accelerator,
            )
        if self.accelerator.is_main_process:
            self._log({"step": step, "fid": value}, bar)

    def _sample_grid(self, step: int) -> None:
        """Write samples/step-NNNNNNN-ema.png from the EMA weights (main process only, own RNG)."""
        if not self.accelerator.is_main_process:
            return
        sample, data = self.config.sample, self.config.data
        with self.accelerator.autocast():
            images = generate(
                self.ema.module,
                self.noise_scheduler,
                sample.n,
                image_shape=(data.channels, data.image_size, data.image_size),
                sampler=sample.sampler,
                steps=sample.steps,
                eta=sample.eta,
                guidance_scale=sample.guidance_scale,
                seed=self.config.train.seed,
                device=self.accelerator.device,
            )
        save_grid(images, self.run_dir / "samples" / f"step-{step:07d}-ema.png")

    def _log(self, record: dict, bar: tqdm) -> None:
        """Send a record to the trackers, the progress bar (last value of each key) and log.jsonl."""
        accelerator = self.accelerator
        accelerator.log(record, step=record["step"])
        if accelerator.is_main_process:
            self._postfix.update(
                {k: f"{v:.4g}" for k, v in record.items() if k not in ("step", "skipped_steps")}
            )
            bar.set_postfix(self._postfix)
            with open(self.run_dir / "log.jsonl", "a") as log:
                log.write(json.dumps(record) + "\n")

    def _raise_if_nonfinite(self, first_bad_step: torch.Tensor, last_saved: Path | None) -> None:
        """Stop on a NaN/inf loss since the last check, or on an fp16 loss scale that keeps collapsing."""
        bad = int(self.accelerator.reduce(first_bad_step, "max"))
        if bad >= 0:
            raise NonFiniteLossError(
                f"the loss became NaN or infinite at step {bad}; nothing after it was saved "
                f"(last good checkpoint: {last_saved or 'none'}). Lower train.lr, raise train.warmup_steps, "
                "use mixed_precision=bf16 or no, or set train.nan_policy=skip"
            )
        # GradScaler halves the scale and skips the step whenever fp16 gradients overflow; below 1 they
        # overflow even unscaled, so training has stalled while the loss still looks finite.
        scaler = self.accelerator.scaler
        if scaler is not None and scaler.is_enabled() and scaler.get_scale() < MIN_LOSS_SCALE:
            raise NonFiniteLossError(
                f"the fp16 loss scale fell to {scaler.get_scale():g} by step {self.state.step}: gradients "
                "overflow fp16 at nearly every step and those steps are skipped (last good checkpoint: "
                f"{last_saved or 'none'}). Use train.mixed_precision=bf16 or no, or lower train.lr"
            )

    def _peer_failure_message(self, error: RuntimeError, last_saved: Path | None) -> str:
        """One line for DistributedTimeoutError: what this process saw, and where to resume from."""
        if re.search(r"timed? ?out", str(error), re.I):
            timeout = self.config.train.dist_timeout_s
            what = f"got no answer from the others within train.dist_timeout_s={timeout:g} s"
        else:
            what = "lost the connection to the others"
        then = f"continue from {last_saved} with --resume" if last_saved else "no checkpoint was saved yet"
        return (
            f"process {self.accelerator.process_index} {what} at step {self.state.step}: another process "
            f"crashed or hangs (see its messages); {then}"
        )

    # -- signals

    def _install_signal_handlers(self) -> dict:
        def request_stop(signum, frame):
            self._signal = self._signal or signal.Signals(signum)

        previous = {}
        for sig in (signal.SIGINT, signal.SIGTERM):
            previous[sig] = signal.signal(sig, request_stop)
        return previous

    @staticmethod
    def _restore_signal_handlers(previous: dict) -> None:
        for sig, handler in previous.items():
            signal.signal(sig, handler)

    def _stop_requested(self, step: int) -> bool:
        """True once SIGINT/SIGTERM arrived on any process; sets `stopped_by`.

        With several processes they agree (one collective) every STOP_CHECK_EVERY steps or more often, so
        that all stop at the same step, each with the same signal.
        """
        if self.accelerator.num_processes == 1:
            self.stopped_by = self._signal
        elif step % min(self.config.train.log_every, STOP_CHECK_EVERY) == 0:
            received = torch.tensor(int(self._signal or 0), device=self.accelerator.device)
            agreed = int(self.accelerator.reduce(received, "max"))
            self.stopped_by = signal.Signals(agreed) if agreed else None
        return self.stopped_by is not None


class RunningLoss:
    """The training loss, summed on the device so that it costs no host sync per step.

    `current`: the mean loss of the current step so far (the sum of its micro-batch losses / grad_accum; each
    is a mean over equally many images); `total`: the sum of the finished steps' means since the last
    `mean_since_last_call`; `first_bad_step`: the first finished step whose mean was NaN or inf (-1: none).
    """

    def __init__(self, grad_accum: int, device: torch.device):
        self.grad_accum = grad_accum
        self.current = torch.zeros((), device=device)
        self.total = torch.zeros((), device=device)
        self.first_bad_step = torch.full((), -1, device=device, dtype=torch.long)

    def add_micro_batch(self, loss: torch.Tensor) -> None:
        self.current += loss.detach().float() / self.grad_accum

    def end_step(self, step: int) -> None:
        """Count the current step's mean as the loss of optimizer step `step`."""
        self.total += self.current
        self.first_bad_step.masked_fill_((self.first_bad_step < 0) & ~torch.isfinite(self.current), step)
        self.current.zero_()

    def drop_step(self) -> None:
        """Forget the current step (it was skipped)."""
        self.current.zero_()

    def mean_since_last_call(self, accelerator, *, steps: int) -> float:
        """The mean step loss over the `steps` steps since the last call, averaged over the processes."""
        mean = accelerator.reduce(self.total, "mean").item() / max(steps, 1)
        self.total.zero_()
        return mean


def _construct(cls: type, section: str, kwargs: dict):
    """`cls(**kwargs)` for a config section, with a bad value reported as a ConfigError naming the key."""
    try:
        return cls(**kwargs)
    except (ValueError, TypeError) as error:
        keys = [f"{section}.{key}" for key in kwargs if re.search(rf"\b{key}\b", str(error))]
        raise ConfigError(
            f"{', '.join(keys) or section}: {error} (the {section} section holds {cls.__name__}'s arguments)"
        ) from None


def _is_peer_failure(error: RuntimeError) -> bool:
    """Whether a collective failed because another process timed out or disappeared (gloo raises a plain
    RuntimeError, NCCL a DistError)."""
    if isinstance(error, torch.distributed.DistError):
        return True
    return type(error) is RuntimeError and bool(_PEER_FAILURE.search(str(error)))


def _logged_step(line: str) -> int:
    """The step of a log.jsonl line, or -1 when the line is not a whole record."""
    try:
        return int(json.loads(line)["step"])
    except (ValueError, KeyError, TypeError):
        return -1


def _mixed_precision(setting: str) -> str:
    """Resolve train.mixed_precision: "auto" is bf16 where the GPU has it, else fp16 on GPU, none on CPU.

    An explicit `accelerate launch --mixed_precision fp16|bf16` wins over "auto".
    """
    if setting != "auto":
        return setting
    launched = os.environ.get("ACCELERATE_MIXED_PRECISION", "no")
    if launched != "no":
        return launched
    if not torch.cuda.is_available():
        return "no"
    return "bf16" if torch.cuda.is_bf16_supported() else "fp16"


def _cpu_threads_per_process() -> int:
    """OMP_NUM_THREADS when it asks for more than one thread; else the cores this process may run on, shared
    among the processes launched on this machine.

    `accelerate launch` sets OMP_NUM_THREADS=1 for a single process without GPUs unless given
    --num_cpu_threads_per_process, so 1 is taken for its default, which would leave every other core idle
    (train.cpu_threads=1 asks for one thread).
    """
    requested = os.environ.get("OMP_NUM_THREADS", "")
    if requested.isdigit() and int(requested) > 1:
        return int(requested)
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return max(1, cores // int(os.environ.get("LOCAL_WORLD_SIZE", 1)))


def _available_trackers() -> list[str]:
    try:
        import tensorboard  # noqa: F401
    except ImportError:
        return []
    return ["tensorboard"]


def _check_compatible(model: UNet, dataset, config: Config) -> None:
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


def _flat(tree: dict, prefix: str = "") -> dict:
    """Flatten a nested config for trackers (TensorBoard hparams take scalars only)."""
    flat = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(_flat(value, f"{name}."))
        else:
            flat[name] = value if isinstance(value, (int, float, str, bool)) else str(value)
    return flat
