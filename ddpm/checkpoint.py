"""Run directories and checkpoints: writing them whole, finding the latest, loading them back.

A run directory looks like this::

    output_dir/
      config.yaml                      the resolved training config
      log.jsonl                        one JSON object per logged step
      samples/step-0000500-ema.png     sample grids from the EMA weights
      checkpoints/step-0000500/        one folder per checkpoint, written whole or not at all
        config.json, model.safetensors   the raw weights, loadable with UNet.from_pretrained
        ema/config.json, ema/model.safetensors   the EMA weights, loadable the same way
        noise_scheduler.json             the NoiseScheduler's keyword arguments
        trainer_state.json               step, EMA update count, package version (written last)
        optimizer.bin, random_states_*.pkl   Accelerate's training state (loaded with weights_only)

A checkpoint is first written under a temporary name in the same folder and then renamed, so a crash at any
moment leaves either the previous checkpoints or a complete new one: never a half-written one that resume or
sampling would pick up. The step of a checkpoint is read from its trainer_state.json, never from its name.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from importlib.metadata import version
from pathlib import Path

import torch
from safetensors.torch import load_file

from ddpm.scheduler import NoiseScheduler
from ddpm.unet import UNet

CHECKPOINTS = "checkpoints"
TRAINER_STATE = "trainer_state.json"
NOISE_SCHEDULER = "noise_scheduler.json"
EMA = "ema"
_PREFIX = "step-"
_TMP_PREFIX = ".tmp-"


class CheckpointError(RuntimeError):
    """A checkpoint is missing, incomplete or does not fit; the message says what to do."""


@dataclass
class TrainerState:
    """What, besides Accelerate's state, is needed to continue a run exactly."""

    step: int  # optimizer steps taken
    ema_updates: int  # EMA updates applied (drives the EMA decay warm-up)
    ddpm_version: str = version("ddpm")


def checkpoint_path(run_dir: str | Path, step: int) -> Path:
    """The folder of the checkpoint at `step` in `run_dir`."""
    return Path(run_dir) / CHECKPOINTS / f"{_PREFIX}{step:07d}"


def list_checkpoints(run_dir: str | Path) -> list[Path]:
    """Complete checkpoints of a run, oldest first (sorted by their recorded step)."""
    folder = Path(run_dir) / CHECKPOINTS
    if not folder.is_dir():
        return []
    found = [p for p in folder.glob(f"{_PREFIX}*") if (p / TRAINER_STATE).is_file()]
    return sorted(found, key=lambda p: read_trainer_state(p).step)


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    """The newest complete checkpoint of a run, or None when there is none."""
    checkpoints = list_checkpoints(run_dir)
    return checkpoints[-1] if checkpoints else None


def read_trainer_state(checkpoint: Path) -> TrainerState:
    """Read trainer_state.json of a checkpoint folder."""
    try:
        return TrainerState(**json.loads((checkpoint / TRAINER_STATE).read_text()))
    except (OSError, ValueError, TypeError) as error:
        raise CheckpointError(
            f"{checkpoint / TRAINER_STATE} is missing or damaged ({error}); "
            "resume from an earlier checkpoint with --resume PATH"
        ) from None


