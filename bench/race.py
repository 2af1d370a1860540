"""Sample quality per second of training on the digits: our Trainer, its variants and two peers, each trained
for the same wall-clock time on this machine, over several seeds, scored at several times on the way.

    python bench/race.py [--marks 15,30,60] [--seeds 0,1,2] [--n-samples 900]
        [--runs ours,diffusers,lucidrains] [--variant NAME [CONFIG] KEY=VALUE ...]
        [--posthoc-sigma-rels 0.05,0.1,0.15,0.2] [--json OUT]
    python bench/race.py --merge A.json B.json ... [--json OUT]      # one report from several invocations

Per seed s (--seeds), every run trains from scratch with training seed s, all in one process and in turns:
one optimizer step at a time, always the run with the least training time so far, each run's own steps timed
(`TrainingClock`). A slowdown of the machine (this one is shared) thus falls on every run alike instead of on
whichever trained then. At each time mark (--marks, seconds of training; the last one ends the run) the EMA
weights are copied off the clock, and afterwards sample --n-samples images each (image i from noise seeded
1,000,000 s + i, label i mod 10 for a class-conditional model). Training time excludes building a run and
scoring it, and includes all that its loop does per step. The runs share the global RNG, so a seed's results
depend on the interleaving (fixed seeds, not bit-reproducible runs). Nothing else should run on the machine.

The runs:
- "ours": `ddpm.training.Trainer` on configs/digits.yaml, float32, no in-training grids or trackers, driven by
  its own training loop; sampled with the config's sampler and steps, no guidance.
- a variant (--variant NAME [CONFIG] KEY=VALUE ...): "ours" with those config overrides, on CONFIG instead of
  --config when given, e.g. `--variant edm bench/configs/digits_edm.yaml` or `--variant b32
  data.batch_size=32`. A variant that sets train.posthoc_ema_every is also scored with the post-hoc EMA of
  each --posthoc-sigma-rels value, reconstructed at each mark from its snapshots (run NAME@SIGMA_REL).
- "diffusers": bench/quality.py's baseline: `UNet2DModel` with the layers of our network, `DDPMScheduler`
  with our schedule and prediction type, in the loop of diffusers' unconditional-generation example,
  class-conditional without label dropout; sampled with our sampler (the config's), so the sampler is not part
  of its difference.
- "lucidrains": denoising-diffusion-pytorch's `GaussianDiffusion` with its defaults (sigmoid schedule,
  v-objective and its loss weights, T = 1000) around its `Unet` (dim = our base_channels, dim_mults = our
  channel_mult), unconditional (it has no labels), trained as its `Trainer` does (Adam betas (0.9, 0.99),
  gradient norm clipped to 1, `ema_pytorch.EMA` with beta 0.995 updated every 10 steps, no warm-up);
  sampled with its own DDIM (eta 0) at the config's number of steps (its schedule is none of ours).
Both peers use PEER_SETTINGS (the network size, batch, learning rate, warm-up, clipping and EMA decay of
configs/digits.yaml before this race), not our current defaults. "diffusers-our-settings" is the diffusers
run with our current config's settings instead: against "ours" it is the library alone (network code and
initialisation, loop, EMA; and label dropout, which it lacks), the rest of a difference being the settings.

Scoring (bench/quality.py's Scorer): the kernel distance (KID) between the samples' classifier conv features
and the real digits', with the real-vs-real floor at --n-samples. Per run and mark: mean and std over seeds;
per pair "ours" against each other run: the difference of the means with its standard error and the ratio of
the means, called a difference only beyond both 3 standard errors and the floor's 95th percentile.
"""

from __future__ import annotations

import os

# The runs take turns in threads, each with its own OpenMP team: idle teams must sleep, not spin on the cores.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse
import copy
import dataclasses
import json
import math
import statistics
import tempfile
import threading
import time
from pathlib import Path

import common
import quality
import torch
from accelerate.state import AcceleratorState
from torch import Tensor

