"""Token-sequence conditioning on digit_strips (issue 25): does a UNet that reads a token sequence by
cross-attention draw the digits it is asked for, each in its place?

    python bench/sequence_condition.py --seeds 0 1 [--n 600] [--scales 1 2 3] [--step STEP]
        [--runs runs/bench-strips] [--threads 1] [--json bench/results/sequence_condition.json]
    python bench/sequence_condition.py --merge A.json B.json [--json OUT]   # seeds scored apart, together

For each --seed: trains configs/strips_digits.yaml (train.seed=SEED) into RUNS/sSEED, unless that run already
holds a checkpoint of its last step (then it is scored as it is; `--step` scores the checkpoint of that step
instead, a run with a constant learning rate being at step k what a k-step run ends with). Its EMA weights
then draw --n strips for --n random digit sequences (`ddpm.digit_strips.random_sequences`, lengths 1..3 and
digits uniform, from a generator seeded SEQUENCE_SEED: the same sequences for every seed and scale), the
run's sampler and steps (UniPC, 20), noise seeded SAMPLING_SEED_STRIDE * SEED + i, at each guidance scale
(--scales; classifier-free, against the learned null sequence).

Reading a strip (`read_strips`): cut into its four 8 x 8 slots; a slot whose mean ink (on the [0, 1] scale)
is below INK_EMPTY is read as empty (the faintest real digit has 0.18, the mean one 0.31), any other is
resized to 16 x 16 as the digits data set resizes the 8 x 8 digits and classified by a small CNN trained on
the training split's 16 x 16 digits (bench/digit_classifier.py; its held-out accuracy is printed). A strip
is correct when every slot reads as asked: each digit at its place, the slots after the last digit (and the
fourth, always) empty. Reported: the fraction of correct strips with its 95% Wilson interval over the
strips, the fraction of asked digits read right, the fraction of slots asked empty that read empty, and by
length.

References, the same reading of strips that no model drew:
- ceiling: the test split's real strips (600, made of the 176 held-out digits): what the reader gets right
  on real handwriting, the most a perfect model could score;
- chance: the model's unconditional strips (every token sequence dropped to the learned null), read against
  the asked sequences.
Spread over training runs: the seeds' fractions (mean and standard deviation), also over files of seeds
scored apart (--merge). Strips and a grid of the first 40 (each row: the sample at each scale) go to
RUNS/sSEED/strips.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
from pathlib import Path

import digit_classifier
import torch
from accelerate.state import AcceleratorState
from torch import Tensor
from torchvision.transforms import v2
from torchvision.utils import save_image

from ddpm.conditions import Conditions
from ddpm.config import load_config
from ddpm.data import digit_strips, split_digits
from ddpm.digit_strips import EMPTY, GRID, MAX_DIGITS, cut_slots, random_sequences, sequence_tokens
from ddpm.inference import generate, load_for_sampling
from ddpm.run_dir import checkpoint_path
from ddpm.training import Trainer

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "configs" / "strips_digits.yaml"
INK_EMPTY = 0.05  # a slot with less mean ink (on [0, 1]) reads as empty
SEQUENCE_SEED = 2025  # the asked sequences' generator
SAMPLING_SEED_STRIDE = 1_000_000  # seed s draws strip i from noise seeded s * stride + i
CLASSIFIER_SIDE = 16  # the classifier reads digits at the digits data set's side


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--n", type=int, default=600, help="strips drawn per seed and scale")
    parser.add_argument("--scales", type=float, nargs="+", default=[1.0, 2.0, 3.0])
    parser.add_argument("--step", type=int, help="score the checkpoint of this step (default: the last)")
    parser.add_argument("--runs", type=Path, default=ROOT / "runs" / "bench-strips")
    parser.add_argument("--threads", type=int, default=1, help="CPU threads of training and sampling")
    parser.add_argument("--json", type=Path)
    parser.add_argument("--merge", type=Path, nargs="+", help="combine these results files (one per seed)")
    args = parser.parse_args()
    if args.merge:
        parts = [json.loads(path.read_text()) for path in args.merge]
        write(args.json, {**parts[0], "runs": [run for part in parts for run in part["runs"]]})
        return
    torch.set_num_threads(args.threads)
    reader = Reader()
    print(f"classifier: held-out accuracy {reader.accuracy:.4f}", flush=True)
    real_images, real_sequences = digit_strips("test")
    ceiling = score(reader.read(real_images), real_sequences)
    print(f"ceiling (real held-out strips): {line(ceiling)}", flush=True)
    sequences = random_sequences(args.n, torch.Generator().manual_seed(SEQUENCE_SEED))
    runs = [score_seed(seed, args, reader, sequences) for seed in args.seeds]
    payload = {
        "classifier_accuracy": reader.accuracy,
        "ink_empty": INK_EMPTY,
        "ceiling": ceiling,
        "n": args.n,
        "asked_unseen_in_training": unseen_fraction(sequences),
        "runs": runs,
    }
    write(args.json, payload)


def write(path: Path | None, payload: dict) -> None:
    """Print the spread over seeds of each scale's fraction of correct strips (and unconditioned), add it
    to `payload` as "over_seeds", and write `payload` to `path` (None: nowhere)."""
    runs = payload["runs"]
    summary = {
        scale: spread([run["scales"][scale]["strips"]["mean"] for run in runs]) for scale in runs[0]["scales"]
    }
    summary["unconditioned"] = spread([run["unconditioned"]["strips"]["mean"] for run in runs])
    for scale, value in summary.items():
        print(f"{scale}: strips correct {value['mean']:.4f} +- {value['std']:.4f} over {len(runs)} seeds")
    if path:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps({**payload, "over_seeds": summary}, indent=2) + "\n")


class Reader:
    """The digit classifier (bench/digit_classifier.py) trained on the training split's 16 x 16 digits, and
    the reading of strips with it (`read`)."""

    def __init__(self) -> None:
        images, labels = split_digits("train", CLASSIFIER_SIDE)
        self.classifier, self.accuracy = digit_classifier.train_classifier(images * 2 - 1, labels)

    @torch.no_grad()
    def read(self, strips: Tensor) -> Tensor:
        """Strips (N, 1, S, S) in [-1, 1] -> the digit read in each of their GRID^2 slots (N, GRID^2) long,
        EMPTY where the slot's mean ink is below INK_EMPTY."""
        slots = cut_slots(strips.add(1).div(2).clamp(0, 1))  # (N, 4, 1, s, s) in [0, 1]
        n, count = slots.shape[:2]
        flat = slots.flatten(0, 1)
        size = [CLASSIFIER_SIDE, CLASSIFIER_SIDE]
        digits = v2.functional.resize(flat, size, interpolation=v2.InterpolationMode.BILINEAR, antialias=True)
        read = self.classifier(digits.clamp(0, 1) * 2 - 1).argmax(1)
        empty = flat.mean((1, 2, 3)) < INK_EMPTY
        return torch.where(empty, EMPTY, read).view(n, count)


