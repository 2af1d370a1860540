"""The metrics: Inception pool3 features of uint8 images, their Gaussian statistics and the Frechet distance
between two such Gaussians (FID), the kernel distance (KID) and precision and recall between two sets of
features (`compare`), with the Inception weights file and .npz files of statistics. The recipe, step by step,
is in `ddpm.fid`'s docstring. torch-fidelity (the `fid` extra) provides the network, KID and precision/recall;
without it this module imports, and what needs it raises MissingDependencyError."""

from __future__ import annotations

import functools
import os
import pickle
import warnings
from collections.abc import Iterable
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch

from ddpm.io import atomic_write
from ddpm.progress import progress_bar

try:  # the fid extra (pip install "ddpm[fid]"): the core installs, imports and trains without it
    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3
    from torch_fidelity.metric_kid import kid_features_to_metric
    from torch_fidelity.metric_prc import prc_features_to_metric
except ImportError:
    FeatureExtractorInceptionV3 = kid_features_to_metric = prc_features_to_metric = None

FID_EXTRA = 'pip install "ddpm[fid]"'
# The file torch-fidelity itself downloads (its URL_INCEPTION_V3); tests check that the two agree.
WEIGHTS_URL = "https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/weights-inception-2015-12-05-6726825d.pth"
WEIGHTS_FILE = WEIGHTS_URL.rsplit("/", 1)[1]
WEIGHTS_ENV = "DDPM_FID_WEIGHTS"
FEATURE_DIM = 2048  # Inception pool3 features; fewer images than this give a singular covariance
# torch-fidelity's defaults: KID (Binkowski et al. 2018) is the mean, over 100 random subsets of 1000 images
# of each set, of the unbiased MMD^2 with the kernel k(x, y) = (x.y / D + 1)^3; precision and recall
# (Kynkaanniemi et al. 2019) count the images inside the union of balls reaching each image's 3rd nearest
# neighbour.
KID_SUBSETS, KID_SUBSET_SIZE, PRC_NEIGHBORHOOD = 100, 1000, 3
KID_SEED = 2020  # torch-fidelity's rng_seed: which subsets


class WeightsNotFoundError(FileNotFoundError):
    """The Inception weights file is not where it was looked for; the message says where to get it."""


class MissingDependencyError(ImportError):
    """torch-fidelity (the `fid` extra) is not installed; the message is one line with the pip command."""


class Statistics(NamedTuple):
    """The Gaussian fitted to a set of Inception features, and the features (for KID and precision/recall)."""

    mu: np.ndarray  # (D,) float64 mean feature
    sigma: np.ndarray  # (D, D) float64 covariance (unbiased: divided by n - 1)
    n: int  # number of images
    features: np.ndarray | None = None  # (n, D) float32; None in .npz files written before KID (FID only)


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
    """Mean (D,) and unbiased covariance (D, D), in float64, of features (N, D), kept too (as float32);
    warns when N < 2048."""
    features = np.asarray(features, dtype=np.float64)
    if features.ndim != 2 or len(features) < 2:
        raise ValueError(f"need features of at least 2 images as an (N, D) array, got shape {features.shape}")
    if len(features) < FEATURE_DIM:
        warnings.warn(
            f"FID statistics of only {len(features)} images (fewer than {FEATURE_DIM}): the covariance is "
            "singular and FID is biased upwards; papers use 50,000 images",
            stacklevel=2,
        )
    return Statistics(
        features.mean(axis=0), np.cov(features, rowvar=False), len(features), features.astype(np.float32)
    )


def compare(real: Statistics, fake: Statistics) -> dict[str, float]:
    """The metrics of `fake` against `real`: "fid" (`frechet_distance`), and where both hold features,
    "kid" and "kid_std" (the mean and standard deviation over subsets of KID) and "precision" and "recall"
    (the fraction of fake images within the real images' 3-NN balls, and of real ones within the fakes'),
    with torch-fidelity's own functions and defaults (KID_SUBSETS, KID_SUBSET_SIZE, PRC_NEIGHBORHOOD).

    KID's subsets shrink to the smaller set when it has fewer than 1000 images (with a warning: such KID is
    noisier, and is not comparable with published numbers); precision and recall need 4 images a side.
    Precision and recall are computed on the Inception features, as guided-diffusion's evaluator does;
    torch-fidelity's own default for them is VGG-16 features, so its numbers differ.
    """
    out = {"fid": frechet_distance(real.mu, real.sigma, fake.mu, fake.sigma)}
    if real.features is None or fake.features is None:
        return out
    require_fidelity()
    size = min(KID_SUBSET_SIZE, len(real.features), len(fake.features))
    if size < KID_SUBSET_SIZE:
        warnings.warn(
            f"KID from subsets of {size} images (fewer than {KID_SUBSET_SIZE}): noisier than published KID",
            stacklevel=2,
        )
    # torch-fidelity's convention: input 1 is generated, input 2 real.
    fake_features, real_features = torch.from_numpy(fake.features), torch.from_numpy(real.features)
    kid = kid_features_to_metric(
        fake_features.double(),
        real_features.double(),
        kid_subsets=KID_SUBSETS,
        kid_subset_size=size,
        rng_seed=KID_SEED,
        verbose=False,
    )
    out |= {"kid": kid["kernel_inception_distance_mean"], "kid_std": kid["kernel_inception_distance_std"]}
    if min(len(real.features), len(fake.features)) > PRC_NEIGHBORHOOD:
        device = resolve_device(None)
        prc = prc_features_to_metric(
            fake_features.to(device),
            real_features.to(device),
            prc_neighborhood=PRC_NEIGHBORHOOD,
            save_cpu_ram=True,  # distances a batch of rows at a time, not an n x n matrix
            verbose=False,
        )
        out |= {"precision": prc["precision"], "recall": prc["recall"]}
    return out


