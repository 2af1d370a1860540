"""Files: atomic writes of a file or a folder, and the model folders of `ddpm.models.hub_model` (the weights,
their config and the noise schedule they were trained with) written and read whole.

A model folder holds config.json, model.safetensors and README.md (the network and its model card, written by
`model.save_pretrained`, huggingface_hub's PyTorchModelHubMixin) and noise_scheduler.json (the schedule);
a model trained on a built-in task (data.task) also task.json, the task's settings, so that sampling reads
its conditions as training made them without the run's config.
`save_pretrained` writes one whole; `load_unet` reads the network of a local one, `read_schedule` and
`schedule_file` its schedule. Which folder is which kind of model source, local or on the Hub, and which
loader reads it, is `ddpm.source`'s to decide (`ddpm.load_pretrained`); nothing here asks the Hub.

What this module still writes by hand, and why: the atomic writes (`atomic_write`, `atomic_folder`), since
the mixin writes a folder's files in place, one after another, so that a crash would leave a truncated
model.safetensors under its real name, or a new config beside old weights; task.json, settings of the data
rather than of the network, which the mixin's config (the constructor's arguments) has no place for; and
reading a schedule of either format (ours or a diffusers scheduler_config.json), which the mixin has no
notion of. config.json, model.safetensors and the model card are the mixin's (`ddpm.models.hub_model`, which
says why it still reads a folder itself), and so is the layout: folders written before it load unchanged.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterator, Mapping
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError

from ddpm.edm import schedule_from_config
from ddpm.interop.diffusers import scheduler_from_diffusers
from ddpm.models import ClassicUNet
from ddpm.models.hub_model import CONFIG_NAME as CONFIG_NAME  # the file names, also for the modules above
from ddpm.models.hub_model import NOISE_SCHEDULER, HubModel
from ddpm.models.hub_model import WEIGHTS_NAME as WEIGHTS_NAME
from ddpm.models.unet import UNet
from ddpm.schedule import NoiseScheduler

EMA = "ema"  # the model folder inside a checkpoint that holds its EMA weights
TASK_FILE = "task.json"  # a model folder's built-in task: `ddpm.config.task_settings`


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
        _raise_naming(path, error)


@contextmanager
def atomic_folder(path: str | Path) -> Iterator[Path]:
    """Yield a temporary folder to write files into; when the block ends without an error, move them to the
    folder `path`:

        with atomic_folder(out) as tmp:
            model.save_pretrained(tmp)

    A new `path` appears whole, by one rename of the temporary folder `.tmp-<pid>-<name>` beside it; into an
    existing one the files are moved one by one, each by a rename, so that every file there is whole, the old
    one or the new one (files of `path` not written are kept). On an error the temporary folder is removed,
    `path` left as it was (or as the files moved so far made it), and the error re-raised, an OSError as one
    naming `path`. A crash leaves at most the hidden temporary folder, beside `path`.
    """
    path = Path(path)
    tmp = path.with_name(f".tmp-{os.getpid()}-{path.name}")
    try:
        shutil.rmtree(tmp, ignore_errors=True)  # a leftover of an earlier process with this pid
        tmp.mkdir(parents=True)
        yield tmp
        if path.is_dir():
            for file in sorted(tmp.iterdir()):
                os.replace(file, path / file.name)
            tmp.rmdir()
        else:
            os.replace(tmp, path)
    except BaseException as error:
        shutil.rmtree(tmp, ignore_errors=True)
        _raise_naming(path, error)


def save_pretrained(
    folder: str | Path,
    model: UNet | ClassicUNet,
    scheduler: NoiseScheduler,
    *,
    sampling: Mapping[str, Any] | None = None,
    sample_grid: str | Path | None = None,
    task: Mapping[str, Any] | None = None,
) -> None:
    """Write a model folder whole (`atomic_folder`): what `model.save_pretrained(folder, scheduler=scheduler,
    sampling=sampling, sample_grid=sample_grid)` writes, config.json, model.safetensors, README.md (the model
    card: the schedule, `sampling`, the sampler settings to recommend, and `sample_grid`, an image drawn with
    them) and noise_scheduler.json, the schedule the weights were trained with, and with `task` (the data
    keys of a built-in task, `ddpm.config.task_settings`) TASK_FILE. `ddpm.load_pretrained` reads it; a
    README.md already in `folder` is replaced."""
    with atomic_folder(folder) as tmp:
        model.save_pretrained(tmp, scheduler=scheduler, sampling=sampling, sample_grid=sample_grid)
        if task is not None:
            (tmp / TASK_FILE).write_text(json.dumps(dict(task), indent=2) + "\n")


def save_unet(folder: str | Path, model: UNet | ClassicUNet) -> None:
    """Write the network alone, whole (`atomic_folder`): config.json (its constructor's keyword arguments,
    its class and the package version), model.safetensors (its weights) and the model card README.md.
    `load_unet` reads them; `save_pretrained` adds the schedule."""
    with atomic_folder(folder) as tmp:
        model.save_pretrained(tmp)


def load_unet(
    folder: str | Path, *, device: torch.device | str | None = None, dtype: torch.dtype | None = None
) -> UNet | ClassicUNet:
    """The network that `save_unet` (or `save_pretrained`) wrote in the local folder `folder` (the class its
    config.json names, UNet or ClassicUNet: `HubModel.from_folder`), with its weights, on `device` in
    `dtype`, in eval mode. Raises FileNotFoundError for a missing folder or file and ValueError for a config
    that is not one of ours or weights that do not fit it, each saying what to do."""
    return HubModel.from_folder(folder, device=device, dtype=dtype)


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


def _raise_naming(path: Path, error: BaseException) -> None:
    """Re-raise an error of writing `path`: an OSError as one naming it (the same errno, so the same
    subclass), safetensors' SafetensorError (its report of a failed write) as an OSError naming it, anything
    else as it is."""
    if isinstance(error, OSError):
        raise OSError(error.errno, f"cannot write {path}: {error.strerror or error}") from error
    if isinstance(error, SafetensorError):
        raise OSError(f"cannot write {path}: {one_line(error)}") from error
    raise error


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


def schedule_file(folder: Path) -> Path:
    """The noise_scheduler.json of a local ddpm model folder; for a checkpoint's ema/ without one, the
    checkpoint's. Raises CheckpointError, saying how to name the schedule, when there is none."""
    # A checkpoint's ema/ written before the schedule was saved beside the EMA weights: the checkpoint's.
    for candidate in (folder, folder.parent) if folder.name == EMA else (folder,):
        if (candidate / NOISE_SCHEDULER).is_file():
            return candidate / NOISE_SCHEDULER
    raise CheckpointError(
        f"{folder} has no {NOISE_SCHEDULER}, so the schedule its weights were trained with is unknown: copy "
        f"the {NOISE_SCHEDULER} of the checkpoint they came from into it, write NoiseScheduler(...).config "
        "there as JSON (ddpm.save_pretrained does), or pass sample.py --schedule FILE"
    )
