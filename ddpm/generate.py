"""Many images from a trained model: batching, per-sample seeds, class labels, and writing PNGs.

`generate` is what the trainer's sample grids call, `sample_checkpoint` what sample.py calls; `ddpm.sample`
does the diffusion maths.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from pathlib import Path

import torch
from torchvision.utils import save_image
from tqdm.auto import tqdm

from ddpm.checkpoint import load_for_sampling, resolve_checkpoint, run_directory, sample_defaults
from ddpm.config import load_config
from ddpm.samplers import sample
from ddpm.scheduler import NoiseScheduler


@torch.no_grad()
def generate(
    model: torch.nn.Module,
    scheduler: NoiseScheduler,
    n: int,
    *,
    image_shape: Sequence[int],
    sampler: str = "ddim",
    steps: int = 50,
    eta: float = 0.0,
    class_label: int | None = None,
    guidance_scale: float = 1.0,
    seed: int = 0,
    batch_size: int | None = None,
    device: torch.device | str = "cpu",
    progress: bool = False,
) -> torch.Tensor:
    """Draw `n` images of shape `image_shape` (C, H, W); returns (n, C, H, W) float32 on the CPU in [-1, 1].

    The starting noise of image i is drawn from its own generator seeded with `seed + i`, so with a
    deterministic sampler (DDIM, eta 0; DPM-Solver++) image i is the same whatever the batch size. For a
    class-conditional model, images get `class_label` when given, else labels 0, 1, ... cycling over the
    classes; `guidance_scale` applies classifier-free guidance against the null label.
    """
    if n <= 0:
        raise ValueError(f"the number of images must be positive, got {n}")
    batch_size = batch_size or n
    num_classes = getattr(model, "num_classes", None)
    if class_label is not None and not num_classes:
        raise ValueError("class_label given, but the model has no classes; drop --class-label")
    if class_label is not None and not 0 <= class_label < num_classes:
        raise ValueError(
            f"class label {class_label} is out of range: the model has {num_classes} classes, so pass a "
            f"label in 0..{num_classes - 1}"
        )
    batches = []
    for start in tqdm(range(0, n, batch_size), desc="sample", disable=not progress or n <= batch_size):
        indices = range(start, min(start + batch_size, n))
        noise = torch.stack(
            [
                torch.randn(tuple(image_shape), generator=torch.Generator().manual_seed(seed + i))
                for i in indices
            ]
        ).to(device)
        y = None
        if num_classes:
            labels = [class_label if class_label is not None else i % num_classes for i in indices]
            y = torch.tensor(labels, device=device)
        generator = torch.Generator(device).manual_seed(seed + start)  # for the stochastic samplers' noise
        images = sample(
            model,
            scheduler,
            noise=noise,
            sampler=sampler,
            steps=steps,
            eta=eta,
            y=y,
            guidance_scale=guidance_scale,
            generator=generator,
            progress=progress and n <= batch_size,
        )
        batches.append(images.float().clamp(-1, 1).cpu())
    return torch.cat(batches)


def save_grid(images: torch.Tensor, path: str | Path, *, nrow: int | None = None) -> Path:
    """Write images in [-1, 1] of shape (N, C, H, W) as one PNG grid (atomically: temp file, then rename).

    A failed write raises OSError naming `path`; a crash leaves at most a hidden .tmp- file beside it.
    """
    path = Path(path)
    tmp = path.with_name(f".tmp-{os.getpid()}-{path.name}")  # one per process: sample.py may run alongside
    nrow = nrow or math.ceil(math.sqrt(images.shape[0]))
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        save_image(images, tmp, nrow=nrow, normalize=True, value_range=(-1, 1), padding=1)
        os.replace(tmp, path)
    except OSError as error:
        tmp.unlink(missing_ok=True)
        raise OSError(error.errno, f"cannot write {path}: {error.strerror or error}") from error
    return path


def save_images_to(images: torch.Tensor, folder: str | Path, *, start: int = 0) -> list[Path]:
    """Write each image in [-1, 1] as its own PNG, named 000000.png, 000001.png, ... (for FID tools)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for offset, image in enumerate(images):
        path = folder / f"{start + offset:06d}.png"
        save_image(image, path, normalize=True, value_range=(-1, 1), padding=0)
        paths.append(path)
    return paths


def sample_checkpoint(
    checkpoint: str | Path | None,
    n: int,
    *,
    default_config: str | Path,
    out: str | Path | None = None,
    sampler: str | None = None,
    steps: int | None = None,
    eta: float | None = None,
    seed: int = 0,
    batch_size: int = 64,
    class_label: int | None = None,
    guidance_scale: float | None = None,
    save_images: bool = False,
    use_ema: bool = True,
) -> Path:
    """Sample `n` images from a run, checkpoint or UNet folder and write a grid; returns the grid's path.

    `checkpoint` None means the run directory named by `default_config`'s output_dir. Sampler options left
    None come from the run's saved config (its `sample:` section), else from `SampleConfig`'s defaults. The
    device is CUDA when available (with bf16 or fp16 autocast), else the CPU. Raises ValueError for a bad
    option and CheckpointError for weights that are missing, damaged or do not fit their config.
    """
    for name, value in (("--n", n), ("--steps", steps), ("--batch-size", batch_size)):
        if value is not None and value <= 0:
            raise ValueError(f"{name} must be a positive integer, got {value}")
    for name, value in (("--eta", eta), ("--guidance-scale", guidance_scale)):
        if value is not None and value < 0:
            raise ValueError(f"{name} must be >= 0, got {value}")
    if checkpoint is None:
        checkpoint = load_config(default_config).output_dir
    folder = resolve_checkpoint(checkpoint)
    defaults = sample_defaults(folder)
    sampler = sampler or defaults.sampler
    steps = steps or defaults.steps
    eta = defaults.eta if eta is None else eta
    guidance_scale = defaults.guidance_scale if guidance_scale is None else guidance_scale

    device = "cuda" if torch.cuda.is_available() else "cpu"
    model, scheduler, weights = load_for_sampling(folder, use_ema=use_ema, device=device)
    config = model.config
    shape = (config["in_channels"], config["image_size"], config["image_size"])
    autocast_dtype = torch.bfloat16 if device == "cuda" and torch.cuda.is_bf16_supported() else torch.float16
    with torch.autocast(device, dtype=autocast_dtype, enabled=device == "cuda"):
        images = generate(
            model,
            scheduler,
            n,
            image_shape=shape,
            sampler=sampler,
            steps=steps,
            eta=eta,
            class_label=class_label,
            guidance_scale=guidance_scale,
            seed=seed,
            batch_size=batch_size,
            device=device,
            progress=True,
        )
    if out is None:
        run = run_directory(folder)
        base = run / "samples" if run is not None else Path.cwd()
        out = base / f"sample-{folder.name}-{weights}-{sampler}{steps}.png"
    out = save_grid(images, out)
    if save_images:
        save_images_to(images, out.with_suffix(""))
    return out
