"""Sample quality at equal optimizer steps on the digits: our Trainer against a plain diffusers training loop,
over several seeds, scored by a kernel distance whose real-vs-real noise floor is reported with it.

    python bench/quality.py [--steps 500] [--seeds 0,1,2] [--n-samples 900]
        [--runs ours,ours-baseline-recipe,diffusers] [--config configs/digits.yaml] [--override KEY=VALUE ...]
        [--samplers ddpm:1000,dpm++:20 --tradeoff-samples N] [--samples-dir DIR] [--json OUT]
    python bench/quality.py --score RUN [RUN ...] [--n-samples 900] [--json OUT]   # trained runs, as they are

For each seed s (--seeds), each run (--runs) trains from scratch for --steps optimizer steps with training
seed s, and its EMA weights sample --n-samples images, image i from noise seeded 1,000,000 s + i with label
i mod 10, with the config's sampler and steps and no guidance (the baseline has no null label). The runs:
- "ours": `ddpm.training.Trainer` on configs/digits.yaml (+ --override), float32, no in-training grids.
- "ours-baseline-recipe": the same with the baseline's recipe: uniform loss weights and no label dropout
  (`train.loss_weighting=uniform train.label_dropout=0`).
- "diffusers": `UNet2DModel` with the same layers (`common.diffusers_unet_kwargs`), `DDPMScheduler` with the
  same schedule and prediction type (checked), trained by the loop of diffusers'
  examples/unconditional_image_generation (add_noise, plain MSE to the target, backward, clip_grad_norm_,
  AdamW, a warm-up LR schedule, EMAModel) on the same data, with our config's batch, learning rate and
  warm-up, Adam betas, weight decay, gradient clipping and EMA decay (the same (1 + n) / (10 + n) warm-up). It
  is class-conditional (num_class_embeds = 10) and has no null label, hence no label dropout.
"ours" against "ours-baseline-recipe" is the recipe (loss weighting, label dropout), "ours-baseline-recipe"
against "diffusers" the library (network code and initialisation, training loop, EMA).

Scoring, by a small CNN trained on the real digits (bench/digit_classifier.py, held-out accuracy printed):
- KID: the unbiased kernel distance (bench/kernel_distance.py) between the samples' features and those of
  all 1,797 real digits, features z-scored by the real digits' mean and std per dimension; on two features:
  the 1,024 convolutional features ("KID conv", the headline) and the 64 hidden features ("KID hidden").
  Its floor: the same distance between --n-samples random real digits, as many as a run's samples, and the
  other 1,797 - n real digits (all that a set disjoint from them can have; the samples are scored against
  all 1,797), over --floor-splits random splits (mean, std and 95th percentile of its absolute value); the
  reports name the two sizes it used.
- the Frechet distance of the 64 hidden features (biased upwards at these sample counts; the previous
  measure, kept for comparison, with the same half-vs-half floor), mean confidence (the largest softmax
  probability), agreement (the fraction classified as the label they were sampled with) and coverage.
Per run, the mean and standard deviation over the seeds; per pair of runs, the difference of the means with
its standard error (sqrt(s_a^2 / n_a + s_b^2 / n_b)). A difference is called one when it exceeds both 3
standard errors and the floor's 95th percentile; otherwise "no difference".

Speed: each run's steps / s over its whole training (timed from the first step; our Trainer's time includes
saving one checkpoint at the end); the run order alternates from seed to seed. Runs share the machine with
whatever else runs on it, so the ratio is indicative only; bench/train_step.py measures the step interleaved.
--samplers additionally scores our first seed's model with other samplers on --tradeoff-samples images.
--score trains nothing: it scores the EMA weights of runs already trained (run directories or checkpoints,
e.g. of configs/digits.yaml and configs/seed_digits.yaml) in the same way, each with its run's sampler and
steps, no guidance, noise seeded i, against the same floor.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import tempfile
import time
import warnings
from pathlib import Path

import common
import digit_classifier
import kernel_distance
import torch
import torch.nn.functional as F
from accelerate.state import AcceleratorState
from diffusers import DDPMScheduler, UNet2DModel
from diffusers.optimization import get_scheduler
from diffusers.training_utils import EMAModel
from torch import Tensor, nn

from ddpm import Config, NoiseScheduler, build_dataset, load_config, num_classes_of
from ddpm.data import loader_workers
from ddpm.fid import frechet_distance
from ddpm.fid import statistics as gaussian_statistics
from ddpm.inference import generate, load_for_sampling
from ddpm.interop.diffusers import diffusers_scheduler_config
from ddpm.training.trainer import Trainer

RUNS = {
    "ours": [],
    "ours-baseline-recipe": ["train.loss_weighting=uniform", "train.label_dropout=0"],
    "diffusers": [],  # DiffusersRun reads only the data, model, schedule and optimizer settings
}
PAIRS = (
    ("ours", "diffusers", "ours against the baseline"),
    ("ours", "ours-baseline-recipe", "recipe (min-SNR weights, label dropout)"),
    ("ours-baseline-recipe", "diffusers", "library (same recipe)"),
)
SAMPLING_SEED_STRIDE = 1_000_000  # seed s samples image i from noise seeded s * stride + i: disjoint sets
METRICS = ("kid_conv", "kid_hidden", "frechet_distance", "confidence", "agreement")


def main() -> None:
    args = parse_args()
    if args.merge:
        merge(args.merge, args.json)
        return
    if args.floor_only:
        floor_only(args)
        return
    if args.score:
        score_runs(args)
        return
    results: list[dict] = []
    tradeoff: list[dict] = []
    scorer = None
    for index, seed in enumerate(args.seeds):
        for name in args.runs if index % 2 == 0 else list(reversed(args.runs)):
            with tempfile.TemporaryDirectory(prefix="ddpm-bench-") as tmp:
                config = bench_config(
                    args.config,
                    [*args.override, *RUNS[name], f"train.seed={seed}"],
                    Path(tmp) / "run",
                    steps=args.steps,
                    checkpoint_every=args.steps,
                )
                scorer = scorer or Scorer(config, splits=args.floor_splits, size=args.n_samples)
                model, scheduler, seconds = train(name, config)
            sample = dataclasses.replace(config.sample, guidance_scale=1.0)  # the baseline has no null label
            images, labels = sample_images(
                model, scheduler, sample, args.n_samples, SAMPLING_SEED_STRIDE * seed
            )
            if args.samples_dir:
                args.samples_dir.mkdir(parents=True, exist_ok=True)
                torch.save({"images": images, "labels": labels}, args.samples_dir / f"{name}-seed{seed}.pt")
            result = {"run": name, "seed": seed, "steps": args.steps, "seconds": seconds}
            results.append({**result, **scorer.score(images, labels)})
            print(
                ", ".join(
                    f"{key} {value:.4g}" if isinstance(value, float) else f"{key} {value}"
                    for key, value in results[-1].items()
                ),
                flush=True,
            )
            if index == 0 and name == "ours" and args.samplers:
                tradeoff = [
                    scorer.timed_score(
                        model,
                        scheduler,
                        dataclasses.replace(sample, sampler=s, steps=k),
                        args.tradeoff_samples,
                    )
                    for s, k in args.samplers
                ]
            write_report(args, scorer, results, tradeoff, final=False)
    write_report(args, scorer, results, tradeoff, final=True)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--config", default=str(common.REPO / "configs/digits.yaml"), help="our run's config")
    parser.add_argument(
        "--override", nargs="*", default=[], metavar="KEY=VALUE", help="dotted overrides of our config"
    )
    parser.add_argument("--steps", type=int, default=500, help="optimizer steps per run (default: 500)")
    parser.add_argument(
        "--seeds",
        type=lambda text: [int(s) for s in text.split(",")],
        default=[0, 1, 2],
        help="training seeds, comma-separated; each also picks its own sampling noise (default: 0,1,2)",
    )
    parser.add_argument(
        "--runs",
        type=lambda text: text.split(","),
        default=list(RUNS),
        help=f"runs to compare, comma-separated, of {', '.join(RUNS)} (default: all)",
    )
    parser.add_argument("--n-samples", type=int, default=900, help="samples scored per run (default: 900)")
    parser.add_argument(
        "--floor-splits", type=int, default=100, help="real-vs-real splits for the floor (default: 100)"
    )
    parser.add_argument(
        "--samplers",
        type=lambda text: [(s, int(k)) for s, k in (item.rsplit(":", 1) for item in text.split(","))],
        default=[],
        help="SAMPLER:STEPS,... to score on our first seed's model too (default: none)",
    )
    parser.add_argument(
        "--tradeoff-samples", type=int, default=300, help="samples per --samplers entry (default: 300)"
    )
    parser.add_argument("--samples-dir", type=Path, help="also save each run's samples here (.pt)")
    parser.add_argument(
        "--floor-only",
        action="store_true",
        help="train nothing: the real-vs-real floor of every measure at --n-samples samples",
    )
    parser.add_argument(
        "--score",
        nargs="+",
        metavar="RUN",
        help="train nothing: score the EMA weights of these trained runs (or checkpoints) against the floor",
    )
    parser.add_argument(
        "--merge",
        nargs="+",
        metavar="JSON",
        help="train nothing: report the runs of these --json files together (same settings; e.g. seeds run "
        "in separate processes)",
    )
    common.add_report_options(parser)
    args = parser.parse_args()
    if args.steps < 1 or min(args.n_samples, args.tradeoff_samples, args.floor_splits) < 2:
        parser.error("--steps must be >= 1; --n-samples, --tradeoff-samples and --floor-splits >= 2")
    unknown = [name for name in args.runs if name not in RUNS]
    if unknown:
        parser.error(f"unknown --runs {unknown}: choose from {', '.join(RUNS)}")
    return args


def floor_only(args: argparse.Namespace) -> None:
    """Print (and write to --json) the floor of each distance at --n-samples samples."""
    with tempfile.TemporaryDirectory(prefix="ddpm-bench-") as tmp:
        config = bench_config(args.config, args.override, Path(tmp) / "run", steps=1, checkpoint_every=1)
    scorer = Scorer(config, splits=args.floor_splits, size=args.n_samples)
    floor = {metric: {k: v for k, v in f.items() if k != "values"} for metric, f in scorer.floor.items()}
    rows = [[metric, f["mean"], f["std"], f["abs_p95"]] for metric, f in floor.items()]
    print(
        f"{floor_label(floor)}, {args.floor_splits} random splits; "
        f"classifier held-out accuracy {scorer.accuracy:.3f}\n"
    )
    print(common.markdown_table(["measure", "mean", "std", "95th percentile of |value|"], rows))
    common.write_json(args.json, {"benchmark": "floor", "n_samples": args.n_samples, "floor": floor})


def score_runs(args: argparse.Namespace) -> None:
    """Print (and write to --json) the scores of the EMA weights of the trained runs --score, each sampled
    with its run's `sample:` settings but no guidance, and the floor at --n-samples."""
    with tempfile.TemporaryDirectory(prefix="ddpm-bench-") as tmp:
        config = bench_config(args.config, args.override, Path(tmp) / "run", steps=1, checkpoint_every=1)
    scorer = Scorer(config, splits=args.floor_splits, size=args.n_samples)
    results = []
    for run in args.score:
        loaded = load_for_sampling(run, use_ema=True)
        sample = dataclasses.replace(loaded.sampling, guidance_scale=1.0)
        scores = scorer.score_model(loaded.model, loaded.scheduler, sample=sample, n=args.n_samples)
        parameters = sum(p.numel() for p in loaded.model.parameters())
        results.append({"run": str(loaded.folder), "network": type(loaded.model).__name__, **scores})
        results[-1]["parameters"] = parameters
        print(f"{loaded.folder}: {scores}", flush=True)
    columns = ["kid_conv", "kid_hidden", "frechet_distance", "confidence", "agreement"]
    rows = [[r["run"], r["network"], r["parameters"], *(r[c] for c in columns)] for r in results]
    print(
        f"\n{args.n_samples} samples per run; classifier held-out accuracy {scorer.accuracy:.3f}\n\n"
        + common.markdown_table(["run", "network", "parameters", *columns], rows)
    )
    floor = {metric: {k: v for k, v in f.items() if k != "values"} for metric, f in scorer.floor.items()}
    rows = [[metric, f["mean"], f["std"], f["abs_p95"]] for metric, f in floor.items()]
    print(f"\nFloor: {floor_label(floor)}, {args.floor_splits} random splits\n")
    print(common.markdown_table(["floor", "mean", "std", "95th percentile of |value|"], rows))
    common.write_json(
        args.json, {"benchmark": "score", "n_samples": args.n_samples, "results": results, "floor": floor}
    )


