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
    "segment": ("ddpm.segment", "segment images with a mask model: the mean and variance of K masks each"),
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
    args, rest = parser.parse_known_args(argv)
    command = importlib.import_module(COMMANDS[args.command][0])
    program = sys.argv[0]
    sys.argv[0] = f"ddpm {args.command}"  # the name argparse gives the command's usage line
    try:
        command.main(rest)
    finally:
        sys.argv[0] = program
