"""Where FID's images come from: a folder of images, a data set (a config's `data:` section), a model (its
samples) or an .npz file of statistics; `fid` on top. With an `accelerate.Accelerator`,
the images are dealt out to the processes in chunks and their features gathered to the main process."""

from __future__ import annotations

import dataclasses
import json
import warnings
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Subset

from ddpm.conditions import Conditions
from ddpm.config import DataConfig, SampleConfig, load_config
from ddpm.data import (
    build_dataset,
    collate_batch,
    convert_image,
    image_files,
    item_conditions,
    loader_workers,
)
from ddpm.fid.metric import (
    FEATURE_DIM,
    Statistics,
    cached_statistics,
    frechet_distance,
    inception_features,
    load_statistics,
    require_fidelity,
    resolve_device,
    resolve_weights,
    save_statistics,
    statistics,
)
from ddpm.hub import local_path
from ddpm.images import to_uint8
from ddpm.inference import Loaded, generate, load_for_sampling, needed_conditions
from ddpm.run_dir import RUN_CONFIG
from ddpm.schedule import NoiseScheduler
from ddpm.source import model_source

if TYPE_CHECKING:
    from accelerate import Accelerator

SOURCES = (
    "a folder of images, a YAML config file, a run directory or checkpoint folder, a model on the Hugging "
    "Face Hub (namespace/name), or an .npz file"
)


def fid(
    real: str | Path,
    fake: str | Path,
    *,
    n: int = 50_000,
    weights: str | Path | None = None,
    batch_size: int = 64,
    device: torch.device | str | None = None,
    seed: int = 0,
    progress: bool = True,
) -> float:
    """FID between two sources (each one of `SOURCES`, see `ddpm.fid`'s docstring); `n` images are sampled
    from a run directory, folders and data sets are used whole. `compare` of `pair_statistics` gives KID and
    precision/recall too."""
    real_stats, fake_stats = pair_statistics(
        real, fake, n=n, weights=weights, batch_size=batch_size, device=device, seed=seed, progress=progress
    )
    return frechet_distance(real_stats.mu, real_stats.sigma, fake_stats.mu, fake_stats.sigma)


@torch.no_grad()
def model_statistics(
    model: torch.nn.Module,
    scheduler: NoiseScheduler,
    n: int,
    *,
    sampling: SampleConfig | None = None,
    weights: str | Path | None = None,
    batch_size: int = 64,
    seed: int = 0,
    progress: bool = True,
    accelerator: Accelerator | None = None,
    data: DataConfig | None = None,
) -> Statistics | None:
    """Inception statistics of `n` images drawn with `ddpm.inference.generate` and the sampler settings of
    `sampling` (default: SampleConfig()), on the model's device.

    Image i starts from noise seeded `seed + i`, so repeated evaluations during training see the same noise.
    Class-conditional models get labels 0, 1, ... cycling over the classes (balanced, as the data usually
    are). A model conditioned on more than labels (an image, a vector, a token sequence) draws image i on the
    conditions of item i mod len of the data set `data` describes (with the model's task, its labels and
    condition files; `ddpm.data.item_conditions`, inpaint's masks seeded by (seed, i)): e.g. a superres
    model's samples are super-resolutions of the reference images' low-resolution versions. Without `data`
    such a model is refused (ValueError). The model is put in eval mode for sampling and left in the mode it
    came in.

    With `accelerator` (an `accelerate.Accelerator`; every process must call this), the images are drawn in
    chunks dealt out to the processes in turn, each process samples and embeds its own chunks, and the
    features are gathered to the main process, which returns the statistics (the others return None). The
    chunks, their seeds and labels are those of the single-process call, so the result is the same, in
    1 / num_processes of the time.
    """
    conditions = _data_conditions(model, data, seed)  # before the weights: a refusal costs nothing
    weights = resolve_weights(weights)
    sampling = sampling or SampleConfig()
    device = next(model.parameters()).device
    rank, world = (accelerator.process_index, accelerator.num_processes) if accelerator else (0, 1)
    chunks = _chunks(model, n, batch_size)  # [(first image index, images)]
    mine = chunks[rank::world]
    was_training = model.training
    model.eval()
    try:
        batches = _sampled_batches(
            model,
            scheduler,
            mine,
            sampling=sampling,
            batch_size=batch_size,
            seed=seed,
            conditions=conditions,
        )
        features = inception_features(
            batches,
            weights=weights,
            batch_size=batch_size,
            device=device,
            total=sum(size for _, size in mine),
            progress=progress and rank == 0,
            allow_empty=True,
        )
    finally:
        model.train(was_training)
    if world > 1:
        features = _gather_chunks(features, chunks, accelerator)
        if not accelerator.is_main_process:
            return None
    return statistics(features)


