"""Model sources: what `ddpm sample --checkpoint`, `ddpm.load_pretrained`, `ddpm.load_for_sampling`,
`ddpm export`, `ddpm nll` and `ddpm fid` take. `resolve_source` decides once what a source is; `load_source`
hands the loader of its kind a local folder, so that nothing below asks again.

A source is a string or a `pathlib.Path`, read by these rules (`ddpm.hub.local_path`):

1. An existing local path, file or folder, is that path, always.
2. A string `namespace/name`, or `namespace/name@REVISION` for a branch, tag or commit, valid by the Hub's
   rules, is a model on the Hugging Face Hub, fetched into the Hub cache (`ddpm.hub`), unless it looks like a
   path: its namespace is an existing local folder (`runs/typo` where runs/ is), or it ends in a file suffix
   (`.pt`, `.safetensors`, `.yaml`, ...; `ddpm.hub.FILE_SUFFIXES`). A `Path` is never a repo id.
3. Anything else is a path that does not exist (`./x`, `../x`, `/x`, `~/x`, `a/b/c`, a name without a slash,
   `runs/typo`): "no such file or folder", naming the absolute path tried and the current folder. The Hub is
   not asked.

The local file or folder is then the first of these kinds that fits (`ModelSource.kind`, `model_source`):

- "openai": a `.pt` file, an OpenAI (guided-diffusion or improved-diffusion) state dict, which needs the
  flags published with it (`ddpm.interop.openai`).
- "run": a run directory (it holds config.yaml or checkpoints/), meaning its latest checkpoint.
- "checkpoint": a checkpoint folder (it holds trainer_state.json); one never finished (`.tmp-*`) is refused.
- "ema": a checkpoint's ema/, the EMA weights.
- "diffusers": a diffusers UNet2DModel folder (config.json with "_class_name") or a pipeline folder with
  unet/ (`ddpm.interop.diffusers`).
- "model": a ddpm model folder (config.json, model.safetensors and noise_scheduler.json: `ddpm.io`), written
  by `ddpm.save_pretrained`, `model.save_pretrained` or `python -m ddpm.ema`.

Anything else holds no model (CheckpointError; `ddpm fid` takes a folder of images). A Hub repo's snapshot is
a "model" or a "diffusers" folder. Run directories, checkpoints and their ema/ hold ddpm model folders (a
checkpoint's own weights are the raw ones); sampling takes a checkpoint's ema/ unless told otherwise
(`ddpm.inference.load_for_sampling`).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

import torch

from ddpm.hub import HubError, local_path
from ddpm.interop.diffusers import (
    diffusers_folder_scheduler,
    diffusers_unet_folder,
    unet_from_diffusers_folder,
)
from ddpm.interop.openai import (
    parse_openai_flags,
    scheduler_from_openai,
    unet_from_openai,
    unet_kwargs_from_openai,
)
from ddpm.io import CONFIG_NAME, EMA, CheckpointError, load_unet, one_line, read_schedule, schedule_file
from ddpm.models.classic import ClassicUNet
from ddpm.models.unet import UNet
from ddpm.run_dir import (
    CHECKPOINTS,
    RUN_CONFIG,
    TMP_PREFIX,
    TRAIN_ONE,
    TRAINER_STATE,
    latest_checkpoint,
    run_directory,
)
from ddpm.schedule import NoiseScheduler

KINDS = ("openai", "run", "checkpoint", "ema", "diffusers", "model")


@dataclass(frozen=True)
class ModelSource:
    """A model source as `resolve_source` classified it (see the module docstring)."""

    kind: str  # one of KINDS
    path: Path  # the local folder of the weights (a run's: its latest checkpoint); the file, for "openai"
    folder: Path  # the checkpoint (also for its ema/) or model folder the weights belong to
    run_dir: Path | None  # the run directory of a checkpoint; None for a folder outside a run
    name: str  # the source as given (a Hub repo id with its @revision), for messages

    def ema(self) -> ModelSource:
        """The EMA weights of a run or checkpoint: its ema/ folder."""
        return dataclasses.replace(self, kind="ema", path=self.folder / EMA)


def resolve_source(source: str | Path) -> ModelSource:
    """What `source` is, decided once: rules 1-3 of the module docstring (`ddpm.hub.local_path`), then the
    kind of the local path (`model_source`). Raises CheckpointError for a path that does not exist or holds
    no model, each saying what to pass, and HubError for a Hub repo that cannot be had."""
    try:
        path = local_path(source)
    except HubError:
        raise
    except FileNotFoundError as error:
        raise CheckpointError(
            f"{error}: name a run directory, a checkpoint or model folder, or a Hub repo id "
            f"(namespace/name); or {TRAIN_ONE}"
        ) from None
    found = model_source(path, str(source))
    if found is None:
        raise CheckpointError(
            f"{source} is neither a run directory nor a checkpoint folder; {TRAIN_ONE}, or pass a run "
            "directory, a folder holding config.json, a diffusers UNet2DModel or "
            "pipeline folder, an OpenAI .pt file, or a Hub repo id such as google/ddpm-cifar10-32"
        )
    return found


def model_source(path: Path, name: str | None = None) -> ModelSource | None:
    """The kind of model the existing local `path` holds (the kinds of the module docstring), or None for
    none; `name` is the source as given (default: `path`). Raises CheckpointError for a checkpoint never
    finished and a run directory without checkpoints."""
    name = str(path) if name is None else name
    if path.is_file():
        return ModelSource("openai", path, path, None, name) if path.suffix == ".pt" else None
    if path.name.startswith(TMP_PREFIX) or path.parent.name.startswith(TMP_PREFIX):
        raise CheckpointError(f"{path} is a checkpoint that was never finished; name a step-NNNNNNN folder")
    if (path / CHECKPOINTS).is_dir() or (path / RUN_CONFIG).is_file():
        latest = latest_checkpoint(path)
        if latest is None:
            raise CheckpointError(f"no checkpoint in {path}; {TRAIN_ONE}")
        return ModelSource("run", latest, latest, run_directory(latest), name)
    if (path / TRAINER_STATE).is_file():
        return ModelSource("checkpoint", path, path, run_directory(path), name)
    if path.name == EMA and (path.parent / TRAINER_STATE).is_file():
        return ModelSource("ema", path, path.parent, run_directory(path.parent), name)
    if diffusers_unet_folder(path) is not None:
        return ModelSource("diffusers", path, path, None, name)
    if (path / CONFIG_NAME).is_file():
        return ModelSource("model", path, path, None, name)
    return None


def load_source(
    source: ModelSource, *, schedule: str | Path | None = None, device: torch.device | str = "cpu"
) -> tuple[UNet | ClassicUNet, NoiseScheduler]:
    """(network in eval mode on `device`, NoiseScheduler) of a resolved source of any kind but "openai"
    (`load_openai_source`): a diffusers folder with `ddpm.interop.diffusers` and the scheduler_config.json
    beside it (DDPMScheduler's defaults without one), the others with `ddpm.io.load_unet` and their
    noise_scheduler.json (`ddpm.io.schedule_file`: a checkpoint's ema/ written before the schedule travelled
    takes the checkpoint's). `schedule` names a schedule file instead, ours or diffusers'.

    Raises CheckpointError for a ddpm folder without a schedule (sampling with another schedule than the one
    the weights were trained with gives noise, so none is guessed) or a schedule file that cannot be read,
    and OSError or ValueError for weights that cannot be read.
    """
    diffusers = source.kind == "diffusers"
    if schedule is not None:  # the schedule first: a missing one stops before the weights are read
        scheduler = read_schedule(schedule)
    elif diffusers:
        scheduler = diffusers_folder_scheduler(source.path)
    else:
        scheduler = read_schedule(schedule_file(source.path))
    model = (unet_from_diffusers_folder if diffusers else load_unet)(source.path, device=device)
    return model.eval(), scheduler


def load_openai_source(
    source: ModelSource,
    flags: str | None,
    *,
    schedule: str | Path | None = None,
    device: torch.device | str = "cpu",
) -> tuple[UNet, NoiseScheduler]:
    """(UNet in eval mode on `device`, NoiseScheduler) of an OpenAI .pt file and the flag string published
    with it (what `ddpm.interop.openai.load_openai` does); `schedule` names a schedule file instead of the
    flags' one. Raises ValueError naming --openai-flags for bad flags and CheckpointError for the rest."""
    if source.kind != "openai":
        raise CheckpointError(
            f"--openai-flags is for an OpenAI .pt checkpoint file, and {source.name} is a {source.kind} "
            "folder: drop --openai-flags"
        )
    if flags is None:
        raise CheckpointError(
            f"{source.path} is an OpenAI checkpoint file: pass --openai-flags with the MODEL_FLAGS (and "
            'DIFFUSION_FLAGS) published with it, e.g. --openai-flags "--image_size 64 ..." '
            "(docs/openai.md)"
        )
    try:
        model_flags, diffusion_flags = parse_openai_flags(flags)
        unet_kwargs_from_openai(**model_flags)
        scheduler = scheduler_from_openai(**diffusion_flags)
    except ValueError as error:
        raise ValueError(f"--openai-flags: {one_line(error)}") from None
    try:
        model = unet_from_openai(source.path, device=device, **model_flags).eval()
    except (OSError, RuntimeError, ValueError) as error:  # ValueError: the tensors do not fit the flags
        raise CheckpointError(f"cannot load {source.path}: {one_line(error)}") from None
    if schedule is not None:
        scheduler = read_schedule(schedule)
    return model, scheduler


def load_pretrained(
    source: str | Path, *, schedule: str | Path | None = None, device: torch.device | str = "cpu"
) -> tuple[UNet | ClassicUNet, NoiseScheduler]:
    """Load a (network in eval mode on `device`, NoiseScheduler) pair from a model folder, local or on the
    Hugging Face Hub (a repo id such as "google/ddpm-cifar10-32", fetched into the Hub cache: `ddpm.hub`).

    A ddpm folder (written by `save_pretrained`, or a checkpoint or its ema/) gets its noise_scheduler.json; a
    checkpoint's ema/ written before the schedule was saved beside the EMA weights gets the checkpoint's. A
    diffusers UNet2DModel or pipeline folder gets the scheduler_config.json beside it (DDPMScheduler's
    defaults without one). `schedule` names a schedule file instead: a noise_scheduler.json or a diffusers
    scheduler_config.json. Raises CheckpointError for a source that is no model folder (a run directory names
    its latest checkpoint's ema/ as the one to load; see `resolve_source`), a ddpm folder without a schedule
    (sampling with another schedule than the one the weights were trained with gives noise, so none is
    guessed) or a schedule file that cannot be read, HubError for a Hub repo that cannot be had, and OSError
    or ValueError for weights that cannot be read.
    """
    found = resolve_source(source)
    if found.kind == "run":
        raise CheckpointError(
            f"{source} is a run directory, not a model folder: load one of its checkpoints, e.g. "
            f"{found.folder / EMA} (the EMA weights of the latest), or sample it with ddpm.load_for_sampling"
        )
    if found.kind == "openai":
        raise CheckpointError(
            f"{source} is an OpenAI checkpoint file: load it with ddpm.interop.openai.load_openai(path, "
            "flags), which needs the flags published with it"
        )
    return load_source(found, schedule=schedule, device=device)
