"""Checkpoints of a training run: which one --resume means, written whole or not at all, resumed exactly.

A checkpoint (see `ddpm.run_dir` for the layout) is first written under a temporary name in the same folder,
flushed to disk and then renamed, so a crash at any moment leaves either the previous checkpoints or a
complete new one: never a half-written one that resume or sampling would pick up. Leftovers of a crash are
deleted by the next save.

Weights are read only through safetensors, and the pickled training state only with `weights_only`
unpickling, which refuses anything but tensors and plain data, so a checkpoint cannot run code.
"""

from __future__ import annotations

import contextlib
import json
import os
import pickle
import shutil
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from accelerate.utils import load as load_weights_only
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file

from ddpm.edm import schedule_from_config
from ddpm.ema.posthoc import CHECKPOINT_FILE as POSTHOC_EMA_FILE
from ddpm.ema.posthoc import check_snapshot_fits, load_snapshot, save_snapshot
from ddpm.ema.power import PowerFunctionEMA
from ddpm.io import EMA, NOISE_SCHEDULER, WEIGHTS_NAME, CheckpointError, one_line, save_pretrained
from ddpm.models.unet import UNet
from ddpm.models.weights import weight_mismatches
from ddpm.run_dir import (
    CHECKPOINTS,
    STEP_PREFIX,
    TMP_PREFIX,
    TRAINER_STATE,
    TrainerState,
    checkpoint_path,
    latest_checkpoint,
    list_checkpoints,
    read_trainer_state,
    run_directory,
)
from ddpm.schedule import NoiseScheduler
from ddpm.version import ddpm_version

_ABANDONED_PREFIX = "abandoned-after-"
_PICKLED = (".bin", ".pkl", ".pt")  # the suffixes of the files Accelerate writes with torch.save
# What a failed write raises: OSError (Python), RuntimeError (torch.save), SafetensorError (safetensors).
_WRITE_ERRORS = (OSError, RuntimeError, SafetensorError)


def save_checkpoint(
    accelerator,
    run_dir: str | Path,
    state: TrainerState,
    *,
    model: UNet,
    ema_model: UNet,
    scheduler: NoiseScheduler,
    keep: int,
    posthoc_ema: PowerFunctionEMA | None = None,
    task: Mapping[str, Any] | None = None,
    sampling: Mapping[str, Any] | None = None,
    extra: Mapping[str, UNet] | None = None,
) -> Path:
    """Write a checkpoint of the prepared training objects atomically; every process must call this.

    `model` and `ema_model` are the unwrapped networks; `posthoc_ema`, when the run tracks one, is saved as
    posthoc_ema.safetensors (`ddpm.ema.posthoc`); `task`, the run's built-in task
    (`ddpm.config.task_settings`, None for none), goes into both model folders (`ddpm.io.save_pretrained`),
    so that each describes itself, and so does `sampling`, the run's sampler settings, in their model cards
    (`dataclasses.asdict(config.sample)`); `extra` networks (folder name -> network, e.g. the target network
    of consistency distillation) each as a model folder of that name. Returns the checkpoint folder. Older
    checkpoints beyond the last `keep` are deleted once the new one is in place. Raises CheckpointError,
    leaving the earlier checkpoints as they were, when the weights are not finite or the files cannot be
    written, and RuntimeError when data-parallel replicas hold different weights.
    """
    _check_replicas_identical(accelerator, model)
    final = checkpoint_path(run_dir, state.step)
    tmp = final.with_name(TMP_PREFIX + final.name)
    # the same answer on every process
    _check_finite(state.step, run_dir, raw=model, ema=ema_model, **(extra or {}))
    if accelerator.is_main_process:
        _remove_incomplete(final.parent, accelerator)
        _ensure_writable_dir(tmp)
    accelerator.wait_for_everyone()
    try:
        accelerator.save_state(str(tmp))  # model, optimizer, gradient scaler, per-process RNG states
        if accelerator.is_main_process:
            # beside Accelerate's model.safetensors
            save_pretrained(tmp, model, scheduler, sampling=sampling, task=task)
            save_pretrained(tmp / EMA, ema_model, scheduler, sampling=sampling, task=task)
            if posthoc_ema is not None:
                save_snapshot(tmp / POSTHOC_EMA_FILE, posthoc_ema, state.step)
            for name, network in (extra or {}).items():
                save_pretrained(tmp / name, network, scheduler)
            (tmp / TRAINER_STATE).write_text(json.dumps(vars(state), indent=2))
            _flush_to_disk(tmp)
    except _WRITE_ERRORS as error:
        if accelerator.is_main_process:
            shutil.rmtree(tmp, ignore_errors=True)  # give back the space a full disk needs
        raise CheckpointError(
            f"could not write checkpoint {final}: {one_line(error)}; free disk space or fix the permissions "
            f"of {final.parent}, then continue with --resume (the earlier checkpoints are untouched)"
        ) from error
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        if final.exists():  # the same step saved before (e.g. when resuming from an earlier checkpoint)
            _discard(final)
        os.replace(tmp, final)
        _flush_to_disk(final.parent, recursive=False)
        for old in list_checkpoints(run_dir)[:-keep]:
            _discard(old)
    accelerator.wait_for_everyone()
    return final


