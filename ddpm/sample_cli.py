"""Sample images from a trained model and write them as a PNG grid.

    ddpm-sample --n 16 [--checkpoint RUN_OR_CHECKPOINT] [--sampler ddim] [--steps 50 | --calls 50]
        [--option NAME=VALUE ...] [--out FILE]
    ddpm-sample --cond-image PATH [--mask PATH] [--cond FILE] [--checkpoint RUN] [...]
    ddpm-sample --autoguide WEAK_CHECKPOINT --guidance-scale W [--checkpoint RUN] [...]
    ddpm-sample --init-image PATH (--strength S | --mask PATH) [--sampler ...] [--steps N]
    ddpm-sample --invert PATH [--steps N]

Sampler settings default to the `sample:` section of the run's config, and the noise schedule is the one saved
with the weights, so nothing from training is re-typed. The cost of a sampler is its network calls: --calls
takes as many steps as fit in that many (a Heun step costs two); the steps and calls used go to stderr.
Editing (an image, or a folder of images, resized and centre-cropped as training data are): --strength is
image-to-image (SDEdit), --mask inpainting (RePaint, white = keep), --invert writes the DDIM noise of each.
A model conditioned on an image needs --cond-image (an image or a folder of images; for a superres run the
low-resolution ones; for an inpaint run the images to fill in, with --mask): one image is drawn from each,
and the grid shows the conditions above the images. A model conditioned on a vector or a token sequence
needs --cond (a .npy or .safetensors file, or a folder of them): one image is drawn from each. Editing such a
model takes them too: one condition for all the images edited, or one each.
--autoguide guides with a weak version of the model (an early checkpoint of the same run) in place of the
unconditional prediction (autoguidance, Karras et al. 2024), at --guidance-scale; unconditional models too.

(`python -m ddpm.sample_cli` and, in a clone, `python sample.py` are the same.)

Exit status: 0 with the grid's path on stdout; 1 with a one-line `error: ...` on stderr for a bad option or
checkpoint.
"""

import argparse
import functools
import sys
from pathlib import Path
from typing import Any, NoReturn

import yaml

from ddpm.compiled import AUTO, AUTO_BATCH_CAP, AUTO_BATCH_CPU
from ddpm.config import DEFAULT_CONFIG
from ddpm.inference import DEFAULT_N, edit_from_checkpoint, grid_from_checkpoint
from ddpm.io import CheckpointError
from ddpm.samplers import SAMPLE_KEYWORDS, SAMPLERS, solver_options


class _Parser(argparse.ArgumentParser):
    """argparse, but a bad option is one line on stderr and exit status 1, as every other bad input."""

    def error(self, message: str) -> NoReturn:
        sys.exit(f"error: {message}; see --help")


