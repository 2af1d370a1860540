"""Sampling speed: one network evaluation (one sampler step) and a whole DDIM run, ours against diffusers.

    python bench/sampling.py [--config configs/cifar10.yaml] [--device cpu|cuda] [--batch 16] [--steps 50]
        [--repeats 20] [--e2e-repeats 3] [--channels-last] [--compile] [--bf16] [--json OUT]

Models as in train_step.py (`common.build_models`: our UNet and its diffusers twin, each initialised by its
own library), in eval mode, without gradients. With --bf16 every call runs under bfloat16 autocast (the
samplers' arithmetic stays float32 in both libraries).

1. Sampler step: one call model(x_t, t[, y]) at batch --batch on random x_t and t; --repeats interleaved
   rounds (common.interleaved_times), median of each and median ratio.
2. End to end: --batch images with --steps DDIM steps (eta 0) from the same x_T (and labels 0, 1, ...):
   - ours: `ddpm.sample(UNet, NoiseScheduler, sampler="ddim")`;
   - diffusers: its UNet2DModel in diffusers' own loop (DDIMScheduler.set_timesteps and step, the loop of
     DDIMPipeline; `common.diffusers_ddim`), the number compared with ours;
   - diffusers' UNet2DModel in `ddpm.sample` (through `common.DiffusersDenoiser`): the same loop as ours, so
     that row differs from ours by the network alone.
   The two diffusers runs compute the same update when --steps divides num_train_timesteps T, and their
   largest image difference, printed, is then float32 rounding: a check that the comparison is like for
   like. (Otherwise diffusers' DDIM steps from t to t - T // steps instead of the next timestep of its own
   list, and the images differ.) Loop overhead per step = end to end / steps - one evaluation.
"""

from __future__ import annotations

import argparse
import statistics
from pathlib import Path

import common
import torch
from common import MODELS
from diffusers import DDIMScheduler

from ddpm import NoiseScheduler, load_config, sample
from ddpm.interop.diffusers import diffusers_scheduler_config


def main() -> None:
    args = parse_args()
    device = torch.device(args.device)
    config = load_config(args.config)
    models = common.build_models(config.model)
    memory_format = torch.channels_last if args.channels_last else torch.contiguous_format
    for model in models.values():
        model.to(device=device, memory_format=memory_format).eval().requires_grad_(False)
    networks = {n: torch.compile(m) if args.compile else m for n, m in models.items()}
    # diffusers' own loop calls the UNet2DModel itself, which must then be compiled too.
    diffusers_unet = torch.compile(models["diffusers"].unet) if args.compile else models["diffusers"].unet
    # DDIM on the schedule's own timesteps: the config's sigma spacings (exponential, karras) have no
    # DDIMScheduler equivalent, and the comparison needs the same timesteps in both libraries.
    scheduler = NoiseScheduler(**{**config.diffusion, "timestep_spacing": "trailing"})
    ddim = DDIMScheduler(**diffusers_scheduler_config(scheduler))
    common.check_same_schedule(scheduler, ddim)

    x, t, y = (
        v.to(device) if v is not None else None for v in common.random_inputs(config.model, args.batch)
    )
    x = x.contiguous(memory_format=memory_format)
    evaluations = {n: autocast(args, device, lambda net=net: net(x, t, y)) for n, net in networks.items()}
    step_times = common.interleaved_times(evaluations, repeats=args.repeats, warmup=2, device=device)

    noise = x  # any standard normal x_T will do; labels, if any, cycle over the classes as generate's do
    labels = torch.arange(args.batch, device=device) % models["ours"].num_classes if y is not None else None
    runs = {
        "ours": lambda: sample(
            networks["ours"],
            scheduler,
            noise=noise,
            sampler="ddim",
            steps=args.steps,
            y=labels,
            progress=False,
        ),
        "diffusers": lambda: common.diffusers_ddim(diffusers_unet, ddim, noise, steps=args.steps, y=labels),
        "diffusers UNet, ddpm.sample": lambda: sample(
            networks["diffusers"],
            scheduler,
            noise=noise,
            sampler="ddim",
            steps=args.steps,
            y=labels,
            progress=False,
        ),
    }
    images = {name: autocast(args, device, run)() for name, run in runs.items()}  # also the warm-up
    mismatch = (images["diffusers"] - images["diffusers UNet, ddpm.sample"]).abs().max().item()
    run_times = common.interleaved_times(
        {n: autocast(args, device, run) for n, run in runs.items()},
        repeats=args.e2e_repeats,
        warmup=0,
        device=device,
    )
    report(args, device, step_times, run_times, mismatch)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--config", default=str(common.REPO / "configs/cifar10.yaml"), help="YAML with model: and diffusion:"
    )
    parser.add_argument(
        "--device", default=common.default_device(), help="cpu or cuda (default: cuda if any)"
    )
    parser.add_argument("--batch", type=int, default=16, help="images per call (default: 16)")
    parser.add_argument("--steps", type=int, default=50, help="DDIM steps end to end (default: 50)")
    parser.add_argument("--repeats", type=int, default=20, help="timed evaluations per model (default: 20)")
    parser.add_argument("--e2e-repeats", type=int, default=3, help="timed DDIM runs per model (default: 3)")
    parser.add_argument("--channels-last", action="store_true", help="channels_last weights and inputs")
    parser.add_argument("--compile", action="store_true", help="torch.compile both networks")
    parser.add_argument("--bf16", action="store_true", help="bfloat16 autocast for the network calls")
    common.add_report_options(parser)
    args = parser.parse_args()
    if min(args.batch, args.steps, args.repeats, args.e2e_repeats) < 1:
        parser.error("--batch, --steps, --repeats and --e2e-repeats must be >= 1")
    return args


