"""Super-resolution 4x4 -> 16x16 of the digits: the diffusion model of configs/superres_digits.yaml against a
regression U-Net of the same network and bicubic upsampling, on the digits' held-out split.

    python bench/superres.py --seed 0 [--threads 1] [--runs runs/bench-superres] [--json OUT]
    python bench/superres.py --merge bench/results/superres-seed*.json --json bench/results/superres.json

For each --seed: trains configs/superres_digits.yaml (train.seed=SEED) into RUNS/diffusion-sSEED, then the
regression U-Net: `build_model` of the same config.model (the same UNet, the same image condition, its
t fixed at 0 and x the condition itself) trained with MSE to output the 16x16 image, on the same training
digits, batch, steps, AdamW, warm-up, gradient clipping and EMA as the diffusion run, from
torch.manual_seed(SEED) (`train_regression`). Equal optimizer steps; both the process CPU time and the wall
time of each training are recorded (the machine is shared: wall time charges each for the others' load).

All 176 held-out digits (data split "test", never trained on) are area-downsampled to 4x4 and brought back
to 16x16 by each method:
- diffusion: the run's EMA weights, its `sample:` settings (UniPC, 20 network calls, no guidance), one sample
  per input, image i from noise seeded 1,000,000 SEED + i, given the nearest-upsampled input as training did;
- regression: one forward pass of the EMA weights, clamped to [-1, 1];
- bicubic: torch's bicubic interpolation of the 4x4 image, clamped (not learned: the same for every seed);
- nearest: the condition itself (each low-resolution pixel as a 4x4 block), for reference;
- originals: the held-out digits themselves, the ceiling of each measure.

Measures, in [0, 1] pixel units throughout (the data's [-1, 1] halved and shifted):
- accuracy: the digit classifier (bench/digit_classifier.py, trained once, seed 0, on the 1,621 training
  digits only) on the outputs, against the originals' labels;
- kid_conv, kid_hidden: the kernel distance (bench/kernel_distance.py) in the classifier's conv and hidden
  features (standardised by the training digits' mean and std) between the 176 outputs and the 1,621
  training digits: real digits disjoint from the originals, so that the measure asks "do these look like
  digits", not "are these the originals" (MSE asks that). Its floor: 176 random real digits against the other
  1,621 of all 1,797 (`split_floor`, 100 splits), the same sizes;
- mse, psnr: per image to the original, PSNR = 10 log10(1 / MSE) (peak 1), averaged over the images;
- consistency: the output area-downsampled to 4x4 against the 4x4 input: the mean and the max over images of
  the per-image max abs difference, the mean abs difference, and the fraction of low-resolution pixels
  within 1/255 (8-bit quantisation).
With --grid, the first 16 held-out digits go to RUNS/lows/ as 4x4 PNGs (sample.py --cond-image's input) and a
grid of inputs, bicubic, regression, diffusion and originals (rows) to RUNS/compare-sSEED.png.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import digit_classifier
import kernel_distance
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ddpm.conditions import Conditions
from ddpm.config import Config, build_model, load_config
from ddpm.data import split_digits, superres_condition
from ddpm.ema import EMA
from ddpm.inference import generate, load_for_sampling, save_grid, save_images_to
from ddpm.lr_schedule import learning_rate
from ddpm.training import Trainer

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "configs" / "superres_digits.yaml"
MEASURES = (
    "accuracy",
    "kid_conv",
    "kid_hidden",
    "mse",
    "psnr",
    "consistency_max_mean",
    "consistency_max",
    "consistency_mean",
    "within_quantisation",
)
QUANTISATION = 1 / 255  # one 8-bit grey level, in [0, 1] units
GRID_IMAGES = 16
T = TypeVar("T")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--seed", type=int, nargs="+", default=[0])
    parser.add_argument("--threads", type=int, default=1, help="CPU threads of both trainings")
    parser.add_argument("--runs", type=Path, default=ROOT / "runs" / "bench-superres")
    parser.add_argument(
        "--set",
        nargs="*",
        default=[],
        metavar="KEY=VALUE",
        help="config overrides for both models (a quick check: train.steps=2)",
    )
    parser.add_argument("--grid", action="store_true", help="write the 4x4 inputs and a comparison grid")
    parser.add_argument("--merge", type=Path, nargs="+", help="merge per-seed JSON files instead")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    if args.merge:
        result = merge([json.loads(path.read_text()) for path in args.merge])
    else:
        torch.set_num_threads(args.threads)
        scorer = SuperresScorer()
        seeds = [
            run_seed(seed, scorer, args.threads, args.runs, overrides=args.set, grid=args.grid)
            for seed in args.seed
        ]
        result = {"scorer": scorer.summary(), "bicubic": scorer.bicubic_scores, "seeds": seeds}
    print(report(result))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2) + "\n")


class SuperresScorer:
    """The held-out digits, their 4x4 inputs and the measures of the module docstring; the classifier and the
    floor are computed once, at construction."""

    def __init__(self, *, factor: int = 4, splits: int = 100) -> None:
        self.factor = factor
        train, train_labels = split_digits("train", 16)  # (1621, 1, 16, 16) in [0, 1]
        self.originals, self.labels = split_digits("test", 16)  # (176, 1, 16, 16)
        self.classifier, self.classifier_accuracy = digit_classifier.train_classifier(
            train.mul(2).sub(1), train_labels
        )
        with torch.no_grad():
            reference = self._features(train)
            self.standardize = {kind: (f.mean(0), f.std(0).clamp(min=1e-6)) for kind, f in reference.items()}
            self.reference = {kind: self._standardized(kind, f) for kind, f in reference.items()}
            held_out = self._features(self.originals)
        self.floor = {
            f"kid_{kind}": kernel_distance.split_floor(
                torch.cat([self.reference[kind], self._standardized(kind, held_out[kind])]),
                size=len(self.originals),
                splits=splits,
            )
            for kind in self.reference
        }
        self.low = F.avg_pool2d(self.originals, factor)  # (176, 1, 4, 4), the inputs
        self.condition = superres_condition(self.originals, factor)  # (176, 1, 16, 16), nearest-upsampled
        bicubic = F.interpolate(self.low, scale_factor=factor, mode="bicubic", align_corners=False)
        self.bicubic = bicubic.clamp(0, 1)
        self.bicubic_scores = self.score(self.bicubic)

    @torch.no_grad()
    def score(self, outputs: Tensor) -> dict:
        """Every measure of the module docstring for outputs (176, 1, 16, 16) in [0, 1], row i from input
        i."""
        features = self._features(outputs)
        kids = {
            f"kid_{kind}": kernel_distance.kernel_distance(self._standardized(kind, f), self.reference[kind])
            for kind, f in features.items()
        }
        predicted = self.classifier(outputs.mul(2).sub(1)).argmax(1)
        return {
            "accuracy": (predicted == self.labels).float().mean().item(),
            **kids,
            **pixel_errors(outputs, self.originals, self.low),
        }

    def summary(self) -> dict:
        """The classifier's accuracies, the floor (without its 100 values) and what was scored."""
        floor = {name: {k: v for k, v in f.items() if k != "values"} for name, f in self.floor.items()}
        return {
            "classifier_held_out_accuracy": self.classifier_accuracy,
            "test_images": len(self.originals),
            "factor": self.factor,
            "floor": floor,
            "originals": self.score(self.originals),
            "nearest": self.score(self.condition),
        }

    def _features(self, images: Tensor) -> dict[str, Tensor]:
        conv = self.classifier.conv_features(images.mul(2).sub(1))
        hidden = F.relu(self.classifier.hidden(conv))
        return {"conv": conv.double(), "hidden": hidden.double()}

    def _standardized(self, kind: str, features: Tensor) -> Tensor:
        mean, std = self.standardize[kind]
        return (features - mean) / std


