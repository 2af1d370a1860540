"""Images from a trained model: finding and loading it with its schedule and sampling settings
(`load_for_sampling`), drawing many images with per-image seeds and class labels (`generate`), and writing
them as PNGs (`save_grid`, `save_images_to`).

`generate` is what the trainer's sample grids call, `grid_from_checkpoint` what sample.py calls; `ddpm.sample`
does the diffusion maths.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch
from huggingface_hub.constants import HF_HUB_CACHE
from PIL import Image
from safetensors import SafetensorError
from safetensors.torch import save_file
from torchvision.utils import save_image

from ddpm.compiled import (
    AUTO,
    SAMPLING_COMPILE_MODE,
    FixedBatchNetwork,
    auto_batch_size,
    sampling_compile_pays,
)
from ddpm.condition_files import ConditionFileError, read_cond_files
from ddpm.conditions import Conditions
from ddpm.config import SampleConfig, load_config, read_task_settings, task_settings
from ddpm.data import inpaint_condition, read_images, upsample_low_res
from ddpm.ema.posthoc import PROVENANCE
from ddpm.images import PngWriter
from ddpm.io import EMA, TASK_FILE, CheckpointError, atomic_write, one_line
from ddpm.models.classic import ClassicUNet
from ddpm.models.unet import UNet
from ddpm.progress import progress_bar
from ddpm.run_dir import RUN_CONFIG, SAMPLES, TRAIN_ONE
from ddpm.samplers import (
    SampleOptionError,
    check_autoguide,
    check_sample_options,
    img2img,
    inpaint,
    invert,
    sample,
    sampling_budget,
)
from ddpm.schedule import NoiseScheduler
from ddpm.source import ModelSource, load_openai_source, load_source, resolve_source

_SAMPLER_NOISE = 1  # the SeedSequence purpose key of the samplers' noise streams
GRID_WITH_IMAGES = 1024  # the images a grid shows when every image is also written alone (--save-images)
DEFAULT_N = 16  # the images sample.py draws when neither --n nor --cond-image says how many


class Loaded(NamedTuple):
    """What sampling needs from a run, a checkpoint or a model folder, loaded together by `load_for_sampling`:
    the network, its schedule and the run's sampling settings."""

    model: UNet | ClassicUNet  # in eval mode, on the device asked for
    scheduler: NoiseScheduler  # the schedule the weights were trained with, or the one `schedule` named
    weights: str  # which weights: "ema", "posthoc-ema" (python -m ddpm.ema), "raw", "diffusers" or "openai"
    sampling: SampleConfig  # the run's `sample:` settings; SampleConfig() for a folder outside a run
    folder: Path  # the checkpoint (also for its ema/) or the model folder the weights belong to
    run_dir: Path | None  # the run directory holding the checkpoint; None for a folder outside a run
    # The built-in task the weights were trained on (`ddpm.config.task_settings`): the folder's TASK_FILE,
    # else the run's data section; {"task": "none"} for a folder without either
    task: dict[str, Any]


def load_for_sampling(
    path: str | Path | ModelSource,
    *,
    use_ema: bool = True,
    schedule: str | Path | None = None,
    device: torch.device | str = "cpu",
    openai_flags: str | None = None,
) -> Loaded:
    """Load what sampling needs from a model source (`ddpm.source`: a run, a checkpoint or its ema/ folder, a
    model folder, a diffusers UNet2DModel or pipeline folder, local or on the Hub, or an OpenAI .pt file with
    `openai_flags`; or a source already resolved): the network, its noise scheduler and the run's sampling
    settings.

    A run directory means its latest checkpoint. A run or checkpoint gives its EMA weights unless `use_ema`
    is False; a checkpoint's ema/ named directly gives the EMA weights (and refuses `use_ema=False`). The
    schedule is the one saved with the weights (see `ddpm.load_pretrained`; a diffusers folder ignores
    `use_ema`, as published EMA weights, such as google/ddpm-ema-church-256, are the only weights there), or
    the file `schedule` names. A ddpm folder without a schedule is refused, never sampled with a guessed one.
    An OpenAI checkpoint (guided-diffusion or improved-diffusion) needs `openai_flags`, the flag string
    published with it (`ddpm.interop.openai.load_openai`), which gives its schedule too.
    Raises CheckpointError, naming the file and the fix, when something cannot be found or read.
    """
    source = path if isinstance(path, ModelSource) else resolve_source(path)
    if source.kind == "openai" or openai_flags is not None:
        model, scheduler = load_openai_source(source, openai_flags, schedule=schedule, device=device)
        return Loaded(model, scheduler, "openai", SampleConfig(), source.path, None, {"task": "none"})
    if source.kind == "ema" and not use_ema:
        raise CheckpointError(
            f"{source.path} holds the EMA weights, but the raw ones were asked for (--raw); pass the "
            f"checkpoint {source.folder} for its raw weights, or drop --raw"
        )
    if use_ema and source.kind in ("run", "checkpoint") and (source.folder / EMA).is_dir():
        source = source.ema()
    try:
        model, scheduler = load_source(source, schedule=schedule, device=device)
    except (OSError, ValueError, SafetensorError) as error:  # JSONDecodeError is a ValueError
        raise CheckpointError(
            f"cannot load the model in {source.folder}: {one_line(error)}; it is incomplete, damaged or not "
            "a ddpm checkpoint: pass another one with --checkpoint"
        ) from None
    if source.kind == "diffusers":
        weights = "diffusers"
    elif (source.path / PROVENANCE).is_file():
        weights = "posthoc-ema"
    else:
        weights = "ema" if source.kind == "ema" else "raw"
    run = source.run_dir
    run_config = load_config(run / RUN_CONFIG) if run is not None else None  # read once
    sampling = run_config.sample if run_config is not None else SampleConfig()
    task = _saved_task(source.path)
    if task is None:  # a folder written before the task travelled with the weights, or without a task
        task = task_settings(run_config.data) if run_config is not None else {"task": "none"}
    return Loaded(model, scheduler, weights, sampling, source.folder, run, task)


def _saved_task(folder: Path) -> dict[str, Any] | None:
    """The task settings saved in the model folder `folder` (TASK_FILE), checked as a config's data keys;
    None without the file. Raises CheckpointError naming the file when it cannot be read."""
    file = folder / TASK_FILE
    if not file.is_file():
        return None
    try:
        settings = json.loads(file.read_text())
        if not isinstance(settings, dict):
            raise ValueError(f"expected a mapping, got {type(settings).__name__}")
        return task_settings(read_task_settings(settings, str(file)))
    except (OSError, ValueError) as error:  # ConfigError and JSONDecodeError are ValueErrors
        raise CheckpointError(
            f"cannot read the task settings {file}: {one_line(error)}; write them as "
            '{"task": "superres", "superres_factor": 4} (or delete the file for a model without a task)'
        ) from None