def score(read: Tensor, sequences: Tensor) -> dict:
    """How well `read` (N, GRID^2) slots match the asked `sequences` (N, MAX_DIGITS), EMPTY after the
    digits (the last slot asked empty always): the fraction of strips read right in every slot (with its
    95% Wilson interval), of the asked digits read right, of the slots asked empty read empty, and of strips
    read right by length."""
    asked = torch.cat([sequences, torch.full((len(sequences), GRID * GRID - MAX_DIGITS), EMPTY)], dim=1)
    right = read == asked
    lengths = (sequences != EMPTY).sum(1)
    strips = right.all(1)
    return {
        "strips": wilson(int(strips.sum()), len(strips)),
        "digits": right[asked != EMPTY].float().mean().item(),
        "empty": right[asked == EMPTY].float().mean().item(),
        "by_length": {str(k): strips[lengths == k].float().mean().item() for k in range(1, MAX_DIGITS + 1)},
    }


def score_seed(seed: int, args: argparse.Namespace, reader: Reader, sequences: Tensor) -> dict:
    """Train (or reuse) seed `seed`'s run and score its strips at each guidance scale and unconditioned."""
    run = args.runs / f"s{seed}"
    overrides = [f"train.seed={seed}", f"train.cpu_threads={args.threads}", f"output_dir={run}"]
    config = load_config(CONFIG, overrides)
    checkpoint = checkpoint_path(run, args.step or config.train.steps)
    if not checkpoint.is_dir():
        if args.step:
            raise SystemExit(f"--step {args.step}: {run} has no checkpoint {checkpoint.name}")
        Trainer(config).train()
        AcceleratorState._reset_state(reset_partial_state=True)
    loaded = load_for_sampling(checkpoint, use_ema=True)
    tokens, mask = sequence_tokens(sequences)
    cond = Conditions({"context": tokens, "context_mask": mask})
    sample = loaded.sampling

    def draw(cond: Conditions, scale: float) -> Tensor:
        return generate(
            loaded.model,
            loaded.scheduler,
            len(sequences),
            image_shape=(1, config.data.image_size, config.data.image_size),
            sampler=sample.sampler,
            steps=sample.steps,
            eta=sample.eta,
            cond=cond,
            guidance_scale=scale,
            seed=SAMPLING_SEED_STRIDE * seed,
            batch_size=100,
        )

    out = run / "strips"
    out.mkdir(parents=True, exist_ok=True)
    result = {"seed": seed, "checkpoint": str(checkpoint), "scales": {}}
    shown = []
    for scale in args.scales:
        images = draw(cond, scale)
        torch.save(images, out / f"scale{scale:g}.pt")
        shown.append(images[:40])
        result["scales"][str(scale)] = score(reader.read(images), sequences)
        print(f"seed {seed} scale {scale:g}: {line(result['scales'][str(scale)])}", flush=True)
    unconditioned = draw(cond.null(), 1.0)
    result["unconditioned"] = score(reader.read(unconditioned), sequences)
    print(f"seed {seed} unconditioned: {line(result['unconditioned'])}", flush=True)
    grid = torch.stack(shown, dim=1).flatten(0, 1)  # each strip's samples at each scale side by side
    save_image(grid.add(1).div(2), out / "grid.png", nrow=2 * len(shown), padding=1, pad_value=0.5)
    return result


def wilson(successes: int, n: int, z: float = 1.96) -> dict:
    """The fraction successes / n with its Wilson score interval (95% at z = 1.96)."""
    p = successes / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return {"mean": p, "low": max(0.0, centre - half), "high": min(1.0, centre + half), "n": n}


def spread(values: list[float]) -> dict:
    """Mean and standard deviation (0 for one value) over seeds."""
    return {"mean": statistics.mean(values), "std": statistics.stdev(values) if len(values) > 1 else 0.0}


def unseen_fraction(sequences: Tensor) -> float:
    """The fraction of `sequences` that no training strip asks for (the training split's sequences)."""
    _, training = digit_strips("train")
    seen = {tuple(row) for row in training.tolist()}
    return sum(tuple(row) not in seen for row in sequences.tolist()) / len(sequences)


def line(result: dict) -> str:
    strips = result["strips"]
    return (
        f"strips correct {strips['mean']:.4f} [{strips['low']:.4f}, {strips['high']:.4f}], digits "
        f"{result['digits']:.4f}, empty slots {result['empty']:.4f}, by length {result['by_length']}"
    )


if __name__ == "__main__":
    main()
