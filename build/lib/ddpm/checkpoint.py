"""Run directories and checkpoints: writing them whole, finding the latest, loading them back.

A run directory looks like this::

    output_dir/
      config.yaml                      the resolved training config
      log.jsonl                        one JSON object per logged step
      samples/step-0000500-ema.png     sample grids from the EMA weights
      checkpoints/step-0000500/        one folder per checkpoint, written whole or not at all
        config.json, model.safetensors, noise_scheduler.json   the raw weights and their schedule
        ema/                             the EMA weights, the same three files
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
from dataclasses import dataclass, field
from pathlib import Path

import torch
from accelerate.utils import load as load_weights_only
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file

from ddpm.config import SampleConfig, load_config
from ddpm.interop.diffusers import diffusers_unet_folder
from ddpm.scheduler import NoiseScheduler
from ddpm.unet import UNet, weight_mismatches
from ddpm.version import ddpm_version

CHECKPOINTS = "checkpoints"
TRAINER_STATE = "trainer_state.json"
NOISE_SCHEDULER = "noise_scheduler.json"
EMA = "ema"
WEIGHTS = "model.safetensors"
_PREFIX = "step-"
_ABANDONED_PREFIX = "abandoned-after-"
_TMP_PREFIX = ".tmp-"
_PICKLED = (".bin", ".pkl", ".pt")  # the suffixes of the files Accelerate writes with torch.save
# What a failed write raises: OSError (Python), RuntimeError (torch.save), SafetensorError (safetensors).
_WRITE_ERRORS = (OSError, RuntimeError, SafetensorError)


class CheckpointError(RuntimeError):
    """A checkpoint is missing, incomplete or does not fit; the message says what to do."""


@dataclass
class TrainerState:
    """What, besides Accelerate's state, is needed to continue a run exactly.

    The data position of a resumed run is (step + skipped_steps) * train.grad_accum batches.
    """

    step: int  # optimizer steps taken
    ema_updates: int  # EMA updates applied (drives the EMA decay warm-up)
    skipped_steps: int = 0  # steps dropped for a non-finite loss (nan_policy "skip"); 0 in older files
    ddpm_version: str = field(default_factory=ddpm_version)


def checkpoint_path(run_dir: str | Path, step: int) -> Path:
    """The folder of the checkpoint at `step` in `run_dir`."""
    return Path(run_dir) / CHECKPOINTS / f"{_PREFIX}{step:07d}"


def list_checkpoints(run_dir: str | Path) -> list[Path]:
    """Complete checkpoints of a run, oldest first (sorted by their recorded step).

    A folder counts when it is a real `step-*` folder (not a symlink, which could lead out of the run) holding
    trainer_state.json, the file written last.
    """
    folder = Path(run_dir) / CHECKPOINTS
    if not folder.is_dir():
        return []
    found = [p for p in folder.glob(f"{_PREFIX}*") if not p.is_symlink() and (p / TRAINER_STATE).is_file()]
    return sorted(found, key=lambda p: read_trainer_state(p).step)


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    """The newest complete checkpoint of a run, or None when there is none."""
    checkpoints = list_checkpoints(run_dir)
    return checkpoints[-1] if checkpoints else None


def abandon_newer_checkpoints(run_dir: str | Path, step: int) -> list[Path]:
    """Move the checkpoints of `run_dir` later than `step` into checkpoints/abandoned-after-step-NNNNNNN/,
    where neither --resume nor sampling looks; returns their new paths (oldest first; [] when none).

    A run resumed from an older checkpoint continues another branch: its own checkpoints will replace the
    abandoned ones step by step, and a later --resume must never jump back to them. They are kept, not
    deleted, since they may be the better weights. Call it on the main process only.
    """
    newer = [p for p in list_checkpoints(run_dir) if read_trainer_state(p).step > step]
    if not newer:
        return []
    aside = _unused_name(Path(run_dir) / CHECKPOINTS / f"{_ABANDONED_PREFIX}{_PREFIX}{step:07d}")
    aside.mkdir()
    for checkpoint in newer:
        os.replace(checkpoint, aside / checkpoint.name)
    _flush_to_disk(aside.parent, recursive=False)
    return [aside / checkpoint.name for checkpoint in newer]


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
    beyond the last `keep` are deleted once the new one is in place. Raises CheckpointError, leaving the
    earlier checkpoints as they were, when the weights are not finite or the files cannot be written.
    """
    final = checkpoint_path(run_dir, state.step)
    tmp = final.with_name(_TMP_PREFIX + final.name)
    _check_finite(state.step, run_dir, raw=model, ema=ema_model)  # the same answer on every process
    if accelerator.is_main_process:
        _remove_incomplete(final.parent, accelerator)
        _ensure_writable_dir(tmp)
    accelerator.wait_for_everyone()
    try:
        accelerator.save_state(str(tmp))  # model, optimizer, gradient scaler, per-process RNG states
        if accelerator.is_main_process:
            save_pretrained(tmp, model, noise_scheduler)  # beside Accelerate's model.safetensors
            save_pretrained(tmp / EMA, ema_model, noise_scheduler)
            (tmp / TRAINER_STATE).write_text(json.dumps(vars(state), indent=2))
            _flush_to_disk(tmp)
    except _WRITE_ERRORS as error:
        if accelerator.is_main_process:
            shutil.rmtree(tmp, ignore_errors=True)  # give back the space a full disk needs
        raise CheckpointError(
            f"could not write checkpoint {final}: {_one_line(error)}; free disk space or fix the permissions "
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
    accelerator, checkpoint: Path, *, model: UNet, ema_model: UNet, noise_scheduler: NoiseScheduler
) -> TrainerState:
    """Restore model, optimizer and RNG states (through Accelerate) and the EMA weights from `checkpoint`.

    `model` and `ema_model` are the unwrapped networks, `noise_scheduler` the one the run continues with.
    Everything is checked before anything is loaded: the noise schedule must be the one the checkpoint was
    trained with, the weights must fit the networks (names and shapes, read from the safetensors headers) and
    every pickled file must unpickle with `weights_only`. Raises CheckpointError, with the fix, otherwise.
    """
    if not (checkpoint / TRAINER_STATE).is_file():
        raise CheckpointError(
            f"{checkpoint} is not a training checkpoint (it has no {TRAINER_STATE}); --resume takes a run "
            f"directory or one of its {CHECKPOINTS}/{_PREFIX}NNNNNNN folders"
        )
    state = read_trainer_state(checkpoint)
    if state.ddpm_version != ddpm_version():
        accelerator.print(
            f"note: {checkpoint} was written by ddpm {state.ddpm_version}, this is {ddpm_version()}"
        )
    _check_same_schedule(checkpoint, noise_scheduler)
    _check_weights_fit(checkpoint / WEIGHTS, model)
    _check_weights_fit(checkpoint / EMA / WEIGHTS, ema_model)
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
        ema_model.load_state_dict(load_file(checkpoint / EMA / WEIGHTS))
    except (OSError, RuntimeError, KeyError, ValueError, SafetensorError) as error:
        raise CheckpointError(
            f"cannot resume from {checkpoint}: {_one_line(error)}; it is damaged: name an earlier checkpoint "
            "with --resume PATH"
        ) from None
    return state


