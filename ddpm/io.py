"""Files: atomic writes, and model folders (the weights, their config and the noise schedule they were trained
with) written and read whole.

A model folder holds config.json and model.safetensors (the UNet: its constructor's keyword arguments and its
weights; `save_unet` and `load_unet`) and noise_scheduler.json (NoiseScheduler's keyword arguments).
`save_pretrained` writes one and `load_pretrained` reads one back, or a diffusers UNet2DModel or pipeline
folder with the scheduler_config.json beside it.
"""

from __future__ import annotations

import inspect
import json
import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from ddpm.edm import schedule_from_config
from ddpm.hub import model_folder
from ddpm.interop.diffusers import (
    diffusers_folder_scheduler,
    diffusers_unet_folder,
    scheduler_from_diffusers,
    unet_from_diffusers,
)
from ddpm.models import ARCHITECTURES, ClassicUNet
from ddpm.models.unet import UNet
from ddpm.models.weights import load_checked
from ddpm.schedule import NoiseScheduler
from ddpm.version import ddpm_version

CONFIG_NAME = "config.json"  # the UNet's constructor keyword arguments (diffusers names its config the same)
WEIGHTS_NAME = "model.safetensors"
NOISE_SCHEDULER = "noise_scheduler.json"
EMA = "ema"  # the model folder inside a checkpoint that holds its EMA weights


class CheckpointError(RuntimeError):
    """A checkpoint or model folder is missing, incomplete or does not fit; the message says what to do."""


@contextmanager
def atomic_write(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path to write a file or a folder to; when the block ends without an error, rename it
    to `path`.

        with atomic_write(run / "config.yaml") as tmp:
            tmp.write_text(text)

    The temporary path is `.tmp-<pid>-<name>` in `path`'s folder (created if missing): the same file system,
    so that the rename (os.replace) is atomic, and one name per process, so that two processes writing the
    same file never write into each other's. A folder written there replaces an existing folder at `path`
    whole (the old one renamed aside to `.tmp-<pid>-old-<name>`, the new one renamed in, then the old one
    deleted): the caller decides whether an existing folder may go. On an error in the block or the rename,
    the temporary file or folder is removed, `path` is left as it was, and the error re-raised; an OSError is
    re-raised as one naming `path` ("[Errno 28] cannot write PATH: No space left on device", the same errno
    and so the same subclass), and so is safetensors' SafetensorError, its report of a failed write ("cannot
    write PATH: " and its first line). A crash (SIGKILL, power loss) leaves at most hidden temporary files
    or folders beside `path` (between a folder's two renames: the old one and the new one, both whole, and
    nothing at `path`).
    """
    path = Path(path)
    tmp = path.with_name(f".tmp-{os.getpid()}-{path.name}")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        yield tmp
        if tmp.is_dir() and path.is_dir() and not path.is_symlink():
            _replace_folder(tmp, path)
        else:
            os.replace(tmp, path)
    except BaseException as error:  # KeyboardInterrupt too: no temporary file is left behind by Ctrl-C
        with suppress(OSError):  # e.g. the folder is a file: the error that says so is the one to raise
            if tmp.is_dir() and not tmp.is_symlink():
                shutil.rmtree(tmp)
            else:
                tmp.unlink(missing_ok=True)
        if isinstance(error, OSError):
            raise OSError(error.errno, f"cannot write {path}: {error.strerror or error}") from error
        if isinstance(error, SafetensorError):
            raise OSError(f"cannot write {path}: {one_line(error)}") from error
        raise


def save_pretrained(folder: str | Path, model: UNet, scheduler: NoiseScheduler) -> None:
    """Write a model folder: config.json and model.safetensors (`save_unet`) and the noise schedule the
    weights were trained with, noise_scheduler.json (`scheduler.config`). `load_pretrained` reads it."""
    save_unet(folder, model)
    (Path(folder) / NOISE_SCHEDULER).write_text(json.dumps(scheduler.config, indent=2) + "\n")


def load_pretrained(
    folder: str | Path, *, schedule: str | Path | None = None, device: torch.device | str = "cpu"
) -> tuple[UNet, NoiseScheduler]:
    """Load a (UNet in eval mode on `device`, NoiseScheduler) pair from a model folder, local or on the
    Hugging Face Hub (a repo id such as "google/ddpm-cifar10-32", fetched into the Hub cache: `ddpm.hub`).

    A ddpm folder (written by `save_pretrained`, or a checkpoint or its ema/) gets its noise_scheduler.json; a
    checkpoint's ema/ written before the schedule was saved beside the EMA weights gets the checkpoint's. A
    diffusers UNet2DModel or pipeline folder gets the scheduler_config.json beside it (DDPMScheduler's
    defaults without one). `schedule` names a schedule file instead: a noise_scheduler.json or a diffusers
    scheduler_config.json. Raises CheckpointError for a ddpm folder without a schedule (sampling with another
    schedule than the one the weights were trained with gives noise, so none is guessed) or a schedule file
    that cannot be read, and OSError or ValueError for weights that cannot be read.
    """
    model, scheduler, _ = load_model_folder(folder, schedule=schedule, device=device)
    return model, scheduler


def load_model_folder(
    folder: str | Path, *, schedule: str | Path | None = None, device: torch.device | str = "cpu"
) -> tuple[UNet, NoiseScheduler, bool]:
    """`load_pretrained`, also saying whether `folder` is a diffusers one: (UNet in eval mode on `device`,
    NoiseScheduler, from_diffusers). The one place that tells a diffusers folder from ours. `folder` may be a
    Hub repo id (`ddpm.hub.model_folder`)."""
    folder = model_folder(folder)
    from_diffusers = diffusers_unet_folder(folder) is not None
    model = unet_from_diffusers(folder, device=device) if from_diffusers else load_unet(folder, device=device)
    if schedule is not None:
        scheduler = read_schedule(schedule)
    elif from_diffusers:
        scheduler = diffusers_folder_scheduler(folder)
    else:
        scheduler = read_schedule(_schedule_file(folder))
    return model.eval(), scheduler, from_diffusers


def save_unet(folder: str | Path, model: UNet | ClassicUNet) -> None:
    """Write the network alone: config.json (its constructor's keyword arguments, its class and the package
    version) and model.safetensors (its weights). `load_unet` reads them; `save_pretrained` adds the
    schedule."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    config = {"class": type(model).__name__, "ddpm_version": ddpm_version(), **model.config}
    (folder / CONFIG_NAME).write_text(json.dumps(config, indent=2) + "\n")
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(folder / WEIGHTS_NAME))