from ddpm import load_config
from ddpm.config import build_schedule
from ddpm.ema.posthoc import posthoc_model, reconstruct
from ddpm.training.trainer import Trainer

PEERS = ("diffusers", "lucidrains", "diffusers-our-settings")
UNLIMITED_STEPS = 10**8  # "ours" runs stop at the time marks, not at train.steps (unless a variant sets it)
# The peers' network size, batch, learning rate, warm-up, clipping and EMA: configs/digits.yaml's before the
# race (tuned on these digits), pinned so that changing our defaults does not change the peers.
PEER_SETTINGS = [
    "model.base_channels=32",
    "model.channel_mult=[1,2,2]",
    "model.num_res_blocks=1",
    "data.batch_size=64",
    "train.lr=1e-3",
    "train.warmup_steps=100",
    "train.grad_clip=1.0",
    "train.ema_decay=0.999",
    "train.ema_warmup=true",
]


def main() -> None:
    args = parse_args()
    if args.merge:
        report([json.loads(Path(p).read_text()) for p in args.merge], args.json)
        return
    variants = {"ours": []} | {name: overrides for name, *overrides in args.variant}
    runs = [*args.runs, *(v for v in variants if v not in args.runs)]
    config = load_config(args.config, ["train.mixed_precision='no'", "train.sample_every=0"])
    scorer = quality.Scorer(config, splits=args.floor_splits, size=args.n_samples)
    results = []
    for seed in args.seeds:
        with tempfile.TemporaryDirectory(prefix="ddpm-race-") as tmp:
            marks = race(args, runs, variants, seed, Path(tmp))
        for mark in marks:
            images, labels = mark.pop("sample")(args.n_samples, quality.SAMPLING_SEED_STRIDE * seed)
            result = {"seed": seed, **mark, **scorer.score(images, labels)}
            results.append(result)
            print(
                f"seed {seed} {result['run']:<24} {result['mark']:>6.0f} s: step {result['steps']:>5} "
                f"({result['seconds']:.1f} s)  KID conv {result['kid_conv']:+.4f}",
                flush=True,
            )
        payload = {
            "options": {k: v for k, v in vars(args).items() if k not in ("merge", "json")},
            "variants": variants,
            "floor": scorer.floor,
            "classifier_accuracy": scorer.accuracy,
            "environment": common.environment(torch.device("cpu")),
            "results": results,
        }
        common.write_json(args.json, payload)
    report([payload], None)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--config", default=str(common.REPO / "configs/digits.yaml"), help="our run's config")
    parser.add_argument("--marks", type=_floats, default=[15.0, 30.0, 60.0], help="seconds of training")
    parser.add_argument("--seeds", type=lambda s: [int(x) for x in s.split(",")], default=[0, 1, 2])
    parser.add_argument("--n-samples", type=int, default=900, help="samples scored per run and mark")
    parser.add_argument("--floor-splits", type=int, default=100, help="real-vs-real splits for the floor")
    parser.add_argument(
        "--runs", type=lambda s: s.split(","), default=["ours", *PEERS], help="ours, diffusers, lucidrains"
    )
    parser.add_argument(
        "--variant",
        nargs="+",
        action="append",
        default=[],
        metavar="NAME [CONFIG] KEY=VALUE",
        help="a run of our Trainer with these config overrides, on CONFIG if given (repeatable)",
    )
    parser.add_argument(
        "--posthoc-sigma-rels", type=_floats, default=[0.05, 0.1, 0.15, 0.2], help="for posthoc variants"
    )
    parser.add_argument("--merge", nargs="+", help="report from these --json files instead of training")
    parser.add_argument("--json", help="write the results here (rewritten after every run)")
    args = parser.parse_args()
    if args.marks != sorted(args.marks) or args.marks[0] <= 0:
        parser.error("--marks must be increasing positive seconds")
    return args


