"""Diffusion segmentation ensembles (Wolleb et al. 2022, "Diffusion Models for Implicit Image Segmentation
Ensembles"): a model trained to generate a mask given an image (configs/segment_digits.yaml) samples K masks
per image; their per-pixel mean is the segmentation and their per-pixel variance the uncertainty map.

    python -m ddpm.segment RUN --images test --k 8 --out DIR     (also `ddpm segment`, `ddpm-segment`)

--images is a folder of images (or one image), read as training data are, or a split ("train", "test") of the
run's own data set when that set gives image/mask pairs (digit_masks), whose true masks are then scored.
DIR receives mean/NNNNNN.png and variance/NNNNNN.png per image (the variance times 4, so that white is the
most two outcomes can disagree, 0.25), grid.png (rows: the images, the means, the variances, and the true
masks when known; the first GRID_IMAGES images), segmentation.safetensors (the same tensors unquantised) and,
with true masks, metrics.json: the Dice of the mean thresholded at 0.5 and the AUROC of the variance against
the pixels that mean gets wrong (`dice`, `auroc`).

Sampler settings are the run's `sample:` section; sample k of image i starts from the noise of seed
`seed + i * K + k` (`ddpm.inference.generate`), whatever the batch size.

Exit status: 0 with DIR on stdout; 1 with a one-line `error: ...` on stderr for bad input.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import NamedTuple

import torch
from safetensors.torch import save_file
from sklearn.metrics import roc_auc_score
from torch import Tensor
from torchvision.utils import save_image

from ddpm.conditions import Conditions
from ddpm.config import DATASET_CONDITIONS, ConfigError, load_config
from ddpm.data import DataError, digit_masks, read_images
from ddpm.digit_masks import COPIES
from ddpm.inference import generate, load_for_sampling, save_images_to
from ddpm.io import CheckpointError
from ddpm.prog import command_name
from ddpm.run_dir import RUN_CONFIG

GRID_IMAGES = 16  # the images grid.png shows
THRESHOLD = 0.5  # the mean's threshold: a pixel is in the segmentation when most samples put it there


class Segmentation(NamedTuple):
    """What `segment` computes for N images of side S, K samples each; all float32 on the CPU."""

    images: Tensor  # (N, 1, S, S) the images segmented, in [-1, 1]
    samples: Tensor  # (N, K, 1, S, S) the sampled masks as probabilities: (x + 1) / 2, in [0, 1]
    mean: Tensor  # (N, 1, S, S) their mean over K: the segmentation, in [0, 1]
    variance: Tensor  # (N, 1, S, S) their variance over K (divided by K): the uncertainty, in [0, 0.25]
    truth: Tensor | None  # (N, 1, S, S) the true masks, 0 or 1, when the images came with them


def segment(
    run: str | Path,
    images: str | Path,
    *,
    k: int = 8,
    out: str | Path,
    n: int | None = None,
    seed: int = 0,
    batch_size: int | None = 256,
    use_ema: bool = True,
    device: torch.device | str = "cpu",
) -> Segmentation:
    """Sample `k` masks per image from the mask model in `run` (a run directory, checkpoint or model folder
    conditioned on a 1-channel image: model.cond_channels=1) and write their mean and variance to `out` (see
    the module docstring for the files). images: a folder or image file, or "train"/"test" for that split of
    the run's data set (digit_masks), which gives the true masks too; n: only the first n of them (None:
    all). batch_size: masks sampled per network
    call (None: all N * k at once). Raises ValueError (CheckpointError, ConfigError, DataError among them)
    naming the problem and its fix."""
    if k < 2:
        raise ValueError(f"--k {k}: the variance needs at least 2 samples per image")
    loaded = load_for_sampling(run, use_ema=use_ema, device=device)
    model = loaded.model
    if getattr(model, "cond_channels", None) != 1 or getattr(model, "num_classes", None):
        raise ValueError(
            f"{run} is not a mask model: it must be conditioned on a 1-channel image alone "
            "(model.cond_channels=1, no num_classes), as configs/segment_digits.yaml trains"
        )
    size = model.config["image_size"]
    pictures, truth = _read(images, loaded.run_dir, size)
    if n is not None and n < 1:
        raise ValueError(f"--n {n}: segment at least 1 image, or leave --n out for all")
    pictures, truth = pictures[:n], None if truth is None else truth[:n]
    n = len(pictures)
    cond = Conditions({"image": pictures}).repeat_interleave(k)  # row i * k + j: image i
    settings = loaded.sampling.sampler_settings()
    masks = generate(
        model,
        loaded.scheduler,
        n * k,
        image_shape=(1, size, size),
        **settings,
        cond=cond,
        seed=seed,
        batch_size=batch_size,
        device=device,
        progress=True,
    )  # (N * K, 1, S, S) in [-1, 1]
    samples = masks.add(1).div(2).clamp(0, 1).view(n, k, 1, size, size)
    result = Segmentation(
        pictures, samples, samples.mean(1), samples.var(1, unbiased=False), None if truth is None else truth
    )
    _write(result, Path(out))
    return result


def dice(prediction: Tensor, truth: Tensor) -> Tensor:
    """The Dice coefficient of each image, 2 |P & T| / (|P| + |T|), from bool masks (N, ...) -> (N,) float;
    1 where both masks are empty (nothing to find, nothing found)."""
    prediction, truth = prediction.flatten(1).float(), truth.flatten(1).float()
    overlap, total = (prediction * truth).sum(1), prediction.sum(1) + truth.sum(1)
    return torch.where(total > 0, 2 * overlap / total.clamp_min(1), torch.ones_like(total))


def auroc(scores: Tensor, positives: Tensor) -> float:
    """The area under the ROC curve of `scores` ranking the `positives` (bool, same shape) above the others:
    the probability that a random positive scores higher than a random negative, ties counting one half.
    ValueError when there are no positives or no negatives."""
    positives = positives.flatten().bool()
    if positives.all() or not positives.any():
        raise ValueError("AUROC needs both positives and negatives, got only one kind")
    return float(roc_auc_score(positives.numpy(), scores.flatten().double().numpy()))


def metrics(result: Segmentation) -> dict[str, float]:
    """The ensemble's scores against the true masks: the mean Dice over images of the mean thresholded at
    THRESHOLD, and the AUROC of the variance against the pixels that thresholded mean gets wrong."""
    if result.truth is None:
        raise ValueError("no true masks: metrics need images that came with them")
    prediction, truth = result.mean > THRESHOLD, result.truth > 0.5
    return {
        "dice": dice(prediction, truth).mean().item(),
        "auroc_variance_vs_error": auroc(result.variance, prediction != truth),
        "images": len(truth),
        "k": result.samples.shape[1],
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog=command_name("ddpm.segment"),
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("run", help="the mask model: a run directory, a checkpoint or a model folder")
    parser.add_argument(
        "--images", required=True, help="a folder of images, one image, or 'train'/'test' (the run's data)"
    )
    parser.add_argument("--k", type=int, default=8, help="masks sampled per image (default: %(default)s)")
    parser.add_argument("--out", required=True, help="the folder to write to")
    parser.add_argument("--n", type=int, help="segment only the first N images (default: all)")
    parser.add_argument("--seed", type=int, default=0, help="the first noise seed (default: %(default)s)")
    parser.add_argument("--batch-size", type=int, default=256, help="masks per network call (default: 256)")
    parser.add_argument("--raw", action="store_true", help="the raw weights instead of the EMA ones")
    parser.add_argument("--device", help="e.g. cuda, cpu (default: cuda when available)")
    args = parser.parse_args(argv)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    try:
        result = segment(
            args.run,
            args.images,
            k=args.k,
            out=args.out,
            n=args.n,
            seed=args.seed,
            batch_size=args.batch_size,
            use_ema=not args.raw,
            device=device,
        )
    except (CheckpointError, ConfigError, DataError, ValueError, OSError) as error:
        sys.exit(f"error: {error}")
    if result.truth is not None:
        scores = metrics(result)
        print(
            f"Dice {scores['dice']:.4f}, AUROC of the variance against the mean's errors "
            f"{scores['auroc_variance_vs_error']:.4f} ({scores['images']} images, K = {args.k})",
            file=sys.stderr,
        )
    print(args.out)


def _read(images: str | Path, run_dir: Path | None, size: int) -> tuple[Tensor, Tensor | None]:
    """The images to segment, (N, 1, S, S) in [-1, 1], and their true masks (N, 1, S, S) in {0, 1} or None:
    a split of the run's digit_masks data, or image files."""
    if str(images) not in COPIES:
        return read_images(images, image_size=size, channels=1)[0], None
    data = load_config(run_dir / RUN_CONFIG).data if run_dir is not None else None
    pairs = [name for name, kinds in DATASET_CONDITIONS.items() if "image" in kinds]
    if data is None or data.dataset not in pairs:
        raise ValueError(
            f"--images {images} names a split of the run's data set, but the model was not trained on "
            f"image/mask pairs (data.dataset: {', '.join(pairs)}): pass a folder of images"
        )
    pictures, masks, _ = digit_masks(str(images), image_size=size)
    return pictures, masks.add(1).div(2)


def _write(result: Segmentation, out: Path) -> None:
    """The files of `segment` (the module docstring) under `out`."""
    out.mkdir(parents=True, exist_ok=True)
    save_images_to(result.mean * 2 - 1, out / "mean")
    save_images_to(result.variance * 8 - 1, out / "variance")  # 4 x variance, in [-1, 1]
    shown = slice(0, GRID_IMAGES)
    rows = [result.images[shown].add(1).div(2), result.mean[shown], 4 * result.variance[shown]]
    rows += [] if result.truth is None else [result.truth[shown]]
    save_image(torch.cat(rows), out / "grid.png", nrow=len(rows[0]), padding=1, pad_value=0.5)
    tensors = {"images": result.images, "mean": result.mean, "variance": result.variance}
    tensors |= {} if result.truth is None else {"truth": result.truth}
    save_file({name: t.contiguous() for name, t in tensors.items()}, str(out / "segmentation.safetensors"))
    if result.truth is not None:
        (out / "metrics.json").write_text(json.dumps(metrics(result), indent=2) + "\n")


if __name__ == "__main__":
    main()
