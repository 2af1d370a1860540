"""Sample quality per CPU-minute on the digits: our Trainer against a plain diffusers training loop.

    python bench/quality.py [--minutes 5] [--fractions 0.25,0.5,1] [--n-samples 900] [--tradeoff-samples N]
        [--samplers ddpm:1000,ddim:50,dpm++:10,dpm++:20] [--config configs/digits.yaml]
        [--override train.lr=2e-3 ...] [--workdir DIR] [--json OUT]

Training, for the same wall-clock budget (--minutes) each, in the same process, in alternating chunks (ours to
25% of the budget, the baseline to 25%, ours to 50%, ...) so that changes in the machine's load reach both:
- ours: `ddpm.trainer.Trainer` on configs/digits.yaml (+ --override), unchanged but for no in-training grids
  and one checkpoint per chunk. A chunk is one `train()`, stopped at its time by SIGTERM, which the Trainer
  answers by finishing the step and saving a checkpoint; the next chunk resumes from it.
- diffusers: `UNet2DModel` with the same layers (`common.diffusers_unet_kwargs`) and `DDPMScheduler` with the
  same schedule and prediction type (checked), trained by the loop of diffusers'
  examples/unconditional_image_generation (add_noise, MSE to the target, backward, clip_grad_norm_, AdamW, a
  warm-up LR schedule, EMAModel) on the same data loader. For a fair race it takes our config's
  hyperparameters (batch, learning rate and warm-up, Adam betas, weight decay, gradient clipping, EMA decay
  with the same (1 + n) / (10 + n) warm-up) rather than the example's defaults, which are tuned for long GPU
  runs. It is class-conditional like ours (num_class_embeds = 10, so that both learn the same conditional
  distribution). What the example loop lacks stays ours: its loss is the plain MSE (ours: the config's
  train.loss_weighting, min-SNR by default), and diffusers has no null label, hence no label dropout (ours
  drops a tenth of the labels, train.label_dropout) and no classifier-free guidance.
Only training is timed (each library's set-up and our resumes are not); the times reported are measured,
and exceed the budget by at most a step and a checkpoint.

Scoring, for the EMA weights at each chunk's end: --n-samples images, image i from noise seeded i and with
label i mod 10 for both models, sampled with `ddpm.generate.generate` (our config's sample: settings; the
baseline through `common.DiffusersDenoiser` without guidance, since it has no null label; sampling.py shows
that diffusers' own DDIM loop gives the same images) and scored by a small CNN trained on the real digits
(bench/digit_classifier.py, held-out accuracy printed):
- Frechet distance between Gaussians fitted to its 64 hidden features of the samples and of all 1,797 real
  digits (`ddpm.fid.statistics` and `ddpm.fid.frechet_distance`); "real" is --n-samples real digits;
- mean confidence (the largest softmax probability), agreement (the fraction classified as the label they
  were sampled with) and coverage (how many classes the predictions reach, with the counts per class).
Also: our final model sampled without guidance (as the baseline is; when our config guides), the time at
which our run first reaches the baseline's full-budget distance, and the sampler/steps trade-off of our final
model (--samplers, each timed and scored on --tradeoff-samples images, default --n-samples: DDPM 1000 makes
1,000 network calls per batch, twice that with guidance).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import dataclasses
import os
import signal
import tempfile
import threading
import time
import warnings
from pathlib import Path

import common
import digit_classifier
import torch
import torch.nn.functional as F
from diffusers import DDPMScheduler, UNet2DModel
from diffusers.optimization import get_scheduler
from diffusers.training_utils import EMAModel
from torch import Tensor, nn

from ddpm import Config, NoiseScheduler, build_dataset, load_config, num_classes_of
from ddpm.checkpoint import load_for_sampling
from ddpm.fid import frechet_distance, statistics
from ddpm.generate import generate
from ddpm.trainer import Trainer


@dataclasses.dataclass
class Snapshot:
    """A model's EMA weights at the end of a training chunk."""

    model: nn.Module  # called as model(x, t, y)
    seconds: float  # training wall-clock time so far
    steps: int  # optimizer steps so far