def default_run(default_config: str | Path) -> Path:
    """The run that sample.py reads without --checkpoint: the output_dir of `default_config`, a local path
    (never a Hub repo id), relative to the current folder unless absolute. Raises CheckpointError when it does
    not exist, saying where it was looked for, how to train it and how to name another."""
    run = Path(load_config(default_config).output_dir)
    if not run.exists():
        where = "" if run.is_absolute() else f", relative to the current folder {Path.cwd()}"
        fixes = "" if run.is_absolute() else "sample from the folder you trained in, "
        raise CheckpointError(
            f"no trained model at {run.absolute()} (the default --checkpoint: output_dir {run} of "
            f"{Path(default_config).name}{where}); {fixes}{TRAIN_ONE}, or pass --checkpoint PATH"
        )
    return run


def samples_folder(loaded: Loaded) -> Path:
    """Where sample.py writes what it makes when not told (--out): the run's samples/ folder; for weights
    outside a run, a samples/ folder beside them (in the model folder; beside an OpenAI .pt file); for a
    model from the Hub, whose snapshot in the Hub cache is huggingface_hub's to manage, samples/ in the
    current folder."""
    if loaded.run_dir is not None:
        return loaded.run_dir / SAMPLES
    if loaded.folder.resolve().is_relative_to(Path(HF_HUB_CACHE).resolve()):
        return Path.cwd() / SAMPLES
    return (loaded.folder if loaded.folder.is_dir() else loaded.folder.parent) / SAMPLES


@torch.no_grad()
def generate(
    model: torch.nn.Module,
    scheduler: NoiseScheduler,
    n: int,
    *,
    image_shape: Sequence[int],
    sampler: str = "ddim",
    steps: int | None = 50,
    calls: int | None = None,
    eta: float = 0.0,
    options: Mapping[str, Any] | None = None,
    class_label: int | None = None,
    cond: Conditions | None = None,
    guidance_scale: float = 1.0,
    guidance_interval: tuple[float, float] | None = None,
    guidance_rescale: float = 0.0,
    autoguide: torch.nn.Module | None = None,
    seed: int = 0,
    batch_size: int | str | None = None,
    compiled: bool | str = AUTO,
    device: torch.device | str = "cpu",
    progress: bool = False,
    on_batch: Callable[[torch.Tensor, int], None] | None = None,
) -> torch.Tensor:
    """Draw `n` images of shape `image_shape` (C, H, W); returns (n, C, H, W) float32 on the CPU in [-1, 1].

    Every random draw is independent of every other. The starting noise x_T of image i comes from its own
    CPU generator seeded with `seed + i`, so image i starts the same whatever the batch size (and with a
    deterministic sampler, DDIM at eta 0 or DPM-Solver++, ends the same). The stochastic samplers' noise
    (ddpm; ddim with eta > 0) for the batch that starts at image s comes from a generator on `device` seeded
    with a hash of (seed + s, 1) by numpy's SeedSequence, a stream unrelated to any x_T's (so those images
    change with the batch size). For a class-conditional model, images get `class_label` when given, else
    labels 0, 1, ... cycling over the classes; `guidance_scale` applies classifier-free guidance against the
    null label. cond: instead, the conditions of the n images (n rows, labels among them if the model takes
    labels), which a model conditioned on more than labels needs; guidance is then against `cond.null()`.
    guidance_interval and guidance_rescale limit and rescale the guidance (see `ddpm.sample`). autoguide: a
    weak version of the model (an earlier checkpoint, a smaller run), guidance_scale then being
    autoguidance's weight (Karras et al. 2024; see `ddpm.sample`): no null label needed, for an unconditional
    model too. `calls`, when given, replaces `steps` (see `ddpm.sample`); `options` are the solver's own.

    batch_size: images sampled together; None: all n; "auto": `ddpm.compiled.auto_batch_size` (on CUDA the
    most that fit, at most AUTO_BATCH_CAP, balanced so that the last batch is nearly full; 64 on the CPU).
    compiled: whether the network runs compiled at that batch (`ddpm.compiled.FixedBatchNetwork`: one CUDA
    graph launch per network call, the last batch padded to the same shape): true, false or "auto" (on CUDA
    for runs of at least COMPILE_MIN_IMAGE_CALLS images x network calls, `sampling_compile_pays`). The
    images do not depend on either. on_batch: called with each batch as soon as it is drawn, (B, C, H, W)
    float32 on the CPU in [-1, 1], and the index of its first image (`PngWriter.write` writes them).
    """
    steps = None if calls is not None else steps
    _check_options(n=n, seed=seed)
    _check_batch_size(batch_size)
    if cond is None:
        # autoguidance passes the labels as they are: it needs no classes nor null label
        cfg_scale = guidance_scale if autoguide is None else 1.0
        _check_labels(model, class_label=class_label, guidance_scale=cfg_scale)
        _refuse_unconditioned(model)
    elif class_label is not None or cond.batch_size != n:
        raise ValueError(
            f"cond must hold the conditions of the n={n} images (got {cond.batch_size} rows), their labels "
            "among them: pass no class_label with it"
        )
    check_sample_options(
        sampler=sampler,
        steps=steps,
        calls=calls,
        eta=eta,
        guidance_scale=guidance_scale,
        guidance_interval=guidance_interval,
        guidance_rescale=guidance_rescale,
        autoguide=autoguide is not None,
        options=options,
        num_train_timesteps=scheduler.num_train_timesteps,
    )
    if autoguide is not None:
        check_autoguide(model, autoguide)
    # classifier-free guidance batches [x, x] into each network call; autoguidance calls the weak model apart
    per_call = 1 if guidance_scale == 1.0 or autoguide is not None else 2
    batch_size = _batch_size(batch_size, model, image_shape, n, device=device, calls_per_image=per_call)
    network_calls = sampling_budget(sampler, steps=steps, calls=calls).calls
    network, weak = model, autoguide
    if sampling_compile_pays(compiled, n=n, calls=network_calls, device=device):
        network = FixedBatchNetwork(model, batch_size * per_call, mode=SAMPLING_COMPILE_MODE)
        if autoguide is not None:
            weak = FixedBatchNetwork(autoguide, batch_size, mode=SAMPLING_COMPILE_MODE)
    num_classes = getattr(model, "num_classes", None)
    batches = []
    for start in progress_bar(range(0, n, batch_size), desc="sample", show=progress and n > batch_size):
        indices = range(start, min(start + batch_size, n))
        noise = torch.stack(
            [
                torch.randn(tuple(image_shape), generator=torch.Generator().manual_seed(seed + i))
                for i in indices
            ]
        ).to(device)
        y = None
        if num_classes and cond is None:
            y = _cycled_labels(indices, num_classes, class_label).to(device)
        batch_cond = cond.rows(slice(indices.start, indices.stop)).to(device) if cond is not None else None
        generator = _noise_generator(seed + start, device)
        images = sample(
            network,
            scheduler,
            noise=noise,
            sampler=sampler,
            steps=steps,
            calls=calls,
            eta=eta,
            options=options,
            y=y,
            cond=batch_cond,
            guidance_scale=guidance_scale,
            guidance_interval=guidance_interval,
            guidance_rescale=guidance_rescale,
            autoguide=weak,
            generator=generator,
            progress=progress and n <= batch_size,
        )
        batches.append(images.float().clamp(-1, 1).cpu())
        if on_batch is not None:
            on_batch(batches[-1], start)
    return torch.cat(batches)