def pixel_errors(outputs: Tensor, originals: Tensor, low: Tensor) -> dict:
    """The per-pixel measures of outputs (N, C, H, W) in [0, 1] against the originals (N, C, H, W) and the
    low-resolution inputs (N, C, h, w) they were made from (h divides H): the mean over images of the MSE and
    of the PSNR, 10 log10(1 / MSE) (peak 1; an exact image counts as 100 dB), and the consistency of the
    output area-downsampled to h x w with the input (its abs difference per low-resolution pixel: the mean
    and max over images of each image's max, the mean, and the fraction within QUANTISATION)."""
    mse = (outputs - originals).square().flatten(1).mean(1)  # (N,)
    factor = outputs.shape[-1] // low.shape[-1]
    gap = (F.avg_pool2d(outputs, factor) - low).abs().flatten(1)  # (N, C h w)
    return {
        "mse": mse.mean().item(),
        "psnr": (-10 * mse.clamp(min=1e-10).log10()).mean().item(),
        "consistency_max_mean": gap.amax(1).mean().item(),
        "consistency_max": gap.max().item(),
        "consistency_mean": gap.mean().item(),
        "within_quantisation": (gap <= QUANTISATION).float().mean().item(),
    }


def run_seed(
    seed: int,
    scorer: SuperresScorer,
    threads: int,
    runs: Path,
    *,
    overrides: list[str] = (),
    grid: bool = False,
) -> dict:
    """Train both models for `seed` (CONFIG with `overrides`), produce the held-out outputs of each and
    score them."""
    run = runs / f"diffusion-s{seed}"
    settings = [f"train.seed={seed}", f"train.cpu_threads={threads}", f"output_dir={run}", *overrides]
    config = load_config(CONFIG, settings)
    _, diffusion_times = timed(lambda: Trainer(config).train())
    torch.set_num_threads(threads)
    regression, regression_times = timed(lambda: train_regression(config, seed))

    start = time.perf_counter()
    loaded = load_for_sampling(run)
    sampling = loaded.sampling
    with torch.no_grad():
        samples = generate(
            loaded.model,
            loaded.scheduler,
            len(scorer.originals),
            image_shape=scorer.originals.shape[1:],
            sampler=sampling.sampler,
            steps=sampling.steps,
            eta=sampling.eta,
            cond=Conditions({"image": to_model(scorer.condition)}),
            guidance_scale=sampling.guidance_scale,
            seed=1_000_000 * seed,
            batch_size=64,
        )
        diffusion = to_unit(samples)
        sampling_s = time.perf_counter() - start
        regression_out = to_unit(regress(regression, to_model(scorer.condition)))
    if grid:
        write_grid(runs, seed, scorer, diffusion, regression_out)
    return {
        "seed": seed,
        "threads": threads,
        "overrides": list(overrides),
        "steps": config.train.steps,
        "batch_size": config.data.batch_size,
        "sampler": sampling.sampler,
        "sampler_steps": sampling.steps,
        "guidance_scale": sampling.guidance_scale,
        "diffusion_train": diffusion_times,
        "regression_train": regression_times,
        "diffusion_sampling_wall_s": sampling_s,
        "diffusion": scorer.score(diffusion),
        "regression": scorer.score(regression_out),
    }


