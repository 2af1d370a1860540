"""Learned variance and the hybrid loss (Nichol & Dhariwal 2021) against the default recipe on the digits:
sample quality and likelihood at equal optimizer steps, over several seeds.

    python bench/learned_variance.py [--steps 1500] [--seeds 0,1,2] [--n-samples 900]
        [--samplers unipc:20,ddpm:50,ddpm:1000] [--nll-n 1000] [--device cuda]
        [--out bench/results/learned_variance]
    python bench/learned_variance.py --quick          # tiny: a check that it runs end to end (CPU, ~minutes)

Runs, each trained from scratch with `ddpm.training.Trainer` on configs/digits.yaml for --steps steps,
float32, training seed s:
- "default": the config as it is (fixed_small variance, L_simple with min-SNR weights, v-prediction).
- "learned": the same with `model.out_channels=2 diffusion.variance_type=learned_range
  train.learn_sigma=true`: 2C output channels and the hybrid loss L_simple + 0.001 L_vlb.
Each run's EMA weights are scored:
- quality, for each sampler of --samplers: the kernel distance (KID on the digit classifier's conv features,
  bench/quality.py's Scorer and bench/kernel_distance.py) of --n-samples images against the real digits, image
  i from noise seeded 1,000,000 s + i with label i mod 10, no guidance; with its real-vs-real floor. Only the
  ancestral sampler ("ddpm") uses the learned variance; the others take the prediction channels alone.
- likelihood: `ddpm.nll.image_nll`, the whole variational bound in bits/dim on the first --nll-n held-out
  digits (data.split=test: 176, which training never sees; 8-bit quantised), with its standard error over
  images.
Reported per seed, and per run as mean +- std over seeds, in OUT.json and OUT.md (written after every run).
Training runs where Accelerate puts it (the GPU when there is one); sampling and the NLL on --device.
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import tempfile
import time
from pathlib import Path

import common
import torch
from accelerate.state import AcceleratorState
from quality import SAMPLING_SEED_STRIDE, Scorer, bench_config

from ddpm.data import build_dataset
from ddpm.inference import load_for_sampling
from ddpm.nll import image_nll
from ddpm.training.trainer import Trainer

RUNS = {
    "default": [],
    "learned": ["model.out_channels=2", "diffusion.variance_type=learned_range", "train.learn_sigma=true"],
}
# --quick: a check of the whole path in minutes on a CPU; T = 100 so that the NLL's n T rows are few
QUICK = {"steps": 2, "seeds": [0], "n_samples": 8, "samplers": [("unipc", 2), ("ddpm", 3)], "nll_n": 2}
QUICK_OVERRIDES = ["diffusion.num_train_timesteps=100"]


def main() -> None:
    args = parse_args()
    results: list[dict] = []
    scorer = None
    for index, seed in enumerate(args.seeds):
        for name in RUNS if index % 2 == 0 else list(reversed(RUNS)):
            with tempfile.TemporaryDirectory(prefix="ddpm-bench-") as tmp:
                overrides = [*args.override, *RUNS[name], f"train.seed={seed}"]
                config = bench_config(
                    args.config, overrides, Path(tmp) / "run", steps=args.steps, checkpoint_every=args.steps
                )
                scorer = scorer or Scorer(config, splits=args.floor_splits, size=args.n_samples)
                start = time.perf_counter()
                checkpoint = Trainer(config).train()
                seconds = time.perf_counter() - start
                AcceleratorState._reset_state(reset_partial_state=True)  # the next Trainer builds its own
                loaded = load_for_sampling(checkpoint, use_ema=True, device=args.device)
            result = {"run": name, "seed": seed, "steps": args.steps, "train_seconds": seconds}
            for sampler, steps in args.samplers:
                sample = dataclasses.replace(config.sample, sampler=sampler, steps=steps, guidance_scale=1.0)
                scores = scorer.score_model(
                    loaded.model,
                    loaded.scheduler,
                    sample=sample,
                    n=args.n_samples,
                    seed=SAMPLING_SEED_STRIDE * seed,
                )
                result[f"kid_conv/{sampler}:{steps}"] = scores["kid_conv"]
            dataset = build_dataset(dataclasses.replace(config.data, hflip=False, split="test"))
            nll = image_nll(
                loaded.model,
                loaded.scheduler,
                dataset,
                n=min(args.nll_n, len(dataset)),
                batch_size=args.nll_batch,
            )
            result.update(nll_bits_per_dim=nll.bits_per_dim, nll_stderr=nll.stderr, nll_n=nll.n)
            result["nll_decoder_term"] = nll.terms[0].item()
            results.append(result)
            print(
                ", ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in result.items())
            )
            write_report(args, scorer, results)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--config", default=str(common.REPO / "configs/digits.yaml"), help="the runs' config")
    parser.add_argument(
        "--override", nargs="*", default=[], metavar="KEY=VALUE", help="overrides of both runs"
    )
    parser.add_argument(
        "--steps", type=int, default=1500, help="optimizer steps per run (default: %(default)s)"
    )
    parser.add_argument(
        "--seeds",
        type=lambda text: [int(s) for s in text.split(",")],
        default=[0, 1, 2],
        help="training seeds",
    )
    parser.add_argument("--n-samples", type=int, default=900, help="samples scored per run and sampler")
    parser.add_argument("--floor-splits", type=int, default=100, help="real-vs-real splits for the KID floor")
    parser.add_argument(
        "--samplers",
        type=lambda text: [(s, int(k)) for s, k in (item.rsplit(":", 1) for item in text.split(","))],
        default=[("unipc", 20), ("ddpm", 50), ("ddpm", 1000)],
        help="SAMPLER:STEPS,... each scored (default: unipc:20,ddpm:50,ddpm:1000)",
    )
    parser.add_argument(
        "--nll-n",
        type=int,
        default=1000,
        help="held-out digits the NLL is measured on (default: 1000, or all)",
    )
    parser.add_argument(
        "--nll-batch",
        type=int,
        default=250,
        help="NLL rows (image, timestep) per network call (default: 250)",
    )
    parser.add_argument("--device", default=common.default_device(), help="sampling and NLL device")
    parser.add_argument(
        "--out",
        type=Path,
        default=common.REPO / "bench/results/learned_variance",
        help="writes OUT.json, OUT.md",
    )
    parser.add_argument(
        "--quick", action="store_true", help=f"a tiny end-to-end check: {QUICK}, floor splits 5"
    )
    args = parser.parse_args()
    if args.quick:
        vars(args).update(QUICK, floor_splits=5, override=[*args.override, *QUICK_OVERRIDES])
        if args.out == parser.get_default("out"):
            args.out = Path(tempfile.gettempdir()) / "learned_variance_quick"
    if args.steps < 1 or args.n_samples < 2 or args.nll_n < 1:
        parser.error("--steps and --nll-n must be >= 1, --n-samples >= 2")
    return args


def summarize(values: list[float]) -> tuple[float, float]:
    """(mean, std over seeds; 0 for one seed)."""
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def write_report(args: argparse.Namespace, scorer: Scorer, results: list[dict]) -> None:
    """OUT.json (every number) and OUT.md (per seed and mean +- std per run), rewritten after every run."""
    metrics = [f"kid_conv/{s}:{k}" for s, k in args.samplers] + ["nll_bits_per_dim"]
    summary = {
        name: {m: summarize([r[m] for r in results if r["run"] == name]) for m in metrics}
        for name in RUNS
        if any(r["run"] == name for r in results)
    }
    floor = {k: v for k, v in scorer.floor["kid_conv"].items() if k != "values"}
    env = common.environment(torch.device(args.device))
    options = {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}
    payload = {
        "benchmark": "learned_variance",
        "environment": env,
        "options": options,
        "kid_conv_floor": floor,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    common.write_json(str(args.out.with_suffix(".json")), {**payload, "results": results, "summary": summary})
    per_seed = [
        [
            r["run"],
            r["seed"],
            *(r[m] for m in metrics[:-1]),
            f"{r['nll_bits_per_dim']:.4f} +- {r['nll_stderr']:.4f}",
        ]
        for r in results
    ]
    means = [[name, *(f"{m:.4g} +- {s:.2g}" for m, s in values.values())] for name, values in summary.items()]
    header = ["run", *(f"KID conv, {m.split('/')[1]}" for m in metrics[:-1]), "NLL bits/dim"]
    text = (
        f"# Learned variance + hybrid loss against the default recipe\n\n"
        f"{Path(args.config).name} {' '.join(args.override)}, {args.steps} steps, seeds {args.seeds}, "
        f"{args.n_samples} samples per sampler, NLL on the first {args.nll_n} held-out digits (8-bit); "
        f"{common.describe(env)}\n\nKID floor (real vs real, {args.floor_splits} splits): mean "
        f"{floor['mean']:.2g}, std {floor['std']:.2g}, 95th percentile of |value| {floor['abs_p95']:.2g}\n\n"
        "Per seed (NLL: mean +- standard error over images):\n\n"
        + common.markdown_table(["run", "seed", *header[1:]], per_seed)
        + "\n\nMean +- std over seeds:\n\n"
        + common.markdown_table(header, means)
        + "\n"
    )
    args.out.with_suffix(".md").write_text(text)


if __name__ == "__main__":
    main()