def merge(paths: list[str], out: str | None) -> None:
    """Print the report of the runs stored in the --json files `paths` (made with the same settings, but for
    train.cpu_threads, for their seeds and runs) as one benchmark, and write it to `out`."""
    payloads = [json.loads(Path(path).read_text()) for path in paths]
    for payload in payloads:  # the thread count changes the speed, not what is computed
        options = payload["options"]
        options["override"] = [o for o in options["override"] if not o.startswith("train.cpu_threads=")]
    same = ("config", "override", "steps", "n_samples", "floor_splits")
    first = payloads[0]
    differ = [key for key in same for p in payloads if p["options"][key] != first["options"][key]]
    if differ:
        raise SystemExit(f"error: the files differ in {sorted(set(differ))}; merge only runs of one setting")
    results = [r for p in payloads for r in p["results"]]
    args = argparse.Namespace(**{**first["options"], "json": out})
    args.seeds = sorted({r["seed"] for r in results})
    args.runs = [name for name in RUNS if any(r["run"] == name for r in results)]
    scorer = argparse.Namespace(floor=first["floor"], accuracy=first["classifier_accuracy"])
    write_report(args, scorer, results, first["samplers"], final=True)


def bench_config(
    path: str | Path,
    overrides: list[str],
    run_dir: Path,
    *,
    steps: int,
    checkpoint_every: int,
    keep_checkpoints: int = 1,
) -> Config:
    """The config at `path` with `overrides` applied, for a benchmark run in `run_dir`: float32 (as the
    baseline), no in-training grids, `steps` optimizer steps, checkpoints every `checkpoint_every`."""
    return load_config(
        path,
        [
            "train.mixed_precision='no'",  # quoted: YAML reads a bare no as false
            *overrides,
            f"output_dir={run_dir}",
            f"train.steps={steps}",
            f"train.checkpoint_every={checkpoint_every}",
            f"train.keep_checkpoints={keep_checkpoints}",
            "train.sample_every=0",
        ],
    )


