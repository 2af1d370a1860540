"""Frechet Inception Distance (FID; Heusel et al. 2017) between two sets of images, computed the way papers
report it, so that our numbers can be compared with published ones.

    python -m ddpm.fid REAL FAKE [--n 50000] [--weights FILE] [--batch-size 64] [--device cuda]
                                 [--seed 0] [--save-stats FILE]

REAL and FAKE are each one of:
  - a folder of images (searched recursively; all of one size);
  - a YAML config file: every image of the data set its `data:` section describes, without random flips;
  - a run directory or checkpoint folder: --n images sampled from the EMA weights of its latest checkpoint
    with the run's `sample:` settings (image i starts from noise seeded seed + i);
  - an .npz file of statistics, written by --save-stats (REAL's) or `save_statistics`.

The recipe, step by step:
  1. Images enter as uint8 RGB, the values a saved PNG holds: samples in [-1, 1] are quantised exactly as
     torchvision's `save_image` does (`to_uint8`); 1-channel images are repeated to 3 channels.
  2. torch-fidelity's `FeatureExtractorInceptionV3`, a port of the TensorFlow Inception graph of 2015-12-05
     that the original FID code uses, with its converted weights and in eval mode, resizes every image to
     299x299 with torch-fidelity's re-implementation of TensorFlow 1.x `tf.image.resize_bilinear`
     (bilinear, align_corners=False, no antialiasing) and returns the 2048 pool3 features of each image.
  3. The mean and covariance of the features over the whole set (`statistics`), and the Frechet distance
     between the two Gaussians they define (`frechet_distance`).

FID from fewer than 2,048 images (the feature dimension) is biased upwards, because the covariance is
rank-deficient: it is allowed, for quick checks, with a warning. Papers report FID of 50,000 generated images
against the training set.

The weights cannot be downloaded on the fly: they are read from --weights FILE, else $DDPM_FID_WEIGHTS,
else DEFAULT_WEIGHTS; `WEIGHTS_URL` is where to get them.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import os
import pickle
import sys
import warnings
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, NamedTuple

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Subset
from tqdm.auto import tqdm

from ddpm.config import DataConfig, SampleConfig, load_config
from ddpm.data import _convert, _image_files, build_dataset
from ddpm.inference import generate, load_for_sampling, sample_defaults
from ddpm.io import CheckpointError, atomic_write
from ddpm.run_dir import CHECKPOINTS, resolve_checkpoint
from ddpm.schedule import NoiseScheduler

if TYPE_CHECKING:
    from accelerate import Accelerator

# The file torch-fidelity itself downloads (its URL_INCEPTION_V3); tests check that the two agree.
WEIGHTS_URL = "https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/weights-inception-2015-12-05-6726825d.pth"
WEIGHTS_ENV = "DDPM_FID_WEIGHTS"
DEFAULT_WEIGHTS = Path("~/.cache/ddpm") / WEIGHTS_URL.rsplit("/", 1)[1]
FEATURE_DIM = 2048  # Inception pool3 features; fewer images than this give a singular covariance
SOURCES = "a folder of images, a YAML config file, a run directory or checkpoint folder, or an .npz file"


class WeightsNotFoundError(FileNotFoundError):
    """The Inception weights file is not where it was looked for; the message says where to get it."""


class Statistics(NamedTuple):
    """The Gaussian fitted to a set of Inception features."""

    mu: np.ndarray  # (D,) float64 mean feature
    sigma: np.ndarray  # (D, D) float64 covariance (unbiased: divided by n - 1)
    n: int  # number of images


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
    """FID between two sources (each one of `SOURCES`, see the module docstring); `n` images are sampled from
    a run directory, folders and data sets are used whole."""
    real_stats, fake_stats = _source_pair(
        real, fake, n=n, weights=weights, batch_size=batch_size, device=device, seed=seed, progress=progress
    )
    return frechet_distance(real_stats.mu, real_stats.sigma, fake_stats.mu, fake_stats.sigma)


def fid_of_model(
    model: torch.nn.Module,
    scheduler: NoiseScheduler,
    reference: Statistics,
    n: int,
    *,
    sample: SampleConfig | None = None,
    weights: str | Path | None = None,
    batch_size: int = 64,
    seed: int = 0,
    progress: bool = True,
    accelerator: Accelerator | None = None,
) -> float | None:
    """FID of `n` images sampled from `model` (e.g. the EMA weights, during training) against `reference`
    (from `reference_statistics`). See `model_statistics` for how the images are drawn and shared among the
    processes of `accelerator`; the FID is returned on the main process, None on the others."""
    stats = model_statistics(
        model,
        scheduler,
        n,
        sample=sample,
        weights=weights,
        batch_size=batch_size,
        seed=seed,
        progress=progress,
        accelerator=accelerator,
    )
    if stats is None:
        return None
    return frechet_distance(reference.mu, reference.sigma, stats.mu, stats.sigma)


@torch.no_grad()
def model_statistics(
    model: torch.nn.Module,
    scheduler: NoiseScheduler,
    n: int,
    *,
    sample: SampleConfig | None = None,
    weights: str | Path | None = None,
    batch_size: int = 64,
    seed: int = 0,
    progress: bool = True,
    accelerator: Accelerator | None = None,
) -> Statistics | None:
    """Inception statistics of `n` images drawn with `ddpm.inference.generate` and the sampler settings of
    `sample` (default: SampleConfig()), on the model's device.

    Image i starts from noise seeded `seed + i`, so repeated evaluations during training see the same noise.
    Class-conditional models get labels 0, 1, ... cycling over the classes (balanced, as the data usually
    are). The model is put in eval mode for sampling and left in the mode it came in.

    With `accelerator` (an `accelerate.Accelerator`; every process must call this), the images are drawn in
    chunks dealt out to the processes in turn, each process samples and embeds its own chunks, and the
    features are gathered to the main process, which returns the statistics (the others return None). The
    chunks, their seeds and labels are those of the single-process call, so the result is the same, in
    1 / num_processes of the time.
    """
    weights = resolve_weights(weights)
    sample = sample or SampleConfig()
    device = next(model.parameters()).device
    rank, world = (accelerator.process_index, accelerator.num_processes) if accelerator else (0, 1)
    chunks = _chunks(model, n, batch_size)  # [(first image index, images)]
    mine = chunks[rank::world]
    was_training = model.training
    model.eval()
    try:
        batches = _sampled_batches(model, scheduler, mine, sample=sample, batch_size=batch_size, seed=seed)
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
) -> Statistics | None:
    """Inception statistics of every image of the data set `data` describes (random flips off).

    With `cache`, the statistics are read from that .npz file when it holds those of the same data set
    (dataset, root, image_size, channels) and weights file, else computed and written there. With
    `accelerator` (every process must call this), they are computed only if some process lacks a valid
    cache, each process embedding its batches (batch i on process i mod num_processes), gathered to the main
    process, which writes the cache and returns the statistics (the others return None).
    """
    weights = resolve_weights(weights)
    data = dataclasses.replace(data, hflip=False)  # the statistics of the data, not of one random draw
    key = json.dumps(
        {
            "dataset": data.dataset,
            "root": str(Path(data.root).expanduser().resolve()) if data.root else None,
            "image_size": data.image_size,
            "channels": data.channels,
            "weights": weights.name,
        }
    )
    rank, world = (accelerator.process_index, accelerator.num_processes) if accelerator else (0, 1)
    cached = _cached_statistics(cache, key)
    if world > 1:  # all processes compute, or none: each one's cache may differ (a disk per machine)
        everywhere = accelerator.gather(torch.tensor([int(cached is not None)], device=accelerator.device))
        cached = cached if int(everywhere.min()) == 1 else None
    if cached is not None:
        return cached if rank == 0 else None
    dataset = build_dataset(data)
    chunks = [(start, min(batch_size, len(dataset) - start)) for start in range(0, len(dataset), batch_size)]
    mine = chunks[rank::world]
    indices = [i for start, size in mine for i in range(start, start + size)]
    loader = DataLoader(Subset(dataset, indices), batch_size=batch_size, num_workers=data.num_workers)
    features = inception_features(
        (to_uint8(images) for images, _ in loader),
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


def _cached_statistics(cache: str | Path | None, key: str) -> Statistics | None:
    """The statistics in `cache` when it holds those of `key`; a file of other data is reported."""
    if cache is None or not Path(cache).is_file():
        return None
    stats, cached_key = _read_statistics(Path(cache))
    if cached_key == key:
        return stats
    warnings.warn(
        f"{cache} holds statistics of other data or weights ({cached_key}); recomputing", stacklevel=3
    )
    return None


def source_statistics(
    source: str | Path,
    *,
    n: int = 50_000,
    weights: str | Path | None = None,
    batch_size: int = 64,
    device: torch.device | str | None = None,
    seed: int = 0,
    progress: bool = True,
) -> Statistics:
    """Inception statistics of one source: a folder of images, a YAML config (its data set), a run directory
    or checkpoint folder (`n` images from its EMA weights and `sample:` settings) or an .npz file."""
    path = Path(source)
    if path.suffix == ".npz":
        return load_statistics(path)
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist; expected {SOURCES}")
    weights = resolve_weights(weights)  # before anything slow, so that a missing file stops us at once
    if path.suffix in (".yaml", ".yml"):
        data = load_config(path).data
        return reference_statistics(
            data, weights=weights, batch_size=batch_size, device=device, progress=progress
        )
    if (path / CHECKPOINTS).is_dir() or (path / "config.yaml").is_file() or (path / "config.json").is_file():
        checkpoint = resolve_checkpoint(path)
        sample = sample_defaults(checkpoint)
        model, scheduler, which = load_for_sampling(checkpoint, use_ema=True, device=_device(device))
        if which != "ema":
            warnings.warn(f"{checkpoint} holds no EMA weights; sampling its raw weights", stacklevel=2)
        return model_statistics(
            model,
            scheduler,
            n,
            sample=sample,
            weights=weights,
            batch_size=batch_size,
            seed=seed,
            progress=progress,
        )
    if path.is_dir():
        files = _image_files(path)
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


def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray) -> float:
    """Squared Frechet (2-Wasserstein) distance of N(mu1, sigma1) and N(mu2, sigma2); mu (D,), sigma (D, D):

        d^2 = ||mu1 - mu2||^2 + Tr(sigma1 + sigma2 - 2 (sigma1 sigma2)^(1/2))   (Heusel et al. 2017, Eq. 6)

    Tr((sigma1 sigma2)^(1/2)) is the sum of the square roots of the eigenvalues of sigma1 sigma2, and those
    are real and >= 0. With sigma1 = W W^T (W = eigenvectors * sqrt(eigenvalues), D x r, r the rank),
    W (W^T sigma2) has the nonzero eigenvalues of (W^T sigma2) W, a symmetric positive semi-definite r x r
    matrix: two symmetric eigendecompositions give them in real arithmetic. That needs none of the repairs of
    scipy.linalg.sqrtm applied to the non-symmetric product (complex parts, eps * I for a singular product),
    is some fifty times faster at D = 2048, and cheaper still when few images make sigma1 low-rank.
    Eigenvalues within rounding error of 0 count as 0 (`_nonzero`).
    """
    mu1, mu2 = np.asarray(mu1, dtype=np.float64), np.asarray(mu2, dtype=np.float64)
    sigma1, sigma2 = np.asarray(sigma1, dtype=np.float64), np.asarray(sigma2, dtype=np.float64)
    d = mu1.shape[0]
    if mu1.shape != (d,) or mu2.shape != (d,) or sigma1.shape != (d, d) or sigma2.shape != (d, d):
        raise ValueError(
            f"statistics do not match: mu {mu1.shape} and {mu2.shape}, sigma {sigma1.shape} and "
            f"{sigma2.shape}; expected (D,) and (D, D) for one feature dimension D"
        )
    values, vectors = np.linalg.eigh(sigma1)
    kept = _nonzero(values, d)
    w = vectors[:, kept] * np.sqrt(values[kept])  # (D, r): sigma1 = w w^T
    product_eigenvalues = np.linalg.eigvalsh(w.T @ sigma2 @ w)  # (r,): the nonzero ones of sigma1 sigma2
    trace_sqrt = np.sqrt(product_eigenvalues[_nonzero(product_eigenvalues, d)]).sum()
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2.0 * trace_sqrt)


def statistics(features: np.ndarray) -> Statistics:
    """Mean (D,) and unbiased covariance (D, D), in float64, of features (N, D); warns when N < 2048."""
    features = np.asarray(features, dtype=np.float64)
    if features.ndim != 2 or len(features) < 2:
        raise ValueError(f"need features of at least 2 images as an (N, D) array, got shape {features.shape}")
    if len(features) < FEATURE_DIM:
        warnings.warn(
            f"FID statistics of only {len(features)} images (fewer than {FEATURE_DIM}): the covariance is "
            "singular and FID is biased upwards; papers use 50,000 images",
            stacklevel=2,
        )
    return Statistics(features.mean(axis=0), np.cov(features, rowvar=False), len(features))


@torch.no_grad()
def inception_features(
    images: torch.Tensor | Iterable[torch.Tensor],
    *,
    weights: str | Path | None = None,
    batch_size: int = 64,
    device: torch.device | str | None = None,
    total: int | None = None,
    progress: bool = True,
    allow_empty: bool = False,
) -> np.ndarray:
    """Inception pool3 features (N, 2048) float64 of uint8 images (N, C, H, W), C = 1 or 3, any H and W.

    `images` is one tensor or an iterable of such batches (read or generated lazily); each batch is run in
    pieces of at most `batch_size`. `total` (the number of images, when known) sizes the progress bar.
    The network runs in float32 even inside an autocast region. No images: ValueError, or (0, 2048) features
    with `allow_empty`.
    """
    device = _device(device)
    network = _inception(resolve_weights(weights), device)
    batches = [images] if isinstance(images, torch.Tensor) else images
    features = []
    with tqdm(total=total, desc="FID features", unit="img", disable=not progress) as bar:
        for batch in batches:
            for piece in _as_rgb_uint8(batch).split(batch_size):
                with torch.autocast(device.type, enabled=False):
                    (pool3,) = network(piece.to(device))  # (n, 3, H, W) uint8 -> (n, 2048) float32
                features.append(pool3.double().cpu().numpy())
                bar.update(len(piece))
    if not features and not allow_empty:
        raise ValueError("no images to compute Inception features of")
    return np.concatenate(features) if features else np.zeros((0, FEATURE_DIM))


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """Float images in [-1, 1] -> uint8, shape kept: the values `save_image(x, normalize=True,
    value_range=(-1, 1))` writes to a PNG, floor((clamp(x, -1, 1) + 1) / 2 * 255 + 0.5), in the same float32
    operations."""
    return images.float().clamp(-1, 1).add(1).div(2).mul(255).add(0.5).clamp(0, 255).to(torch.uint8)


def resolve_weights(weights: str | Path | None = None) -> Path:
    """The Inception weights file: `weights`, else $DDPM_FID_WEIGHTS, else DEFAULT_WEIGHTS.

    Raises WeightsNotFoundError, a one-line message naming where the file was expected and its URL.
    """
    path = Path(weights or os.environ.get(WEIGHTS_ENV) or DEFAULT_WEIGHTS).expanduser()
    if not path.is_file():
        raise WeightsNotFoundError(
            f"Inception weights for FID not found at {path}: download {WEIGHTS_URL} and put it there "
            f"(or pass --weights FILE, or set {WEIGHTS_ENV}=FILE)"
        )
    return path


def save_statistics(stats: Statistics, path: str | Path, *, key: str = "") -> Path:
    """Write statistics as an .npz (mu, sigma, n, and `key` describing what they are of), atomically."""
    path = Path(path)
    with atomic_write(path) as tmp, open(tmp, "wb") as f:
        np.savez(f, mu=stats.mu, sigma=stats.sigma, n=stats.n, key=key)
    return path


def load_statistics(path: str | Path) -> Statistics:
    """Read statistics written by `save_statistics`."""
    return _read_statistics(Path(path))[0]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m ddpm.fid", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("real", help="reference images: " + SOURCES)
    parser.add_argument("fake", help="images to score: " + SOURCES)
    parser.add_argument(
        "--n", type=int, default=50_000, help="images sampled from a run directory (default: %(default)s)"
    )
    parser.add_argument(
        "--weights", help=f"Inception weights file (default: ${WEIGHTS_ENV}, else {DEFAULT_WEIGHTS})"
    )
    parser.add_argument("--batch-size", type=int, default=64, help="images per forward pass")
    parser.add_argument("--device", help="e.g. cuda, cuda:1, cpu (default: cuda when available)")
    parser.add_argument("--seed", type=int, default=0, help="sampled image i starts from noise seeded seed+i")
    parser.add_argument("--save-stats", metavar="FILE", help="also write REAL's statistics to FILE (.npz)")
    args = parser.parse_args(argv)
    try:
        with warnings.catch_warnings():
            warnings.showwarning = _print_warning
            real, fake = _source_pair(
                args.real,
                args.fake,
                n=args.n,
                weights=args.weights,
                batch_size=args.batch_size,
                device=args.device,
                seed=args.seed,
                progress=True,
            )
        if args.save_stats:
            save_statistics(real, args.save_stats, key=f"python -m ddpm.fid {args.real}")
        distance = frechet_distance(real.mu, real.sigma, fake.mu, fake.sigma)
    except (FileNotFoundError, ValueError, CheckpointError) as error:
        sys.exit(f"error: {error}")
    print(f"real: {real.n} images ({args.real}); fake: {fake.n} images ({args.fake})", file=sys.stderr)
    print(f"{distance:.4f}")


def _source_pair(
    real, fake, *, n, weights, batch_size, device, seed, progress
) -> tuple[Statistics, Statistics]:
    if n <= 0:
        raise ValueError(f"the number of images to sample must be positive, got {n}")
    if any(Path(s).suffix != ".npz" for s in (real, fake)):
        weights = resolve_weights(weights)  # checked before the first source's (maybe long) work
    options = dict(n=n, weights=weights, batch_size=batch_size, device=device, seed=seed, progress=progress)
    return source_statistics(real, **options), source_statistics(fake, **options)


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
    sample: SampleConfig,
    batch_size: int,
    seed: int,
) -> Iterator[torch.Tensor]:
    """uint8 images from `generate`, one batch per chunk of `_chunks` (image i seeded seed + i)."""
    config = model.config
    shape = (config["in_channels"], config["image_size"], config["image_size"])
    for start, size in chunks:
        images = generate(
            model,
            scheduler,
            size,
            image_shape=shape,
            sampler=sample.sampler,
            steps=sample.steps,
            eta=sample.eta,
            guidance_scale=sample.guidance_scale,
            seed=seed + start,
            batch_size=batch_size,
            device=next(model.parameters()).device,
        )
        yield to_uint8(images)


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
                arrays.append(np.asarray(_convert(image, "RGB")))  # (H, W, 3)
            shape = shape or arrays[-1].shape
            if arrays[-1].shape != shape:
                raise ValueError(
                    f"{file} is {arrays[-1].shape[1]}x{arrays[-1].shape[0]} pixels but {files[0]} is "
                    f"{shape[1]}x{shape[0]}: FID compares images of one size; resize them first"
                )
        yield torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2)


def _as_rgb_uint8(batch: torch.Tensor) -> torch.Tensor:
    if batch.dtype != torch.uint8:
        raise TypeError(f"expected uint8 images, got {batch.dtype}; convert samples in [-1, 1] with to_uint8")
    if batch.ndim != 4 or batch.shape[1] not in (1, 3):
        raise ValueError(f"expected images (N, 1 or 3, H, W), got shape {tuple(batch.shape)}")
    return batch.expand(-1, 3, -1, -1)


def _inception(weights: Path, device: torch.device) -> torch.nn.Module:
    stat = weights.stat()
    return _load_inception(str(weights), stat.st_mtime_ns, stat.st_size, str(device))


@functools.lru_cache(maxsize=1)  # one network kept, so that FID during training does not reload it each time
def _load_inception(path: str, mtime_ns: int, size: int, device: str) -> torch.nn.Module:
    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3  # slow to import

    hint = f"expected torch-fidelity's Inception weights, {WEIGHTS_URL}"
    try:
        # torch-fidelity unpickles the file without restrictions: a tensors-only load first refuses code.
        torch.load(path, map_location="cpu", weights_only=True)
        network = FeatureExtractorInceptionV3(
            "inception-v3-compat", ["2048"], feature_extractor_weights_path=path
        )
    except (OSError, RuntimeError, EOFError, pickle.UnpicklingError) as error:
        raise ValueError(f"cannot load {path} ({str(error).splitlines()[0]}); {hint}") from None
    return network.to(device).eval()


def _nonzero(eigenvalues: np.ndarray, dim: int) -> np.ndarray:
    """Mask of the eigenvalues of a positive semi-definite matrix computed at size `dim` that are above the
    rounding noise: numpy.linalg.matrix_rank's tolerance, dim * eps * the largest. The square roots of the
    others (true zeros blurred to ~1e-16 of the largest, as in the null space of a covariance of few images)
    would each add ~1e-8 of the largest, and there can be thousands."""
    return eigenvalues > dim * np.finfo(np.float64).eps * eigenvalues.max(initial=0.0)


def _read_statistics(path: Path) -> tuple[Statistics, str]:
    try:
        with np.load(path) as f:
            return Statistics(f["mu"], f["sigma"], int(f["n"])), str(f["key"])
    except (OSError, KeyError, ValueError) as error:
        raise ValueError(f"{path} is not a file of FID statistics written by ddpm.fid ({error})") from None


def _device(device: torch.device | str | None) -> torch.device:
    return torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))


def _print_warning(message, category, filename, lineno, file=None, line=None) -> None:
    print(f"warning: {message}", file=sys.stderr)