def require_fidelity() -> None:
    """Raise MissingDependencyError, saying how to install it, when torch-fidelity is missing."""
    if FeatureExtractorInceptionV3 is None:
        raise MissingDependencyError(
            f"FID, KID and precision/recall need torch-fidelity, which is not installed: {FID_EXTRA}"
        )


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
    device = resolve_device(device)
    network = _inception(resolve_weights(weights), device)
    batches = [images] if isinstance(images, torch.Tensor) else images
    features = []
    with progress_bar(total=total, desc="FID features", unit="img", show=progress) as bar:
        for batch in batches:
            for piece in _as_rgb_uint8(batch).split(batch_size):
                with torch.autocast(device.type, enabled=False):
                    (pool3,) = network(piece.to(device))  # (n, 3, H, W) uint8 -> (n, 2048) float32
                features.append(pool3.double().cpu().numpy())
                bar.update(len(piece))
    if not features and not allow_empty:
        raise ValueError("no images to compute Inception features of")
    return np.concatenate(features) if features else np.zeros((0, FEATURE_DIM))


def default_weights() -> Path:
    """Where torch-fidelity keeps the Inception weights it downloads, torch.hub's checkpoints folder
    ($TORCH_HOME/hub/checkpoints, by default ~/.cache/torch/hub/checkpoints), so that either finds the other's
    copy."""
    return Path(torch.hub.get_dir()) / "checkpoints" / WEIGHTS_FILE


def resolve_weights(weights: str | Path | None = None) -> Path:
    """The Inception weights file: `weights`, else $DDPM_FID_WEIGHTS, else `default_weights()`, which is
    downloaded from WEIGHTS_URL on first use (as torch-fidelity does) when it is not there.

    Raises WeightsNotFoundError, a one-line message naming where the file was expected and its URL: for a
    file named by `weights` or the variable that does not exist, and when the download fails (offline).
    """
    named = weights or os.environ.get(WEIGHTS_ENV)
    path = Path(named).expanduser() if named else default_weights()
    if path.is_file():
        return path
    fix = f"or pass --weights FILE, or set {WEIGHTS_ENV}=FILE"
    if named:
        raise WeightsNotFoundError(
            f"Inception weights for FID not found at {path}: download {WEIGHTS_URL} and put it there ({fix})"
        )
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.hub.download_url_to_file(WEIGHTS_URL, str(path), progress=True)
    except OSError as error:  # urllib's URLError and HTTPError are OSErrors
        reason = str(getattr(error, "reason", None) or error).splitlines()[0]
        raise WeightsNotFoundError(
            f"Inception weights for FID not found at {path}, and downloading {WEIGHTS_URL} failed "
            f"({reason}): download it on a machine with internet and put it there ({fix})"
        ) from None
    return path


def resolve_device(device: torch.device | str | None) -> torch.device:
    """`device`, else CUDA when available, else the CPU."""
    return torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))


def save_statistics(stats: Statistics, path: str | Path, *, key: str = "") -> Path:
    """Write statistics as an .npz (mu, sigma, n, the features when there are some, and `key` describing
    what they are of), atomically. The features make it 4 bytes x 2048 per image (410 MB for 50,000)."""
    path = Path(path)
    features = {} if stats.features is None else {"features": stats.features}
    with atomic_write(path) as tmp, open(tmp, "wb") as f:
        np.savez(f, mu=stats.mu, sigma=stats.sigma, n=stats.n, key=key, **features)
    return path


def load_statistics(path: str | Path) -> Statistics:
    """Read statistics written by `save_statistics`."""
    return _read_statistics(Path(path))[0]


def cached_statistics(cache: str | Path | None, key: str) -> Statistics | None:
    """The statistics in the .npz file `cache` when it holds those of `key` (as `save_statistics` wrote it);
    None when there is no such file, or, with a warning, when it holds those of another key."""
    if cache is None or not Path(cache).is_file():
        return None
    stats, cached_key = _read_statistics(Path(cache))
    if cached_key == key:
        return stats
    warnings.warn(
        f"{cache} holds statistics of other data or weights ({cached_key}); recomputing", stacklevel=3
    )
    return None


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
    require_fidelity()
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
            features = f["features"] if "features" in f.files else None
            return Statistics(f["mu"], f["sigma"], int(f["n"]), features), str(f["key"])
    except (OSError, KeyError, ValueError) as error:
        raise ValueError(f"{path} is not a file of FID statistics written by ddpm.fid ({error})") from None
