"""Diffusion segmentation against the seed's ClassicUNet at equal training time, on digit_masks' test split.

    python bench/segmentation.py --seed 0 [--k 8] [--n 352] [--threads 1] [--runs runs/bench-segment]
        [--json OUT]

For each --seed: trains configs/segment_digits.yaml (train.seed=SEED) into RUNS/diffusion-sSEED, measuring
the CPU time of the training (process time: the machine is shared, and wall time would charge one method for
the other sessions' load); then trains `ClassicUNet` (the seed write-up's network, no time conditioning) as an
ordinary segmentation network on the same training pairs, loss BCE + soft Dice (`bce_dice_loss`), Adam at
1e-3, batches of 64, torch.manual_seed(SEED), for the same CPU time. Both are scored on the first --n test
pairs (of 352; the first 176 hold each held-out digit once):

- the ensemble (`ddpm.segment.segment`, K masks per image, the run's sampler settings, noise seed SEED):
  the Dice of its mean thresholded at 0.5, and the AUROC of its per-pixel variance against the per-pixel
  error of that thresholded mean (0.5: the variance says nothing about where the errors are);
- ClassicUNet: the Dice of sigmoid(logits) > 0.5.

Spread: 95% bootstrap intervals over the test images (BOOTSTRAP resamples, percentile method) of each Dice,
of their difference (paired: the same resampled images) and of the AUROC (AUROC_BOOTSTRAP resamples); the
seeds give the spread over training runs. The ensemble's files (grid.png, ...) go to RUNS/diffusion-sSEED/
segmentation.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

from ddpm.config import load_config
from ddpm.data import digit_masks
from ddpm.models.classic import ClassicUNet
from ddpm.segment import auroc, dice, metrics, segment
from ddpm.training import Trainer

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "configs" / "segment_digits.yaml"
BOOTSTRAP = 2000  # resamples of the test images for the Dice intervals
AUROC_BOOTSTRAP = 200  # and for the AUROC's (each is a pass over every pixel)
# The seed write-up's network at the digits' side: 16 -> 8 -> 4 -> 2, channels 16-32-64 and a 128 bottleneck.
CLASSIC = {
    "in_channels": 1,
    "out_channels": 1,
    "base_channels": 16,
    "channel_mult": [1, 2, 4, 8],
    "image_size": 16,
}


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--seed", type=int, nargs="+", default=[0])
    parser.add_argument("--k", type=int, default=8, help="masks sampled per test image")
    parser.add_argument("--n", type=int, default=352, help="test pairs scored, the first")
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="CPU threads of both (1: the setting for small models on a "
        "shared machine, BENCHMARKS.md section 8)",
    )
    parser.add_argument("--runs", type=Path, default=ROOT / "runs" / "bench-segment")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    results = [run_seed(seed, args.k, args.n, args.threads, args.runs) for seed in args.seed]
    for result in results:
        print(report_line(result))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(results, indent=2) + "\n")


def run_seed(seed: int, k: int, n: int, threads: int, runs: Path) -> dict:
    """Train both methods for the same CPU time and score them on the test split (the module docstring)."""
    run = runs / f"diffusion-s{seed}"
    config = load_config(CONFIG, [f"train.seed={seed}", f"train.cpu_threads={threads}", f"output_dir={run}"])
    start = time.process_time()
    Trainer(config).train()
    cpu_s = time.process_time() - start
    torch.set_num_threads(threads)
    classic, classic_steps = train_classic(seed, cpu_s)
    images, masks, _ = digit_masks("test")
    images, truth = images[:n], masks[:n] > 0
    with torch.no_grad():
        classic_prediction = classic(images).sigmoid() > 0.5
    ensemble = segment(run, "test", k=k, out=run / "segmentation", n=n, seed=seed)
    ensemble_prediction = ensemble.mean > 0.5
    dice_ensemble, dice_classic = dice(ensemble_prediction, truth), dice(classic_prediction, truth)
    error = ensemble_prediction != truth
    generator = torch.Generator().manual_seed(seed)
    return {
        "seed": seed,
        "k": k,
        "train_cpu_s": cpu_s,
        "threads": threads,
        "diffusion_steps": config.train.steps,
        "classic_steps": classic_steps,
        "classic_parameters": sum(p.numel() for p in classic.parameters()),
        "test_images": len(images),
        "dice_ensemble": interval(dice_ensemble, generator),
        "dice_classic": interval(dice_classic, generator),
        "dice_difference": interval(dice_ensemble - dice_classic, generator),
        "auroc_variance_vs_error": auroc_interval(ensemble.variance, error, generator),
        "ensemble_metrics": metrics(ensemble),
    }


def train_classic(seed: int, cpu_s: float) -> tuple[ClassicUNet, int]:
    """ClassicUNet (CLASSIC) trained on the digit_masks training pairs with `bce_dice_loss` until `cpu_s`
    seconds of process CPU time are spent; returns it (eval mode) and its optimizer steps."""
    torch.manual_seed(seed)
    model = ClassicUNet(**CLASSIC)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    images, masks, _ = digit_masks("train")
    targets = masks.add(1).div(2)
    generator = torch.Generator().manual_seed(seed)
    steps, start = 0, time.process_time()
    while time.process_time() - start < cpu_s:
        for batch in torch.randperm(len(images), generator=generator).split(64):
            loss = bce_dice_loss(model(images[batch]), targets[batch])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            steps += 1
            if time.process_time() - start >= cpu_s:
                break
    return model.eval(), steps


def bce_dice_loss(logits: Tensor, targets: Tensor, eps: float = 1.0) -> Tensor:
    """The usual segmentation loss: binary cross-entropy of `logits` (N, 1, H, W) against `targets` in {0, 1}
    plus the soft Dice loss, 1 - (2 sum(p t) + eps) / (sum(p) + sum(t) + eps) per image (p = sigmoid(logits),
    eps smoothing empty masks), averaged over the batch."""
    bce = F.binary_cross_entropy_with_logits(logits, targets)
    p, t = logits.sigmoid().flatten(1), targets.flatten(1)
    soft_dice = (2 * (p * t).sum(1) + eps) / (p.sum(1) + t.sum(1) + eps)
    return bce + (1 - soft_dice).mean()


def interval(values: Tensor, generator: torch.Generator) -> dict:
    """The mean of per-image `values` (N,) and its 95% bootstrap interval over the images."""
    index = torch.randint(0, len(values), (BOOTSTRAP, len(values)), generator=generator)
    means = values[index].mean(1)
    low, high = torch.quantile(means, torch.tensor([0.025, 0.975])).tolist()
    return {"mean": values.mean().item(), "low": low, "high": high}


def auroc_interval(variance: Tensor, error: Tensor, generator: torch.Generator) -> dict:
    """The AUROC of the variance against the error pixels (both (N, 1, H, W)) and its 95% bootstrap interval
    over the images (resamples without both kinds of pixel are skipped)."""
    values = []
    for _ in range(AUROC_BOOTSTRAP):
        index = torch.randint(0, len(error), (len(error),), generator=generator)
        if error[index].any() and not error[index].all():
            values.append(auroc(variance[index], error[index]))
    low, high = torch.quantile(torch.tensor(values), torch.tensor([0.025, 0.975])).tolist()
    return {"mean": auroc(variance, error), "low": low, "high": high}


def report_line(result: dict) -> str:
    def show(name: str) -> str:
        value = result[name]
        return f"{value['mean']:.4f} [{value['low']:.4f}, {value['high']:.4f}]"

    return (
        f"seed {result['seed']}: {result['train_cpu_s']:.0f} CPU-s each ({result['diffusion_steps']} "
        f"diffusion steps, {result['classic_steps']} ClassicUNet steps); Dice ensemble (K={result['k']}) "
        f"{show('dice_ensemble')}, ClassicUNet {show('dice_classic')}, difference {show('dice_difference')}; "
        f"AUROC variance vs error {show('auroc_variance_vs_error')}"
    )


if __name__ == "__main__":
    main()
