"""`python -m ddpm.nll RUN_OR_CHECKPOINT [--data CONFIG] [--n N] [--batch B]`: the negative log-likelihood of
a model on a data set in bits per dimension, as improved-diffusion's image_nll reports it.

For each image, the whole variational bound (`ddpm.vlb.variational_bound`): the prior term at T, the KL
terms of every timestep and the discretised Gaussian decoder's NLL at t = 0 (Ho et al. 2020, Eq. 5 and
Sec. 3.3), one network call per timestep (T calls per batch), with the model's variance (fixed or learned:
its noise_scheduler.json). Printed: the mean over N images and its standard error over images. Images are
the data set's first N in order, quantised to 8 bits as PNGs would hold them (the decoder's 256 levels); a
class-conditional model is scored on each image's label (-log p(x | y)), or on the null label where the data
has none. The EMA weights, unless --raw. Data: the run's `data:` section (its config.yaml), or that of the
config file --data names.

This module loads models (`ddpm.inference`): it sits above it, and nothing in ddpm imports it.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import NamedTuple

import torch
from torch import Tensor

from ddpm.config import ConfigError, DataConfig, load_config
from ddpm.data import DataError, build_dataset
from ddpm.inference import load_for_sampling
from ddpm.io import CheckpointError
from ddpm.progress import progress_bar
from ddpm.run_dir import RUN_CONFIG
from ddpm.samplers import denoiser
from ddpm.schedule import NoiseScheduler
from ddpm.vlb import variational_bound


class Likelihood(NamedTuple):
    """The bound of a model on a data set, in bits/dim (`image_nll`)."""

    bits_per_dim: float  # mean over the images
    stderr: float  # standard error of that mean: std over images / sqrt(n)
    n: int  # images scored
    per_image: Tensor  # (n,) float64: each image's bound
    terms: Tensor  # (T,) float64: each timestep's term, averaged over the images (t = 0: the decoder)
    prior: float  # the prior term, averaged


def quantize(images: Tensor) -> Tensor:
    """Images in [-1, 1] rounded to the 256 levels of 8-bit pixels, -1 + 2k / 255: what the discretised
    decoder scores."""
    return torch.round((images.clamp(-1, 1) + 1) * 127.5) / 127.5 - 1


@torch.no_grad()
def image_nll(
    model: torch.nn.Module,
    scheduler: NoiseScheduler,
    dataset: torch.utils.data.Dataset,
    *,
    n: int,
    batch_size: int = 64,
    seed: int = 0,
    progress: bool = True,
) -> Likelihood:
    """The variational bound of `model` on the first `n` images of `dataset` ((image (C, H, W) in [-1, 1],
    label) pairs, quantised here), `batch_size` at a time, on the model's device in float32; the noise of
    each batch's T draws x_t ~ q(x_t | x0) comes from a CPU generator seeded `seed` (results do not depend
    on the device, but do on the batch size). Labels: a class-conditional model gets each image's label, or
    its null label for an image without one (-1)."""
    if not 1 <= n <= len(dataset):
        raise ValueError(f"n must be in 1..{len(dataset)} (the images of the data set), got {n}")
    if batch_size < 1:
        raise ValueError(f"batch size must be >= 1, got {batch_size}")
    device = next(model.parameters()).device
    generator = torch.Generator().manual_seed(seed)
    conditional = getattr(model, "num_classes", None) is not None
    loader = torch.utils.data.DataLoader(torch.utils.data.Subset(dataset, range(n)), batch_size=batch_size)
    bounds, terms, priors = [], [], []
    with progress_bar(total=n, unit="image", show=progress, desc="bits/dim") as bar:
        for images, labels in loader:
            x0 = quantize(images.float()).to(device)
            if conditional and int(labels.max()) >= model.num_classes:
                raise ValueError(
                    f"the data has label {int(labels.max())} but the model has num_classes="
                    f"{model.num_classes}: score it on its own data set (--data with the run's config)"
                )
            y = torch.where(labels < 0, model.null_class, labels).to(device) if conditional else None
            bound = variational_bound(denoiser(model, scheduler, y=y), scheduler, x0, generator=generator)
            bounds.append(bound.total.double().cpu())
            terms.append(bound.terms.double().sum(dim=0).cpu())
            priors.append(bound.prior.double().sum().item())
            bar.update(len(x0))
            bar.set_postfix(mean=f"{torch.cat(bounds).mean().item():.4f}")
    per_image = torch.cat(bounds)
    stderr = per_image.std().item() / n**0.5 if n > 1 else float("nan")
    return Likelihood(
        per_image.mean().item(), stderr, n, per_image, torch.stack(terms).sum(dim=0) / n, sum(priors) / n
    )


def main(argv: list[str] | None = None) -> None:
    """Parse the command line, print `bits/dim: MEAN +- STDERR (...)` on stdout; bad input exits with one
    line `error: ...` and status 1."""
    parser = argparse.ArgumentParser(
        prog="python -m ddpm.nll", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "checkpoint", help="a run directory (its latest checkpoint), a checkpoint or a model folder"
    )
    parser.add_argument("--data", help="a config file whose data: section to score on (default: the run's)")
    parser.add_argument("--n", type=int, help="images scored, the data set's first (default: 1000, or all)")
    parser.add_argument("--batch", type=int, default=64, help="images per batch (default: %(default)s)")
    parser.add_argument("--raw", action="store_true", help="the raw weights instead of the EMA ones")
    parser.add_argument("--device", help="e.g. cuda, cpu (default: cuda when available)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the noise draws (default: %(default)s)")
    parser.add_argument(
        "--json", metavar="OUT", help="also write the numbers (and the mean of each term) here"
    )
    args = parser.parse_args(argv)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    try:
        loaded = load_for_sampling(args.checkpoint, use_ema=not args.raw, device=device)
        data = _data_section(args.data, loaded.run_dir)
        dataset = build_dataset(DataConfig(**{**vars(data), "hflip": False}))
        n = args.n if args.n is not None else min(1000, len(dataset))
        result = image_nll(
            loaded.model, loaded.scheduler, dataset, n=n, batch_size=args.batch, seed=args.seed
        )
    except (CheckpointError, ConfigError, DataError, ValueError, OSError) as error:
        sys.exit(f"error: {error}")
    T = loaded.scheduler.num_train_timesteps
    print(
        f"bits/dim: {result.bits_per_dim:.4f} +- {result.stderr:.4f} (standard error over {result.n} images "
        f"of {data.dataset}; variational bound over T = {T} terms, {loaded.weights} weights, "
        f"variance {loaded.scheduler.variance_type}; decoder term {result.terms[0].item():.4f}, prior "
        f"{result.prior:.2e})"
    )
    if args.json:
        payload = {
            "bits_per_dim": result.bits_per_dim,
            "stderr": result.stderr,
            "n": result.n,
            "prior": result.prior,
            "terms": result.terms.tolist(),
            "checkpoint": str(loaded.folder),
            "weights": loaded.weights,
            "dataset": data.dataset,
        }
        Path(args.json).write_text(json.dumps(payload, indent=2) + "\n")


def _data_section(config: str | None, run: Path | None) -> DataConfig:
    """The data section of the config file named, else of the run's config.yaml."""
    if config is not None:
        return load_config(config).data
    if run is None:
        raise ConfigError(
            "this model folder belongs to no run, so its data set is unknown: pass --data CONFIG"
        )
    return load_config(run / RUN_CONFIG).data


if __name__ == "__main__":
    main()