def reference_statistics(
    data: DataConfig,
    *,
    cache: str | Path | None = None,
    weights: str | Path | None = None,
    batch_size: int = 64,
    device: torch.device | str | None = None,
    progress: bool = True,
    accelerator: Accelerator | None = None,
    model: Mapping[str, Any] | None = None,
) -> Statistics | None:
    """Inception statistics of every image of the data set `data` describes (random flips off); with
    condition files (data.conditions, data.paired) `model`, the network's config, which they are checked
    against (`build_dataset`), is needed, and only the images are used.

    With `cache`, the statistics are read from that .npz file when it holds those of the same data set
    (dataset, split, root, image_size, channels) and weights file, else computed and written there. With
    `accelerator` (every process must call this), they are computed only if some process lacks a valid
    cache, each process embedding its batches (batch i on process i mod num_processes), gathered to the main
    process, which writes the cache and returns the statistics (the others return None).
    """
    weights = resolve_weights(weights)
    data = dataclasses.replace(data, hflip=False)  # the statistics of the data, not of one random draw
    key = json.dumps(
        {
            "dataset": data.dataset,
            "split": data.split,  # older caches (of the digits: all of them) name none: recomputed once
            "root": str(Path(data.root).expanduser().resolve()) if data.root else None,
            "image_size": data.image_size,
            "channels": data.channels,
            "weights": weights.name,
            "features": True,  # older caches hold no features (FID only): recomputed once
        }
    )
    rank, world = (accelerator.process_index, accelerator.num_processes) if accelerator else (0, 1)
    cached = cached_statistics(cache, key)
    if world > 1:  # all processes compute, or none: each one's cache may differ (a disk per machine)
        everywhere = accelerator.gather(torch.tensor([int(cached is not None)], device=accelerator.device))
        cached = cached if int(everywhere.min()) == 1 else None
    if cached is not None:
        return cached if rank == 0 else None
    dataset = build_dataset(data, model)
    chunks = [(start, min(batch_size, len(dataset) - start)) for start in range(0, len(dataset), batch_size)]
    mine = chunks[rank::world]
    indices = [i for start, size in mine for i in range(start, start + size)]
    workers = loader_workers(data.num_workers)
    loader = DataLoader(
        Subset(dataset, indices), batch_size=batch_size, num_workers=workers, collate_fn=collate_batch
    )
    features = inception_features(
        (to_uint8(images) for images, *_ in loader),
        weights=weights,
        batch_size=batch_size,
        device=device,
        total=len(indices),
        progress=progress and rank == 0,
        allow_empty=True,
    )
    if world > 1:
        features = _gather_chunks(features, chunks, accelerator)
        if rank != 0:
            return None
    stats = statistics(features)
    if cache is not None:
        save_statistics(stats, cache, key=key)
    return stats