def train(name: str, config: Config) -> tuple[nn.Module, NoiseScheduler, float]:
    """Train run `name` for config.train.steps steps: (EMA model called as model(x, t, y), its noise
    scheduler, seconds of training)."""
    scheduler = NoiseScheduler(**config.diffusion)
    if name == "diffusers":
        run = DiffusersRun(config)
        start = time.perf_counter()
        for _ in range(config.train.steps):
            run.step()
        return run.ema_model(), scheduler, time.perf_counter() - start
    trainer = Trainer(config)
    start = time.perf_counter()
    checkpoint = trainer.train()
    seconds = time.perf_counter() - start
    AcceleratorState._reset_state(reset_partial_state=True)  # the next Trainer builds its own
    loaded = load_for_sampling(checkpoint, use_ema=True)
    return loaded.model, loaded.scheduler, seconds


@torch.no_grad()
def sample_images(
    model: nn.Module,
    scheduler: NoiseScheduler,
    sample,
    n: int,
    seed: int,
    *,
    autoguide: nn.Module | None = None,
    guidance_interval: tuple[float, float] | None = None,
    guidance_rescale: float = 0.0,
) -> tuple[Tensor, Tensor | None]:
    """`n` images (n, C, S, S) of `model` with the settings `sample`, image i from noise seeded seed + i and
    with label i mod classes; and those labels (None for an unconditional model). autoguide: a weak model
    whose autoguidance sample.guidance_scale weighs (`ddpm.sample`), instead of classifier-free guidance.
    guidance_interval (sigma_lo, sigma_hi) and guidance_rescale (phi): the guidance only at those noise
    levels and rescaled (`ddpm.sample`; the sample: section has no such fields)."""
    model.eval()
    images = generate(
        model,
        scheduler,
        n,
        image_shape=(model_channels(model), *(2 * [model_size(model)])),
        sampler=sample.sampler,
        steps=sample.steps,
        eta=sample.eta,
        guidance_scale=sample.guidance_scale,
        guidance_interval=guidance_interval,
        guidance_rescale=guidance_rescale,
        autoguide=autoguide,
        seed=seed,
        device=next(model.parameters()).device,
    )
    labels = torch.arange(n) % model.num_classes if model.num_classes else None
    return images, labels