def load_unet(
    folder: str | Path, *, device: torch.device | str | None = None, dtype: torch.dtype | None = None
) -> UNet | ClassicUNet:
    """The network that `save_unet` (or `save_pretrained`) wrote in `folder` (the class its config.json names,
    UNet or ClassicUNet), with its weights, on `device` in `dtype`. Raises FileNotFoundError for a missing
    folder or file and ValueError for a config that is not one of ours or weights that do not fit it, each
    saying what to do."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(
            f"{folder} is not a directory; pass the folder written by ddpm.save_pretrained(folder, model, "
            "scheduler)"
        )
    for name in (CONFIG_NAME, WEIGHTS_NAME):
        if not (folder / name).is_file():
            raise FileNotFoundError(
                f"{folder / name} not found; a model folder holds {CONFIG_NAME} and {WEIGHTS_NAME} as "
                "written by ddpm.save_pretrained(folder, model, scheduler)"
            )
    config = json.loads((folder / CONFIG_NAME).read_text())
    saved_class = config.pop("class", UNet.__name__)
    config.pop("ddpm_version", None)
    classes = {cls.__name__: cls for cls in ARCHITECTURES.values()}
    if saved_class not in classes:
        raise ValueError(
            f"{folder / CONFIG_NAME} describes a {saved_class}, not one of ddpm's networks "
            f"({', '.join(classes)})"
        )
    cls = classes[saved_class]
    valid = [p for p in inspect.signature(cls.__init__).parameters if p != "self"]
    unknown = sorted(set(config) - set(valid))
    if unknown:
        raise ValueError(
            f"unknown config key(s) {unknown} in {folder / CONFIG_NAME}; valid keys: {valid}. "
            "Remove them, or upgrade ddpm if the folder was written by a newer version"
        )
    model = cls(**config)
    load_checked(
        model,
        load_file(str(folder / WEIGHTS_NAME)),
        f"the weights in {folder / WEIGHTS_NAME} do not fit the config in {folder / CONFIG_NAME}",
        "save the weights and the config together with ddpm.save_pretrained",
    )
    return model.to(device=device, dtype=dtype)


def read_schedule(file: str | Path) -> NoiseScheduler:
    """The NoiseScheduler of a schedule file: a ddpm noise_scheduler.json (NoiseScheduler's keyword arguments)
    or a diffusers scheduler_config.json (it has "_class_name"). Raises CheckpointError naming the file."""
    try:
        config = json.loads(Path(file).read_text())
        if isinstance(config, dict) and "_class_name" in config:
            return scheduler_from_diffusers(config)
        return schedule_from_config(config)
    except (OSError, ValueError, TypeError) as error:  # TypeError: not a dict, or an unknown keyword
        raise CheckpointError(
            f"cannot read the noise schedule {file}: {one_line(error)}; it must hold NoiseScheduler's "
            "keyword arguments (a ddpm noise_scheduler.json) or be a diffusers scheduler_config.json"
        ) from None


def one_line(error: BaseException) -> str:
    """The first line of an error's message (torch and safetensors write paragraphs)."""
    lines = str(error).strip().splitlines()
    return lines[0] if lines else type(error).__name__


def _replace_folder(new: Path, folder: Path) -> None:
    """Put the folder `new` in the place of the existing `folder` (its sibling), whose old content is deleted;
    if the second rename fails, the old folder is put back."""
    old = folder.with_name(f".tmp-{os.getpid()}-old-{folder.name}")
    os.replace(folder, old)
    try:
        os.replace(new, folder)
    except OSError:
        os.replace(old, folder)
        raise
    shutil.rmtree(old)


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