def source_statistics(
    source: str | Path,
    *,
    n: int = 50_000,
    weights: str | Path | None = None,
    batch_size: int = 64,
    device: torch.device | str | None = None,
    seed: int = 0,
    progress: bool = True,
    data: DataConfig | None = None,
) -> Statistics:
    """Inception statistics of one source: a folder of images, a YAML config (its data set), a model source
    other than an OpenAI file (`ddpm.source`: `n` images from a run's or checkpoint's EMA weights and its
    `sample:` settings, or from a model folder, local or on the Hub) or an .npz file. A model conditioned on
    more than labels is sampled on the conditions of the items of `data` (`model_statistics`), by default
    of the data set of its run (its config.yaml); a model folder outside a run needs `data`."""
    path = local_path(source)  # a Hub repo id becomes its snapshot's folder; a missing path stops here
    if path.suffix == ".npz":
        return load_statistics(path)
    weights = resolve_weights(weights)  # before anything slow, so that a missing file stops us at once
    if path.suffix in (".yaml", ".yml"):
        config = load_config(path)
        return reference_statistics(
            config.data,
            weights=weights,
            batch_size=batch_size,
            device=device,
            progress=progress,
            model=config.model,
        )
    model = model_source(path, str(source))
    if model is not None and model.kind != "openai":
        loaded = load_for_sampling(model, use_ema=True, device=resolve_device(device))
        if loaded.weights not in ("ema", "posthoc-ema"):
            warnings.warn(f"{loaded.folder} holds no EMA weights; sampling its raw weights", stacklevel=2)
        return model_statistics(
            loaded.model,
            loaded.scheduler,
            n,
            sampling=loaded.sampling,
            weights=weights,
            batch_size=batch_size,
            seed=seed,
            progress=progress,
            data=_condition_data(loaded, data),
        )
    if path.is_dir():
        files = image_files(path)
        if not files:
            raise FileNotFoundError(f"no images found under {path}; expected {SOURCES}")
        batches = _folder_batches(files, batch_size)
        return statistics(
            inception_features(
                batches,
                weights=weights,
                batch_size=batch_size,
                device=device,
                total=len(files),
                progress=progress,
            )
        )
    raise ValueError(f"cannot compute FID statistics of {path}; expected {SOURCES}")


def pair_statistics(
    real: str | Path,
    fake: str | Path,
    *,
    n: int,
    weights: str | Path | None,
    batch_size: int,
    device: torch.device | str | None,
    seed: int,
    progress: bool,
) -> tuple[Statistics, Statistics]:
    """`source_statistics` of `real` and of `fake`, with the same options; torch-fidelity, n and the weights
    file are checked (and the weights downloaded on first use) before the first source's (maybe long) work.
    Where one source is a YAML config, its data set is the reference whose items' conditions a model
    conditioned on more than labels is sampled on (`source_statistics`' data)."""
    require_fidelity()
    if n <= 0:
        raise ValueError(f"the number of images to sample must be positive, got {n}")
    if any(Path(s).suffix != ".npz" for s in (real, fake)):
        weights = resolve_weights(weights)
    configs = [source for source in (real, fake) if Path(source).suffix in (".yaml", ".yml")]
    data = load_config(configs[0]).data if configs else None
    options = dict(n=n, weights=weights, batch_size=batch_size, device=device, seed=seed, progress=progress)
    return source_statistics(real, **options, data=data), source_statistics(fake, **options, data=data)