def model_channels(model: nn.Module) -> int:
    return model.unet.config.in_channels if hasattr(model, "unet") else model.config["in_channels"]


def model_size(model: nn.Module) -> int:
    return model.unet.config.sample_size if hasattr(model, "unet") else model.config["image_size"]


class DiffusersRun:
    """The baseline: diffusers' UNet2DModel, DDPMScheduler and EMAModel in the training loop of diffusers'
    unconditional-generation example, with our config's data and hyperparameters (module docstring)."""

    def __init__(self, config: Config) -> None:
        train = config.train
        self.train = train
        self.device = torch.device(common.default_device())
        torch.manual_seed(train.seed)
        self.unet = UNet2DModel(**common.diffusers_unet_kwargs(config.model)).to(self.device).train()
        # Training reads only the noise levels; the spacing of sampling steps (ours may be "exponential",
        # which DDPMScheduler lacks) does not enter, and the samples are drawn with our sampler.
        schedule = NoiseScheduler(**{**config.diffusion, "timestep_spacing": "trailing"})
        self.noise_scheduler = DDPMScheduler(**diffusers_scheduler_config(schedule))
        common.check_same_schedule(schedule, self.noise_scheduler)
        self.optimizer = torch.optim.AdamW(
            self.unet.parameters(), lr=train.lr, betas=train.adam_betas, weight_decay=train.weight_decay
        )
        self.lr_scheduler = get_scheduler(
            "constant_with_warmup", self.optimizer, num_warmup_steps=train.warmup_steps
        )
        self.ema = EMAModel(self.unet.parameters(), decay=train.ema_decay)  # decay min(d, (1 + n) / (10 + n))
        dataset = build_dataset(config.data)
        self.loader = torch.utils.data.DataLoader(
            dataset,
            batch_size=config.data.batch_size,
            shuffle=True,
            drop_last=len(dataset) >= config.data.batch_size,
            num_workers=loader_workers(config.data.num_workers),
            generator=torch.Generator().manual_seed(train.seed),
        )
        self.conditional = num_classes_of(dataset) is not None
        self.generator = torch.Generator(self.device).manual_seed(train.seed)  # noise and timesteps
        self.batches = self._batches()

    def ema_model(self) -> nn.Module:
        """A copy of the EMA weights, called as model(x, t, y)."""
        ema_unet = UNet2DModel.from_config(self.unet.config).to(self.device).eval()
        self.ema.copy_to(ema_unet.parameters())
        return common.DiffusersDenoiser(ema_unet)

    def step(self) -> None:
        """One optimizer step of the example's loop on the next batch."""
        x0, labels = next(self.batches)
        x0 = x0.to(self.device)
        noise = torch.randn(x0.shape, generator=self.generator, device=self.device)
        timesteps = torch.randint(
            0,
            self.noise_scheduler.config.num_train_timesteps,
            (len(x0),),
            generator=self.generator,
            device=self.device,
        )
        noisy = self.noise_scheduler.add_noise(x0, noise, timesteps)
        class_labels = labels.to(self.device) if self.conditional else None
        prediction = self.unet(noisy, timesteps, class_labels=class_labels).sample
        loss = F.mse_loss(prediction, self._target(x0, noise, timesteps))
        loss.backward()
        if self.train.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(self.unet.parameters(), self.train.grad_clip)
        self.optimizer.step()
        self.lr_scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.ema.step(self.unet.parameters())

    def _target(self, x0: Tensor, noise: Tensor, timesteps: Tensor) -> Tensor:
        prediction_type = self.noise_scheduler.config.prediction_type
        if prediction_type == "epsilon":
            return noise
        if prediction_type == "v_prediction":
            return self.noise_scheduler.get_velocity(x0, noise, timesteps)
        return x0

    def _batches(self):
        while True:
            yield from self.loader