def save_pretrained(folder: str | Path, model: UNet, scheduler: NoiseScheduler) -> None:
    """Write a model folder: config.json and model.safetensors (`UNet.save_pretrained`) and the noise schedule
    the weights were trained with, noise_scheduler.json (`scheduler.config`). `load_pretrained` reads it."""
    model.save_pretrained(folder)
    (Path(folder) / NOISE_SCHEDULER).write_text(json.dumps(scheduler.config, indent=2) + "\n")


def load_pretrained(
    folder: str | Path, *, schedule: str | Path | None = None, device: torch.device | str = "cpu"
) -> tuple[UNet, NoiseScheduler]:
    """Load a (UNet in eval mode on `device`, NoiseScheduler) pair from a model folder.

    A ddpm folder (written by `save_pretrained`, or a checkpoint or its ema/) gets its noise_scheduler.json; a
    checkpoint's ema/ written before the schedule was saved beside the EMA weights gets the checkpoint's. A
    diffusers UNet2DModel or pipeline folder gets the scheduler_config.json beside it (DDPMScheduler's
    defaults without one). `schedule` names a schedule file instead: a noise_scheduler.json or a diffusers
    scheduler_config.json. Raises CheckpointError for a ddpm folder without a schedule (sampling with another
    schedule than the one the weights were trained with gives noise, so none is guessed) or a schedule file
    that cannot be read, and OSError or ValueError for weights that cannot be read.
    """
    folder = Path(folder)
    if diffusers_unet_folder(folder) is not None:
        model = UNet.from_diffusers(folder, device=device)
        if schedule is None:
            return model.eval(), NoiseScheduler.from_diffusers_config(_diffusers_scheduler_config(folder))
    else:
        model = UNet.from_pretrained(folder, device=device)
    return model.eval(), _read_schedule(schedule if schedule is not None else _schedule_file(folder))


