"""Running a network at the speed of its GPU: what `auto` means for train.channels_last (`enabled`) and
train.compile (`training_compile_pays`), torch.compile at static shapes (`compile_network`), and for
sampling a network compiled at one fixed batch (`FixedBatchNetwork`), the largest batch that fits
(`auto_batch_size`) and when compiling pays (`sampling_compile_pays`).

Why: at 32x32 the DDPM CIFAR-10 network keeps a GPU waiting on kernel launches and memory traffic rather
than on arithmetic (BENCHMARKS.md section 4). torch.compile fuses the elementwise work between the
convolutions, and its "reduce-overhead" mode replays a whole call as one CUDA graph, which removes the
launches. Both hold only for the shapes they were built for: a new batch size compiles (and captures) again,
so training drops the last partial batch of an epoch and sampling pads it to the full batch.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
from torch import Tensor, nn

from ddpm.conditions import Conditions

AUTO = "auto"
# torch.compile's modes (train.compile_mode): "reduce-overhead" adds CUDA graphs to the default's fused
# kernels; the "max-autotune" modes also search kernel configurations (minutes more of compilation).
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
SAMPLING_COMPILE_MODE = "reduce-overhead"  # one graph launch per network call
# Training compiles ("auto") on CUDA for runs of at least this many steps. The break-even is steps x (eager
# step - compiled step) = compilation time: at section 4's CIFAR-10 speeds (0.063 s and 0.036 s a step at
# batch 128) a minute of compilation pays after about 2,200 steps; this leaves a margin (an estimate:
# bench/gpu.py measures the compilation time). The digits' 1,500-step default stays eager.
COMPILE_MIN_STEPS = 5_000
# Sampling compiles when the run makes at least this many image-network calls (images x calls per image).
# The break-even is n calls (1 / r_eager - 1 / r_compiled) = t_compile; with t_compile about a minute
# (section 4's compiled runs) it lies in the hundreds of thousands of image-calls at the eager rates of
# section 4. An estimate: bench/gpu.py measures t_compile and both rates, from which to set it.
COMPILE_MIN_IMAGE_CALLS = 200_000
AUTO_BATCH_CAP = 4096  # the most images per network call that --batch-size auto picks on a GPU
AUTO_BATCH_CPU = 64  # --batch-size auto on the CPU: the speed no longer grows with the batch there
PROBE_BATCH = 64  # images of the one forward pass that measures the memory an image needs
MEMORY_SHARE = 0.5  # of the free GPU memory that the sampling batch may take (CUDA graphs and compiled
# kernels keep their own pools beside the probe's peak)


def enabled(setting: bool | str, device: torch.device | str) -> bool:
    """Whether a setting of true, false or "auto" is on for `device`: "auto" is on with CUDA, off elsewhere
    (torch.compile costs minutes of compilation on a CPU, and channels_last does not speed up our network
    there: BENCHMARKS.md section 1)."""
    if setting == AUTO:
        return torch.device(device).type == "cuda"
    return bool(setting)


def compile_network(model: nn.Module, *, mode: str = "default") -> Callable[..., Tensor]:
    """torch.compile(model) in `mode` (one of COMPILE_MODES) with static shapes: every new input shape is a
    new compilation, never a switch to dynamic shapes (slower kernels), so callers keep their shapes fixed."""
    if mode not in COMPILE_MODES:
        raise ValueError(f"unknown compile mode {mode!r}; valid: {', '.join(COMPILE_MODES)}")
    return torch.compile(model, mode=mode, dynamic=False)


class FixedBatchNetwork(nn.Module):
    """`model(x, t, y)` run at one fixed batch: a smaller batch is padded to `batch_size` (and the output
    cut back), so that a network compiled for that shape (`compile_network`) never compiles again, and its
    CUDA graph ("reduce-overhead") is one launch per call. Each output is a copy the next call cannot
    overwrite (a CUDA graph replays into the same memory).

    model: a network called as ddpm's UNet is, its `num_classes`, `null_class`, `time_conditioning` and
    `config` passed through for the samplers. batch_size: the batch of every call (under classifier-free
    guidance the sampler calls with twice its images). mode: torch.compile's mode, None for no compilation
    (the padding alone).
    """

    def __init__(self, model: nn.Module, batch_size: int, *, mode: str | None = SAMPLING_COMPILE_MODE):
        super().__init__()
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.model, self.batch_size = model, batch_size
        for name in ("num_classes", "null_class", "time_conditioning", "config"):
            if hasattr(model, name):
                setattr(self, name, getattr(model, name))
        # Not an attribute nn.Module registers: the compiled wrapper holds `model` itself.
        self.__dict__["_call"] = compile_network(model, mode=mode) if mode is not None else model

    def forward(self, x: Tensor, t: Tensor, y: Conditions | Tensor | None = None) -> Tensor:
        """x (N, C, H, W) with N <= batch_size, t (N,), y (N,) labels, N rows of Conditions or None ->
        (N, C', H, W)."""
        n = x.shape[0]
        if n > self.batch_size:
            raise ValueError(f"{n} images do not fit this network's fixed batch of {self.batch_size}")
        if n < self.batch_size:  # pad with copies of the first image: values the network sees anyway
            x, t = _pad(x, self.batch_size), _pad(t, self.batch_size)
            if isinstance(y, Conditions):
                y = Conditions.cat([y, y.rows([0] * (self.batch_size - n))])
            elif y is not None:
                y = _pad(y, self.batch_size)
        if x.is_cuda:
            torch.compiler.cudagraph_mark_step_begin()  # the previous call's outputs are no longer read
        return self._call(x, t, y)[:n].clone()


def auto_batch_size(
    model: nn.Module,
    image_shape: Sequence[int],
    n: int,
    *,
    device: torch.device | str,
    calls_per_image: int = 1,
    cap: int = AUTO_BATCH_CAP,
) -> int:
    """The images per sampling batch of --batch-size auto: on CUDA the most that fit in MEMORY_SHARE of the
    free memory, at most `cap`, from the memory one forward pass of PROBE_BATCH images needs (under the
    caller's autocast, so at the dtype sampling runs in), balanced (`balanced_batch`) so that the last batch,
    padded to the others' shape when compiled, is nearly full; on the CPU AUTO_BATCH_CPU, as sample.py's
    batch always was there (the stochastic samplers' noise depends on the batches). Never more than n.
    calls_per_image: 2 under classifier-free guidance, whose calls are twice the batch."""
    device = torch.device(device)
    if device.type != "cuda":
        return min(n, AUTO_BATCH_CPU)
    probe = min(PROBE_BATCH, n) * calls_per_image
    param = next(model.parameters(), None)
    dtype = param.dtype if param is not None and param.is_floating_point() else torch.float32
    x = torch.zeros((probe, *image_shape), device=device, dtype=dtype)
    t = torch.zeros(probe, device=device, dtype=torch.long)
    y = torch.zeros(probe, device=device, dtype=torch.long) if getattr(model, "num_classes", None) else None
    with torch.no_grad():
        model(x, t, y)  # first: cuDNN's algorithm search (with cudnn.benchmark) would inflate the peak
        torch.cuda.synchronize(device)
        before = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        model(x, t, y)
    per_call_image = max(torch.cuda.max_memory_allocated(device) - before, 1) / probe
    free, _ = torch.cuda.mem_get_info(device)
    fits = int(MEMORY_SHARE * free / (per_call_image * calls_per_image))
    return balanced_batch(n, max(1, min(cap, fits)))


def balanced_batch(n: int, most: int) -> int:
    """The batch size that splits n images into as few batches as batches of `most` need, all but the last
    full and the last as full as can be: ceil(n / ceil(n / most)). 50,000 at most 4096: 13 batches of 3847."""
    return math.ceil(n / math.ceil(n / most))


def training_compile_pays(setting: bool | str, *, steps: int, device: torch.device | str) -> bool:
    """Whether a training run of `steps` optimizer steps compiles its network (train.compile): true or false
    as given; "auto" on CUDA for runs of at least COMPILE_MIN_STEPS steps, never on the CPU."""
    if setting == AUTO:
        return enabled(AUTO, device) and steps >= COMPILE_MIN_STEPS
    return bool(setting)


def sampling_compile_pays(setting: bool | str, *, n: int, calls: int, device: torch.device | str) -> bool:
    """Whether sampling n images at `calls` network calls each compiles its network: true or false as
    given; "auto" on CUDA when n x calls >= COMPILE_MIN_IMAGE_CALLS, never on the CPU."""
    if setting == AUTO:
        return enabled(AUTO, device) and n * calls >= COMPILE_MIN_IMAGE_CALLS
    return bool(setting)


def _pad(values: Tensor, size: int) -> Tensor:
    """values (N, ...) -> (size, ...) with values[0] repeated after them."""
    extra = values[:1].expand(size - values.shape[0], *values.shape[1:])
    return torch.cat([values, extra])