def race(args: argparse.Namespace, runs: list[str], variants: dict, seed: int, tmp: Path) -> list[dict]:
    """Train every run of one seed in turns until each has had the last mark's seconds of training; per run
    and mark its step, seconds and a sampler of the weights it had then."""
    clock = TrainingClock()
    threads, marks = [], []
    for name in runs:
        step_loop = (
            peer_loop(name, args, seed) if name in PEERS else trainer_loop(name, args, variants, seed, tmp)
        )
        clock.enter(name)
        threads.append(Contestant(name, step_loop, clock, args.marks, marks))
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
        if thread.error is not None:
            raise thread.error
    AcceleratorState._reset_state(reset_partial_state=True)  # the next seed's Trainers build their own
    return sorted(marks, key=lambda m: (runs.index(m["run"].split("@")[0]), m["run"], m["mark"]))


class TrainingClock:
    """Lets one run train at a time, always the one with the least training time so far, and counts each
    run's time: machine-wide slowdowns then fall on every run alike instead of on whichever ran then."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}
        self._turn = threading.Condition()
        self._running: str | None = None
        self._since = 0.0

    def enter(self, name: str) -> None:
        self.seconds[name] = 0.0

    def acquire(self, name: str) -> None:
        with self._turn:
            self._turn.wait_for(
                lambda: self._running is None and name == min(self.seconds, key=self.seconds.get)
            )
            self._running, self._since = name, time.perf_counter()

    def elapsed(self, name: str) -> float:
        """The run's training time so far, including the current turn."""
        return self.seconds[name] + time.perf_counter() - self._since

    def release(self, name: str, *, uncounted: float = 0.0) -> None:
        with self._turn:
            self.seconds[name] += time.perf_counter() - self._since - uncounted
            self._running = None
            self._turn.notify_all()

    def leave(self, name: str) -> None:
        with self._turn:
            self.seconds.pop(name, None)
            if self._running == name:
                self._running = None
            self._turn.notify_all()


class Contestant(threading.Thread):
    """Runs `step_loop(self)`, a training loop that calls `tick` after each optimizer step, on `clock` (its
    first turn taken before the loop starts), appending to `out` a run's samplers (scored later) at each time
    mark."""

    def __init__(self, name: str, step_loop, clock: TrainingClock, marks: list[float], out: list[dict]):
        super().__init__(name=name, daemon=True)
        self.step_loop, self.clock, self.marks, self.out = step_loop, clock, list(marks), out
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            self.clock.acquire(self.name)
            self.step_loop(self)
        except BaseException as error:  # re-raised by the main thread
            self.error = error
        finally:
            self.clock.leave(self.name)

    def tick(self, steps: int, snapshot) -> bool:
        """Called after each optimizer step, holding the clock (taken in `run`); returns whether to go on.
        At a mark, `snapshot()` -> [(run name, sampler)] is taken off the clock."""
        elapsed = self.clock.elapsed(self.name)
        uncounted = 0.0
        if elapsed >= self.marks[0]:
            start = time.perf_counter()
            self._record([self.marks.pop(0)], steps, elapsed, snapshot)
            uncounted = time.perf_counter() - start
        self.clock.release(self.name, uncounted=uncounted)
        if not self.marks:
            return False
        self.clock.acquire(self.name)
        return True

    def finish(self, steps: int, snapshot) -> None:
        """The run stopped on its own (train.steps) before the last mark: its final weights stand for the
        marks left, at the time it took."""
        if self.marks:
            self._record(self.marks, steps, self.clock.elapsed(self.name), snapshot)

    def _record(self, marks: list[float], steps: int, elapsed: float, snapshot) -> None:
        for run, sampler in snapshot():
            for mark in marks:
                self.out.append(
                    {"run": run, "mark": mark, "steps": steps, "seconds": elapsed, "sample": sampler}
                )


