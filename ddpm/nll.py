"""`python -m ddpm.nll RUN_OR_CHECKPOINT [--data CONFIG] [--split train|test] [--n N] [--batch B]`: the
negative log-likelihood of a model on a data set in bits per dimension, as improved-diffusion's image_nll
reports it.

For each image, the whole variational bound (`ddpm.vlb.variational_bound`): the prior term at T, the KL
terms of every timestep and the discretised Gaussian decoder's NLL at t = 0 (Ho et al. 2020, Eq. 5 and
Sec. 3.3), with the model's variance (fixed or learned: its noise_scheduler.json). That is T network
evaluations per image: the N x T rows (image, timestep) go B to a network call, many timesteps in one call,
ceil(N T / B) calls, announced on stderr before the start and counted by the progress bar. Printed: the mean
over N images and its standard error over images. Images are the split's first N in order, quantised to 8
bits as PNGs would hold them (the decoder's 256 levels); a conditioned model is scored given each image's
conditions, as training gave them (-log p(x | c)): its label, or the null label where the data has none, its
condition files, and its model's task's image (data.task, saved with the weights: superres's low-resolution
image, inpaint's masked image with a mask of its own). The EMA weights, unless --raw. Data: the
run's `data:` section (its config.yaml), or that of the config file --data names, with the split --split
names: by default "test" where the data set has one (published bits/dim are test-set numbers: torchvision's
test sets, CelebA's test split, the digits' held-out 176), else "train" (a folder is one set of images).

This module loads models (`ddpm.inference`): it sits above it, and nothing in ddpm imports it.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
from pathlib import Path
from typing import NamedTuple

import torch
import yaml
from torch import Tensor

from ddpm.conditions import Conditions
from ddpm.config import SPLITS, ConfigError, DataConfig, load_config
from ddpm.data import DataError, build_dataset, item_conditions
from ddpm.inference import load_for_sampling
from ddpm.io import CheckpointError
from ddpm.prog import command_name
from ddpm.progress import progress_bar
from ddpm.run_dir import RUN_CONFIG
from ddpm.samplers import Denoised, denoiser
from ddpm.schedule import NoiseScheduler
from ddpm.vlb import RowDenoiser, bound_calls, variational_bound

# The images `image_nll` loads at a time (about; `_groups`): the noise it draws is T per image, for the few
# images of one network call, so a group costs only its images' memory.
GROUP_IMAGES = 1024


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
    data: DataConfig | None = None,
    batch_size: int = 256,
    seed: int = 0,
    progress: bool = True,
) -> Likelihood:
    """The variational bound of `model` on the first `n` images of `dataset` ((image (C, H, W) in [-1, 1],
    label[, conditions]) items, quantised here), on the model's device in float32, `batch_size` rows (image,
    timestep) per network call: ceil(n T / batch_size) calls in all (`ddpm.vlb.bound_calls`), each many
    timesteps of one image or more (`ddpm.vlb.variational_bound`). Image i's noise, for its T draws
    x_t ~ q(x_t | x0), is the (i+1)-th (T, C, H, W) draw of a CPU generator seeded `seed`: results depend
    neither on the device nor on the batch size, and an image's bound not on n.

    Conditions: each image's, as training gives them (`ddpm.data.item_conditions`, from the unquantised
    image): a class-conditional model gets its label, or its null label for an image without one (-1); its
    condition files; and the conditions `data.task` derives from it (`data`: the data section `dataset` was
    built from, with the model's task; None: no task; inpaint's masks seeded by (seed, i)). The progress bar
    counts network calls."""
    if not 1 <= n <= len(dataset):
        raise ValueError(f"n must be in 1..{len(dataset)} (the images of the data set), got {n}")
    if batch_size < 1:
        raise ValueError(f"batch size must be >= 1 (rows per network call), got {batch_size}")
    T = scheduler.num_train_timesteps
    device = next(model.parameters()).device
    generator = torch.Generator().manual_seed(seed)
    conditional = getattr(model, "num_classes", None) is not None
    data = data if data is not None else DataConfig()
    bounds, terms, priors = [], [], []
    with progress_bar(
        total=bound_calls(n, T, batch_size), unit="call", show=progress, desc="bits/dim"
    ) as bar:
        start = 0
        for size in _groups(n, T, batch_size):
            indices = range(start, start + size)
            start += size
            images, labels, cond = item_conditions(data, dataset, indices, labels=conditional, seed=seed)
            x0 = quantize(images.float()).to(device)
            if conditional and int(labels.max()) >= model.num_classes:
                raise ValueError(
                    f"the data has label {int(labels.max())} but the model has num_classes="
                    f"{model.num_classes}: score it on its own data set (--data with the run's config)"
                )
            if conditional:  # an image without a label is scored on the null label
                cond = cond.drop({"label": labels < 0})
            bound = variational_bound(
                _row_denoiser(model, scheduler, cond.to(device)),
                scheduler,
                x0,
                generator=generator,
                batch_size=batch_size,
                callback=lambda rows: bar.update(1),
            )
            bounds.append(bound.total.double().cpu())
            terms.append(bound.terms.double().sum(dim=0).cpu())
            priors.append(bound.prior.double().sum().item())
            bar.set_postfix(images=sum(map(len, bounds)), mean=f"{torch.cat(bounds).mean().item():.4f}")
    per_image = torch.cat(bounds)
    stderr = per_image.std().item() / n**0.5 if n > 1 else float("nan")
    return Likelihood(
        per_image.mean().item(), stderr, n, per_image, torch.stack(terms).sum(dim=0) / n, sum(priors) / n
    )


def main(argv: list[str] | None = None) -> None:
    """Parse the command line, print the cost on stderr, then `bits/dim: MEAN +- STDERR (...)` on stdout; bad
    input exits with one line `error: ...` and status 1."""
    parser = argparse.ArgumentParser(
        prog=command_name("ddpm.nll"),
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "checkpoint", help="a run directory (its latest checkpoint), a checkpoint or a model folder"
    )
    parser.add_argument("--data", help="a config file whose data: section to score on (default: the run's)")
    parser.add_argument(
        "--split",
        choices=("train", "test"),
        help="the data set's split (default: test where the data set has one, else train)",
    )
    parser.add_argument("--n", type=int, help="images scored, the split's first (default: 1000, or all)")
    parser.add_argument(
        "--batch",
        type=int,
        default=256,
        help="rows (image, timestep) per network call (default: %(default)s)",
    )
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
        # the task the model was trained with (saved with its weights) gives its conditions
        data = dataclasses.replace(_data_section(args.data, loaded.run_dir), **loaded.task)
        split = args.split or ("test" if "test" in SPLITS.get(data.dataset, ()) else "train")
        data = dataclasses.replace(data, hflip=False, split=split)
        dataset = build_dataset(data, loaded.model.config)
        if args.data is None and split == "test" and _training_split(loaded.run_dir) == "all":
            print(
                "warning: this run trained on its test images too (data.split=all, or a digits run from "
                "before data.split, which trained on all 1,797): the bound is not a held-out one",
                file=sys.stderr,
            )
        n = args.n if args.n is not None else min(1000, len(dataset))
        T = loaded.scheduler.num_train_timesteps
        if args.batch >= 1 and 1 <= n <= len(dataset):  # else image_nll says what is wrong
            calls = bound_calls(n, T, args.batch)
            print(
                f"{n:,} image{'s' * (n > 1)} x T = {T} timesteps = {n * T:,} rows: {calls:,} network "
                f"call{'s' * (calls > 1)} of up to {args.batch} rows on {device}",
                file=sys.stderr,
            )
        result = image_nll(
            loaded.model, loaded.scheduler, dataset, n=n, data=data, batch_size=args.batch, seed=args.seed
        )
    except (CheckpointError, ConfigError, DataError, ValueError, OSError) as error:
        sys.exit(f"error: {error}")
    print(
        f"bits/dim: {result.bits_per_dim:.4f} +- {result.stderr:.4f} (standard error over {result.n} images "
        f"of {data.dataset}, {split} split; variational bound over T = {T} terms, {loaded.weights} weights, "
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
            "split": split,
        }
        Path(args.json).write_text(json.dumps(payload, indent=2) + "\n")


def _groups(n: int, T: int, batch_size: int) -> list[int]:
    """The sizes of the groups of images `image_nll` loads at a time: about GROUP_IMAGES, a multiple of
    batch_size / gcd(batch_size, T) so that a group's rows fill whole calls (all calls but the last are full,
    ceil(n T / batch_size) in all)."""
    unit = batch_size // math.gcd(batch_size, T)
    size = unit * max(1, GROUP_IMAGES // unit)
    return [min(size, n - start) for start in range(0, n, size)]


def _row_denoiser(model: torch.nn.Module, scheduler: NoiseScheduler, cond: Conditions) -> RowDenoiser:
    """The model's `RowDenoiser` for images with the conditions `cond` (N rows; empty: unconditional): each
    row gets its image's conditions, a dropped label the model's null label."""
    null_class = getattr(model, "null_class", None)

    def denoise(x_t: Tensor, t: Tensor, image: Tensor) -> Denoised:
        return denoiser(model, scheduler, cond=cond.rows(image) if cond else cond, null_class=null_class)(
            x_t, t
        )

    return denoise


def _data_section(config: str | None, run: Path | None) -> DataConfig:
    """The data section of the config file named, else of the run's config.yaml."""
    if config is not None:
        return load_config(config).data
    if run is None:
        raise ConfigError(
            "this model folder belongs to no run, so its data set is unknown: pass --data CONFIG"
        )
    return load_config(run / RUN_CONFIG).data


def _training_split(run: Path) -> str:
    """The data.split the run trained on, as its config.yaml says; a config written before that key existed
    trained the digits on all their images ("all"), any other data set on its training split."""
    data = (yaml.safe_load((run / RUN_CONFIG).read_text()) or {}).get("data") or {}
    return data.get("split", "all" if data.get("dataset", "digits") == "digits" else "train")


if __name__ == "__main__":
    main()