def main() -> None:
    args = parse_args()
    budget = 60 * args.minutes
    with working_directory(args.workdir) as workdir:
        config = our_config(args, workdir / "ours")
        scorer = Scorer(config, n=args.n_samples)
        ours, theirs = OurRun(config), DiffusersRun(config)
        snapshots: dict[str, list[Snapshot]] = {"ours": [], "diffusers": []}
        for fraction in args.fractions:
            snapshots["ours"].append(ours.train_until(fraction * budget))
            snapshots["diffusers"].append(theirs.train_until(fraction * budget))

        sample = config.sample
        unguided = dataclasses.replace(sample, guidance_scale=1.0)  # diffusers' model has no null label
        settings = {"ours": sample, "diffusers": unguided}
        scores = {
            name: [scorer.score_model(s.model, ours.scheduler, sample=settings[name]) for s in runs]
            for name, runs in snapshots.items()
        }
        final = snapshots["ours"][-1].model
        if sample.guidance_scale != 1.0:
            scores["ours, no guidance"] = [scorer.score_model(final, ours.scheduler, sample=unguided)]
        n_tradeoff = args.tradeoff_samples or args.n_samples
        tradeoff = [
            scorer.timed_score(
                final, ours.scheduler, dataclasses.replace(sample, sampler=s, steps=k), n_tradeoff
            )
            for s, k in args.samplers
        ]
    report(args, config, scorer, snapshots, scores, tradeoff, n_tradeoff)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--config", default=str(common.REPO / "configs/digits.yaml"), help="our run's config")
    parser.add_argument(
        "--override", nargs="*", default=[], metavar="KEY=VALUE", help="dotted overrides of our config"
    )
    parser.add_argument("--minutes", type=float, default=5.0, help="training budget per model (default: 5)")
    parser.add_argument(
        "--fractions",
        type=lambda text: sorted(float(f) for f in text.split(",")),
        default=[0.25, 0.5, 1.0],
        help="fractions of the budget at which both models are scored (default: 0.25,0.5,1)",
    )
    parser.add_argument("--n-samples", type=int, default=900, help="samples scored per model (default: 900)")
    parser.add_argument(
        "--samplers",
        type=lambda text: [(s, int(k)) for s, k in (item.rsplit(":", 1) for item in text.split(","))],
        default=[("ddpm", 1000), ("ddim", 50), ("dpm++", 10), ("dpm++", 20)],
        help="SAMPLER:STEPS,... for our final model's trade-off "
        "(default: ddpm:1000,ddim:50,dpm++:10,dpm++:20)",
    )
    parser.add_argument(
        "--tradeoff-samples", type=int, help="samples per sampler in the trade-off (default: --n-samples)"
    )
    parser.add_argument("--workdir", type=Path, help="keep our run here (default: a temporary directory)")
    common.add_report_options(parser)
    args = parser.parse_args()
    if args.minutes <= 0 or min(args.n_samples, args.tradeoff_samples or 2) < 2:
        parser.error("--minutes must be > 0, --n-samples and --tradeoff-samples >= 2")
    if not all(0 < f <= 1 for f in args.fractions):
        parser.error("every fraction must lie in (0, 1]")
    if args.fractions[-1] != 1.0:
        args.fractions.append(1.0)
    return args


def our_config(args: argparse.Namespace, run_dir: Path) -> Config:
    """Our benchmark config with no step limit (the chunks end by time) and a checkpoint per chunk."""
    return bench_config(
        args.config,
        args.override,
        run_dir,
        steps=10**12,
        checkpoint_every=10**12,
        keep_checkpoints=len(args.fractions),
    )


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


@contextlib.contextmanager
def working_directory(path: Path | None):
    """`path` (which must not hold a run yet), or a temporary directory removed afterwards."""
    if path is not None:
        if (path / "ours").exists():
            raise SystemExit(f"error: {path / 'ours'} exists; pass a new --workdir")
        yield path
        return
    with tempfile.TemporaryDirectory(prefix="ddpm-bench-") as tmp:
        yield Path(tmp)


class OurRun:
    """Our Trainer, trained in chunks up to given total training times."""

    def __init__(self, config: Config) -> None:
        self.config = config
        self.seconds = 0.0
        self.scheduler = NoiseScheduler(**config.diffusion)

    def train_until(self, seconds: float) -> Snapshot:
        """Train to `seconds` of training in all; returns the EMA weights of the checkpoint saved then."""
        trainer = Trainer(self.config, resume="latest" if self.seconds else None)
        start = time.perf_counter()
        with sigterm_after(seconds - self.seconds):
            checkpoint = trainer.train()
        self.seconds += time.perf_counter() - start
        model, _, _ = load_for_sampling(checkpoint, use_ema=True)
        return Snapshot(model, self.seconds, trainer.state.step)