def trainer_loop(name: str, args: argparse.Namespace, variants: dict, seed: int, tmp: Path):
    """Our Trainer for run `name` (a variant's config and overrides), ticking after each of its steps."""
    overrides = variants[name]
    base = args.config
    if overrides and overrides[0].endswith((".yaml", ".yml")):
        base, *overrides = overrides
    config = load_config(
        base,
        [
            "train.mixed_precision='no'",
            "train.sample_every=0",
            "train.log_with=none",
            f"train.steps={UNLIMITED_STEPS}",
            f"train.checkpoint_every={UNLIMITED_STEPS}",
            *overrides,
            f"train.seed={seed}",
            f"output_dir={tmp / name}",
        ],
    )
    trainer = Trainer(config)
    sample = dataclasses.replace(config.sample, guidance_scale=1.0)

    def snapshot() -> list:
        model = copy.deepcopy(trainer.ema.module).eval()
        taken = [(name, _sampler(model, trainer.scheduler, sample))]
        if config.train.posthoc_ema_every and trainer.state.step >= config.train.posthoc_ema_every:
            states = reconstruct(tmp / name, model, args.posthoc_sigma_rels)
            for sigma_rel, state in zip(args.posthoc_sigma_rels, states, strict=True):
                posthoc = posthoc_model(config, state)
                taken.append((f"{name}@{sigma_rel:g}", _sampler(posthoc, trainer.scheduler, sample)))
        return taken

    def loop(contestant: Contestant) -> None:
        batches = trainer._batches

        def ticking_batches():
            for batch in batches():
                yield batch  # the Trainer runs one optimizer step on it before asking for the next
                if not contestant.tick(trainer.state.step, snapshot):
                    return

        trainer._batches = ticking_batches
        trainer.train()
        contestant.finish(trainer.state.step, snapshot)

    return loop


def peer_loop(name: str, args: argparse.Namespace, seed: int):
    """Peer `name` (module docstring) on the peers' settings, ticking after each of its steps."""
    settings = [] if name == "diffusers-our-settings" else PEER_SETTINGS
    config = load_config(args.config, ["train.mixed_precision='no'", *settings, f"train.seed={seed}"])
    sample = dataclasses.replace(config.sample, guidance_scale=1.0)
    if name == "lucidrains":
        run = LucidrainsRun(config, seed)

        def snapshot() -> list:
            return [(name, run.sampler(sample.steps))]
    else:
        run = quality.DiffusersRun(config)
        schedule = build_schedule(config.diffusion)

        def snapshot() -> list:
            return [(name, _sampler(run.ema_model(), schedule, sample))]

    def loop(contestant: Contestant) -> None:
        steps = 1
        while True:
            run.step()
            if not contestant.tick(steps, snapshot):
                return
            steps += 1

    return loop


def _sampler(model, scheduler, sample):
    def draw(n: int, seed: int) -> tuple[Tensor, Tensor | None]:
        return quality.sample_images(model, scheduler, sample, n, seed)

    return draw