def load_training_state(
    accelerator,
    checkpoint: Path,
    *,
    model: UNet,
    ema_model: UNet,
    scheduler: NoiseScheduler,
    posthoc_ema: PowerFunctionEMA | None = None,
    extra: Mapping[str, UNet] | None = None,
) -> TrainerState:
    """Restore model, optimizer and RNG states (through Accelerate) and the EMA weights from `checkpoint`,
    and the post-hoc EMA trackers when `posthoc_ema` is given (the checkpoint must then hold them), and the
    `extra` networks from their folders (as `save_checkpoint` wrote them).

    `model` and `ema_model` are the unwrapped networks, `scheduler` the noise schedule the run continues with.
    Everything is checked before anything is loaded: the noise schedule must be the one the checkpoint was
    trained with, the weights must fit the networks (names and shapes, read from the safetensors headers) and
    every pickled file must unpickle with `weights_only`. Raises CheckpointError, with the fix, otherwise.
    """
    if not (checkpoint / TRAINER_STATE).is_file():
        raise CheckpointError(
            f"{checkpoint} is not a training checkpoint (it has no {TRAINER_STATE}); --resume takes a run "
            f"directory or one of its {CHECKPOINTS}/{STEP_PREFIX}NNNNNNN folders"
        )
    state = read_trainer_state(checkpoint)
    if state.ddpm_version != ddpm_version():
        accelerator.print(
            f"note: {checkpoint} was written by ddpm {state.ddpm_version}, this is {ddpm_version()}"
        )
    _check_same_schedule(checkpoint, scheduler)
    _check_weights_fit(checkpoint / WEIGHTS_NAME, model)
    _check_weights_fit(checkpoint / EMA / WEIGHTS_NAME, ema_model)
    for name, network in (extra or {}).items():
        _check_weights_fit(checkpoint / name / WEIGHTS_NAME, network)
    if posthoc_ema is not None and not (checkpoint / POSTHOC_EMA_FILE).is_file():
        raise CheckpointError(
            f"{checkpoint} holds no post-hoc EMA state ({POSTHOC_EMA_FILE}): it was trained with "
            "train.posthoc_ema_every=0; resume with train.posthoc_ema_every=0, or start a new run to track "
            "post-hoc EMA from step 0"
        )
    if posthoc_ema is not None:
        check_snapshot_fits(checkpoint / POSTHOC_EMA_FILE, posthoc_ema)
    for file in sorted(checkpoint.iterdir()):
        if file.suffix in _PICKLED:
            _check_unpickles_safely(file)
    if not (checkpoint / f"random_states_{accelerator.process_index}.pkl").is_file():
        # Accelerate would skip the missing file silently; say that the run will not repeat bit for bit.
        warnings.warn(
            f"{checkpoint} has no random state for process {accelerator.process_index} (it was written by "
            "fewer processes); training continues, but not exactly as an uninterrupted run would",
            stacklevel=2,
        )
    try:
        accelerator.load_state(str(checkpoint))
        ema_model.load_state_dict(load_file(checkpoint / EMA / WEIGHTS_NAME))
        for name, network in (extra or {}).items():
            network.load_state_dict(load_file(checkpoint / name / WEIGHTS_NAME))
        if posthoc_ema is not None:
            load_snapshot(checkpoint / POSTHOC_EMA_FILE, posthoc_ema)
    except (OSError, RuntimeError, KeyError, ValueError, SafetensorError) as error:
        raise CheckpointError(
            f"cannot resume from {checkpoint}: {one_line(error)}; it is damaged: name an earlier checkpoint "
            "with --resume PATH"
        ) from None
    return state


