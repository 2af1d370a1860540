"""Training-step throughput, peak memory and FLOP utilisation: our UNet against diffusers' UNet2DModel.

    python bench/train_step.py [--config configs/cifar10.yaml] [--device cpu|cuda] [--batch N]
        [--repeats 20] [--warmup 2] [--channels-last] [--compile [--compile-mode MODE]] [--bf16]
        [--fused-adam] [--no-memory] [--json OUT]

Models: `UNet(**config.model)`, by default DDPM's CIFAR-10 network (35.7M parameters), and its diffusers twin
`UNet2DModel(**common.diffusers_unet_kwargs(config.model))`, with the same layers (the parameter counts are
checked and printed). Each keeps its own library's initialisation.

A step: forward of x_t (batch, C, S, S) at timesteps t (and labels y, for a class-conditional config), MSE
against the noise, backward, AdamW step, zero_grad; train mode, so dropout is on as configured. x_t, t, y
and the noise are random and the same for both models (the values do not change the work).

Timing: `--warmup` untimed steps of each model, then `--repeats` rounds of one step of each, the order
alternating between rounds (common.interleaved_times). Reported: the median step time of each, and the
median of the per-round ratios ours / diffusers (below 1: ours is faster; in the rows of rates, images/s
and FLOP/s, above 1 is ours faster).

Peak memory of a step:
- CUDA: torch.cuda.max_memory_allocated during one step, minus what was allocated before it (weights and
  AdamW state of both models; zero_grad frees the gradients between steps): activations, gradients and
  temporaries.
- CPU: the growth of the peak resident set size (VmHWM), in a fresh process per model, from
  after building the model and its optimizer to after `--warmup` + 1 steps: activations, gradients, the
  AdamW state (twice the weights, the same for both models) and what the allocator keeps. Approximate.

FLOP/s: the FLOPs of one step's forward and backward (torch's FlopCounterMode: convolutions, matmuls and
attention; elementwise work and the optimizer count as 0) over the median step time. MFU divides that by
the measured matmul peak: the fastest of several 4096^2 products on the CPU, 8192^2 ones on CUDA, in the
step's dtype (bfloat16 with --bf16, else float32), with the same thread count.

Options for the GPU study (DDPM issue 5, item 4): --bf16 (autocast), --channels-last, --compile (both
models, torch.compile in --compile-mode, its "default" unless given) and --fused-adam (AdamW(fused=True); the
default is torch's foreach AdamW). bench/gpu.py runs the whole GPU study in one command.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import multiprocessing
import statistics
from collections.abc import Callable
from pathlib import Path

import common
import torch
import torch.nn.functional as F
from common import MODELS
from torch import nn

from ddpm import load_config
from ddpm.compiled import COMPILE_MODES

MATMUL_SIZE = {"cpu": 4096, "cuda": 8192}


def main() -> None:
    args = parse_args()
    device = torch.device(args.device)
    args.batch = args.batch or (128 if device.type == "cuda" else 16)
    config = load_config(args.config)
    models = common.build_models(config.model)
    x, t, y = common.random_inputs(config.model, args.batch)
    noise = torch.randn(x.shape, generator=torch.Generator().manual_seed(1))  # the target (out = in channels)

    steps, flops = {}, {}
    for name, model in models.items():
        steps[name] = training_step(model, (x, t, y, noise), args, device)
        flops[name] = step_flops(model, (x, t, y), args, device)
    times = common.interleaved_times(steps, repeats=args.repeats, warmup=args.warmup, device=device)
    memory = None
    if not args.no_memory:
        memory = {name: step_memory_mib(name, steps[name], args, device) for name in MODELS}
    dtype = torch.bfloat16 if args.bf16 else torch.float32
    peak = common.matmul_peak_flops(device, dtype, size=MATMUL_SIZE[device.type])

    report(args, device, models, times, flops, memory, peak)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--config", default=str(common.REPO / "configs/cifar10.yaml"), help="YAML whose model: section to use"
    )
    parser.add_argument(
        "--device", default=common.default_device(), help="cpu or cuda (default: cuda if any)"
    )
    parser.add_argument("--batch", type=int, help="images per step (default: 16 on CPU, 128 on CUDA)")
    parser.add_argument("--repeats", type=int, default=20, help="timed steps per model (default: 20)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps per model first (default: 2)")
    parser.add_argument("--channels-last", action="store_true", help="channels_last weights and inputs")
    parser.add_argument("--compile", action="store_true", help="torch.compile both models")
    parser.add_argument(
        "--compile-mode",
        default="default",
        choices=COMPILE_MODES,
        help="torch.compile's mode with --compile (default: default; reduce-overhead adds CUDA graphs)",
    )
    parser.add_argument("--bf16", action="store_true", help="bfloat16 autocast for forward and backward")
    parser.add_argument("--fused-adam", action="store_true", help="AdamW(fused=True)")
    parser.add_argument("--no-memory", action="store_true", help="skip the peak-memory measurement")
    common.add_report_options(parser)
    args = parser.parse_args()
    if args.repeats < 1 or args.warmup < 0 or (args.batch is not None and args.batch < 1):
        parser.error("--repeats and --batch must be >= 1, --warmup >= 0")
    return args


def training_step(
    model: nn.Module, batch: tuple, args: argparse.Namespace, device: torch.device
) -> Callable[[], None]:
    """Moves `model` and `batch` to `device` (with --channels-last: that memory format) and returns one
    training step: forward (--bf16: under autocast), MSE, backward, AdamW (--fused-adam), zero_grad."""
    memory_format = torch.channels_last if args.channels_last else torch.contiguous_format
    model.to(device=device, memory_format=memory_format).train()
    x, t, y, noise = (v.to(device) if v is not None else None for v in batch)
    x = x.contiguous(memory_format=memory_format)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=args.fused_adam or None)
    forward = torch.compile(model, mode=args.compile_mode) if args.compile else model

    def step() -> None:
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.bf16):
            prediction = forward(x, t, y)
        F.mse_loss(prediction.float(), noise).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def step_flops(model: nn.Module, batch: tuple, args: argparse.Namespace, device: torch.device) -> int:
    """Forward + backward FLOPs of one step, counted at batch 1 on the eager model and scaled (FLOPs are
    linear in the batch)."""
    x, t, y = (v[:1].to(device) if v is not None else None for v in batch)
    if args.channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.bf16):
        return common.training_flops(model, x, t, y) * len(batch[0])


def step_memory_mib(
    name: str, step: Callable[[], None], args: argparse.Namespace, device: torch.device
) -> float:
    """Peak memory of a training step in MiB (see the module docstring for what each device counts)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        before = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        step()
        torch.cuda.synchronize(device)
        return (torch.cuda.max_memory_allocated(device) - before) / 2**20
    # A fresh process, so that neither the other model nor earlier steps have raised the peak RSS already.
    context = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(1, mp_context=context) as pool:
        return pool.submit(cpu_rss_growth_mib, name, args).result()


