"""The `ddpm` command: every command of the package under one name.

    ddpm COMMAND [ARGS ...]        e.g. ddpm train --config cifar10, ddpm sample --checkpoint runs/digits
    ddpm COMMAND --help            the command's own options

ARGS go to the command's own parser unchanged, so `ddpm sample ...` is `ddpm-sample ...` (and, in a clone,
`python sample.py ...`). `python -m ddpm` is the same as `ddpm`.
"""

import argparse
import importlib
import sys

# name -> (the module whose main(argv) runs it, what it does in one line)
COMMANDS = {
    "train": ("ddpm.train", "train a model: a YAML config and key=value overrides, --resume"),
    "sample": ("ddpm.sample_cli", "draw a grid of images from a model, or edit images with it"),
    "export": ("ddpm.export", "write a model as a diffusers DDPMPipeline folder"),
    "fid": ("ddpm.fid.__main__", "FID, KID and precision/recall between two sources of images"),
    "nll": ("ddpm.nll", "negative log-likelihood of a model on a data set, in bits/dim"),
    "ema": ("ddpm.ema.__main__", "post-hoc EMA: reconstruct or sweep EMA lengths after training"),
    "distill": ("ddpm.distill", "distil a trained run into a sampler of 1, 2 or 4 network calls"),
    "segment": ("ddpm.segment", "segment images: the mean and variance of K sampled masks each"),
}


def main(argv: list[str] | None = None) -> None:
    """Run `ddpm COMMAND ARGS` (`argv`, default sys.argv[1:]): the command's main with ARGS. Only the
    command's module is imported, so that `ddpm --help` is quick."""
    parser = argparse.ArgumentParser(
        prog="ddpm", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (_, summary) in COMMANDS.items():
        # add_help=False: --help, like every other argument after the command, is the command's own
        commands.add_parser(name, help=summary, add_help=False)
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] not in (*COMMANDS, "-h", "--help"):
        what = f"unknown command {argv[0]!r}" if argv else "no command"
        parser.error(f"{what}: the commands are {', '.join(COMMANDS)} (`ddpm --help` says what each does)")
    args, rest = parser.parse_known_args(argv)
    command = importlib.import_module(COMMANDS[args.command][0])
    program = sys.argv[0]
    sys.argv[0] = f"ddpm {args.command}"  # the name its usage line shows (`ddpm.prog.command_name`)
    try:
        command.main(rest)
    finally:
        sys.argv[0] = program