def checkpoint_to_resume(run_dir: str | Path, resume: str | None) -> Path | None:
    """The checkpoint that `--resume` names for a run writing to `run_dir`, or None to start fresh.

    resume: None to start fresh, "latest" for the newest checkpoint of `run_dir`, or the path of a
    checkpoint folder or of a run directory (then its newest checkpoint). Raises CheckpointError when a fresh
    start would write over the checkpoints `run_dir` holds, or when the run named holds none.
    """
    run_dir = Path(run_dir)
    if resume is None:
        existing = latest_checkpoint(run_dir)
        if existing is not None:
            raise CheckpointError(
                f"{run_dir} already holds checkpoints (latest {existing.name}); continue it with "
                "--resume, or choose a new output_dir=..."
            )
        return None
    source = run_dir if resume == "latest" else Path(resume)
    is_run = resume == "latest" or (source / CHECKPOINTS).is_dir()
    checkpoint = latest_checkpoint(source) if is_run else source
    if checkpoint is None:
        raise CheckpointError(
            f"--resume: no checkpoint in {source / CHECKPOINTS}; start without --resume "
            "or set output_dir to the run you want to continue"
        )
    return checkpoint


def abandon_newer_checkpoints(accelerator, run_dir: str | Path, step: int) -> list[Path]:
    """Move the checkpoints of `run_dir` later than `step` into checkpoints/abandoned-after-step-NNNNNNN/,
    where neither --resume nor sampling looks, saying where; returns their new paths on the main process
    (oldest first; [] when none, and on the other processes). Every process must call this.

    A run resumed from an older checkpoint continues another branch: its own checkpoints will replace the
    abandoned ones step by step, and a later --resume must never jump back to them. They are kept, not
    deleted, since they may be the better weights.
    """
    moved = _move_newer_checkpoints(Path(run_dir), step) if accelerator.is_main_process else []
    if moved:
        accelerator.print(
            f"moved {', '.join(p.name for p in moved)} (newer than step {step}) to {moved[0].parent}: "
            "--resume no longer picks them; move them back to use them again"
        )
    accelerator.wait_for_everyone()
    return moved


def _move_newer_checkpoints(run_dir: Path, step: int) -> list[Path]:
    newer = [p for p in list_checkpoints(run_dir) if read_trainer_state(p).step > step]
    if not newer:
        return []
    aside = _unused_name(run_dir / CHECKPOINTS / f"{_ABANDONED_PREFIX}{STEP_PREFIX}{step:07d}")
    aside.mkdir()
    for checkpoint in newer:
        os.replace(checkpoint, aside / checkpoint.name)
    _flush_to_disk(aside.parent, recursive=False)
    return [aside / checkpoint.name for checkpoint in newer]


def _check_replicas_identical(accelerator, model: torch.nn.Module) -> None:
    """Guard against silently diverged data-parallel replicas (one collective per checkpoint)."""
    if accelerator.num_processes == 1:
        return
    sums = torch.stack([p.detach().float().sum() for p in model.parameters()])
    gathered = accelerator.gather(sums[None])
    if not torch.equal(gathered.amin(0), gathered.amax(0)):
        raise RuntimeError(
            "data-parallel replicas hold different weights; gradients were not synchronised. "
            "Launch with `accelerate launch` and do not mix processes of different configs"
        )


def _check_finite(step: int, run_dir: str | Path, **networks: torch.nn.Module) -> None:
    """Raise CheckpointError when a network holds a NaN or inf (one host sync for all tensors)."""
    for name, network in networks.items():
        tensors = {k: v for k, v in network.state_dict().items() if v.is_floating_point()}
        finite = torch.stack([torch.isfinite(v).all() for v in tensors.values()]).tolist()
        bad = [key for key, ok in zip(tensors, finite, strict=True) if not ok]
        if bad:
            raise CheckpointError(
                f"refusing to save step {step}: the {name} weights hold NaN or inf ({len(bad)} tensors, e.g. "
                f"{bad[0]}); the last good checkpoint is {latest_checkpoint(run_dir) or 'none'}. Lower "
                "train.lr, raise train.warmup_steps or use mixed_precision=bf16 or no, then --resume"
            )


