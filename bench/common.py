"""What the benchmark scripts share: the diffusers twin of a ddpm model, interleaved timing, FLOP counting,
the device's matmul peak, and the report (a markdown table on stdout, optionally JSON).

The twin: `UNet2DModel(**diffusers_unet_kwargs(config.model))` has the layers of `UNet(**config.model)`.
`diffusers_unet_kwargs` is the inverse of `ddpm.interop.diffusers.unet_kwargs_from_diffusers` and checks
the round trip through it; `check_parameter_counts` compares the built networks, so the two cannot silently
differ.
`DiffusersDenoiser` lets the twin be called as ours is, `model(x, t, y)`, so that the same training step and
`ddpm.sample` run on both.
"""

from __future__ import annotations

import argparse
import inspect
import json
import platform
import statistics
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import diffusers
import torch
import torch.nn.functional as F
import torch.utils.flop_counter as flop_counter
from diffusers import UNet2DModel
from torch import Tensor, nn

from ddpm.interop.diffusers import unet_kwargs_from_diffusers
from ddpm.models.unet import UNet
from ddpm.schedule import NoiseScheduler

REPO = Path(__file__).resolve().parents[1]


def diffusers_unet_kwargs(model_config: dict) -> dict:
    """UNet2DModel kwargs with the layers of `UNet(**model_config)`; ValueError for what diffusers lacks.

    Attention at feature side s <-> Attn{Down,Up}Block2D at level log2(image_size / s); one head of all the
    channels (num_heads 1) <-> attention_head_dim None; time_injection "add" <-> resnet_time_scale_shift
    "default"; downsample "conv" <-> downsample_padding 1. attn_norm_num_groups is set because with
    "scale_shift" diffusers otherwise drops the GroupNorm of the middle attention, which ours has.
    """
    c = unet_config(model_config)
    bad = []
    if not c["time_conditioning"]:
        bad.append("time_conditioning=False")
    if c["head_kernel_size"] != 3:
        bad.append(f"head_kernel_size={c['head_kernel_size']} (diffusers: 3)")
    if c["downsample"] == "maxpool":
        bad.append("downsample='maxpool'")
    if c["num_heads"] != 1 and c["head_channels"] is None:
        bad.append(f"num_heads={c['num_heads']} without head_channels")
    if bad:
        raise ValueError(f"no UNet2DModel has the layers of this UNet: {', '.join(bad)}")
    size, base = c["image_size"], c["base_channels"]
    attention = [size // 2**level in c["attention_resolutions"] for level in range(len(c["channel_mult"]))]
    kwargs = {
        "sample_size": size,
        "in_channels": c["in_channels"],
        "out_channels": c["out_channels"],
        "block_out_channels": [base * m for m in c["channel_mult"]],
        "layers_per_block": c["num_res_blocks"],
        "down_block_types": ["AttnDownBlock2D" if a else "DownBlock2D" for a in attention],
        "up_block_types": ["AttnUpBlock2D" if a else "UpBlock2D" for a in reversed(attention)],
        "attention_head_dim": c["head_channels"],
        "add_attention": c["mid_attention"],
        "dropout": c["dropout"],
        "norm_num_groups": c["norm_groups"],
        "attn_norm_num_groups": c["norm_groups"],
        "norm_eps": c["norm_eps"],
        "resnet_time_scale_shift": "default" if c["time_injection"] == "add" else "scale_shift",
        "flip_sin_to_cos": c["time_flip_sin_to_cos"],
        "freq_shift": c["time_freq_shift"],
        "num_class_embeds": c["num_classes"],
        "downsample_padding": 1 if c["downsample"] == "conv" else 0,
    }
    back = unet_kwargs_from_diffusers(kwargs)
    if c["head_channels"] is not None:  # then num_heads is unused, and maps back as 1
        back["num_heads"] = c["num_heads"]
    differ = {key: (c[key], value) for key, value in back.items() if c[key] != value}
    if differ:
        raise ValueError(f"the UNet2DModel kwargs map back to other UNet kwargs (ours, back): {differ}")
    return kwargs


MODELS = ("ours", "diffusers")


def build_model(name: str, model_config: dict) -> nn.Module:
    """`UNet(**model_config)` ("ours"), or its diffusers twin behind `DiffusersDenoiser` ("diffusers"), each
    with its library's initialisation under seed 0; both are called as model(x, t, y)."""
    torch.manual_seed(0)
    if name == "ours":
        return UNet(**model_config)
    return DiffusersDenoiser(UNet2DModel(**diffusers_unet_kwargs(model_config)))


def build_models(model_config: dict) -> dict[str, nn.Module]:
    """{"ours": ..., "diffusers": ...} from `build_model`, parameter counts checked."""
    models = {name: build_model(name, model_config) for name in MODELS}
    check_parameter_counts(models["ours"], models["diffusers"].unet)
    return models


def random_inputs(model_config: dict, batch: int, *, seed: int = 0) -> tuple[Tensor, Tensor, Tensor | None]:
    """Network inputs on the CPU: x (batch, C, S, S) standard normal, t (batch,) uniform in 0..999, y (batch,)
    uniform labels for a class-conditional model, else None."""
    generator = torch.Generator().manual_seed(seed)
    c = unet_config(model_config)
    x = torch.randn((batch, c["in_channels"], c["image_size"], c["image_size"]), generator=generator)
    t = torch.randint(0, 1000, (batch,), generator=generator)
    classes = c["num_classes"]
    y = torch.randint(0, classes, (batch,), generator=generator) if classes else None
    return x, t, y


def unet_config(model_config: dict) -> dict:
    """`UNet(**model_config).config` without building the network (which would cost its memory): every
    constructor argument, defaults filled in, sequences as lists."""
    defaults = {p.name: p.default for p in inspect.signature(UNet).parameters.values()}
    return {k: list(v) if isinstance(v, tuple | list) else v for k, v in {**defaults, **model_config}.items()}


def check_parameter_counts(ours: UNet, twin: UNet2DModel) -> None:
    """Raise ValueError unless the twin has our parameter count, less the one class-embedding row (the null
    label of classifier-free guidance) that ours has when the model is class-conditional."""
    null_row = 4 * ours.config["base_channels"] if ours.num_classes is not None else 0
    if parameter_count(ours) - parameter_count(twin) != null_row:
        raise ValueError(
            f"parameter counts differ: ours {parameter_count(ours):,}, diffusers {parameter_count(twin):,}"
        )


class DiffusersDenoiser(nn.Module):
    """A UNet2DModel called as a ddpm UNet is, `model(x, t, y)`: for `ddpm.sample`, `ddpm.inference.generate`
    and the shared training step. `num_classes` is read by `generate` to cycle the labels."""

    def __init__(self, unet: UNet2DModel) -> None:
        super().__init__()
        self.unet = unet
        self.num_classes = unet.config.num_class_embeds

    def forward(self, x: Tensor, t: Tensor, y: Tensor | None = None) -> Tensor:
        return self.unet(x, t, class_labels=y).sample


def check_same_schedule(ours: NoiseScheduler, theirs) -> None:
    """Raise ValueError when another library's alpha_bar (`theirs.alphas_cumprod`: a diffusers scheduler's,
    a denoising-diffusion-pytorch GaussianDiffusion's) differs from ours beyond float32 rounding."""
    mismatch = (theirs.alphas_cumprod.double().cpu() - ours.alphas_cumprod).abs().max().item()
    if mismatch > 1e-5:
        raise ValueError(f"{type(theirs).__name__}'s alpha_bar differs from ours by up to {mismatch:.2e}")


@torch.no_grad()
def diffusers_ddim(
    unet: UNet2DModel, scheduler, noise: Tensor, *, steps: int, y: Tensor | None = None
) -> Tensor:
    """DDIM (eta 0) with diffusers' own loop, as DDIMPipeline runs it: (N, C, H, W) noise -> x0.

    DDIMPipeline draws its own noise and takes no labels, hence this loop. use_clipped_model_output=True
    re-derives eps from the clipped x0, as ddpm's DDIM does (DDIMPipeline's default keeps the raw eps),
    so that both loops compute the same update and differ only in their overheads.
    """
    scheduler.set_timesteps(steps, device=noise.device)
    x = noise
    for t in scheduler.timesteps:
        eps = unet(x, t, class_labels=y).sample
        x = scheduler.step(eps, t, x, eta=0.0, use_clipped_model_output=True).prev_sample
    return x


def interleaved_times(
    calls: dict[str, Callable[[], object]], *, repeats: int, warmup: int, device: torch.device
) -> dict[str, list[float]]:
    """Seconds per call of each callable: `warmup` untimed rounds, then `repeats` timed rounds of one call
    each. Rounds alternate the order (A B, B A, A B, ...), so that neither call always runs right after
    the other and slow drifts of the machine's load reach all of them alike."""
    names = list(calls)
    for _ in range(warmup):
        for name in names:
            calls[name]()
    synchronize(device)
    times: dict[str, list[float]] = {name: [] for name in names}
    for round_ in range(repeats):
        for name in names if round_ % 2 == 0 else reversed(names):
            start = time.perf_counter()
            calls[name]()
            synchronize(device)
            times[name].append(time.perf_counter() - start)
    return times


def median_ratio(numerator: Sequence[float], denominator: Sequence[float]) -> float:
    """Median of the per-round ratios numerator[i] / denominator[i] (robust to a round slowed for both)."""
    return statistics.median(a / b for a, b in zip(numerator, denominator, strict=True))


def training_flops(model: nn.Module, x: Tensor, t: Tensor, y: Tensor | None) -> int:
    """FLOPs of forward + MSE loss + backward of `model(x, t, y)` by torch's FlopCounterMode (matmuls,
    convolutions and attention; elementwise work and the optimizer step count as 0). Leaves no gradients."""
    with flop_counter.FlopCounterMode(display=False, custom_mapping=_CPU_ATTENTION_FLOPS) as counter:
        F.mse_loss(model(x, t, y).float(), torch.zeros_like(x, dtype=torch.float32)).backward()
    model.zero_grad(set_to_none=True)
    return counter.get_total_flops()


@torch.no_grad()
def forward_flops(model: nn.Module, x: Tensor, t: Tensor, y: Tensor | None) -> int:
    """FLOPs of one call `model(x, t, y)` without gradients (a sampler's network call), counted as
    `training_flops` counts them."""
    with flop_counter.FlopCounterMode(display=False, custom_mapping=_CPU_ATTENTION_FLOPS) as counter:
        model(x, t, y)
    return counter.get_total_flops()


def matmul_peak_flops(device: torch.device, dtype: torch.dtype, *, size: int, repeats: int = 5) -> float:
    """FLOP/s of the fastest of `repeats` (size x size) @ (size x size) products: the practical peak that
    model FLOP utilisation is measured against (same device, dtype and thread count)."""
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    best = float("inf")
    for _ in range(repeats + 1):  # the first product warms up the BLAS and the allocator
        synchronize(device)
        start = time.perf_counter()
        a @ b
        synchronize(device)
        best = min(best, time.perf_counter() - start)
    return 2 * size**3 / best


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def parameter_count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def add_report_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", metavar="OUT", help="also write every number (and raw timings) to OUT")


def environment(device: torch.device) -> dict:
    """The versions and hardware the numbers were taken on."""
    info = {
        "torch": torch.__version__,
        "diffusers": diffusers.__version__,
        "device": device.type,
        "cpu": _cpu_name(),
        "threads": torch.get_num_threads(),
    }
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


COMPARISON_HEADER = ("", "ours", "diffusers", "ours / diffusers")


def comparison_row(label: str, values: dict, *, ratio: float | None = None) -> list:
    """[label, ours, diffusers, ratio] for COMPARISON_HEADER; the ratio defaults to ours / diffusers."""
    return [
        label,
        values["ours"],
        values["diffusers"],
        values["ours"] / values["diffusers"] if ratio is None else ratio,
    ]


def describe(env: dict) -> str:
    """One line naming the hardware and versions of `environment()`."""
    hardware = env.get("gpu", f"{env['cpu']}, {env['threads']} threads")
    return f"{env['device']} ({hardware}); torch {env['torch']}, diffusers {env['diffusers']}"


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """A GitHub markdown table; floats with 4 significant digits, integers with thousands separators."""

    def cell(value: object) -> str:
        if isinstance(value, float):
            return f"{value:.4g}"
        return f"{value:,}" if isinstance(value, int) and not isinstance(value, bool) else str(value)

    lines = [header, ["---"] * len(header), *rows]
    return "\n".join("| " + " | ".join(cell(v) for v in line) + " |" for line in lines)


def write_json(path: str | None, payload: dict) -> None:
    if path is not None:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(json.dumps(payload, indent=2) + "\n")


def _cpu_name() -> str:
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def _sdpa_flops(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    return flop_counter.sdpa_flop_count(query_shape, key_shape, value_shape)


def _sdpa_backward_flops(
    grad_shape, query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs
) -> int:
    return flop_counter.sdpa_backward_flop_count(grad_shape, query_shape, key_shape, value_shape)


# FlopCounterMode knows the CUDA attention kernels only; on the CPU, SDPA runs these two ops.
_CPU_ATTENTION_FLOPS = {
    torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: _sdpa_flops,
    torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward: _sdpa_backward_flops,
}