def autocast(args: argparse.Namespace, device: torch.device, call):
    """`call` run under bfloat16 autocast when --bf16 (else as it is)."""

    def wrapped():
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.bf16):
            return call()

    return wrapped


def report(args, device, step_times, run_times, mismatch: float) -> None:
    """Print the markdown table (ours, diffusers, ratio) and write --json."""
    step = {n: statistics.median(step_times[n]) for n in MODELS}
    run = {n: statistics.median(v) for n, v in run_times.items()}
    via_ddpm = run["diffusers UNet, ddpm.sample"]
    row = common.comparison_row
    rows = [
        row(
            f"network evaluation, batch {args.batch}, median of {args.repeats} (s)",
            step,
            ratio=common.median_ratio(step_times["ours"], step_times["diffusers"]),
        ),
        row(
            f"DDIM {args.steps} steps, {args.batch} images, median of {args.e2e_repeats} (s)",
            run,
            ratio=common.median_ratio(run_times["ours"], run_times["diffusers"]),
        ),
        [
            f"DDIM {args.steps}, diffusers' UNet in ddpm.sample (s)",
            "",
            via_ddpm,
            common.median_ratio(run_times["ours"], run_times["diffusers UNet, ddpm.sample"]),
        ],
        row("loop overhead per step (s)", {n: run[n] / args.steps - step[n] for n in MODELS}),
    ]
    env = common.environment(device)
    options = ", ".join(o for o in ("channels_last", "compile", "bf16") if getattr(args, o))
    print(f"Sampling, {Path(args.config).name}, options: {options or 'none'}; {common.describe(env)}\n")
    print(common.markdown_table(common.COMPARISON_HEADER, rows))
    print(
        "\nThe same network in diffusers' DDIM loop and in ddpm.sample: the images differ by at most "
        f"{mismatch:.2g} (float32 rounding when --steps divides num_train_timesteps, see the docstring)."
    )
    common.write_json(
        args.json,
        {
            "benchmark": "sampling",
            "environment": env,
            "options": vars(args),
            "evaluation_seconds": step_times,
            "ddim_seconds": run_times,
            "max_image_difference_of_the_two_diffusers_loops": mismatch,
        },
    )


if __name__ == "__main__":
    main()