def cpu_rss_growth_mib(name: str, args: argparse.Namespace) -> float:
    """In a fresh process: growth of the peak RSS over `args.warmup` + 1 CPU training steps of `name`."""
    model_config = load_config(args.config).model
    x, t, y = common.random_inputs(model_config, args.batch)
    noise = torch.randn(x.shape, generator=torch.Generator().manual_seed(1))
    step = training_step(common.build_model(name, model_config), (x, t, y, noise), args, torch.device("cpu"))
    before = peak_rss_mib()
    for _ in range(args.warmup + 1):
        step()
    return peak_rss_mib() - before


def peak_rss_mib() -> float:
    """This process's peak resident set size (VmHWM), in MiB. Not getrusage's ru_maxrss: Linux carries that
    over from the parent through fork and exec, so a spawned child would start at the parent's peak."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024  # kB
    raise RuntimeError("no VmHWM in /proc/self/status; CPU memory needs Linux: pass --no-memory")


def report(args, device, models, times, flops, memory, peak) -> None:
    """Print the markdown table (ours, diffusers, ratio) and write --json."""
    median = {n: statistics.median(times[n]) for n in MODELS}
    achieved = {n: flops[n] / median[n] for n in MODELS}
    row = common.comparison_row
    rows = [
        row("parameters", {n: common.parameter_count(models[n]) for n in MODELS}),
        row(
            f"step time, median of {args.repeats} (s)",
            median,
            ratio=common.median_ratio(times["ours"], times["diffusers"]),
        ),
        row("images / s", {n: args.batch / median[n] for n in MODELS}),
    ]
    if memory is not None:
        what = "CUDA allocated" if device.type == "cuda" else "CPU RSS growth"
        rows.append(row(f"peak step memory, {what} (MiB)", memory))
    rows += [
        row("forward + backward GFLOP per step", {n: flops[n] / 1e9 for n in MODELS}),
        row("achieved TFLOP/s", {n: achieved[n] / 1e12 for n in MODELS}),
        row(
            f"MFU, % of matmul peak {peak / 1e12:.3g} TFLOP/s", {n: 100 * achieved[n] / peak for n in MODELS}
        ),
    ]
    env = common.environment(device)
    options = ", ".join(o for o in ("channels_last", "compile", "bf16", "fused_adam") if getattr(args, o))
    print(
        f"Training step, {Path(args.config).name}, batch {args.batch}, options: {options or 'none'}; "
        f"{common.describe(env)}\n"
    )
    print(common.markdown_table(common.COMPARISON_HEADER, rows))
    common.write_json(
        args.json,
        {
            "benchmark": "train_step",
            "environment": env,
            "options": vars(args),
            "parameters": {n: common.parameter_count(models[n]) for n in MODELS},
            "step_seconds": times,
            "median_step_seconds": median,
            "median_ratio_ours_over_diffusers": common.median_ratio(times["ours"], times["diffusers"]),
            "step_flops": flops,
            "matmul_peak_flops": peak,
            "peak_step_memory_mib": memory,
        },
    )


if __name__ == "__main__":
    main()