def main(argv: list[str] | None = None) -> None:
    parser = _Parser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--n",
        type=int,
        help=f"number of images (default: {DEFAULT_N}; with --cond-image or --cond one per condition)",
    )
    parser.add_argument(
        "--checkpoint",
        help="a run directory (its latest checkpoint), a checkpoint folder or its ema/, a model folder, or a "
        "diffusers folder (default: output_dir of configs/digits.yaml)",
    )
    parser.add_argument(
        "--out",
        help="grid PNG path (default: RUN/samples/sample-STEP-WEIGHTS-SAMPLERSTEPS-...-seedS-nN.png, "
        "named after every setting that changes the images; a model folder outside a run gets a samples/ "
        "folder of its own, a Hub model samples/ in the current folder)",
    )
    parser.add_argument(
        "--sampler",
        choices=list(SAMPLERS),
        metavar="SAMPLER",
        help=f"one of {', '.join(SAMPLERS)} (default: the run's sample.sampler)",
    )
    budget = parser.add_mutually_exclusive_group()
    budget.add_argument("--steps", type=int, help="sampler steps (default: the run's sample.steps)")
    budget.add_argument(
        "--calls",
        type=int,
        help="network calls instead of steps: the most steps that cost at most this many (default: the "
        "run's sample.calls when set)",
    )
    parser.add_argument("--eta", type=float, help="DDIM eta (default: the run's sample.eta)")
    parser.add_argument(
        "--option",
        action="append",
        type=_option,
        metavar="NAME=VALUE",
        help=f"a solver option, repeatable ({_solver_options_help()}); default: the run's sample.options "
        "when sampling with its sampler",
    )
    parser.add_argument("--seed", type=int, default=0, help="image i starts from noise seeded seed+i (>= 0)")
    parser.add_argument(
        "--batch-size",
        type=_batch_size,
        default=AUTO,
        help="images per forward pass, or auto (default): on a GPU the most that fit (at most "
        f"{AUTO_BATCH_CAP}), {AUTO_BATCH_CPU} on the CPU",
    )
    parser.add_argument("--class-label", type=int, help="class of every image (default: cycle over classes)")
    parser.add_argument(
        "--guidance-scale",
        type=float,
        help="classifier-free guidance scale, or with --autoguide autoguidance's (1 = none; default: the "
        "run's sample.guidance_scale, without --autoguide)",
    )
    parser.add_argument(
        "--autoguide",
        metavar="WEAK",
        help="autoguidance (Karras et al. 2024): a run, checkpoint or model folder of a weaker version of "
        "the model (e.g. RUN/checkpoints/step-0000500 of the same run) guiding it at --guidance-scale W "
        "(needed, != 1): D_weak + W (D - D_weak), instead of classifier-free guidance; same image size, "
        "channels, conditions and schedule",
    )
    parser.add_argument(
        "--guidance-interval",
        type=float,
        nargs=2,
        metavar=("SIGMA_LO", "SIGMA_HI"),
        help="guide only at noise levels sigma = sqrt((1 - alpha_bar) / alpha_bar) in [SIGMA_LO, SIGMA_HI] "
        "(Kynkaanniemi et al. 2024; inf allowed), the conditional prediction elsewhere (default: every step)",
    )
    parser.add_argument(
        "--guidance-rescale",
        type=float,
        default=0.0,
        metavar="PHI",
        help="rescaled guidance in [0, 1] (Lin et al. 2023, Eq. 15-16): the guided prediction's std brought "
        "to the conditional one's, mixed by PHI (default: 0, plain guidance)",
    )
    parser.add_argument(
        "--cond-image",
        metavar="PATH",
        help="for a model conditioned on an image: an image or a folder of images, one image drawn from each "
        "(for a superres run, the low-resolution images; for an inpaint run, the images to fill in, with "
        "--mask)",
    )
    parser.add_argument(
        "--cond",
        metavar="FILE",
        help="for a model conditioned on a vector or a token sequence (model.cond_dim, context_dim): a .npy "
        "or .safetensors file, or a folder of them, one image drawn from each ((cond_dim,) a vector, "
        "(L, context_dim) a sequence; a .safetensors file may hold both, named vector and context)",
    )
    parser.add_argument("--save-images", action="store_true", help="also write one PNG per image")
    parser.add_argument("--raw", action="store_true", help="use the raw weights instead of the EMA weights")
    parser.add_argument(
        "--schedule",
        metavar="FILE",
        help="noise schedule JSON (a noise_scheduler.json or a diffusers scheduler_config.json) in place of "
        "the one saved with the weights; needed for a folder that has none",
    )
    parser.add_argument(
        "--openai-flags",
        metavar="FLAGS",
        help="for an OpenAI .pt checkpoint (guided-diffusion, improved-diffusion): the MODEL_FLAGS and "
        "DIFFUSION_FLAGS published with it, as one string (docs/openai.md)",
    )
    edit = parser.add_argument_group("editing (--n and --calls do not apply)")
    edit.add_argument("--init-image", metavar="PATH", help="an image or a folder of images to edit")
    edit.add_argument("--strength", type=float, help="image-to-image (SDEdit): noise level in [0, 1]")
    edit.add_argument(
        "--mask",
        metavar="PATH",
        help="inpainting, white = keep: with --init-image RePaint's (any model), with --cond-image a model "
        "trained with data.task=inpaint",
    )
    edit.add_argument("--jump-length", type=int, default=10, help="RePaint jump length (default: 10)")
    edit.add_argument(
        "--jump-n-sample",
        type=int,
        default=10,
        help="RePaint resamplings, 1 = plain replacement (default: 10)",
    )
    edit.add_argument(
        "--invert", metavar="PATH", help="DDIM-invert image(s) to noise, written as .safetensors"
    )
    args = parser.parse_args(argv)
    editing = args.init_image or args.invert or args.strength is not None
    if editing or args.mask and args.cond_image is None:  # --mask with --cond-image: an inpaint model's
        try:
            print(_edit(args))
        except (CheckpointError, ValueError, OSError) as error:
            sys.exit(f"error: {error}")
        return
    try:
        grid = grid_from_checkpoint(
            args.checkpoint,
            args.n,
            default_config=DEFAULT_CONFIG,
            out=args.out,
            sampler=args.sampler,
            steps=args.steps,
            calls=args.calls,
            eta=args.eta,
            options=dict(args.option) if args.option else None,
            seed=args.seed,
            batch_size=args.batch_size,
            class_label=args.class_label,
            guidance_scale=args.guidance_scale,
            guidance_interval=tuple(args.guidance_interval) if args.guidance_interval else None,
            guidance_rescale=args.guidance_rescale,
            autoguide=args.autoguide,
            cond_image=args.cond_image,
            mask=args.mask,
            cond_files=args.cond,
            save_images=args.save_images,
            use_ema=not args.raw,
            schedule=args.schedule,
            say=functools.partial(print, file=sys.stderr),
            openai_flags=args.openai_flags,
        )
    except (CheckpointError, ValueError, OSError) as error:
        sys.exit(f"error: {error}")
    print(grid)