class Scorer:
    """Scores sets of images with the features and predictions of a classifier of the real data, against
    all the real images; `floor` holds each distance between `size` random real images (default: half; at
    most all but two) and the other real images, with the two sizes (see `floor_label`)."""

    def __init__(self, config: Config, *, splits: int = 100, size: int | None = None) -> None:
        # every real digit, the held-out ones too (data.split=all), whatever split the runs train on
        data = dataclasses.replace(config.data, hflip=False, split="all")
        dataset = build_dataset(data)
        self.images, self.labels = next(iter(torch.utils.data.DataLoader(dataset, batch_size=len(dataset))))
        self.classifier, self.accuracy = digit_classifier.train_classifier(self.images, self.labels)
        if self.accuracy < digit_classifier.MIN_ACCURACY:
            raise RuntimeError(
                f"the digit classifier reached only {self.accuracy:.3f} held-out accuracy "
                f"(< {digit_classifier.MIN_ACCURACY}): its features cannot be trusted to score samples"
            )
        self.num_classes = self.classifier.head.out_features
        with torch.no_grad():
            real = self._features(self.images)
        self.standardize = {kind: (f.mean(0), f.std(0).clamp(min=1e-6)) for kind, f in real.items()}
        self.real = {kind: self._standardized(kind, f) for kind, f in real.items()}
        self.reference = _gaussian(real["hidden"])
        size = floor_size(len(self.images), size)
        self.floor = {
            f"kid_{kind}": kernel_distance.split_floor(f, size=size, splits=splits)
            for kind, f in self.real.items()
        }
        self.floor["frechet_distance"] = _frechet_floor(real["hidden"], size=size, splits=splits)

    @torch.no_grad()
    def score(self, images: Tensor, labels: Tensor | None) -> dict:
        """KID (conv and hidden features) and Frechet distance to the real digits, mean confidence, label
        agreement and class coverage of images (N, C, S, S) in [-1, 1] sampled with `labels` (N,)."""
        logits = self.classifier(images)
        predicted = logits.argmax(1)
        counts = torch.bincount(predicted, minlength=self.num_classes).tolist()
        features = self._features(images)
        kids = {
            f"kid_{kind}": kernel_distance.kernel_distance(self._standardized(kind, features[kind]), real)
            for kind, real in self.real.items()
        }
        stats, reference = _gaussian(features["hidden"]), self.reference
        return {
            **kids,
            "frechet_distance": frechet_distance(reference.mu, reference.sigma, stats.mu, stats.sigma),
            "confidence": logits.softmax(1).amax(1).mean().item(),
            "agreement": (predicted == labels).float().mean().item() if labels is not None else None,
            "coverage": sum(c > 0 for c in counts),
            "class_counts": counts,
        }

    def score_model(
        self,
        model: nn.Module,
        scheduler: NoiseScheduler,
        *,
        sample,
        n: int,
        seed: int = 0,
        autoguide: nn.Module | None = None,
        guidance_interval: tuple[float, float] | None = None,
        guidance_rescale: float = 0.0,
    ) -> dict:
        """Score `n` images of `model` sampled with the settings `sample` from noise seeded seed + i
        (guided by the weak model `autoguide` when given, the guidance limited to `guidance_interval` and
        rescaled by `guidance_rescale`: `sample_images`)."""
        images, labels = sample_images(
            model,
            scheduler,
            sample,
            n,
            seed,
            autoguide=autoguide,
            guidance_interval=guidance_interval,
            guidance_rescale=guidance_rescale,
        )
        return self.score(images, labels)

    def timed_score(self, model: nn.Module, scheduler: NoiseScheduler, sample, n: int) -> dict:
        start = time.perf_counter()
        scores = self.score_model(model, scheduler, sample=sample, n=n)
        return {
            "sampler": sample.sampler,
            "steps": sample.steps,
            "seconds": time.perf_counter() - start,
            **scores,
        }

    def _features(self, images: Tensor) -> dict[str, Tensor]:
        conv = self.classifier.conv_features(images)
        hidden = F.relu(self.classifier.hidden(conv))
        return {"conv": conv.double(), "hidden": hidden.double()}

    def _standardized(self, kind: str, features: Tensor) -> Tensor:
        mean, std = self.standardize[kind]
        return (features - mean) / std