def _check_same_schedule(checkpoint: Path, scheduler: NoiseScheduler) -> None:
    """Raise CheckpointError, naming the keys, when `scheduler` differs from the one `checkpoint` was
    trained with (its noise_scheduler.json, with today's defaults for keys it lacks)."""
    try:
        saved = json.loads((checkpoint / NOISE_SCHEDULER).read_text())
    except (OSError, ValueError) as error:
        raise CheckpointError(
            f"cannot read {checkpoint / NOISE_SCHEDULER}: {one_line(error)}; the checkpoint is incomplete "
            "or damaged: name an earlier one with --resume PATH"
        ) from None
    with contextlib.suppress(TypeError, ValueError):  # else written by another version: compared as it is
        saved = schedule_from_config(saved).config
    saved, current = (json.loads(json.dumps(config)) for config in (saved, scheduler.config))
    differing = [key for key in sorted(saved.keys() | current.keys()) if saved.get(key) != current.get(key)]
    if differing:
        run = run_directory(checkpoint) or checkpoint.parent.parent
        changes = ", ".join(
            f"diffusion.{key} (checkpoint {saved.get(key)!r}, config {current.get(key)!r})"
            for key in differing
        )
        raise CheckpointError(
            f"{checkpoint} was trained with another noise schedule: {changes}; resume with the run's own "
            f"config (--config {run / 'config.yaml'}), or train the new schedule in a new output_dir"
        )


def _check_weights_fit(file: Path, network: torch.nn.Module) -> None:
    """Raise CheckpointError unless `file` holds exactly the tensors of `network`, shape for shape.

    Only the safetensors header is read; it also tells a truncated file (the header promises more bytes).
    """
    try:
        with safe_open(file, framework="pt") as f:
            shapes = {key: tuple(f.get_slice(key).get_shape()) for key in f.keys()}  # noqa: SIM118
    except (OSError, SafetensorError) as error:
        raise CheckpointError(
            f"cannot read {file}: {one_line(error)}; the checkpoint is incomplete or damaged: name an "
            "earlier one with --resume PATH"
        ) from None
    problems = weight_mismatches(network, shapes)
    if problems:
        raise CheckpointError(
            f"the weights in {file} do not fit the model of this config ({len(problems)} problems, e.g. "
            f"{'; '.join(problems[:3])}); resume with the config the run was trained with (its config.yaml)"
        )


def _check_unpickles_safely(file: Path) -> None:
    """Unpickle `file` as Accelerate will, with weights_only: tensors and plain data only, never code."""
    try:
        load_weights_only(file, map_location="cpu")
    except pickle.UnpicklingError as error:
        reason = next((line for line in str(error).splitlines() if "GLOBAL" in line), "")
        raise CheckpointError(
            f"refusing to load {file}: it holds more than tensors and plain data, and unpickling it could "
            f"run code ({reason or one_line(error)}); use only checkpoints written by ddpm"
        ) from None
    except (OSError, RuntimeError, EOFError) as error:
        raise CheckpointError(
            f"cannot read {file}: {one_line(error)}; the checkpoint is damaged: name an earlier one with "
            "--resume PATH"
        ) from None


def _remove_incomplete(folder: Path, accelerator) -> None:
    """Delete what a crash left in the checkpoints folder: temporary folders, step folders missing
    trainer_state.json. Symlinks are left alone (they lead to folders this run does not own)."""
    if not folder.is_dir():
        return
    for path in folder.iterdir():
        temporary = path.name.startswith(TMP_PREFIX)
        incomplete = path.name.startswith(STEP_PREFIX) and not (path / TRAINER_STATE).is_file()
        if path.is_dir() and not path.is_symlink() and (temporary or incomplete):
            accelerator.print(f"removing {path}, left incomplete by an interrupted save")
            shutil.rmtree(path)


def _unused_name(path: Path) -> Path:
    """`path`, or `path`-2, -3, ... : the first that does not exist yet."""
    candidate, n = path, 1
    while candidate.exists():
        n += 1
        candidate = path.with_name(f"{path.name}-{n}")
    return candidate


def _discard(checkpoint: Path) -> None:
    """Delete a checkpoint so that no crash leaves it half deleted yet listed: rename it, then delete."""
    trash = checkpoint.with_name(f"{TMP_PREFIX}old-{checkpoint.name}")
    shutil.rmtree(trash, ignore_errors=True)
    os.replace(checkpoint, trash)
    shutil.rmtree(trash)


def _flush_to_disk(folder: Path, *, recursive: bool = True) -> None:
    """fsync the files under `folder` and the folders themselves, so that after a power cut a renamed
    checkpoint holds its data and not empty files."""
    paths = [*folder.rglob("*"), folder] if recursive else [folder]
    for path in paths:
        if path.is_dir() and os.name != "posix":  # folders can be opened for fsync on POSIX only
            continue
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _ensure_writable_dir(path: Path) -> None:
    try:
        path.mkdir(parents=True)
    except OSError as error:
        raise CheckpointError(f"cannot create {path}: {error}; check the path and its permissions") from None