def _edit(args: argparse.Namespace) -> Path:
    """--init-image with --strength or --mask, or --invert: `ddpm.inference.edit_from_checkpoint`."""
    if args.calls is not None or args.option:
        raise ValueError("editing takes --steps, not --calls or --option")
    if args.guidance_interval or args.guidance_rescale:
        raise ValueError(
            "editing guides at every step, unrescaled: drop --guidance-interval, --guidance-rescale"
        )
    if args.autoguide:
        raise ValueError("editing guides by classifier-free guidance only: drop --autoguide")
    return edit_from_checkpoint(
        args.checkpoint,
        args.init_image,
        default_config=DEFAULT_CONFIG,
        strength=args.strength,
        mask=args.mask,
        invert_images=args.invert,
        out=args.out,
        sampler=args.sampler,
        steps=args.steps,
        eta=args.eta,
        jump_length=args.jump_length,
        jump_n_sample=args.jump_n_sample,
        seed=args.seed,
        batch_size=args.batch_size,
        class_label=args.class_label,
        guidance_scale=args.guidance_scale,
        cond_image=args.cond_image,
        cond_files=args.cond,
        use_ema=not args.raw,
        schedule=args.schedule,
        say=functools.partial(print, file=sys.stderr),
        openai_flags=args.openai_flags,
    )


def _batch_size(text: str) -> int | str:
    """--batch-size: "auto" or an integer (its range is checked with the other options)."""
    if text == AUTO:
        return AUTO
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer or {AUTO}, got {text!r}") from None


def _option(text: str) -> tuple[str, Any]:
    """NAME=VALUE, the value read as a YAML scalar (as config overrides are): s_churn=40 gives 40."""
    name, sep, value = text.partition("=")
    if not sep or not name:
        raise argparse.ArgumentTypeError(f"expected NAME=VALUE, e.g. s_churn=40, got {text!r}")
    return name, yaml.safe_load(value)


def _solver_options_help() -> str:
    """The solver options of each sampler that has some, for --help: "heun: s_churn, s_tmin, ..."."""
    listed = []
    for name, solver in SAMPLERS.items():
        own = [option for option in solver_options(solver) if option not in SAMPLE_KEYWORDS]
        listed += [f"{name}: {', '.join(own)}"] if own else []
    return "; ".join(listed) or "none"


if __name__ == "__main__":
    main()