def _gaussian(features: Tensor):
    # ddpm.fid.statistics warns below 2,048 images, Inception's feature count; these features have 64.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        return gaussian_statistics(features.numpy())


def floor_size(n_real: int, n_samples: int | None) -> int:
    """How many of the n_real real images the floor sets against the others: n_samples, the count a run's
    samples are scored with (default: half), but at most all but two (the kernel distance needs two on each
    side). The scores compare n_samples images with all n_real; a real set disjoint from the n_samples can
    have only the n_real - n_samples others, so the floor is a little wider than the scores' own noise."""
    return min(n_samples or n_real // 2, n_real - 2)


def floor_label(floor: dict) -> str:
    """What the floor compared, from the sizes its entries hold: "900 real digits against the other 897"."""
    sizes = {tuple(f["sizes"]) for f in floor.values() if "sizes" in f}
    if len(sizes) != 1:  # files written before the sizes were recorded
        return "real digits against the other real digits (sizes not recorded)"
    size, rest = sizes.pop()
    return f"{size:,} real digits against the other {rest:,}"


def _frechet_floor(features: Tensor, *, size: int | None, splits: int, seed: int = 0) -> dict:
    """The Frechet distance between `size` (default: half) random rows of `features` and the other rows,
    over `splits` seeded splits, with the sizes, as `kernel_distance.split_floor`."""
    generator = torch.Generator().manual_seed(seed)
    half = size or len(features) // 2
    values = []
    for _ in range(splits):
        order = torch.randperm(len(features), generator=generator)
        a, b = _gaussian(features[order[:half]]), _gaussian(features[order[half:]])
        values.append(frechet_distance(a.mu, a.sigma, b.mu, b.sigma))
    absolute = sorted(values)
    return {
        "mean": statistics.fmean(values),
        "std": statistics.stdev(values),
        "abs_p95": absolute[round(0.95 * (len(absolute) - 1))],
        "values": values,
        "sizes": [half, len(features) - half],
    }


def write_report(args, scorer: Scorer, results: list[dict], tradeoff: list[dict], *, final: bool) -> None:
    """Write --json (after every run, so that an interrupted benchmark keeps what it measured); when `final`,
    print the tables too."""
    runs = [name for name in args.runs if any(r["run"] == name for r in results)]
    summary = {name: summarize([r for r in results if r["run"] == name]) for name in runs}
    pairs = [
        compare(summary[a], summary[b], scorer.floor, label=label, runs=(a, b))
        for a, b, label in PAIRS
        if a in summary and b in summary
    ]
    speed = speed_ratios(results)
    env = common.environment(torch.device(common.default_device()))
    floor = {metric: {k: v for k, v in f.items() if k != "values"} for metric, f in scorer.floor.items()}
    common.write_json(
        args.json,
        {
            "benchmark": "quality",
            "environment": env,
            "options": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
            "classifier_accuracy": scorer.accuracy,
            "floor": floor,
            "results": results,
            "summary": summary,
            "pairs": pairs,
            "speed_ratios_ours_over_diffusers": speed,
            "samplers": tradeoff,
        },
    )
    if not final:
        return
    print(
        f"\nSample quality at {args.steps} steps, {Path(args.config).name} {' '.join(args.override)}, "
        f"{args.n_samples} samples per run, seeds {args.seeds}; {common.describe(env)}; classifier held-out "
        f"accuracy {scorer.accuracy:.3f}\n"
    )
    header = [
        "run",
        "seed",
        "steps / s",
        "KID conv",
        "KID hidden",
        "Frechet distance",
        "confidence",
        "agreement",
    ]
    rows = [
        [r["run"], r["seed"], r["steps"] / r["seconds"], *(r[m] for m in METRICS)]
        for r in sorted(results, key=lambda r: (runs.index(r["run"]), r["seed"]))
    ]
    print(common.markdown_table(header, rows))
    print(f"\nMean +- standard deviation over the seeds; the floor: {floor_label(floor)}:\n")
    rows = [
        [name, len(s["seeds"]), *(f"{s[m]['mean']:.4g} +- {s[m]['std']:.2g}" for m in METRICS)]
        for name, s in summary.items()
    ]
    rows.append(
        [
            "real vs real",
            args.floor_splits,
            *(f"{f['mean']:.4g} +- {f['std']:.2g}" for f in floor.values()),
        ]
    )
    print(common.markdown_table(["run", "seeds", *header[3:]], rows))
    percentiles = ", ".join(f"{metric} {f['abs_p95']:.3g}" for metric, f in floor.items())
    print(f"\nFloor, 95th percentile of |distance|: {percentiles}")
    print("\nDifferences of the means (first run minus second):\n")
    rows = [
        [p["label"], p["a"], p["b"], m, p[m]["difference"], p[m]["se"], p[m]["verdict"]]
        for p in pairs
        for m in ("kid_conv", "kid_hidden")
    ]
    print(common.markdown_table(["what", "run", "against", "measure", "difference", "s.e.", "verdict"], rows))
    if speed:
        print(f"\nsteps / s, ours / diffusers, per seed (not interleaved; indicative): {speed}")
    if tradeoff:
        header = ["sampler", "steps", "seconds", "KID conv", "KID hidden", "Frechet distance", "agreement"]
        rows = [
            [
                t["sampler"],
                t["steps"],
                t["seconds"],
                t["kid_conv"],
                t["kid_hidden"],
                t["frechet_distance"],
                t["agreement"],
            ]
            for t in tradeoff
        ]
        print(f"\nSamplers on our seed-{args.seeds[0]} model, {args.tradeoff_samples} samples each:\n")
        print(common.markdown_table(header, rows))


def summarize(results: list[dict], metrics: tuple[str, ...] = (*METRICS, "steps_per_s")) -> dict:
    """{"seeds": [...], metric: {"mean", "std", "n"}} over the results of one run (std 0 for one seed)."""
    summary = {"seeds": [r["seed"] for r in results]}
    for metric in metrics:
        values = [r["steps"] / r["seconds"] if metric == "steps_per_s" else r[metric] for r in results]
        values = [v for v in values if v is not None]
        summary[metric] = {
            "mean": statistics.fmean(values),
            "std": statistics.stdev(values) if len(values) > 1 else 0.0,
            "n": len(values),
        }
    return summary


def compare(a: dict, b: dict, floor: dict, *, label: str, runs: tuple[str, str]) -> dict:
    """The difference of the means of two runs per KID and Frechet distance, its standard error, and the
    verdict: "a difference" when it exceeds 3 standard errors and the floor's 95th percentile."""
    out = {"label": label, "a": runs[0], "b": runs[1]}
    for metric in ("kid_conv", "kid_hidden", "frechet_distance"):
        difference = a[metric]["mean"] - b[metric]["mean"]
        se = (a[metric]["std"] ** 2 / a[metric]["n"] + b[metric]["std"] ** 2 / b[metric]["n"]) ** 0.5
        resolved = (
            abs(difference) > max(3 * se, floor[metric]["abs_p95"])
            and min(a[metric]["n"], b[metric]["n"]) > 1
        )
        out[metric] = {
            "difference": difference,
            "se": se,
            "floor_p95": floor[metric]["abs_p95"],
            "verdict": ("lower" if difference < 0 else "higher") if resolved else "no difference",
        }
    return out


def speed_ratios(results: list[dict]) -> list[float]:
    """Per seed with both: steps / s of "ours" over that of "diffusers"."""
    rate = {(r["run"], r["seed"]): r["steps"] / r["seconds"] for r in results}
    return [
        rate["ours", seed] / rate["diffusers", seed]
        for run, seed in rate
        if run == "ours" and ("diffusers", seed) in rate
    ]


if __name__ == "__main__":
    main()
