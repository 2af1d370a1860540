"""`python -m ddpm.fid REAL FAKE ...`: print FID, KID and precision/recall of two sources; its help is
`ddpm.fid`'s docstring."""

import argparse
import sys
import warnings

import ddpm.fid
from ddpm.fid.metric import WEIGHTS_ENV, MissingDependencyError, compare, save_statistics
from ddpm.fid.sources import SOURCES, pair_statistics
from ddpm.io import CheckpointError
from ddpm.prog import command_name


def main(argv: list[str] | None = None) -> None:
    """Parse the command line (`argv`, default sys.argv[1:]), print the metrics on stdout, one `name value`
    line each (`compare`), and the image counts on stderr; a missing file, a bad source or a missing
    torch-fidelity exits with one line `error: ...`."""
    parser = argparse.ArgumentParser(
        prog=command_name("ddpm.fid"),
        description=ddpm.fid.__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("real", help="reference images: " + SOURCES)
    parser.add_argument("fake", help="images to score: " + SOURCES)
    parser.add_argument(
        "--n", type=int, default=50_000, help="images sampled from a run directory (default: %(default)s)"
    )
    parser.add_argument(
        "--weights",
        help=f"Inception weights file (default: ${WEIGHTS_ENV}, else torch-fidelity's, fetched on first use)",
    )
    parser.add_argument("--batch-size", type=int, default=64, help="images per forward pass")
    parser.add_argument("--device", help="e.g. cuda, cuda:1, cpu (default: cuda when available)")
    parser.add_argument("--seed", type=int, default=0, help="sampled image i starts from noise seeded seed+i")
    parser.add_argument("--save-stats", metavar="FILE", help="also write REAL's statistics to FILE (.npz)")
    args = parser.parse_args(argv)
    try:
        with warnings.catch_warnings():
            warnings.showwarning = _print_warning
            real, fake = pair_statistics(
                args.real,
                args.fake,
                n=args.n,
                weights=args.weights,
                batch_size=args.batch_size,
                device=args.device,
                seed=args.seed,
                progress=True,
            )
            if args.save_stats:
                save_statistics(real, args.save_stats, key=f"python -m ddpm.fid {args.real}")
            metrics = compare(real, fake)
    except (FileNotFoundError, ValueError, CheckpointError, MissingDependencyError) as error:
        sys.exit(f"error: {error}")
    print(f"real: {real.n} images ({args.real}); fake: {fake.n} images ({args.fake})", file=sys.stderr)
    for name, value in metrics.items():
        print(f"{name} {value:.6g}" if name.startswith("kid") else f"{name} {value:.4f}")


def _print_warning(message, category, filename, lineno, file=None, line=None) -> None:
    print(f"warning: {message}", file=sys.stderr)


if __name__ == "__main__":
    main()
