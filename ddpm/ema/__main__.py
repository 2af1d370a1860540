"""Post-hoc EMA of a run trained with `train.posthoc_ema_every` (Karras et al. 2024): reconstruct the EMA of
any profile width after training, or score several and keep the best.

    python -m ddpm.ema RUN --sigma-rel 0.08 --out DIR          # a model folder: sample.py --checkpoint DIR
    python -m ddpm.ema RUN --sweep 0.05,0.08,0.12 [--out DIR]  # score each; --out writes the best

sigma_rel is the standard deviation of the averaging profile relative to the training time (the profile
peaks at the end of training; 1/sqrt(12) = 0.289 would be a uniform average). The model folder also holds
posthoc_ema.json: the width, the step and the snapshots it was made from. It is written whole or not at all,
and replaces an earlier one at --out (a folder holding other files is refused). The score of --sweep is the
run's training loss on fixed draws of its data (`ddpm.ema.posthoc.denoising_score`): lower is better. --step
reconstructs at an earlier snapshot. Exit status 0, or 1 with one line `error: ...` on stderr.
"""

import argparse
import dataclasses
import sys
from pathlib import Path
from typing import NoReturn

from ddpm.config import task_settings
from ddpm.ema.posthoc import (
    denoising_score,
    list_snapshots,
    load_run,
    posthoc_model,
    reconstruct,
    save_posthoc_model,
)
from ddpm.io import CheckpointError
from ddpm.prog import command_name


class _Parser(argparse.ArgumentParser):
    """argparse, but a bad option is one line on stderr and exit status 1, as in sample.py."""

    def error(self, message: str) -> NoReturn:
        sys.exit(f"error: {message}; see --help")


def main(argv: list[str] | None = None) -> None:
    """Parse `argv` (default sys.argv[1:]); write the model folder and/or print the scores."""
    parser = _Parser(
        prog=command_name("ddpm.ema"),
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("run", help="a run directory whose training wrote posthoc_ema/ snapshots")
    what = parser.add_mutually_exclusive_group(required=True)
    what.add_argument("--sigma-rel", type=float, help="the profile width to reconstruct, in (0, 0.2887)")
    what.add_argument("--sweep", type=_floats, metavar="S1,S2,...", help="profile widths to score")
    parser.add_argument("--out", help="model folder to write (with --sweep: the best width's)")
    parser.add_argument("--step", type=int, help="reconstruct at this snapshot's step (default: the last)")
    parser.add_argument("--n", type=int, default=1024, help="images scored by --sweep (default: %(default)s)")
    parser.add_argument(
        "--seed", type=int, default=0, help="seed of the scoring draws (default: %(default)s)"
    )
    args = parser.parse_args(argv)
    if args.sigma_rel is not None and args.out is None:
        parser.error("--sigma-rel needs --out DIR, the model folder to write")
    widths = [args.sigma_rel] if args.sigma_rel is not None else args.sweep
    try:
        config, scheduler = load_run(args.run)
        model = posthoc_model(config, None)
        states = reconstruct(args.run, model, widths, step=args.step)
        best = 0
        if args.sweep is not None:
            scores = []
            for width, state in zip(widths, states, strict=True):
                model.load_state_dict(state)
                scores.append(denoising_score(model, scheduler, config, n=args.n, seed=args.seed))
                print(f"sigma_rel {width:.4f}  loss {scores[-1]:.6f}")
            best = min(range(len(widths)), key=scores.__getitem__)
            print(f"best: sigma_rel {widths[best]:.4f}", file=sys.stderr)
        if args.out is not None:
            model.load_state_dict(states[best])
            steps = [s.step for s in list_snapshots(args.run)]
            step = args.step if args.step is not None else steps[-1]
            made_from = {"sigma_rel": widths[best], "step": step, "run": str(Path(args.run).resolve())}
            made_from["snapshot_steps"] = [s for s in steps if s <= step]
            task = task_settings(config.data) if config.data.task != "none" else None
            save_posthoc_model(
                args.out, model, scheduler, made_from, sampling=dataclasses.asdict(config.sample), task=task
            )
            print(f"wrote {args.out} (post-hoc EMA, sigma_rel {widths[best]:.4f})", file=sys.stderr)
    except (CheckpointError, ValueError, OSError) as error:
        sys.exit(f"error: {error}")


def _floats(text: str) -> list[float]:
    try:
        return [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected numbers separated by commas, e.g. 0.05,0.1, got {text!r}"
        ) from None


if __name__ == "__main__":
    main()
