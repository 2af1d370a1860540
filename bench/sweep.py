"""Compare variants of our digits config at a fixed number of steps: the measurements behind its defaults.

    python bench/sweep.py [--steps 650] [--n-samples 900] [--guidance 1] [--config configs/digits.yaml]
        [--variant NAME KEY=VALUE ...] ...

Each variant is our config plus its dotted overrides, trained from scratch by `ddpm.training.Trainer` for
--steps optimizer steps in float32 (same seed, so variants differ only by their overrides) and scored on
--n-samples images from its EMA weights, sampled with the config's `sample:` settings at each --guidance
weight, by `quality.Scorer` (the classifier features of bench/quality.py). Without --variant it runs the ones
that set the defaults of configs/digits.yaml (BENCHMARKS.md, section 3).
"""

from __future__ import annotations

import argparse
import dataclasses
import tempfile
import time
from pathlib import Path

import common
import quality
from accelerate.state import AcceleratorState

from ddpm.inference import load_for_sampling
from ddpm.training.trainer import Trainer

DEFAULT_VARIANTS = {
    "epsilon, uniform weights": ["diffusion.prediction_type=epsilon", "train.loss_weighting=uniform"],
    "epsilon, uniform weights, lr 2e-3": [
        "diffusion.prediction_type=epsilon",
        "train.loss_weighting=uniform",
        "train.lr=2.0e-3",
    ],
    "epsilon, min-SNR-5": ["diffusion.prediction_type=epsilon", "train.loss_weighting=min_snr"],
    "v-prediction, min-SNR-5": ["diffusion.prediction_type=v_prediction", "train.loss_weighting=min_snr"],
}


def main() -> None:
    args = parse_args()
    variants = dict(args.variant) if args.variant else DEFAULT_VARIANTS
    rows, scorer = [], None
    for name, overrides in variants.items():
        with tempfile.TemporaryDirectory(prefix="ddpm-sweep-") as tmp:
            config = quality.bench_config(
                args.config, overrides, Path(tmp) / "run", steps=args.steps, checkpoint_every=args.steps
            )
            scorer = scorer or quality.Scorer(config)
            start = time.perf_counter()
            checkpoint = Trainer(config).train()
            seconds = time.perf_counter() - start
            AcceleratorState._reset_state(reset_partial_state=True)  # the next Trainer builds its own
            loaded = load_for_sampling(checkpoint, use_ema=True)
            for guidance in args.guidance:
                sample = dataclasses.replace(config.sample, guidance_scale=guidance)
                score = scorer.score_model(loaded.model, loaded.scheduler, sample=sample, n=args.n_samples)
                rows.append(
                    [
                        name,
                        guidance,
                        args.steps,
                        seconds,
                        score["kid_conv"],
                        score["frechet_distance"],
                        score["confidence"],
                        score["agreement"],
                        score["coverage"],
                    ]
                )
    header = [
        "variant",
        "guidance",
        "steps",
        "trained (s)",
        "KID conv",
        "Frechet distance",
        "confidence",
        "agreement",
    ]
    print(
        f"\n{Path(args.config).name}, {args.n_samples} samples; classifier accuracy {scorer.accuracy:.3f}\n"
    )
    print(common.markdown_table([*header, "coverage"], rows))
    common.write_json(args.json, {"benchmark": "sweep", "header": [*header, "coverage"], "rows": rows})


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--config", default=str(common.REPO / "configs/digits.yaml"), help="the base config")
    parser.add_argument("--steps", type=int, default=650, help="optimizer steps per variant (default: 650)")
    parser.add_argument("--n-samples", type=int, default=900, help="samples scored (default: 900)")
    parser.add_argument(
        "--guidance",
        type=lambda text: [float(g) for g in text.split(",")],
        default=[1.0],
        help="guidance weights to score, comma-separated (default: 1)",
    )
    parser.add_argument(
        "--variant",
        nargs="+",
        action="append",
        metavar=("NAME", "KEY=VALUE"),
        help="a name and its dotted overrides (repeatable; default: DEFAULT_VARIANTS)",
    )
    common.add_report_options(parser)
    args = parser.parse_args()
    if args.steps < 1 or args.n_samples < 2:
        parser.error("--steps must be >= 1 and --n-samples >= 2")
    args.variant = [(v[0], v[1:]) for v in args.variant] if args.variant else None
    return args


if __name__ == "__main__":
    main()
