"""Export a trained model as a diffusers DDPMPipeline folder.

    python -m ddpm.export RUN_OR_CHECKPOINT OUT [--raw] [--scheduler NAME]

RUN_OR_CHECKPOINT is what `sample.py --checkpoint` takes: a run directory (its latest checkpoint), a
checkpoint folder or its ema/, a model folder, a diffusers folder or a Hub repo id. OUT gets model_index.json,
unet/ (config.json and diffusion_pytorch_model.safetensors of a UNet2DModel computing the same function) and
scheduler/scheduler_config.json, so that `DDPMPipeline.from_pretrained(OUT)` loads it. The weights are the
EMA ones, as sample.py uses, or the raw ones with --raw. A class-conditional model keeps its classes and its
null label (the last one): DDPMPipeline draws unconditional images only, so call its `unet` with
`class_labels` for those.

Exit status: 0 with OUT on stdout; 1 with a one-line `error: ...` on stderr, naming the option, for a model
that diffusers cannot express, and for a missing checkpoint or an OUT that exists.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ddpm.inference import load_for_sampling
from ddpm.interop.diffusers import DIFFUSERS_SAMPLER_SETTINGS, save_diffusers_pipeline
from ddpm.io import CheckpointError, atomic_write
from ddpm.models.unet import UNet


def export_pipeline(
    source: str | Path, out: str | Path, *, use_ema: bool = True, scheduler_class: str | None = None
) -> str:
    """Write the model of `source` (see the module docstring) as a DDPMPipeline folder `out`, whole or not at
    all (written beside it under a temporary name, then renamed); returns a line saying what was written.

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
        save_diffusers_pipeline(tmp, loaded.model, loaded.scheduler, scheduler_class=scheduler_class)
    classes = loaded.model.num_classes
    note = (
        f"; labels 0-{classes - 1}, and {classes} for none (pipeline.unet's class_labels)" if classes else ""
    )
    return f"exported the {loaded.weights} weights of {loaded.folder} as a diffusers DDPMPipeline{note}"


def main(argv: list[str] | None = None) -> None:
    """Parse the command line (`argv`, default sys.argv[1:]) and export; see the module docstring."""
    parser = argparse.ArgumentParser(
        prog="python -m ddpm.export",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("source", metavar="RUN_OR_CHECKPOINT", help="what sample.py --checkpoint takes")
    parser.add_argument("out", metavar="OUT", help="the pipeline folder to write (must not exist)")
    parser.add_argument("--raw", action="store_true", help="export the raw instead of the EMA weights")
    parser.add_argument(
        "--scheduler",
        choices=list(DIFFUSERS_SAMPLER_SETTINGS),
        help="the diffusers scheduler class of scheduler/ (default: DDPMScheduler, or "
        "DPMSolverMultistepScheduler for the karras and exponential spacings, which only it has)",
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