def save_grid(images: torch.Tensor, path: str | Path, *, nrow: int | None = None) -> Path:
    """Write images in [-1, 1] of shape (N, C, H, W) as one PNG grid (atomically: temp file, then rename).

    A failed write raises OSError naming `path`; a crash leaves at most a hidden .tmp- file beside it
    (`atomic_write`).
    """
    path = Path(path)
    nrow = nrow or math.ceil(math.sqrt(images.shape[0]))
    with atomic_write(path) as tmp:
        save_image(images, tmp, nrow=nrow, normalize=True, value_range=(-1, 1), padding=1)
    return path


def save_images_to(images: torch.Tensor, folder: str | Path, *, start: int = 0) -> list[Path]:
    """Write each image in [-1, 1] as its own PNG, named 000000.png, 000001.png, ... (for FID tools), as
    torchvision's save_image writes it, on several threads (`ddpm.images.PngWriter`)."""
    with PngWriter(folder) as writer:
        return writer.write(images, start=start)


def grid_from_checkpoint(
    checkpoint: str | Path | None,
    n: int | None,
    *,
    default_config: str | Path,
    out: str | Path | None = None,
    sampler: str | None = None,
    steps: int | None = None,
    calls: int | None = None,
    eta: float | None = None,
    options: Mapping[str, Any] | None = None,
    seed: int = 0,
    batch_size: int | str = AUTO,
    class_label: int | None = None,
    guidance_scale: float | None = None,
    guidance_interval: tuple[float, float] | None = None,
    guidance_rescale: float = 0.0,
    autoguide: str | Path | None = None,
    cond_image: str | Path | None = None,
    mask: str | Path | None = None,
    cond_files: str | Path | None = None,
    save_images: bool = False,
    use_ema: bool = True,
    schedule: str | Path | None = None,
    say: Callable[[str], None] | None = None,
    openai_flags: str | None = None,
) -> Path:
    """Draw `n` images (None: DEFAULT_N) from a run, a checkpoint (or its ema/), a model folder or a diffusers
    folder and write them as a grid; returns the grid's path. What sample.py does.

    cond_image: for a model conditioned on an image (model.cond_channels), which then needs it, an image file
    or a folder of images (`read_cond_images`), one image drawn from each (so `n` stays None): the grid shows
    the conditions, as the network sees them, in the rows above the images drawn from them, min(N, 16) to a
    row; its default name gets -condSTEM before the seed. mask: for a model trained with data.task inpaint,
    which then needs it, the masks of the cond_image images (white = keep; -maskSTEM in the name); the grid
    shows the images with their holes grey. cond_files: for a model conditioned on a vector or a token
    sequence (model.cond_dim, context_dim), which then needs it, a .npy or .safetensors file or a folder of
    them, one image drawn from each (`ddpm.condition_files.read_cond_files`; with cond_image, as many as
    there are images, paired in sorted order); its default name gets -condSTEM too.

    `checkpoint` None means the run directory named by `default_config`'s output_dir. Sampler options left
    None come from the run's saved config (its `sample:` section), else from `SampleConfig`'s defaults; the
    run's eta applies only when sampling with ddim, and its solver options only with its own sampler. `steps`
    or `calls` (a network-call budget) given replace both of the run's; else the run's calls, when set,
    replace its steps. guidance_interval (sigma_lo, sigma_hi) and guidance_rescale (phi) limit and rescale
    the guidance (see `ddpm.sample`). autoguide: a run, checkpoint or model folder (as `checkpoint`, with the
    same `use_ema` and `schedule`) whose model guides by autoguidance (Karras et al. 2024), e.g. an early
    checkpoint of the same run; it needs `guidance_scale`, its weight (the run's sample.guidance_scale is
    classifier-free guidance's), and the model's image shape, conditions and noise schedule. `say`, when
    given, is told the steps and network calls used ("heun: 10 steps, 19 network calls (from the calls asked
    for)"). The noise schedule is the one saved with
    the weights, or the file `schedule` names, or for an OpenAI .pt file the one of its `openai_flags` (see
    `load_for_sampling`). `out` None writes to the run's samples/ folder (`samples_folder`: a folder
    outside a run gets one of its own)
    `sample-CHECKPOINT-WEIGHTS-SAMPLERSTEPS[-callsC][-NAMEVALUE...][-etaE][-classC][-guidanceG][-intervalLO-HI]
    [-rescaleP][-autoguideWEAK][-condSTEM]-seedS-nN.png`
    (callsC where the calls differ from the steps, NAMEVALUE for each solver option), a name that differs
    whenever the images would; `save_images` also writes one PNG per image in the folder of the grid's name
    without .png, each as soon as its batch is drawn (on threads: `ddpm.images.PngWriter`), and then the grid
    shows the first GRID_WITH_IMAGES images only (a grid of 50,000 takes longer to encode than to sample).
    `batch_size`: images per batch, or "auto" (see `generate`, which also says when the network is
    compiled). The device is CUDA when available (with bf16 or fp16 autocast), else the CPU. Raises
    ValueError, naming the sample.py option, for a bad option and CheckpointError for weights that are
    missing, damaged or do not fit their config: the options that need no model before it is loaded, those
    that need it (the class label, guidance, the image condition) before anything is sampled or said.
    """
    if cond_image is not None and n is not None:
        raise ValueError(f"--n {n} with --cond-image: one image is drawn per condition image; drop --n")
    if cond_files is not None and n is not None:
        raise ValueError(f"--n {n} with --cond: one image is drawn per condition file; drop --n")
    if mask is not None and cond_image is None:
        raise ValueError(f"--mask {mask} when sampling goes with --cond-image: the images to fill in")
    n = DEFAULT_N if n is None and cond_image is None and cond_files is None else n
    _check_options(seed=seed, **({"n": n} if n is not None else {}))
    _check_batch_size(batch_size)
    given = {
        "sampler": sampler,
        "steps": steps,
        "calls": calls,
        "eta": eta,
        "options": options,
        "guidance_scale": guidance_scale,
    }
    _check_settings_given(**given, guidance_interval=guidance_interval, guidance_rescale=guidance_rescale)
    if out is not None:
        _check_out(Path(out), image=True)
    if schedule is not None and not Path(schedule).is_file():
        raise ValueError(f"--schedule {schedule}: no such file; name a noise_scheduler.json")
    if autoguide is not None and guidance_scale is None:
        raise ValueError(
            f"--autoguide {autoguide} needs --guidance-scale W, its weight (the run's sample.guidance_scale "
            "is classifier-free guidance's, which autoguidance replaces)"
        )
    if checkpoint is None:
        checkpoint = default_run(default_config)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    loaded = load_for_sampling(
        checkpoint, use_ema=use_ema, schedule=schedule, device=device, openai_flags=openai_flags
    )
    weak = None
    if autoguide is not None:
        weak = _load_weak(autoguide, loaded, use_ema=use_ema, schedule=schedule, device=device)
    settings = sampling_settings(loaded.sampling, **given)
    sampler, steps, calls, eta, guidance_scale = (
        settings[key] for key in ("sampler", "steps", "calls", "eta", "guidance_scale")
    )
    settings.update(guidance_interval=guidance_interval, guidance_rescale=guidance_rescale)
    try:
        check_sample_options(
            **settings, autoguide=weak is not None, num_train_timesteps=loaded.scheduler.num_train_timesteps
        )
    except SampleOptionError as error:
        raise _cli_error(error) from None
    _check_labels(
        loaded.model,
        class_label=class_label,
        guidance_scale=guidance_scale if weak is None else 1.0,  # autoguidance needs no null label
        conditioned=cond_image is not None or cond_files is not None,
    )
    _check_cond_image(loaded.model, cond_image)
    _check_cond_files(loaded.model, cond_files)
    cond = None
    if cond_image is not None:
        cond = read_cond_images(loaded, cond_image, mask=mask, class_label=class_label)
    if cond_files is not None:
        cond = _with_cond_files(loaded.model, cond, cond_files, class_label=class_label)
    n = cond.batch_size if cond is not None else n
    budget = sampling_budget(sampler, steps=steps, calls=calls)
    if out is None:
        name = [loaded.folder.name, loaded.weights, f"{sampler}{budget.steps}"]
        name += [f"calls{budget.calls}"] if budget.calls != budget.steps else []
        name += [f"{key}{_name_value(value)}" for key, value in sorted(settings["options"].items())]
        name += [f"eta{eta:g}"] if eta else []
        name += [f"class{class_label}"] if class_label is not None else []
        name += [f"guidance{guidance_scale:g}"] if guidance_scale != 1 else []
        name += [f"interval{guidance_interval[0]:g}-{guidance_interval[1]:g}"] if guidance_interval else []
        name += [f"rescale{guidance_rescale:g}"] if guidance_rescale else []
        name += [f"autoguide{weak.folder.name}"] if weak is not None else []
        name += [f"cond{Path(cond_image).stem}"] if cond_image is not None else []
        name += [f"mask{Path(mask).stem}"] if mask is not None else []
        name += [f"cond{Path(cond_files).stem}"] if cond_files is not None else []
        name += [f"seed{seed}", f"n{n}"]
        out = samples_folder(loaded) / f"sample-{'-'.join(name)}.png"
        _check_out(out, image=True)
    if say is not None:
        say(f"{sampler}: {budget}")
    config = loaded.model.config
    shape = (config["in_channels"], config["image_size"], config["image_size"])
    out = Path(out)
    autocast_dtype = torch.bfloat16 if device == "cuda" and torch.cuda.is_bf16_supported() else torch.float16
    writer = PngWriter(out.with_suffix("")) if save_images else contextlib.nullcontext()
    with writer, torch.autocast(device, dtype=autocast_dtype, enabled=device == "cuda"):
        images = generate(
            loaded.model,
            loaded.scheduler,
            n,
            image_shape=shape,
            **settings,  # the sampler settings just checked
            autoguide=weak.model if weak is not None else None,
            class_label=class_label if cond is None else None,  # else among the conditions
            cond=cond,
            seed=seed,
            batch_size=batch_size,
            device=device,
            progress=True,
            on_batch=writer.write if save_images else None,
        )
    shown = images[:GRID_WITH_IMAGES] if save_images else images
    if cond is None or "image" not in cond:
        return save_grid(shown, out)
    # The conditions above the images, in x's channels (grey where the two differ; inpainting's masked images)
    conditions = cond["image"][: len(shown)]
    if loaded.task["task"] == "inpaint":
        conditions = conditions[:, : shape[0]]
    elif conditions.shape[1] != shape[0]:
        conditions = conditions.mean(1, keepdim=True)
    grid = [*_full_rows(conditions.expand(-1, shape[0], -1, -1)), *_full_rows(shown)]
    return save_grid(torch.cat(grid), out, nrow=min(len(shown), 16))