def train_regression(config: Config, seed: int) -> nn.Module:
    """`build_model(config.model)` trained to output each training image (N, C, H, W) in [-1, 1] from its
    superres condition c (given as x and as the image condition, t = 0) with the MSE loss, for config.train's
    steps at its batch size, learning rate, warm-up, schedule, AdamW betas and weight decay, gradient clipping
    and EMA; the batches are shuffled epochs drawn from a generator seeded with `seed`. Returns the EMA
    weights (eval mode), the weights the diffusion model is sampled from."""
    train, data = config.train, config.data
    torch.manual_seed(seed)
    model = build_model(config.model)
    optimizer = torch.optim.AdamW(
        model.parameters(), lr=train.lr, betas=tuple(train.adam_betas), weight_decay=train.weight_decay
    )
    ema = EMA(model, train.ema_decay, warmup=train.ema_warmup)
    images, _ = split_digits(data.split, data.image_size)
    images = images.mul(2).sub(1)  # (1621, 1, 16, 16) in [-1, 1]
    generator = torch.Generator().manual_seed(seed)
    step = 0
    while step < train.steps:
        for batch in torch.randperm(len(images), generator=generator).split(data.batch_size):
            if step == train.steps:
                break
            for group in optimizer.param_groups:
                group["lr"] = learning_rate(
                    step,
                    lr=train.lr,
                    steps=train.steps,
                    warmup_steps=train.warmup_steps,
                    schedule=train.lr_schedule,
                    lr_min=train.lr_min,
                )
            x0 = images[batch]
            loss = F.mse_loss(regress(model, superres_condition(x0, data.superres_factor)), x0)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if train.grad_clip > 0:
                nn.utils.clip_grad_norm_(model.parameters(), train.grad_clip)
            optimizer.step()
            ema.update(model)
            step += 1
    return ema.module.eval()


