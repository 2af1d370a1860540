"""The run directory that training writes, and finding its checkpoints.

A run directory looks like this::

    output_dir/
      config.yaml                      the resolved training config
      log.jsonl                        one JSON object per logged step
      samples/step-0000500-ema.png     sample grids from the EMA weights
      checkpoints/step-0000500/        one folder per checkpoint, written whole or not at all
        config.json, model.safetensors, noise_scheduler.json   the raw weights and their schedule
        README.md                        their model card (`ddpm.models.hub_model`)
        ema/                             the EMA weights, the same four files
        (each a model folder: load_pretrained(folder) gives the UNet and its NoiseScheduler)
        trainer_state.json               step, skipped steps, EMA update count, package version (last)
        optimizer.bin, random_states_*.pkl   Accelerate's training state (loaded with weights_only)
      checkpoints/abandoned-after-step-0000300/   checkpoints newer than the one the run was resumed
                                       from (a --resume of an older checkpoint moves them here, out of reach)

A checkpoint is first written under a temporary name in the same folder, flushed to disk and then renamed,
so a crash at any moment leaves either the previous checkpoints or a complete new one: never a half-written
one that resume or sampling would pick up. Only real `step-*` folders holding trainer_state.json count as
checkpoints (a symlink there is followed only when named explicitly); leftovers of a crash are deleted by the
next save. The step of a checkpoint is read from its trainer_state.json, never from its name.

The checkpoints are written and resumed by `ddpm.training.checkpoints`; sampling finds them here
(`ddpm.source`).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from ddpm.io import EMA, CheckpointError
from ddpm.version import ddpm_version

RUN_CONFIG = "config.yaml"  # the resolved config of the run
CHECKPOINTS = "checkpoints"
SAMPLES = "samples"  # sample grids
# What an error that finds no trained model tells the user to run: the quick start's command, and the
# installed one.
TRAIN_ONE = "train one with `python train.py` (`ddpm-train` when installed)"
TRAINER_STATE = "trainer_state.json"
STEP_PREFIX = "step-"
TMP_PREFIX = ".tmp-"


@dataclass
class TrainerState:
    """What, besides Accelerate's state, is needed to continue a run exactly.

    The data position of a resumed run is (step + skipped_steps) * train.grad_accum batches.
    """

    step: int  # optimizer steps taken
    ema_updates: int  # EMA updates applied (drives the EMA decay warm-up)
    skipped_steps: int = 0  # steps dropped for a non-finite loss (nan_policy "skip"); 0 in older files
    # train.timestep_sampling=loss_second_moment: its loss history (LossSecondMomentSampler.state_dict)
    timestep_sampler: dict | None = None
    ddpm_version: str = field(default_factory=ddpm_version)


def checkpoint_path(run_dir: str | Path, step: int) -> Path:
    """The folder of the checkpoint at `step` in `run_dir`."""
    return Path(run_dir) / CHECKPOINTS / f"{STEP_PREFIX}{step:07d}"


def list_checkpoints(run_dir: str | Path) -> list[Path]:
    """Complete checkpoints of a run, oldest first (sorted by their recorded step).

    A folder counts when it is a real `step-*` folder (not a symlink, which could lead out of the run) holding
    trainer_state.json, the file written last.
    """
    folder = Path(run_dir) / CHECKPOINTS
    if not folder.is_dir():
        return []
    found = [
        p for p in folder.glob(f"{STEP_PREFIX}*") if not p.is_symlink() and (p / TRAINER_STATE).is_file()
    ]
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


def checkpoint_of(folder: Path) -> Path:
    """The checkpoint a weights folder belongs to: the parent of a checkpoint's ema/, else `folder` itself."""
    parent = folder.parent
    return parent if folder.name == EMA and (parent / TRAINER_STATE).is_file() else folder


def run_directory(folder: Path) -> Path | None:
    """The run directory a checkpoint folder (or its ema/) belongs to (it holds config.yaml), or None for a
    loose folder."""
    run = checkpoint_of(folder).parent.parent
    return run if (run / RUN_CONFIG).is_file() else None