def sampling_settings(
    defaults: SampleConfig,
    *,
    sampler: str | None = None,
    steps: int | None = None,
    calls: int | None = None,
    eta: float | None = None,
    options: Mapping[str, Any] | None = None,
    guidance_scale: float | None = None,
) -> dict[str, Any]:
    """The sampler settings sample.py uses (`grid_from_checkpoint`), unchecked: those given, the others from
    `defaults`, the run's saved `sample:` section (`Loaded.sampling`). `steps` or `calls` given replace both
    of the run's, else the run's calls, when set, replace its steps; the run's eta applies only to ddim, its
    solver options only to its own sampler. Returns {sampler, steps, calls, eta, options, guidance_scale},
    `generate`'s keywords."""
    sampler = sampler or defaults.sampler
    if steps is None and calls is None:
        steps, calls = defaults.sampler_settings()["steps"], defaults.calls
    if eta is None:
        eta = defaults.eta if sampler == "ddim" else 0.0  # the run's eta is a DDIM setting
    if options is None:  # the run's solver options are settings of its own sampler
        options = defaults.options if sampler == defaults.sampler else {}
    return {
        "sampler": sampler,
        "steps": steps,
        "calls": calls,
        "eta": eta,
        "options": dict(options),
        "guidance_scale": defaults.guidance_scale if guidance_scale is None else guidance_scale,
    }