def save_checkpoint(
    accelerator,
    run_dir: str | Path,
    state: TrainerState,
    *,
    model: UNet,
    ema_model: UNet,
    noise_scheduler: NoiseScheduler,
    keep: int,
) -> Path:
    """Write a checkpoint of the prepared training objects atomically; every process must call this.

    `model` and `ema_model` are the unwrapped networks. Returns the checkpoint folder. Older checkpoints
    beyond the last `keep` are deleted once the new one is in place.
    """
    final = checkpoint_path(run_dir, state.step)
    tmp = final.with_name(_TMP_PREFIX + final.name)
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)  # left over from a crash during an earlier write
        _ensure_writable_dir(tmp)
    accelerator.wait_for_everyone()
    try:
        accelerator.save_state(str(tmp))  # model, optimizer, gradient scaler, per-process RNG states
        if accelerator.is_main_process:
            model.save_pretrained(tmp)  # adds config.json beside Accelerate's model.safetensors
            ema_model.save_pretrained(tmp / EMA)
            (tmp / NOISE_SCHEDULER).write_text(json.dumps(noise_scheduler.config, indent=2))
            (tmp / TRAINER_STATE).write_text(json.dumps(vars(state), indent=2))
    except OSError as error:
        raise CheckpointError(
            f"could not write checkpoint {final}: {error}; free disk space or fix permissions, then resume "
            "with --resume (earlier checkpoints are untouched)"
        ) from error
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        if final.exists():  # the same step saved before (e.g. a signal right after a scheduled save)
            shutil.rmtree(final)
        os.replace(tmp, final)
        for old in list_checkpoints(run_dir)[:-keep]:
            shutil.rmtree(old)
    accelerator.wait_for_everyone()
    return final


def load_training_state(accelerator, checkpoint: Path, ema_model: UNet) -> TrainerState:
    """Restore model, optimizer and RNG states (through Accelerate) and the EMA weights from `checkpoint`."""
    state = read_trainer_state(checkpoint)
    if state.ddpm_version != version("ddpm"):
        accelerator.print(
            f"note: {checkpoint} was written by ddpm {state.ddpm_version}, this is {version('ddpm')}"
        )
    try:
        accelerator.load_state(str(checkpoint))
        ema_model.load_state_dict(load_file(checkpoint / EMA / "model.safetensors"))
    except (OSError, RuntimeError, KeyError) as error:
        raise CheckpointError(
            f"cannot resume from {checkpoint}: {error}. Its weights do not fit this config or it is damaged; "
            "resume with the config it was trained with, or name an earlier checkpoint with --resume PATH"
        ) from None
    return state


def resolve_checkpoint(path: str | Path) -> Path:
    """Turn a run directory, a checkpoint folder or a UNet folder into the folder that holds the weights.

    A run directory resolves to its latest checkpoint. Raises CheckpointError, with the fix, when nothing is
    found.
    """
    path = Path(path)
    if (path / CHECKPOINTS).is_dir() or (path / "config.yaml").is_file():
        latest = latest_checkpoint(path)
        if latest is None:
            raise CheckpointError(f"no checkpoint in {path}; train one first: accelerate launch train.py")
        return latest
    if (path / "config.json").is_file():
        return path
    raise CheckpointError(
        f"{path} is neither a run directory nor a checkpoint folder; train one with `accelerate launch "
        "train.py`, or pass --checkpoint with a run directory or a folder holding config.json"
    )


def load_for_sampling(
    path: str | Path, *, use_ema: bool = True, device: torch.device | str = "cpu"
) -> tuple[UNet, NoiseScheduler, str]:
    """Load the network and noise scheduler that sampling needs from a run, checkpoint or UNet folder.

    Returns (model in eval mode on `device`, scheduler, a label naming the weights: "ema" or "raw").
    A bare UNet folder without noise_scheduler.json gets the default (DDPM linear) schedule.
    """
    checkpoint = resolve_checkpoint(path)
    use_ema = use_ema and (checkpoint / EMA).is_dir()
    weights, label = (checkpoint / EMA, "ema") if use_ema else (checkpoint, "raw")
    model = UNet.from_pretrained(weights, device=device).eval()
    scheduler_file = checkpoint / NOISE_SCHEDULER
    scheduler_config = json.loads(scheduler_file.read_text()) if scheduler_file.is_file() else {}
    return model, NoiseScheduler(**scheduler_config), label


def _ensure_writable_dir(path: Path) -> None:
    try:
        path.mkdir(parents=True)
    except OSError as error:
        raise CheckpointError(f"cannot create {path}: {error}; check the path and its permissions") from None