@contextlib.contextmanager
def sigterm_after(seconds: float):
    """Send this process SIGTERM `seconds` after entering, but only once the SIGTERM handler has changed (the
    Trainer installs its own at the start of train(); before that, SIGTERM would end the process)."""
    before = signal.getsignal(signal.SIGTERM)
    done = threading.Event()

    def send() -> None:
        if done.wait(max(seconds, 0.0)):
            return
        while signal.getsignal(signal.SIGTERM) == before:
            if done.wait(0.01):
                return
        os.kill(os.getpid(), signal.SIGTERM)

    thread = threading.Thread(target=send, daemon=True)
    thread.start()
    try:
        yield
    finally:
        done.set()
        thread.join()


class DiffusersRun:
    """The baseline: diffusers' UNet2DModel, DDPMScheduler and EMAModel in the training loop of diffusers'
    unconditional-generation example, with our config's data and hyperparameters (module docstring)."""

    def __init__(self, config: Config) -> None:
        train = config.train
        self.train = train
        self.device = torch.device(common.default_device())
        torch.manual_seed(train.seed)
        self.unet = UNet2DModel(**common.diffusers_unet_kwargs(config.model)).to(self.device).train()
        self.noise_scheduler = DDPMScheduler(**NoiseScheduler(**config.diffusion).diffusers_config())
        common.check_same_schedule(NoiseScheduler(**config.diffusion), self.noise_scheduler)
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
            num_workers=config.data.num_workers,
            generator=torch.Generator().manual_seed(train.seed),
        )
        self.conditional = num_classes_of(dataset) is not None
        self.generator = torch.Generator(self.device).manual_seed(train.seed)  # noise and timesteps
        self.batches = self._batches()
        self.seconds, self.steps = 0.0, 0

    def train_until(self, seconds: float) -> Snapshot:
        """Train to `seconds` of training in all (at least one step); returns a copy of the EMA weights."""
        start = time.perf_counter()
        deadline = start + seconds - self.seconds
        while True:
            self._step(*next(self.batches))
            if time.perf_counter() >= deadline:
                break
        self.seconds += time.perf_counter() - start
        ema_unet = copy.deepcopy(self.unet).eval()
        self.ema.copy_to(ema_unet.parameters())
        return Snapshot(common.DiffusersDenoiser(ema_unet), self.seconds, self.steps)

    def _step(self, x0: Tensor, labels: Tensor) -> None:
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
        self.steps += 1

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
    """Scores sets of images with the hidden features and predictions of a classifier of the real data."""

    def __init__(self, config: Config, *, n: int) -> None:
        data = dataclasses.replace(config.data, hflip=False)
        dataset = build_dataset(data)
        self.images, self.labels = next(iter(torch.utils.data.DataLoader(dataset, batch_size=len(dataset))))
        self.n = n
        self.image_shape = tuple(self.images.shape[1:])
        self.classifier, self.accuracy = digit_classifier.train_classifier(self.images, self.labels)
        if self.accuracy < digit_classifier.MIN_ACCURACY:
            raise RuntimeError(
                f"the digit classifier reached only {self.accuracy:.3f} held-out accuracy "
                f"(< {digit_classifier.MIN_ACCURACY}): its features cannot be trusted to score samples"
            )
        self.num_classes = self.classifier.head.out_features
        self.reference = self._statistics(self.images)
        real = torch.randperm(len(self.images), generator=torch.Generator().manual_seed(0))[:n]
        self.real = self.score(self.images[real], self.labels[real])

    @torch.no_grad()
    def score(self, images: Tensor, labels: Tensor | None) -> dict:
        """Frechet distance to the real digits, mean confidence, label agreement and class coverage of images
        (N, C, S, S) in [-1, 1] sampled with `labels` (N,) (None: unconditional)."""
        logits = self.classifier(images)
        predicted = logits.argmax(1)
        counts = torch.bincount(predicted, minlength=self.num_classes).tolist()
        stats = self._statistics(images)
        return {
            "frechet_distance": frechet_distance(
                self.reference.mu, self.reference.sigma, stats.mu, stats.sigma
            ),
            "confidence": logits.softmax(1).amax(1).mean().item(),
            "agreement": (predicted == labels).float().mean().item() if labels is not None else None,
            "coverage": sum(c > 0 for c in counts),
            "class_counts": counts,
        }

    def score_model(
        self, model: nn.Module, scheduler: NoiseScheduler, *, sample, n: int | None = None
    ) -> dict:
        """Score `n` (default: the scorer's) images of `model` sampled with the settings `sample`."""
        n = n or self.n
        model.eval()
        images = generate(
            model,
            scheduler,
            n,
            image_shape=self.image_shape,
            sampler=sample.sampler,
            steps=sample.steps,
            eta=sample.eta,
            guidance_scale=sample.guidance_scale,
            seed=0,
            device=next(model.parameters()).device,
        )
        labels = torch.arange(n) % model.num_classes if model.num_classes else None
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

    def _statistics(self, images: Tensor):
        # ddpm.fid.statistics warns below 2,048 images, Inception's feature count; these features have 64.
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            return statistics(self.classifier.features(images).double().numpy())