def resolve_checkpoint(path: str | Path) -> Path:
    """Turn a run directory, a checkpoint folder (or its ema/), a model folder or a diffusers model or
    pipeline folder into the folder that holds the weights.

    A run directory resolves to its latest checkpoint. Raises CheckpointError, with the fix, when nothing is
    found.
    """
    path = Path(path)
    if path.name.startswith(_TMP_PREFIX) or path.parent.name.startswith(_TMP_PREFIX):
        raise CheckpointError(f"{path} is a checkpoint that was never finished; name a step-NNNNNNN folder")
    if (path / CHECKPOINTS).is_dir() or (path / "config.yaml").is_file():
        latest = latest_checkpoint(path)
        if latest is None:
            raise CheckpointError(f"no checkpoint in {path}; train one first: accelerate launch train.py")
        return latest
    if (path / "config.json").is_file() or diffusers_unet_folder(path) is not None:
        return path
    raise CheckpointError(
        f"{path} is neither a run directory nor a checkpoint folder; train one with `accelerate launch "
        "train.py`, or pass --checkpoint with a run directory, a folder holding config.json, or a diffusers "
        "UNet2DModel or pipeline folder"
    )


def checkpoint_of(folder: Path) -> Path:
    """The checkpoint a weights folder belongs to: the parent of a checkpoint's ema/, else `folder` itself."""
    parent = folder.parent
    return parent if folder.name == EMA and (parent / TRAINER_STATE).is_file() else folder


def load_for_sampling(
    path: str | Path,
    *,
    use_ema: bool = True,
    schedule: str | Path | None = None,
    device: torch.device | str = "cpu",
) -> tuple[UNet, NoiseScheduler, str]:
    """Load the network and noise scheduler that sampling needs from a run, a checkpoint (or its ema/ folder),
    a model folder, or a diffusers UNet2DModel or pipeline folder.

    Returns (model in eval mode on `device`, scheduler, a label naming the weights: "ema", "raw" or
    "diffusers"). A run or checkpoint gives its EMA weights unless `use_ema` is False; a checkpoint's ema/
    named directly gives the EMA weights (and refuses `use_ema=False`). The schedule is the one saved with
    the weights (see `load_pretrained`; a diffusers folder ignores `use_ema`, as published EMA weights, such
    as google/ddpm-ema-church-256, are the only weights there), or the file `schedule` names. A ddpm folder
    without a schedule is refused, never sampled with a guessed one. Raises CheckpointError, naming the file
    and the fix, when something cannot be read.
    """
    folder = resolve_checkpoint(path)
    checkpoint = checkpoint_of(folder)
    if folder != checkpoint and not use_ema:
        raise CheckpointError(
            f"{folder} holds the EMA weights, but the raw ones were asked for (--raw); pass the checkpoint "
            f"{checkpoint} for its raw weights, or drop --raw"
        )
    if diffusers_unet_folder(folder) is not None:
        weights, label = folder, "diffusers"
    elif folder != checkpoint:
        weights, label = folder, "ema"
    elif use_ema and (folder / EMA).is_dir():
        weights, label = folder / EMA, "ema"
    else:
        weights, label = folder, "raw"
    try:
        model, scheduler = load_pretrained(weights, schedule=schedule, device=device)
    except (OSError, ValueError, SafetensorError) as error:  # JSONDecodeError is a ValueError
        raise CheckpointError(
            f"cannot load the model in {checkpoint}: {_one_line(error)}; it is incomplete, damaged or not a "
            "ddpm checkpoint: pass another one with --checkpoint"
        ) from None
    return model, scheduler, label


def run_directory(folder: Path) -> Path | None:
    """The run directory a checkpoint folder (or its ema/) belongs to (it holds config.yaml), or None for a
    loose folder."""
    run = checkpoint_of(folder).parent.parent
    return run if (run / "config.yaml").is_file() else None


def sample_defaults(folder: Path) -> SampleConfig:
    """The `sample:` section of the run a checkpoint folder (or its ema/) belongs to; SampleConfig() for a
    loose folder."""
    run = run_directory(folder)
    return load_config(run / "config.yaml").sample if run is not None else SampleConfig()