def _chunks(model: torch.nn.Module, n: int, batch_size: int) -> list[tuple[int, int]]:
    """The (first image index, number of images) of each call of `generate` that draws n images: chunks whose
    size is a multiple of the class count, because `generate` cycles labels from 0 in every call, so only
    such chunks keep the classes balanced (and equal to one big call)."""
    classes = getattr(model, "num_classes", None) or 1
    chunk = -(-batch_size // classes) * classes
    return [(start, min(chunk, n - start)) for start in range(0, n, chunk)]


def _sampled_batches(
    model: torch.nn.Module,
    scheduler: NoiseScheduler,
    chunks: list[tuple[int, int]],
    *,
    sampling: SampleConfig,
    batch_size: int,
    seed: int,
    conditions: Callable[[range], Conditions] | None = None,
) -> Iterator[torch.Tensor]:
    """uint8 images from `generate`, one batch per chunk of `_chunks` (image i seeded seed + i), the images
    `indices` on `conditions(indices)` when given."""
    config = model.config
    shape = (config["in_channels"], config["image_size"], config["image_size"])
    for start, size in chunks:
        images = generate(
            model,
            scheduler,
            size,
            image_shape=shape,
            **sampling.sampler_settings(),
            cond=conditions(range(start, start + size)) if conditions is not None else None,
            seed=seed + start,
            batch_size=batch_size,
            device=next(model.parameters()).device,
        )
        yield to_uint8(images)


def _data_conditions(
    model: torch.nn.Module, data: DataConfig | None, seed: int
) -> Callable[[range], Conditions] | None:
    """For a model conditioned on more than labels, indices -> the Conditions of images `indices`, image i
    on item i mod len of the data set `data` describes (`ddpm.data.item_conditions`; a row without a label
    on the null label); None for any other model. ValueError, naming the fix, without `data`."""
    needed = needed_conditions(model)
    if not needed:
        return None
    if data is None:
        raise ValueError(
            f"this model is conditioned on more than labels ({needed}): FID samples each image on the "
            "conditions of a reference image; pass the data set that gives them (python -m ddpm.fid "
            "CONFIG.yaml MODEL, the reference's config as REAL; model_statistics(data=...))"
        )
    dataset = build_dataset(dataclasses.replace(data, hflip=False), model.config)
    labels = getattr(model, "num_classes", None) is not None

    def conditions(indices: range) -> Conditions:
        rows = [i % len(dataset) for i in indices]
        _, item_labels, cond = item_conditions(data, dataset, rows, labels=labels, seed=seed)
        return cond.drop({"label": item_labels < 0}) if labels else cond

    return conditions


def _condition_data(loaded: Loaded, data: DataConfig | None) -> DataConfig | None:
    """The data set whose items condition `loaded.model` when it needs conditions beyond labels: `data`,
    else its run's data section (None outside a run), with the task saved with the weights; else None."""
    if not needed_conditions(loaded.model):
        return None
    if data is None and loaded.run_dir is not None:
        data = load_config(loaded.run_dir / RUN_CONFIG).data
    return dataclasses.replace(data, **loaded.task) if data is not None else None


def _gather_chunks(
    features: np.ndarray, chunks: list[tuple[int, int]], accelerator: Accelerator
) -> np.ndarray:
    """All processes' features (n, D), in the order of `chunks`, from each process's own: the features of
    chunks[rank::world] on process rank. Collective: every process calls it; all get the result."""
    world = accelerator.num_processes
    counts = [sum(size for _, size in chunks[rank::world]) for rank in range(world)]
    rows = max(counts)
    padded = torch.zeros(rows, FEATURE_DIM, dtype=torch.float64)  # gather needs one shape everywhere
    padded[: len(features)] = torch.from_numpy(features)
    gathered = (
        accelerator.gather(padded.to(accelerator.device)).cpu().numpy().reshape(world, rows, FEATURE_DIM)
    )
    taken = [0] * world  # rows of each process's features already put in order
    ordered = []
    for index, (_, size) in enumerate(chunks):
        rank = index % world
        ordered.append(gathered[rank, taken[rank] : taken[rank] + size])
        taken[rank] += size
    return np.concatenate(ordered)


def _folder_batches(files: list[Path], batch_size: int) -> Iterator[torch.Tensor]:
    """(n, 3, H, W) uint8 batches of image files, converted to RGB as the training data are."""
    shape = None  # (H, W, 3) of files[0]
    for start in range(0, len(files), batch_size):
        arrays = []
        for file in files[start : start + batch_size]:
            with Image.open(file) as image:
                arrays.append(np.asarray(convert_image(image, "RGB")))  # (H, W, 3)
            shape = shape or arrays[-1].shape
            if arrays[-1].shape != shape:
                raise ValueError(
                    f"{file} is {arrays[-1].shape[1]}x{arrays[-1].shape[0]} pixels but {files[0]} is "
                    f"{shape[1]}x{shape[0]}: FID compares images of one size; resize them first"
                )
        yield torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2)
