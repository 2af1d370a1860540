"""Files: atomic writes, and model folders (the weights, their config and the noise schedule they were trained
with) written and read whole.

A model folder holds config.json and model.safetensors (the UNet: its constructor's keyword arguments and its
weights) and noise_scheduler.json (NoiseScheduler's keyword arguments). `save_pretrained` writes one and
`load_pretrained` reads one back, or a diffusers UNet2DModel or pipeline folder with the scheduler_config.json
beside it.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path

import torch

from ddpm.interop.diffusers import diffusers_unet_folder
from ddpm.models.unet import UNet
from ddpm.schedule import NoiseScheduler

NOISE_SCHEDULER = "noise_scheduler.json"
EMA = "ema"  # the model folder inside a checkpoint that holds its EMA weights


class CheckpointError(RuntimeError):
    """A checkpoint or model folder is missing, incomplete or does not fit; the message says what to do."""


@contextmanager
def atomic_write(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path to write to; when the block ends without an error, rename it to `path`.

        with atomic_write(run / "config.yaml") as tmp:
            tmp.write_text(text)

    The temporary file is `.tmp-<pid>-<name>` in `path`'s folder (created if missing): the same file system,
    so that the rename (os.replace) is atomic, and one name per process, so that two processes writing the
    same file never write into each other's. On an error in the block or the rename, the temporary file is
    removed, `path` is left as it was, and the error re-raised; an OSError is re-raised as one naming `path`
    ("[Errno 28] cannot write PATH: No space left on device", the same errno and so the same subclass). A
    crash (SIGKILL, power loss) leaves at most the hidden temporary file beside `path`.
    """
    path = Path(path)
    tmp = path.with_name(f".tmp-{os.getpid()}-{path.name}")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        yield tmp
        os.replace(tmp, path)
    except BaseException as error:  # KeyboardInterrupt too: no temporary file is left behind by Ctrl-C
        with suppress(OSError):  # e.g. the folder is a file: the error that says so is the one to raise
            tmp.unlink(missing_ok=True)
        if isinstance(error, OSError):
            raise OSError(error.errno, f"cannot write {path}: {error.strerror or error}") from error
        raise


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
    return model.eval(), read_schedule(schedule if schedule is not None else _schedule_file(folder))


def read_schedule(file: str | Path) -> NoiseScheduler:
    """The NoiseScheduler of a schedule file: a ddpm noise_scheduler.json (NoiseScheduler's keyword arguments)
    or a diffusers scheduler_config.json (it has "_class_name"). Raises CheckpointError naming the file."""
    try:
        config = json.loads(Path(file).read_text())
        if isinstance(config, dict) and "_class_name" in config:
            return NoiseScheduler.from_diffusers_config(config)
        return NoiseScheduler(**config)
    except (OSError, ValueError, TypeError) as error:  # TypeError: not a dict, or an unknown keyword
        raise CheckpointError(
            f"cannot read the noise schedule {file}: {one_line(error)}; it must hold NoiseScheduler's "
            "keyword arguments (a ddpm noise_scheduler.json) or be a diffusers scheduler_config.json"
        ) from None


def one_line(error: BaseException) -> str:
    """The first line of an error's message (torch and safetensors write paragraphs)."""
    lines = str(error).strip().splitlines()
    return lines[0] if lines else type(error).__name__


def _schedule_file(folder: Path) -> Path:
    """The noise_scheduler.json of a ddpm model folder; for a checkpoint's ema/ without one, the checkpoint's.
    Raises CheckpointError, saying how to name the schedule, when there is none."""
    # A checkpoint's ema/ written before the schedule was saved beside the EMA weights: the checkpoint's.
    for candidate in (folder, folder.parent) if folder.name == EMA else (folder,):
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