def read_cond_images(
    loaded: Loaded,
    path: str | Path,
    *,
    mask: str | Path | None = None,
    class_label: int | None = None,
) -> Conditions:
    """The image conditions of sample.py's --cond-image: the image file `path`, or every image in the folder
    `path`, as `loaded.model` takes them: (N, cond_channels, S, S) float32 under "image", S the model's side,
    read as training data are (`ddpm.data.read_images`: to L or RGB, the shorter side resized, the centre
    cropped), by the task the weights were trained on (`loaded.task`, saved with them):
    - superres: each image is the low-resolution one, read at side S / superres_factor, then upsampled as
      training did (`ddpm.data.upsample_low_res`);
    - inpaint: each image (in the model's in_channels) with the `mask` (an image file for every image, or a
      folder of as many as there are images; white (> half grey) = keep, as --mask when editing) made into
      the condition by the function training uses (`ddpm.data.inpaint_condition`);
    - none: the image as it is, in cond_channels (1 grey or 3 RGB).
    A model with classes also gets labels (N,): `class_label` for every image, else 0, 1, ... cycling.
    Raises ValueError naming --cond-image or --mask for a condition that cannot be read for this model (the
    image condition not 1 or 3 channels wide, a mask missing for an inpainting model or given to another, a
    number of masks that fits no image), and DataError for a missing path or an unreadable image."""
    model, task = loaded.model, loaded.task["task"]
    channels, size = model.cond_channels, model.config["image_size"]
    if (mask is not None) != (task == "inpaint"):
        raise ValueError(
            f"this model inpaints (data.task=inpaint): pass --mask MASK (white = keep) with --cond-image "
            f"{path}"
            if mask is None
            else f"--mask {mask} with --cond-image is for a model trained with data.task=inpaint, and this "
            f"one's task is {task}: drop --mask"
        )
    if task == "inpaint":
        images, files = read_images(path, image_size=size, channels=model.config["in_channels"])
        masks, mask_files = read_images(mask, image_size=size, channels=1)
        if len(mask_files) not in (1, len(files)):
            raise ValueError(
                f"--mask {mask}: {len(mask_files)} masks for {len(files)} images; give one or as many"
            )
        image = inpaint_condition(images, (masks > 0).float().expand(len(files), -1, -1, -1))
    else:
        if channels not in (1, 3):
            raise ValueError(
                f"--cond-image {path}: the model's image condition has {channels} channels, and image files "
                "are read as 1 (grey) or 3 (RGB); pass its conditions to ddpm.inference.generate(cond=) "
                "instead"
            )
        factor = loaded.task["superres_factor"] if task == "superres" else 1
        images, _ = read_images(path, image_size=size // factor, channels=channels)  # (N, C, S/f, S/f)
        image = upsample_low_res(images, factor) if factor > 1 else images  # (N, C, S, S)
    values = {"image": image}
    num_classes = getattr(model, "num_classes", None)
    if num_classes:
        values["label"] = _cycled_labels(range(len(image)), num_classes, class_label)
    return Conditions(values)


def needed_conditions(model: torch.nn.Module) -> str:
    """The settings by which `model` is conditioned on more than labels (an image, a vector, a token
    sequence), as "model.cond_channels=1, ...", whose conditions no sampler can make up; "" for none."""
    needed = [name for name in ("cond_channels", "cond_dim", "context_dim") if getattr(model, name, None)]
    return ", ".join(f"model.{name}={getattr(model, name)}" for name in needed)


def _load_weak(
    source: str | Path, loaded: Loaded, *, use_ema: bool, schedule: str | Path | None, device: str
) -> Loaded:
    """The weak model of --autoguide SOURCE, loaded as the model was (`load_for_sampling`); ValueError naming
    --autoguide when it cannot guide `loaded.model` (`check_autoguide`) or its noise schedule differs (its
    predictions are read with the model's)."""
    weak = load_for_sampling(source, use_ema=use_ema, schedule=schedule, device=device)
    try:
        check_autoguide(loaded.model, weak.model)
    except ValueError as error:
        raise ValueError(f"--autoguide {source}: {error}") from None
    if weak.scheduler.config != loaded.scheduler.config:
        differ = sorted(k for k, v in loaded.scheduler.config.items() if weak.scheduler.config.get(k) != v)
        raise ValueError(
            f"--autoguide {source}: its noise schedule differs from the model's in {', '.join(differ)}; its "
            "predictions are read with the model's schedule: guide with a model trained on the same one"
        )
    return weak


def _cycled_labels(indices: range, num_classes: int, class_label: int | None) -> torch.Tensor:
    """The (len(indices),) long labels of the images `indices`: `class_label` for each, else i % num_classes
    for image i (0, 1, ... cycling over the classes)."""
    return torch.tensor([class_label if class_label is not None else i % num_classes for i in indices])


def _check_cond_image(model: torch.nn.Module, cond_image: str | Path | None) -> None:
    """ValueError naming --cond-image when it is given to a model without an image condition, or missing for
    one with (`read_cond_images` checks --mask)."""
    channels = getattr(model, "cond_channels", None)
    if cond_image is not None and channels is None:
        raise ValueError(
            f"--cond-image {cond_image}: this model takes no image condition (model.cond_channels is unset); "
            "drop --cond-image"
        )
    if cond_image is None and channels is not None:
        raise ValueError(
            f"this model is conditioned on an image (model.cond_channels={channels}): pass --cond-image "
            "PATH, an image or a folder of images (for a superres run, the low-resolution ones; for an "
            "inpaint run, the images to fill in, with --mask MASK)"
        )


def _check_cond_files(model: torch.nn.Module, cond_files: str | Path | None) -> None:
    """ValueError naming --cond when it is given to a model without a vector or sequence condition, or
    missing for one with."""
    sizes = {name: getattr(model, name, None) for name in ("cond_dim", "context_dim")}
    taken = ", ".join(f"model.{name}={size}" for name, size in sizes.items() if size is not None)
    if cond_files is not None and not taken:
        raise ValueError(
            f"--cond {cond_files}: this model takes no vector or token sequence (model.cond_dim and "
            "context_dim are unset); drop --cond"
        )
    if cond_files is None and taken:
        raise ValueError(
            f"this model is conditioned on a vector or a token sequence ({taken}): pass --cond FILE, a .npy "
            "or .safetensors file or a folder of them, one per image"
        )


def _with_cond_files(
    model: torch.nn.Module, cond: Conditions | None, path: str | Path, *, class_label: int | None
) -> Conditions:
    """`cond` (the --cond-image conditions, or None) with the vectors and sequences of --cond `path`
    (`read_cond_files`), one row each, and a class model's labels when cond has none."""
    sizes = {name: getattr(model, name, None) for name in ("cond_dim", "context_dim")}
    try:
        files = read_cond_files(path, sizes)
    except ConditionFileError as error:
        raise ValueError(str(error)) from None
    if cond is not None and cond.batch_size != files.batch_size:
        raise ValueError(
            f"--cond {path}: {files.batch_size} conditions for {cond.batch_size} --cond-image images; give "
            "as many (paired in sorted order)"
        )
    values = dict(files.values)
    num_classes = getattr(model, "num_classes", None)
    if cond is not None:
        values.update(cond.values)
    elif num_classes:
        values["label"] = _cycled_labels(range(files.batch_size), num_classes, class_label)
    return Conditions(values)


def _cli_error(error: SampleOptionError) -> ValueError:
    """The sampling option's error, named as sample.py spells the option (`--eta 2: expected ...`)."""
    if error.option == "options":
        return ValueError(f"--option {error.value}=...: expected {error.expected}")
    if error.option.startswith("options."):
        name = error.option.removeprefix("options.")
        return ValueError(f"--option {name}={error.value}: expected {error.expected}")
    flag = "--" + error.option.replace("_", "-")
    value = error.value
    if isinstance(value, tuple | list):  # --guidance-interval LO HI
        value = " ".join(f"{v:g}" if isinstance(v, int | float) else str(v) for v in value)
    return ValueError(f"{flag} {value}: expected {error.expected}")


def _name_value(value: Any) -> str:
    """A solver option's value as a file name part: numbers as %g (inf: "inf"), others as str."""
    return f"{value:g}" if isinstance(value, int | float) and not isinstance(value, bool) else str(value)


def _batch_size(
    batch_size: int | str | None,
    model: torch.nn.Module,
    image_shape: Sequence[int],
    n: int,
    *,
    device: torch.device | str,
    calls_per_image: int,
) -> int:
    """`generate`'s batch: None is n, "auto" `auto_batch_size`, else the positive integer given (ValueError
    naming --batch-size otherwise)."""
    _check_batch_size(batch_size)
    if batch_size is None:
        return n
    if batch_size == AUTO:
        return auto_batch_size(model, image_shape, n, device=device, calls_per_image=calls_per_image)
    return batch_size


def _check_batch_size(batch_size: int | str | None) -> None:
    """ValueError naming --batch-size unless it is None, "auto" or a positive integer."""
    if isinstance(batch_size, str) and batch_size != AUTO:
        raise ValueError(f"--batch-size must be a positive integer or {AUTO}, got {batch_size!r}")
    if isinstance(batch_size, int):
        _check_options(batch_size=batch_size)


def _check_options(**options: int) -> None:
    """Raise ValueError naming the option (as sample.py spells it) for a count or seed out of range; the
    sampling settings are `ddpm.samplers.check_sample_options`'s to check."""
    for name, value in options.items():
        valid, expected = (value >= 0, ">= 0") if name == "seed" else (value > 0, "a positive integer")
        if not valid:
            raise ValueError(f"--{name.replace('_', '-')} must be {expected}, got {value}")


def _refuse_unconditioned(model: torch.nn.Module) -> None:
    """ValueError for a model conditioned on more than labels (`needed_conditions`), whose conditions
    generate cannot make up: they must be given."""
    settings = needed_conditions(model)
    if settings:
        raise ValueError(
            f"this model is conditioned on more than labels ({settings}): pass the conditions of the images "
            "(generate's cond; sample.py --cond-image for an image condition, --cond for a vector or a "
            "token sequence)"
        )


def _check_labels(
    model: torch.nn.Module, *, class_label: int | None, guidance_scale: float, conditioned: bool = False
) -> None:
    """Raise ValueError naming the option (as sample.py spells it) for a label or guidance the model cannot
    take. conditioned: conditions beyond labels are given (--cond-image), which guidance can drop to the
    network's learned nulls, so a model without classes may be guided."""
    num_classes = getattr(model, "num_classes", None)
    if class_label is not None and not num_classes:
        raise ValueError(f"--class-label {class_label}: the model has no classes; drop --class-label")
    if class_label is not None and not 0 <= class_label < num_classes:
        raise ValueError(
            f"--class-label {class_label} is out of range: the model has {num_classes} classes, so pass a "
            f"label in 0..{num_classes - 1}"
        )
    if guidance_scale != 1 and not num_classes and not conditioned:
        raise ValueError(
            f"--guidance-scale {guidance_scale:g} needs a class-conditional model; this one has no classes: "
            "pass --guidance-scale 1"
        )
    if guidance_scale != 1 and num_classes and getattr(model, "null_class", None) is None:
        raise ValueError(
            f"--guidance-scale {guidance_scale:g} needs a null label (the unconditional output), which this "
            "class-conditional model has not (as OpenAI's and diffusers' class-conditional weights): "
            "fine-tune it with label dropout first, or pass --guidance-scale 1"
        )


def _check_settings_given(
    *,
    sampler: str | None,
    steps: int | None,
    calls: int | None,
    eta: float | None,
    options: Mapping[str, Any] | None,
    guidance_scale: float | None,
    guidance_interval: tuple[float, float] | None = None,
    guidance_rescale: float = 0.0,
) -> None:
    """Raise ValueError naming the option (as sample.py spells it) for a sampling setting given that
    `check_sample_options` refuses before the model and its run are read: all it checks but the upper bound
    of the steps and calls (the schedule's length) when the sampler is given. Without it the run's sampler is
    not known yet: ddim, which takes eta, stands in for it, and the calls and solver options, which depend on
    the sampler, wait for the run's."""
    known = sampler is not None
    try:
        check_sample_options(
            sampler=sampler if known else "ddim",
            steps=steps,
            calls=calls if known else None,
            eta=0.0 if eta is None else eta,
            # the run's guidance scale, not known yet: one that guides stands in (its interval and rescale)
            guidance_scale=0.0 if guidance_scale is None else guidance_scale,
            guidance_interval=guidance_interval,
            guidance_rescale=guidance_rescale,
            options=options if known else None,
        )
    except SampleOptionError as error:
        raise _cli_error(error) from None


def _check_out(out: Path, *, image: bool) -> None:
    """Raise ValueError, before any work, when nothing could be written to `out`: an existing folder, a
    folder that cannot be created or written, or (`image`) a name whose suffix is no image format that
    Pillow writes (it picks the format from the suffix)."""
    if out.is_dir():
        raise ValueError(f"--out {out} is a folder: name a file in it, e.g. {out / 'grid.png'}")
    if image and Image.registered_extensions().get(out.suffix.lower()) not in Image.SAVE:
        raise ValueError(f"--out {out}: not an image file name; end it with .png (or .jpg, .webp)")
    folder = out.absolute().parent
    while not folder.exists():
        folder = folder.parent
    if not folder.is_dir() or not os.access(folder, os.W_OK | os.X_OK):
        raise ValueError(
            f"cannot write {out}: {folder} is not a folder this process may write; pass --out FILE"
        )


def _noise_generator(seed: int, device: torch.device | str) -> torch.Generator:
    """The generator of a batch's sampler noise: seeded with a SeedSequence hash of (seed, 1), never with a
    plain `seed + i` of an x_T generator, whose stream it would repeat (same seed, same engine on the CPU)."""
    entropy = np.random.SeedSequence([seed, _SAMPLER_NOISE]).generate_state(1, np.uint64)[0]
    return torch.Generator(device).manual_seed(int(entropy))


def edit_from_checkpoint(
    checkpoint: str | Path | None,
    init_image: str | Path | None = None,
    *,
    default_config: str | Path,
    strength: float | None = None,
    mask: str | Path | None = None,
    invert_images: str | Path | None = None,
    out: str | Path | None = None,
    sampler: str | None = None,
    steps: int | None = None,
    eta: float | None = None,
    jump_length: int = 10,
    jump_n_sample: int = 10,
    seed: int = 0,
    batch_size: int | str = AUTO,
    class_label: int | None = None,
    guidance_scale: float | None = None,
    cond_image: str | Path | None = None,
    cond_files: str | Path | None = None,
    use_ema: bool = True,
    schedule: str | Path | None = None,
    say: Callable[[str], None] | None = None,
    openai_flags: str | None = None,
) -> Path:
    """Edit the image file or folder of images `init_image` (or `invert_images`) with a run, checkpoint or
    model folder (as `grid_from_checkpoint` loads them) and write the result; returns its path. What
    sample.py does with --init-image or --invert.

    The images are read as training data are (`ddpm.data.read_images`: resized on the shorter side to the
    model's size and centre-cropped, in its channels). Exactly one of: `strength` (img2img, SDEdit), `mask`
    (inpainting, RePaint: an image file for every image, or a folder of as many as there are images, read
    the same way; white (> half grey) = keep), or `invert_images` in place of init_image (DDIM inversion:
    writes the noises x_T,
    (N, C, H, W) float32 under the key "noise", as .safetensors, with the image files in its metadata).
    img2img takes the run's sampler and steps unless given; inpainting the "ddpm" sampler and the run's steps
    unless given, and `jump_length`, `jump_n_sample`; inversion "ddim" and the run's steps. A class model
    edits with `class_label` when given, else with its null label (unconditioned); guidance needs a
    class_label, or conditions beyond labels. A model conditioned on an image, a vector or a token sequence
    needs them, as sample.py does (`grid_from_checkpoint`): `cond_image` (`read_cond_images`; for a model
    trained with data.task=inpaint the mask of its condition is `mask`, so it inpaints only) and `cond_files`
    (`read_cond_files`), one condition for every image or as many as there are images (paired in sorted
    order); guidance is then against their null (`ddpm.conditions.Conditions.null`). The noise of the batch
    starting at image s is drawn from a generator seeded from seed + s.
    `out` None writes to the run's samples/ folder (`samples_folder`)
    `KIND-CHECKPOINT-WEIGHTS-SAMPLERSTEPS[-strengthS | -jumpJxN][-classC][-guidanceG][-condSTEM]-seedS-IN.png`
    (IN: the input's stem; .safetensors for inversion, without the seed): a grid of the inputs (the pixels
    to fill in grey) over the results, min(N, 16) to a row.
    Raises ValueError (a DataError for unreadable images) naming the sample.py option, and CheckpointError.
    """
    if (init_image is None) == (invert_images is None):
        raise ValueError(
            "--strength and --mask edit the images of --init-image PATH: pass it"
            if init_image is None
            else "--invert PATH takes the images itself: drop --init-image"
        )
    if invert_images is not None and (strength is not None or mask is not None):
        raise ValueError("--invert takes no --strength or --mask: they edit the images of --init-image")
    if init_image is not None and (strength is None) == (mask is None):
        raise ValueError(
            "--init-image needs either --strength S (image-to-image) or --mask PATH (inpainting)"
        )
    kind = "invert" if invert_images is not None else "img2img" if strength is not None else "inpaint"
    init_image = init_image if invert_images is None else invert_images
    _check_options(seed=seed)
    _check_batch_size(batch_size)
    _check_settings_given(
        sampler=sampler, steps=steps, calls=None, eta=eta, options=None, guidance_scale=guidance_scale
    )
    if out is not None:
        _check_out(Path(out), image=kind != "invert")
    if checkpoint is None:
        checkpoint = default_run(default_config)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    loaded = load_for_sampling(
        checkpoint, use_ema=use_ema, schedule=schedule, device=device, openai_flags=openai_flags
    )
    model, scheduler, config = loaded.model, loaded.scheduler, loaded.model.config
    if kind == "invert" and sampler not in (None, "ddim"):
        raise ValueError(f"--sampler {sampler}: --invert is DDIM inversion; drop --sampler")
    default_sampler = {"invert": "ddim", "inpaint": "ddpm", "img2img": loaded.sampling.sampler}[kind]
    sampler = sampler or default_sampler
    steps = steps if steps is not None else loaded.sampling.steps
    eta = (loaded.sampling.eta if sampler == "ddim" and kind != "invert" else 0.0) if eta is None else eta
    guidance_scale = loaded.sampling.guidance_scale if guidance_scale is None else guidance_scale
    conditioned = cond_image is not None or cond_files is not None
    _check_labels(model, class_label=class_label, guidance_scale=guidance_scale, conditioned=conditioned)
    if guidance_scale != 1 and class_label is None and not conditioned:
        raise ValueError(f"--guidance-scale {guidance_scale:g} needs --class-label when editing")
    _check_cond_image(model, cond_image)
    _check_cond_files(model, cond_files)
    try:
        check_sample_options(
            sampler=sampler,
            steps=steps,
            eta=eta,
            guidance_scale=guidance_scale,
            num_train_timesteps=scheduler.num_train_timesteps,
        )
    except SampleOptionError as error:
        raise _cli_error(error) from None
    size, channels = config["image_size"], config["in_channels"]
    images, files = read_images(init_image, image_size=size, channels=channels)
    masks = None
    if mask is not None:
        masks, mask_files = read_images(mask, image_size=size, channels=1)
        if len(mask_files) not in (1, len(files)):
            raise ValueError(
                f"--mask {mask}: {len(mask_files)} masks for {len(files)} images; give one or as many"
            )
        masks = (masks > 0).float().expand(len(files), -1, -1, -1)  # white = keep
    cond = _edit_conditions(loaded, len(files), cond_image, cond_files, mask=mask, class_label=class_label)
    if out is None:
        name = [kind, loaded.folder.name, loaded.weights, f"{sampler}{steps}"]
        name += [f"eta{eta:g}"] if eta else []
        name += [f"strength{strength:g}"] if kind == "img2img" else []
        name += [f"jump{jump_length}x{jump_n_sample}"] if kind == "inpaint" else []
        name += [f"class{class_label}"] if class_label is not None else []
        name += [f"guidance{guidance_scale:g}"] if guidance_scale != 1 else []
        name += [f"cond{Path(path).stem}" for path in (cond_image, cond_files) if path is not None]
        name += [f"seed{seed}"] if kind != "invert" else []
        name += [Path(init_image).stem]
        suffix = ".safetensors" if kind == "invert" else ".png"
        out = samples_folder(loaded) / f"{'-'.join(name)}{suffix}"
        _check_out(out, image=kind != "invert")
    out = Path(out)
    if say is not None:
        say(f"{kind}: {len(files)} images, {sampler} {steps} steps")
    per_call = 1 if guidance_scale == 1.0 else 2
    batch_size = _batch_size(
        batch_size, model, (channels, size, size), len(files), device=device, calls_per_image=per_call
    )
    results = []
    autocast_dtype = torch.bfloat16 if device == "cuda" and torch.cuda.is_bf16_supported() else torch.float16
    for start in range(0, len(files), batch_size):
        batch = images[start : start + batch_size].to(device)
        y, batch_cond = None, None
        if cond is not None:
            batch_cond = cond.rows(slice(start, start + len(batch))).to(device)
        elif getattr(model, "num_classes", None):
            y = torch.full(
                (len(batch),), model.null_class if class_label is None else class_label, device=device
            )
        generator = _noise_generator(seed + start, device)
        common = {"y": y, "cond": batch_cond, "guidance_scale": guidance_scale, "progress": True}
        with torch.autocast(device, dtype=autocast_dtype, enabled=device == "cuda"):
            if kind == "invert":
                result = invert(model, scheduler, batch, steps=steps, **common)
            elif kind == "img2img":
                result = img2img(
                    model,
                    scheduler,
                    batch,
                    strength,
                    sampler=sampler,
                    steps=steps,
                    eta=eta,
                    generator=generator,
                    **common,
                )
            else:
                result = inpaint(
                    model,
                    scheduler,
                    batch,
                    masks[start : start + batch_size].to(device),
                    steps=steps,
                    jump_length=jump_length,
                    jump_n_sample=jump_n_sample,
                    sampler=sampler,
                    eta=eta,
                    generator=generator,
                    **common,
                )
        results.append(result.float().cpu())
    result = torch.cat(results)
    if kind == "invert":
        metadata = {"images": json.dumps([str(file) for file in files]), "steps": str(steps)}
        with atomic_write(out) as tmp:
            save_file({"noise": result.contiguous()}, tmp, metadata=metadata)
        return out
    shown = images if masks is None else images * masks  # the pixels to fill in, grey (0)
    return save_grid(
        torch.cat([*_full_rows(shown), *_full_rows(result.clamp(-1, 1))]), out, nrow=min(len(files), 16)
    )


def _edit_conditions(
    loaded: Loaded,
    n: int,
    cond_image: str | Path | None,
    cond_files: str | Path | None,
    *,
    mask: str | Path | None,
    class_label: int | None,
) -> Conditions | None:
    """The conditions of the n images edited with --cond-image and --cond (None without either), read as
    sample.py reads them (`read_cond_images`, `_with_cond_files`), one for all images or one each, with the
    labels of editing: `class_label` for every image, else the null label (the label dropped)."""
    if cond_image is None and cond_files is None:
        return None
    inpaints = loaded.task["task"] == "inpaint"
    if cond_image is not None and inpaints and mask is None:
        raise ValueError(
            f"--cond-image {cond_image}: this model was trained with data.task=inpaint, whose condition "
            "needs the mask of the pixels to fill in: edit it with --init-image and --mask (inpainting)"
        )
    cond = None
    if cond_image is not None:
        cond = read_cond_images(loaded, cond_image, mask=mask if inpaints else None, class_label=class_label)
    if cond_files is not None:
        cond = _with_cond_files(loaded.model, cond, cond_files, class_label=class_label)
    if cond.batch_size not in (1, n):
        given = (("--cond-image", cond_image), ("--cond", cond_files))
        flags = " and ".join(f"{flag} {path}" for flag, path in given if path is not None)
        raise ValueError(f"{flags}: {cond.batch_size} conditions for {n} images; give one or as many")
    cond = cond.rows([0] * n) if cond.batch_size == 1 else cond
    if "label" in cond and class_label is None:  # editing's default: no label, the null's
        cond = cond.drop({"label": torch.ones(n, dtype=torch.bool)})
    return cond


def _full_rows(images: torch.Tensor, nrow: int = 16) -> list[torch.Tensor]:
    """images (N, C, H, W), padded with grey images to whole rows of min(N, nrow) (so that a grid of
    several such parts starts each on a row of its own)."""
    row = min(len(images), nrow)
    missing = -len(images) % row
    return [images, images.new_zeros(missing, *images.shape[1:])]