def regress(model: nn.Module, condition: Tensor) -> Tensor:
    """The regression U-Net's output for superres conditions (N, C, H, W) in [-1, 1]: the condition as x and
    as the image condition, t = 0."""
    return model(condition, torch.zeros(len(condition), dtype=torch.long), Conditions({"image": condition}))


def timed(work: Callable[[], T]) -> tuple[T, dict]:
    """`work()` and the seconds it took: {"cpu_s": process CPU time, "wall_s": wall time}."""
    cpu, wall = time.process_time(), time.perf_counter()
    result = work()
    return result, {"cpu_s": time.process_time() - cpu, "wall_s": time.perf_counter() - wall}


def to_model(images: Tensor) -> Tensor:
    return images.mul(2).sub(1)


def to_unit(images: Tensor) -> Tensor:
    return images.add(1).div(2).clamp(0, 1)


def write_grid(runs: Path, seed: int, scorer: SuperresScorer, diffusion: Tensor, regression: Tensor) -> None:
    """The first GRID_IMAGES 4x4 inputs as PNGs in RUNS/lows/ and the rows nearest input, bicubic,
    regression, diffusion, original in RUNS/compare-sSEED.png."""
    k = GRID_IMAGES
    save_images_to(to_model(scorer.low[:k]), runs / "lows")
    rows = [scorer.condition, scorer.bicubic, regression, diffusion, scorer.originals]
    save_grid(to_model(torch.cat([r[:k] for r in rows])), runs / f"compare-s{seed}.png", nrow=k)


def merge(files: list[dict]) -> dict:
    """Per-seed files (one seed each, or several) as one: the seeds together, the first file's scorer, and
    each method's mean and standard deviation over the seeds of every measure."""
    seeds = [s for f in files for s in f["seeds"]]
    over = {
        method: {
            m: {
                "mean": statistics.fmean(s[method][m] for s in seeds),
                "std": statistics.stdev(s[method][m] for s in seeds) if len(seeds) > 1 else 0.0,
            }
            for m in MEASURES
        }
        for method in ("diffusion", "regression")
    }
    return {"scorer": files[0]["scorer"], "bicubic": files[0]["bicubic"], "seeds": seeds, "over_seeds": over}


def report(result: dict) -> str:
    """One line per seed and method, the bicubic and reference rows and the floor."""
    scorer = result["scorer"]

    def line(name: str, scores: dict) -> str:
        return f"{name}: " + ", ".join(f"{m} {scores[m]:.4f}" for m in MEASURES)

    lines = [f"classifier held-out accuracy {scorer['classifier_held_out_accuracy']:.3f}"]
    for name, floor in scorer["floor"].items():
        lines.append(
            f"floor {name}: mean {floor['mean']:.4f}, std {floor['std']:.4f}, |p95| {floor['abs_p95']:.4f}"
        )
    lines += [line(name, scorer[name]) for name in ("originals", "nearest")]
    lines.append(line("bicubic", result["bicubic"]))
    for s in result["seeds"]:
        times = f"{s['diffusion_train']['cpu_s']:.0f} / {s['regression_train']['cpu_s']:.0f} CPU-s"
        lines.append(f"seed {s['seed']} (diffusion / regression training {times})")
        lines += [line(f"  {method}", s[method]) for method in ("diffusion", "regression")]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
