"""Train a diffusion model.

    ddpm-train [--config NAME_OR_FILE] [key=value ...] [--resume [CHECKPOINT]]
    accelerate launch --multi_gpu --num_processes N -m ddpm.train [...]     # several processes

(`python -m ddpm.train` and, in a clone, `python train.py` and `accelerate launch train.py` are the same.)
--config takes a YAML file or the name of a config that ships with ddpm (digits, cifar10, folder, ...); when
both exist, the file at the path given wins (`--config digits.yaml` reads ./digits.yaml if there is one).

Overrides are dotted config keys, e.g. `train.steps=200 data.batch_size=32 output_dir=runs/try`.
`--resume` alone continues the latest checkpoint of output_dir; `--resume PATH` continues that checkpoint, or
the latest one of the run directory PATH.

Exit status: 0 when training finished; 1 with a one-line `error: ...` on stderr for bad input or a failure
(config, data, checkpoint, NaN loss, a full disk, another process not answering); 128 + the signal number
(130 for SIGINT, 143 for SIGTERM) when a signal stopped training after saving a checkpoint of the current
step, and 130 when Ctrl-C came before training started (nothing to save). A launcher reports its own status:
`accelerate launch` exits 1 for any of these failures and signals, and prints a traceback after our line
unless given -q (one process); see docs/faults-and-resume.md, "Exit statuses and launchers".
"""

import argparse
import signal
import sys
from pathlib import Path

from ddpm.config import BUNDLED_CONFIGS, DEFAULT_CONFIG, load_config
from ddpm.run_dir import latest_checkpoint
from ddpm.training import USER_ERRORS, Trainer


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--config",
        help=f"YAML config file, or the name of a bundled one: {', '.join(_bundled())} (an existing file at "
        f"the path given wins) (default: {DEFAULT_CONFIG.stem})",
    )
    parser.add_argument(
        "--resume",
        nargs="?",
        const="latest",
        metavar="CHECKPOINT",
        help="continue the latest checkpoint of output_dir, or the checkpoint folder or run directory given",
    )
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="dotted config overrides")
    args = parser.parse_args(argv)
    if args.resume and "=" in args.resume and not Path(args.resume).exists():
        # `--resume train.steps=10`: argparse took an override for the optional checkpoint path.
        args.overrides.insert(0, args.resume)
        args.resume = "latest"
    config = None
    try:
        config = load_config(args.config or DEFAULT_CONFIG, args.overrides)
        trainer = Trainer(config, resume=args.resume)
        trainer.train()
    except USER_ERRORS as error:
        sys.exit(f"error: {error}")
    except KeyboardInterrupt:
        last = latest_checkpoint(config.output_dir) if config is not None else None
        print(f"interrupted before training started; last checkpoint: {last or 'none'}", file=sys.stderr)
        sys.exit(128 + signal.SIGINT)
    if trainer.stopped_by is not None:
        sys.exit(128 + trainer.stopped_by)


def _bundled() -> list[str]:
    """The names of the bundled configs, for --help."""
    return sorted(path.stem for path in BUNDLED_CONFIGS.glob("*.yaml"))


if __name__ == "__main__":
    main()