def report(args, config, scorer, snapshots, scores, tradeoff, n_tradeoff) -> None:
    """Print the tables and write --json."""
    final = {name: runs[-1] for name, runs in snapshots.items()}
    final_scores = {name: scores[name][-1] for name in common.MODELS}
    sample = config.sample
    how = f"{sample.sampler} {sample.steps}, guidance {sample.guidance_scale:g} (diffusers: 1)"
    row = common.comparison_row
    rows = [
        row("training time (s)", {n: final[n].seconds for n in common.MODELS}),
        row("optimizer steps", {n: final[n].steps for n in common.MODELS}),
        row("steps / s", {n: final[n].steps / final[n].seconds for n in common.MODELS}),
        row(f"Frechet distance, {how}", {n: final_scores[n]["frechet_distance"] for n in common.MODELS}),
        row("mean confidence", {n: final_scores[n]["confidence"] for n in common.MODELS}),
        row("classes covered", {n: final_scores[n]["coverage"] for n in common.MODELS}),
    ]
    if final_scores["ours"]["agreement"] is not None:
        rows.append(row("label agreement", {n: final_scores[n]["agreement"] for n in common.MODELS}))
    env = common.environment(torch.device(common.default_device()))
    print(
        f"Sample quality per training minute, {Path(args.config).name} {' '.join(args.override)}, "
        f"{args.minutes:g} min each, {args.n_samples} samples; {common.describe(env)}; classifier held-out "
        f"accuracy {scorer.accuracy:.3f}\n"
    )
    print(common.markdown_table(common.COMPARISON_HEADER, rows))

    curve = [["real digits", "", "", "", *_score_cells(scorer.real)]]
    for name in common.MODELS:
        for fraction, snapshot, score in zip(args.fractions, snapshots[name], scores[name], strict=True):
            curve.append(
                [name, f"{fraction:g}", f"{snapshot.seconds:.0f}", snapshot.steps, *_score_cells(score)]
            )
    if "ours, no guidance" in scores:
        curve.append(
            [
                "ours, no guidance",
                "1",
                f"{final['ours'].seconds:.0f}",
                final["ours"].steps,
                *_score_cells(scores["ours, no guidance"][0]),
            ]
        )
    header = [
        "model",
        "budget",
        "trained (s)",
        "steps",
        "Frechet distance",
        "confidence",
        "agreement",
        "coverage",
        "predicted class counts",
    ]
    print("\n" + common.markdown_table(header, curve))

    target = final_scores["diffusers"]["frechet_distance"]
    reached = next(
        (
            s
            for s, score in zip(snapshots["ours"], scores["ours"], strict=True)
            if score["frechet_distance"] <= target
        ),
        None,
    )
    print(
        f"\nOurs reaches the baseline's full-budget distance ({target:.3g}) "
        + (
            f"by {reached.seconds:.0f} s ({reached.steps} steps)."
            if reached
            else "at none of the budgets scored."
        )
    )

    rows = [
        [t["sampler"], t["steps"], n_tradeoff, t["seconds"], t["seconds"] / n_tradeoff, *_score_cells(t)]
        for t in tradeoff
    ]
    header = [
        "sampler",
        "steps",
        "samples",
        "seconds",
        "s / sample",
        "Frechet distance",
        "confidence",
        "agreement",
        "coverage",
        "predicted class counts",
    ]
    print(f"\nSamplers on our final model, guidance {sample.guidance_scale:g}:\n")
    print(common.markdown_table(header, rows))
    common.write_json(
        args.json,
        {
            "benchmark": "quality",
            "environment": env,
            "options": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
            "classifier_accuracy": scorer.accuracy,
            "real": scorer.real,
            "runs": {
                name: [
                    {"fraction": f, "seconds": s.seconds, "steps": s.steps, **score}
                    for f, s, score in zip(args.fractions, snapshots[name], scores[name], strict=True)
                ]
                for name in common.MODELS
            },
            "ours_no_guidance": scores.get("ours, no guidance", [None])[0],
            "ours_reaches_baseline_at_seconds": reached.seconds if reached else None,
            "samplers": tradeoff,
        },
    )


def _score_cells(score: dict) -> list:
    agreement = score["agreement"]
    return [
        score["frechet_distance"],
        score["confidence"],
        "" if agreement is None else agreement,
        score["coverage"],
        " ".join(map(str, score["class_counts"])),
    ]


if __name__ == "__main__":
    main()
