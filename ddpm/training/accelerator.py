"""The Accelerate `Accelerator` of a training run: processes, mixed precision, CPU threads, trackers."""

from __future__ import annotations

import os
from datetime import timedelta
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import DataLoaderConfiguration, GradientAccumulationPlugin, InitProcessGroupKwargs

from ddpm.config import TrainConfig, tracker_names
from ddpm.data import available_cores


def build_accelerator(train: TrainConfig, run_dir: Path) -> Accelerator:
    """The Accelerator for the `train` section, logging to the trackers of train.log_with under `run_dir`
    (a tracker named but not installed: ConfigError, before anything is built).

    On the CPU it also sets torch's thread count: train.cpu_threads, or the cores shared among the processes
    of this machine (`_cpu_threads_per_process`).
    """
    accelerator = Accelerator(
        # Without GPUs, `accelerate launch --multi_gpu --num_processes N` must still mean N processes
        # over gloo; Accelerate only picks that backend when told it runs on the CPU.
        cpu=not torch.cuda.is_available() and "LOCAL_RANK" in os.environ,
        mixed_precision=_mixed_precision(train.mixed_precision),
        gradient_accumulation_plugin=GradientAccumulationPlugin(
            num_steps=train.grad_accum, sync_with_dataloader=False
        ),
        # Batches come from pinned memory on a GPU (the loader's pin_memory): copied without waiting for it.
        dataloader_config=DataLoaderConfiguration(
            use_seedable_sampler=True, data_seed=train.seed, non_blocking=torch.cuda.is_available()
        ),
        log_with=tracker_names(train) or None,
        project_dir=str(run_dir),
        # A process whose peer crashed or hangs stops with an error instead of waiting forever.
        kwargs_handlers=[InitProcessGroupKwargs(timeout=timedelta(seconds=train.dist_timeout_s))],
    )
    if accelerator.device.type == "cpu":
        torch.set_num_threads(train.cpu_threads or _cpu_threads_per_process())
    return accelerator


def _mixed_precision(setting: str) -> str:
    """Resolve train.mixed_precision: "auto" is bf16 where the GPU has it, else fp16 on GPU, none on CPU.

    An explicit `accelerate launch --mixed_precision fp16|bf16` wins over "auto".
    """
    if setting != "auto":
        return setting
    launched = os.environ.get("ACCELERATE_MIXED_PRECISION", "no")
    if launched != "no":
        return launched
    if not torch.cuda.is_available():
        return "no"
    return "bf16" if torch.cuda.is_bf16_supported() else "fp16"


def _cpu_threads_per_process() -> int:
    """OMP_NUM_THREADS when it asks for more than one thread; else the cores this process may run on, shared
    among the processes launched on this machine.

    `accelerate launch` sets OMP_NUM_THREADS=1 for a single process without GPUs unless given
    --num_cpu_threads_per_process, so 1 is taken for its default, which would leave every other core idle
    (train.cpu_threads=1 asks for one thread).
    """
    requested = os.environ.get("OMP_NUM_THREADS", "")
    if requested.isdigit() and int(requested) > 1:
        return int(requested)
    return available_cores()