class LucidrainsRun:
    """denoising-diffusion-pytorch's GaussianDiffusion and Unet in its Trainer's loop (module docstring)."""

    def __init__(self, config, seed: int) -> None:
        from denoising_diffusion_pytorch import GaussianDiffusion, Unet
        from ema_pytorch import EMA

        from ddpm import build_dataset

        torch.manual_seed(seed)
        model = config.model
        unet = Unet(dim=model["base_channels"], dim_mults=tuple(model["channel_mult"]), channels=1)
        self.diffusion = GaussianDiffusion(unet, image_size=model["image_size"], timesteps=1000)
        self.optimizer = torch.optim.Adam(self.diffusion.parameters(), lr=config.train.lr, betas=(0.9, 0.99))
        self.ema = EMA(self.diffusion, beta=0.995, update_every=10)
        dataset = build_dataset(config.data)
        self.loader = torch.utils.data.DataLoader(
            dataset,
            batch_size=config.data.batch_size,
            shuffle=True,
            drop_last=True,
            generator=torch.Generator().manual_seed(seed),
        )
        self.batches = self._batches()

    def step(self) -> None:
        x0, _ = next(self.batches)
        loss = self.diffusion((x0 + 1) / 2)  # it normalises [0, 1] images to [-1, 1] itself
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.diffusion.parameters(), 1.0)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.ema.update()

    def sampler(self, steps: int):
        """Its EMA model's own DDIM sampler at `steps` steps, frozen at this point of training."""
        from denoising_diffusion_pytorch import GaussianDiffusion

        ema = copy.deepcopy(self.ema.ema_model).eval()
        diffusion = GaussianDiffusion(
            ema.model, image_size=ema.image_size, timesteps=1000, sampling_timesteps=steps
        )

        @torch.no_grad()
        def draw(n: int, seed: int) -> tuple[Tensor, None]:
            torch.manual_seed(seed)
            images = torch.cat([diffusion.sample(batch_size=b) for b in _batches(n, 500)])
            return images * 2 - 1, None

        return draw

    def _batches(self):
        while True:
            yield from self.loader


def _batches(n: int, size: int) -> list[int]:
    return [min(size, n - i) for i in range(0, n, size)]


def report(payloads: list[dict], out: str | None) -> None:
    """Print the per-mark table and the comparisons of "ours" with each peer (and write --json if asked)."""
    first = payloads[0]
    results = [r for p in payloads for r in p["results"]]
    floor = first["floor"]["kid_conv"]
    if out:
        common.write_json(out, {**first, "results": results})
    runs = list(dict.fromkeys(r["run"] for r in results))
    marks = sorted({r["mark"] for r in results})
    rows, means = [], {}
    for run in runs:
        for mark in marks:
            group = [r for r in results if r["run"] == run and r["mark"] == mark]
            if not group:
                continue
            kids = [r["kid_conv"] for r in group]
            means[run, mark] = (statistics.fmean(kids), _std(kids), len(kids))
            rows.append(
                [
                    run,
                    f"{mark:g}",
                    f"{statistics.fmean(r['steps'] for r in group):.0f}",
                    f"{statistics.fmean(kids):.4f} +- {_std(kids):.4f}",
                    " / ".join(f"{k:.4f}" for k in kids),
                ]
            )
    print(f"floor (real vs real, 95th pct. of |KID conv|): {floor['abs_p95']:.4f}")
    print(common.markdown_table(["run", "mark (s)", "steps", "KID conv mean +- std", "per seed"], rows))
    pairs = []
    for peer in [r for r in runs if r != "ours"]:
        for mark in marks:
            if ("ours", mark) not in means or (peer, mark) not in means:
                continue
            (a, sa, na), (b, sb, nb) = means["ours", mark], means[peer, mark]
            se = math.sqrt(sa**2 / na + sb**2 / nb)
            called = abs(a - b) > 3 * se and abs(a - b) > floor["abs_p95"]
            verdict = ("ours better" if a < b else "ours worse") if called else "no difference"
            pairs.append([f"ours - {peer}", f"{mark:g}", f"{a - b:+.4f} ({se:.4f})", f"{a / b:.2f}", verdict])
    print(common.markdown_table(["pair", "mark (s)", "difference (s.e.)", "ratio", "verdict"], pairs))
    last = marks[-1]
    for peer in [r for r in runs if r != "ours" and (r, last) in means]:
        target = means[peer, last][0]
        reached = [m for m in marks if ("ours", m) in means and means["ours", m][0] <= target]
        when = f"at the {reached[0]:g} s mark" if reached else "at none of the marks"
        print(f"ours reaches {peer}'s {last:g} s mean ({target:.4f}) {when}")


def _std(values: list[float]) -> float:
    return statistics.stdev(values) if len(values) > 1 else 0.0


def _floats(text: str) -> list[float]:
    return [float(x) for x in text.split(",")]


if __name__ == "__main__":
    main()
