"""Export a trained model as a diffusers pipeline folder.

    python -m ddpm.export RUN_OR_CHECKPOINT OUT [--raw] [--scheduler NAME]

RUN_OR_CHECKPOINT is what `sample.py --checkpoint` takes: a run directory (its latest checkpoint), a
checkpoint folder or its ema/, a model folder, a diffusers folder or a Hub repo id. OUT gets model_index.json,
unet/ (config.json and diffusion_pytorch_model.safetensors of a UNet2DModel computing the same function) and
scheduler/scheduler_config.json, so that `DDPMPipeline.from_pretrained(OUT)` loads it. The weights are the
EMA ones, as sample.py uses, or the raw ones with --raw.

The scheduler is DPMSolverMultistepScheduler (DPM-Solver++ 2M) for the "exponential" and "karras" spacings
and DDPMScheduler for the others, or --scheduler's, with a spacing that diffusers runs correctly at every
step count: the model's own where it can ("exponential", "leading", "linspace"), else the nearest, said on
stderr ("trailing" runs as "linspace", "karras" as "exponential"). A class-conditional model keeps its
classes and its null label (the last one) and is exported as a ClassConditionalPipeline (this package's
ddpm/interop/class_conditional_pipeline.py, copied into OUT), which takes class_labels and guidance_scale:
`DiffusionPipeline.from_pretrained(OUT, trust_remote_code=True)`; diffusers' DDPMPipeline cannot pass labels.

An image-conditioned model (cond_channels) is refused: neither pipeline passes an image; its UNet alone
exports with `ddpm.interop.diffusers.save_diffusers_unet` (sample [x, image, flag]). Vector (cond_dim) and
token-sequence (context_dim) conditions are refused by name: UNet2DModel has no layout for them.

Exit status: 0 with OUT on stdout; 1 with a one-line `error: ...` on stderr, naming the option, for a model
that diffusers cannot express, and for a missing checkpoint or an OUT that exists.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ddpm.inference import load_for_sampling
from ddpm.interop.diffusers import CONDITIONAL_PIPELINE, DIFFUSERS_SAMPLER_SETTINGS, save_diffusers_pipeline
from ddpm.io import CheckpointError, atomic_write
from ddpm.models.unet import UNet
from ddpm.prog import command_name


def export_pipeline(
    source: str | Path, out: str | Path, *, use_ema: bool = True, scheduler_class: str | None = None
) -> str:
    """Write the model of `source` (see the module docstring) as a diffusers pipeline folder `out`, whole or
    not at all (written beside it under a temporary name, then renamed); returns a line saying what was
    written: the weights, the pipeline and scheduler classes, the spacing and, where it differs, the model's
    own, and a class-conditional model's labels.

    Raises ValueError naming the option diffusers cannot express (`save_diffusers_pipeline`) or for a network
    other than `UNet`, FileExistsError for an `out` that exists, and CheckpointError for a source that cannot
    be loaded.
    """
    out = Path(out)
    if out.exists():
        raise FileExistsError(f"{out} exists; export into a new folder (or remove it first)")
    loaded = load_for_sampling(source, use_ema=use_ema)
    if not isinstance(loaded.model, UNet):
        raise ValueError(
            f"model.architecture={type(loaded.model).__name__} cannot be exported to diffusers: UNet2DModel "
            "has the layout of ddpm.UNet only"
        )
    with atomic_write(out) as tmp:
        cls, runs = save_diffusers_pipeline(
            tmp, loaded.model, loaded.scheduler, scheduler_class=scheduler_class
        )
    spacing, own = runs.config["timestep_spacing"], loaded.scheduler.config["timestep_spacing"]
    said = f"exported the {loaded.weights} weights of {loaded.folder} as a diffusers "
    classes = loaded.model.num_classes
    if classes is None:
        said += "DDPMPipeline"
    else:
        null = loaded.model.null_class
        labels = f"labels 0-{classes - 1}" + (f", and {null} for none" if null is not None else "")
        said += (
            f"{CONDITIONAL_PIPELINE[1]} ({labels}; DiffusionPipeline.from_pretrained({str(out)!r}, "
            "trust_remote_code=True) loads it: DDPMPipeline cannot pass labels)"
        )
    said += f" with a {cls}, {spacing!r} spacing"
    if spacing != own:
        said += f" (the model's is {own!r}, which {cls} does not run correctly at every step count)"
    return said


def main(argv: list[str] | None = None) -> None:
    """Parse the command line (`argv`, default sys.argv[1:]) and export; see the module docstring."""
    parser = argparse.ArgumentParser(
        prog=command_name("ddpm.export"),
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("source", metavar="RUN_OR_CHECKPOINT", help="what sample.py --checkpoint takes")
    parser.add_argument("out", metavar="OUT", help="the pipeline folder to write (must not exist)")
    parser.add_argument("--raw", action="store_true", help="export the raw instead of the EMA weights")
    parser.add_argument(
        "--scheduler",
        choices=list(DIFFUSERS_SAMPLER_SETTINGS),
        help="the diffusers scheduler class of scheduler/ (default: DPMSolverMultistepScheduler for the "
        "karras and exponential spacings, DDPMScheduler for the others)",
    )
    args = parser.parse_args(argv)
    try:
        said = export_pipeline(args.source, args.out, use_ema=not args.raw, scheduler_class=args.scheduler)
    except (CheckpointError, ValueError, OSError) as error:
        sys.exit(f"error: {error}")
    print(said, file=sys.stderr)
    print(args.out)


if __name__ == "__main__":
    main()
