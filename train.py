"""Train a diffusion model.

    accelerate launch train.py [--config configs/NAME.yaml] [key=value ...] [--resume [CHECKPOINT]]

Overrides are dotted config keys, e.g. `train.steps=200 data.batch_size=32 output_dir=runs/try`.
`--resume` alone continues the latest checkpoint of output_dir; `--resume PATH` continues that checkpoint.
"""

import argparse
import sys
from pathlib import Path

from ddpm.checkpoint import CheckpointError
from ddpm.config import ConfigError, load_config
from ddpm.trainer import NonFiniteLossError, Trainer

DEFAULT_CONFIG = Path(__file__).resolve().parent / "configs" / "digits.yaml"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--config", default=str(DEFAULT_CONFIG), help="YAML config (default: %(default)s)")
    parser.add_argument(
        "--resume",
        nargs="?",
        const="latest",
        metavar="CHECKPOINT",
        help="continue the latest checkpoint of output_dir, or the checkpoint folder given",
    )
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="dotted config overrides")
    args = parser.parse_args(argv)
    if args.resume and "=" in args.resume and not Path(args.resume).exists():
        # `--resume train.steps=10`: argparse took an override for the optional checkpoint path.
        args.overrides.insert(0, args.resume)
        args.resume = "latest"
    try:
        config = load_config(args.config, args.overrides)
        Trainer(config, resume=args.resume).train()
    except (ConfigError, CheckpointError, NonFiniteLossError) as error:
        sys.exit(f"error: {error}")


if __name__ == "__main__":
    main()