def _read_schedule(file: str | Path) -> NoiseScheduler:
    """The NoiseScheduler of a schedule file: a ddpm noise_scheduler.json (NoiseScheduler's keyword arguments)
    or a diffusers scheduler_config.json (it has "_class_name"). Raises CheckpointError naming the file."""
    try:
        config = json.loads(Path(file).read_text())
        if isinstance(config, dict) and "_class_name" in config:
            return NoiseScheduler.from_diffusers_config(config)
        return NoiseScheduler(**config)
    except (OSError, ValueError, TypeError) as error:  # TypeError: not a dict, or an unknown keyword
        raise CheckpointError(
            f"cannot read the noise schedule {file}: {_one_line(error)}; it must hold NoiseScheduler's "
            "keyword arguments (a ddpm noise_scheduler.json) or be a diffusers scheduler_config.json"
        ) from None


def _schedule_file(folder: Path) -> Path:
    """The noise_scheduler.json of a ddpm model folder; for a checkpoint's ema/ without one, the checkpoint's.
    Raises CheckpointError, saying how to name the schedule, when there is none."""
    for candidate in (folder, checkpoint_of(folder)):
        if (candidate / NOISE_SCHEDULER).is_file():
            return candidate / NOISE_SCHEDULER
    raise CheckpointError(
        f"{folder} has no {NOISE_SCHEDULER}, so the schedule its weights were trained with is unknown: copy "
        f"the {NOISE_SCHEDULER} of the checkpoint they came from into it, write NoiseScheduler(...).config "
        "there as JSON (ddpm.save_pretrained does), or pass sample.py --schedule FILE"
    )


def _diffusers_scheduler_config(folder: Path) -> dict:
    """The scheduler_config.json beside a diffusers model: in `folder`, in its scheduler/ (a pipeline folder)
    or in its parent's scheduler/ (`folder` is a pipeline's unet/); {} (DDPMScheduler's defaults) if none."""
    for candidate in (folder, folder / "scheduler", folder.parent / "scheduler"):
        if (candidate / "scheduler_config.json").is_file():
            return json.loads((candidate / "scheduler_config.json").read_text())
    return {}


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


def _check_same_schedule(checkpoint: Path, noise_scheduler: NoiseScheduler) -> None:
    """Raise CheckpointError, naming the keys, when `noise_scheduler` differs from the one `checkpoint` was
    trained with (its noise_scheduler.json, with today's defaults for keys it lacks)."""
    try:
        saved = json.loads((checkpoint / NOISE_SCHEDULER).read_text())
    except (OSError, ValueError) as error:
        raise CheckpointError(
            f"cannot read {checkpoint / NOISE_SCHEDULER}: {_one_line(error)}; the checkpoint is incomplete "
            "or damaged: name an earlier one with --resume PATH"
        ) from None
    with contextlib.suppress(TypeError, ValueError):  # else written by another version: compared as it is
        saved = NoiseScheduler(**saved).config
    saved, current = (json.loads(json.dumps(config)) for config in (saved, noise_scheduler.config))
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
            f"cannot read {file}: {_one_line(error)}; the checkpoint is incomplete or damaged: name an "
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
            f"run code ({reason or _one_line(error)}); use only checkpoints written by ddpm"
        ) from None
    except (OSError, RuntimeError, EOFError) as error:
        raise CheckpointError(
            f"cannot read {file}: {_one_line(error)}; the checkpoint is damaged: name an earlier one with "
            "--resume PATH"
        ) from None


def _remove_incomplete(folder: Path, accelerator) -> None:
    """Delete what a crash left in the checkpoints folder: temporary folders, step folders missing
    trainer_state.json. Symlinks are left alone (they lead to folders this run does not own)."""
    if not folder.is_dir():
        return
    for path in folder.iterdir():
        temporary = path.name.startswith(_TMP_PREFIX)
        incomplete = path.name.startswith(_PREFIX) and not (path / TRAINER_STATE).is_file()
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
    trash = checkpoint.with_name(f"{_TMP_PREFIX}old-{checkpoint.name}")
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


def _one_line(error: BaseException) -> str:
    """The first line of an error's message (torch and safetensors write paragraphs)."""
    lines = str(error).strip().splitlines()
    return lines[0] if lines else type(error).__name__


def _ensure_writable_dir(path: Path) -> None:
    try:
        path.mkdir(parents=True)
    except OSError as error:
        raise CheckpointError(f"cannot create {path}: {error}; check the path and its permissions") from None
