"""Post-hoc EMA of a run (Karras et al. 2024, Sec. 3): the snapshots training writes, and the EMA of any
profile width reconstructed from them afterwards, scored so that the EMA length is chosen after training.

With `train.posthoc_ema_every: N` the trainer tracks a `PowerFunctionEMA` of each width in
`train.posthoc_ema_sigma_rels` and writes all of them every N optimizer steps, and at the last step, into

    output_dir/posthoc_ema/step-0000500.safetensors     tensors "<k>/<parameter name>" for profile k;
                                                        metadata: step, sigma_rels (JSON), ddpm_version

each written atomically (`ddpm.io.atomic_write`). A checkpoint holds the trackers' state in the same format
(`CHECKPOINT_FILE`), so that a resumed run writes the same snapshots as an uninterrupted one; resuming an
older checkpoint sets the newer snapshots aside into posthoc_ema/abandoned-after-step-N/, as it does
checkpoints.

`reconstruct` turns the snapshots up to a step into the parameters of the EMA of any sigma_rel (least squares
over the profiles, `ddpm.ema.power.posthoc_coefficients`), streaming over the files one at a time;
`posthoc_model` builds the run's network with them and `denoising_score` scores it cheaply (see there).
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any, NamedTuple

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from ddpm.conditions import network_argument
from ddpm.config import Config, build_model, build_schedule, load_config
from ddpm.data import build_dataset, item_conditions
from ddpm.ema.power import PowerFunctionEMA, posthoc_coefficients
from ddpm.io import (
    CONFIG_NAME,
    NOISE_SCHEDULER,
    TASK_FILE,
    WEIGHTS_NAME,
    CheckpointError,
    atomic_write,
)
from ddpm.losses import diffusion_loss
from ddpm.models.hub_model import CARD_NAME
from ddpm.run_dir import RUN_CONFIG
from ddpm.schedule import NoiseScheduler
from ddpm.version import ddpm_version

SNAPSHOTS = "posthoc_ema"  # the folder of a run that holds the snapshots
CHECKPOINT_FILE = "posthoc_ema.safetensors"  # the trackers' state inside a checkpoint
PROVENANCE = (
    "posthoc_ema.json"  # in a model folder `python -m ddpm.ema` wrote: what it was reconstructed from
)
# What save_posthoc_model writes: an existing folder holding only these may be replaced.
_MODEL_FOLDER_FILES = (CONFIG_NAME, WEIGHTS_NAME, NOISE_SCHEDULER, CARD_NAME, TASK_FILE, PROVENANCE)
_SNAPSHOT_NAME = re.compile(r"step-(\d{7,})\.safetensors")


class Snapshot(NamedTuple):
    """One snapshot file: its path, the optimizer step it was taken after and the widths of its profiles."""

    path: Path
    step: int
    sigma_rels: tuple[float, ...]


def snapshot_path(run_dir: str | Path, step: int) -> Path:
    """The snapshot file of `step` in `run_dir`."""
    return Path(run_dir) / SNAPSHOTS / f"step-{step:07d}.safetensors"


def save_snapshot(path: str | Path, ema: PowerFunctionEMA, step: int) -> None:
    """Write the state of every profile of `ema` after optimizer `step` to `path`, atomically (float32 on the
    CPU; parameters and buffers, "<k>/<name>" for profile k)."""
    tensors = {
        f"{k}/{name}": value.detach().float().cpu().contiguous()
        for k, module in enumerate(ema.modules)
        for name, value in module.state_dict().items()
    }
    metadata = {"step": str(step), "sigma_rels": json.dumps(ema.sigma_rels), "ddpm_version": ddpm_version()}
    with atomic_write(path) as tmp:
        save_file(tensors, str(tmp), metadata=metadata)


def read_snapshot_header(path: str | Path) -> Snapshot:
    """The step and widths a snapshot file records (only its header is read). Raises CheckpointError for a
    file that is not one."""
    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
        return Snapshot(Path(path), int(metadata["step"]), tuple(json.loads(metadata["sigma_rels"])))
    except (OSError, ValueError, KeyError, TypeError, SafetensorError) as error:
        raise CheckpointError(
            f"cannot read {path} as a post-hoc EMA snapshot ({error}); move it out of the way"
        ) from None


def check_snapshot_fits(path: str | Path, ema: PowerFunctionEMA) -> Snapshot:
    """The header of a snapshot (or of a checkpoint's `CHECKPOINT_FILE`); raises CheckpointError when its
    profiles are not `ema`'s, saying which setting to change."""
    header = read_snapshot_header(path)
    if not _same_widths(header.sigma_rels, ema.sigma_rels):
        raise CheckpointError(
            f"{path} tracks the post-hoc EMA profiles sigma_rel={list(header.sigma_rels)}, but this run has "
            f"train.posthoc_ema_sigma_rels={list(ema.sigma_rels)}: resume with the run's own config "
            "(its config.yaml), or train the new profiles in a new output_dir"
        )
    return header


def load_snapshot(path: str | Path, ema: PowerFunctionEMA) -> int:
    """Load a snapshot (or a checkpoint's `CHECKPOINT_FILE`) into `ema`, checked by `check_snapshot_fits`;
    returns its step."""
    header = check_snapshot_fits(path, ema)
    tensors = load_file(str(path))
    for k, module in enumerate(ema.modules):
        module.load_state_dict(
            {name[len(f"{k}/") :]: v for name, v in tensors.items() if name.startswith(f"{k}/")}
        )
    return header.step


def list_snapshots(run_dir: str | Path) -> list[Snapshot]:
    """The snapshots of a run, oldest first (from their headers; files with other names are ignored)."""
    folder = Path(run_dir) / SNAPSHOTS
    if not folder.is_dir():
        return []
    found = [
        read_snapshot_header(p) for p in folder.iterdir() if _SNAPSHOT_NAME.fullmatch(p.name) and p.is_file()
    ]
    return sorted(found, key=lambda s: s.step)


def abandon_newer_snapshots(run_dir: str | Path, step: int) -> list[Path]:
    """Move the snapshots taken after `step` into posthoc_ema/abandoned-after-step-NNNNNNN/ (they belong to
    a branch of the run that a resume from `step` leaves), where `list_snapshots` does not look; returns their
    new paths."""
    newer = [s for s in list_snapshots(run_dir) if s.step > step]
    if not newer:
        return []
    aside = Path(run_dir) / SNAPSHOTS / f"abandoned-after-step-{step:07d}"
    n = 1
    while aside.exists():
        n += 1
        aside = aside.with_name(f"abandoned-after-step-{step:07d}-{n}")
    aside.mkdir()
    moved = []
    for snapshot in newer:
        os.replace(snapshot.path, aside / snapshot.path.name)
        moved.append(aside / snapshot.path.name)
    return moved


def reconstruct(
    run_dir: str | Path, model: torch.nn.Module, sigma_rels: list[float], *, step: int | None = None
) -> list[dict[str, torch.Tensor]]:
    """The state dicts (float32, CPU) of `model`'s network as the post-hoc EMAs of `sigma_rels` at `step`
    (default: the last snapshot's), from the run's snapshots up to that step (App. C.3): each parameter the
    least-squares combination of that parameter in every profile of every snapshot, accumulated in float64;
    buffers copied from the last snapshot. `model` gives the names (the run's network); one snapshot file is
    read at a time.

    Raises CheckpointError when the run has no snapshots or none at `step`, and ValueError for a sigma_rel
    outside (0, 1/sqrt(12)).
    """
    snapshots = list_snapshots(run_dir)
    if not snapshots:
        raise CheckpointError(
            f"{Path(run_dir) / SNAPSHOTS} holds no snapshots: train with train.posthoc_ema_every=N (e.g. "
            "every 5% of train.steps) to record them"
        )
    step = snapshots[-1].step if step is None else step
    if step not in {s.step for s in snapshots}:
        raise CheckpointError(
            f"no snapshot at step {step} in {Path(run_dir) / SNAPSHOTS}; the steps there: "
            f"{', '.join(str(s.step) for s in snapshots)}"
        )
    used = [s for s in snapshots if s.step <= step]
    times = [s.step for s in used for _ in s.sigma_rels]
    widths = [w for s in used for w in s.sigma_rels]
    coefficients = posthoc_coefficients(times, widths, step, sigma_rels)  # (snapshots x profiles, K)
    names = [name for name, _ in model.named_parameters()]
    sums = [dict.fromkeys(names, 0.0) for _ in sigma_rels]
    row = 0
    for snapshot in used:
        tensors = load_file(str(snapshot.path))
        for k in range(len(snapshot.sigma_rels)):
            for name in names:
                value = tensors[f"{k}/{name}"].double()
                for j, state in enumerate(sums):
                    state[name] = state[name] + float(coefficients[row, j]) * value
            row += 1
    buffers = {name: tensors[f"0/{name}"] for name, _ in model.named_buffers()}
    return [{**{name: v.float() for name, v in state.items()}, **buffers} for state in sums]


def load_run(run_dir: str | Path) -> tuple[Config, NoiseScheduler]:
    """A run's resolved config (its config.yaml) and noise schedule. Raises CheckpointError without one."""
    file = Path(run_dir) / RUN_CONFIG
    if not file.is_file():
        raise CheckpointError(
            f"{run_dir} is not a run directory (it has no {RUN_CONFIG}); pass the output_dir of a run"
        )
    config = load_config(file)
    return config, build_schedule(config.diffusion)


def posthoc_model(config: Config, state: dict[str, torch.Tensor] | None = None) -> torch.nn.Module:
    """The run's network (`config.model`) in eval mode, with `state` (a `reconstruct` result) loaded."""
    model = build_model(config.model)
    if state is not None:
        model.load_state_dict(state)
    return model.eval()


@torch.no_grad()
def denoising_score(
    model: torch.nn.Module, scheduler: NoiseScheduler, config: Config, *, n: int = 1024, seed: int = 0
) -> float:
    """The run's training loss (`diffusion_loss` with its `train.loss_weighting`) of `model` on n fixed
    draws: images i * len / n of the data set (no flips), their conditions as training gives them
    (`ddpm.data.item_conditions`: labels, condition files, data.task's image, inpaint's masks seeded by
    (seed, i)), none dropped, and noise and timesteps from a generator seeded `seed`, the same for every
    model scored.

    A cheap score for choosing the EMA length: no sampling and no external weights, seconds on a CPU, and the
    draws are shared, so the differences between EMA widths are not sampling noise. It measures denoising
    error, the quantity training minimises, not sample quality: confirm the chosen width with FID
    (`python -m ddpm.fid`) on the model folder it writes.
    """
    data_config = dataclasses.replace(config.data, hflip=False)
    data = build_dataset(data_config, config.model)
    n = min(n, len(data))
    indices = [i * len(data) // n for i in range(n)]
    generator = torch.Generator().manual_seed(seed)
    total, batch = 0.0, config.data.batch_size
    null_class = getattr(model, "null_class", None)
    for start in range(0, n, batch):
        rows = indices[start : start + batch]
        labelled = getattr(model, "num_classes", None) is not None
        x0, _, cond = item_conditions(data_config, data, rows, labels=labelled, seed=seed)
        noise = torch.randn(x0.shape, generator=generator)
        t = scheduler.sample_timesteps(len(rows), generator=generator)
        loss = diffusion_loss(
            model,
            scheduler,
            x0,
            noise,
            t,
            network_argument(cond, null_class),
            weighting=config.train.loss_weighting,
            min_snr_gamma=config.train.min_snr_gamma,
        )
        total += loss.item() * len(rows)
    return total / n


def save_posthoc_model(
    folder: str | Path,
    model: torch.nn.Module,
    scheduler: NoiseScheduler,
    made_from: dict,
    *,
    sampling: Mapping[str, Any] | None = None,
    task: Mapping[str, Any] | None = None,
) -> None:
    """Write the model folder of a reconstructed EMA whole or not at all: `save_pretrained`'s config.json,
    model.safetensors, noise_scheduler.json and the model card README.md (with the run's `sampling` settings),
    with `task` (the run's data.task settings, `ddpm.config.task_settings`; None: no task) TASK_FILE, so that
    its conditions are read as training built them, and PROVENANCE (`made_from` as JSON), built beside
    `folder` under a temporary name and renamed (`ddpm.io.atomic_write`).

    An existing `folder` holding nothing but those files (an earlier output, or nothing) is replaced whole;
    one holding anything else is refused, since replacing it would delete that. Raises FileExistsError naming
    what it holds, and OSError naming `folder` when the write fails (nothing of the new folder is then left,
    and an existing one is as it was).
    """
    folder = Path(folder)
    if folder.is_dir():
        others = sorted(p.name for p in folder.iterdir() if p.name not in _MODEL_FOLDER_FILES)
        if others:
            raise FileExistsError(
                f"{folder} exists and holds {', '.join(others)}, which a post-hoc EMA model folder does not: "
                "name a new folder, or one written by python -m ddpm.ema before"
            )
    with atomic_write(folder) as tmp:
        model.save_pretrained(tmp, scheduler=scheduler, sampling=sampling)  # already whole: atomic_write
        if task is not None:
            (tmp / TASK_FILE).write_text(json.dumps(dict(task), indent=2) + "\n")
        (tmp / PROVENANCE).write_text(json.dumps(made_from, indent=2) + "\n")


def _same_widths(a, b) -> bool:
    return len(a) == len(b) and all(abs(x - y) <= 1e-12 for x, y in zip(a, b, strict=True))
