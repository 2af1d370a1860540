"""How often a half-masked digit, completed by inpainting with the trained digits model, is classified as
the digit it was, by the classifier of bench/digit_classifier.py.

    python bench/inpainting.py [--checkpoint runs/digits] [--n 200] [--keep top] [--steps 50]
        [--jump-length 10] [--jump-n-sample 10] [--json OUT]
    python bench/inpainting.py --write-inputs DIR [--n 16] [--keep top]     # PNGs for sample.py --mask

The digits: the first --n of the classifier's held-out 20% (it never trained on them; the diffusion model
trained on all 1,797). Each keeps one half (--keep: top, bottom, left or right) and loses the other. Scored,
each the fraction classified as the original label:
- "original": the whole digit (the classifier's own accuracy on these: the ceiling);
- "masked": the kept half alone, the other left empty (background, -1): what the classifier makes of the
  known pixels without any completion (the floor a completion must beat);
- "replacement": `ddpm.inpaint` with jump_n_sample=1, the plain replacement method;
- "repaint": `ddpm.inpaint` with the --jump-length and --jump-n-sample resampling jumps (RePaint).
Completions are unconditional (the model's null label), with the model's EMA weights and schedule, the "ddpm"
sampler and --steps steps, noise from a generator seeded with --seed.

--write-inputs writes DIR/images/NNN-labelL.png (the same digits, as 16x16 PNGs) and DIR/mask.png (white =
keep) for `python sample.py --init-image DIR/images --mask DIR/mask.png`.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import digit_classifier
import torch
from PIL import Image

import ddpm
from ddpm import load_config
from ddpm.inference import load_for_sampling

ROOT = Path(__file__).resolve().parents[1]
KEEP = ("top", "bottom", "left", "right")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--checkpoint", default=str(ROOT / "runs" / "digits"))
    parser.add_argument("--config", default=str(ROOT / "configs" / "digits.yaml"), help="the data's config")
    parser.add_argument("--n", type=int, default=200, help="held-out digits (at most 359)")
    parser.add_argument("--keep", choices=KEEP, default="top", help="the half that is known")
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--jump-length", type=int, default=10)
    parser.add_argument("--jump-n-sample", type=int, default=10)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--write-inputs", type=Path, metavar="DIR")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()

    images, labels = held_out_digits(args.config)
    images, labels = images[: args.n], labels[: args.n]
    mask = half_mask(images.shape[-1], args.keep)
    if args.write_inputs:
        write_inputs(args.write_inputs, images, labels, mask)
        return
    classifier, accuracy = train_scorer(args.config)
    loaded = load_for_sampling(args.checkpoint)
    model, scheduler = loaded.model, loaded.scheduler
    y = torch.full((len(images),), model.null_class)
    results = {
        "checkpoint": str(loaded.folder),
        "weights": loaded.weights,
        "n": len(images),
        "keep": args.keep,
        "steps": args.steps,
        "classifier_held_out_accuracy": accuracy,
    }
    scores = {"original": images, "masked": torch.where(mask.bool(), images, -1.0)}
    for name, jumps in (("replacement", 1), ("repaint", args.jump_n_sample)):
        start = time.perf_counter()
        scores[name] = ddpm.inpaint(
            model,
            scheduler,
            images,
            mask,
            steps=args.steps,
            jump_length=args.jump_length,
            jump_n_sample=jumps,
            y=y,
            generator=torch.Generator().manual_seed(args.seed),
        )
        results[f"{name}_seconds"] = round(time.perf_counter() - start, 1)
    results["jump_length"], results["jump_n_sample"] = args.jump_length, args.jump_n_sample
    with torch.no_grad():
        for name, batch in scores.items():
            results[name] = (classifier(batch).argmax(1) == labels).float().mean().item()
    print(json.dumps(results, indent=1))
    if args.json:
        args.json.write_text(json.dumps(results, indent=1) + "\n")


def held_out_digits(config_path: str) -> tuple[torch.Tensor, torch.Tensor]:
    """The digits the classifier holds out (bench/digit_classifier.py's split, seed 0), as training reads
    them: (359, 1, 16, 16) in [-1, 1] and their labels."""
    images, labels = all_digits(config_path)
    _, held_out = digit_classifier.split(len(images), torch.Generator().manual_seed(0))
    return images[held_out], labels[held_out]


def all_digits(config_path: str) -> tuple[torch.Tensor, torch.Tensor]:
    dataset = ddpm.build_dataset(load_config(config_path, ["data.split=all"]).data)
    return dataset.images, dataset.labels


def train_scorer(config_path: str) -> tuple[digit_classifier.DigitClassifier, float]:
    classifier, accuracy = digit_classifier.train_classifier(*all_digits(config_path))
    if accuracy < digit_classifier.MIN_ACCURACY:
        raise SystemExit(f"classifier held-out accuracy {accuracy:.3f} < {digit_classifier.MIN_ACCURACY}")
    return classifier, accuracy


def half_mask(size: int, keep: str) -> torch.Tensor:
    """(size, size) of 0/1, 1 on the kept half."""
    mask = torch.zeros(size, size)
    half = size // 2
    region = {
        "top": (slice(0, half), slice(None)),
        "bottom": (slice(half, None), slice(None)),
        "left": (slice(None), slice(0, half)),
        "right": (slice(None), slice(half, None)),
    }[keep]
    mask[region] = 1
    return mask


def write_inputs(folder: Path, images: torch.Tensor, labels: torch.Tensor, mask: torch.Tensor) -> None:
    (folder / "images").mkdir(parents=True, exist_ok=True)
    for i, (image, label) in enumerate(zip(images, labels, strict=True)):
        pixels = ((image[0] + 1) * 127.5).round().clamp(0, 255).byte().numpy()
        Image.fromarray(pixels).save(folder / "images" / f"{i:03d}-label{int(label)}.png")
    Image.fromarray((mask * 255).byte().numpy()).save(folder / "mask.png")
    print(f"wrote {len(images)} digits to {folder / 'images'} and the mask to {folder / 'mask.png'}")


if __name__ == "__main__":
    main()
