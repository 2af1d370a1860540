"""Distil a trained model into a sampler of 1, 2 or 4 network calls.

    ddpm-distill RUN --calls N --out STUDENT [--method progressive] [--teacher-steps 16] [--stage-steps 200]
        [--guidance-scale S] [--lr 5e-4] [--batch-size B] [--resume]

Progressive distillation (Salimans & Ho 2022): the student, started from the teacher's EMA weights, learns to
take in one DDIM step two of the teacher's; each stage halves the steps, from --teacher-steps down to --calls.
STUDENT is a run directory: `ddpm-sample --checkpoint STUDENT` samples it with DDIM at --calls steps, the
timesteps it was trained on, with no flags. A class-conditional teacher is distilled with one guidance scale
baked in (--guidance-scale, default the teacher run's sample.guidance_scale); the student is sampled without
guidance. `--resume` with the same settings continues the latest checkpoint of STUDENT.
See `ddpm.training.distiller`.

(`python -m ddpm.distill` and `ddpm distill` are the same.)

Exit status: 0 when distillation finished; 1 with a one-line `error: ...` on stderr for bad input or a
failure; 128 + the signal number when a signal stopped it after saving a checkpoint (as ddpm-train).
"""

import argparse
import sys

from ddpm.training import USER_ERRORS
from ddpm.training.distiller import LR, METHODS, DistillSettings, start_distillation


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("run", metavar="RUN", help="the teacher: a run directory or one of its checkpoints")
    parser.add_argument("--out", required=True, metavar="STUDENT", help="the student's run directory")
    parser.add_argument("--method", choices=METHODS, default="progressive", help="(default: %(default)s)")
    parser.add_argument("--calls", type=int, required=True, help="the student's network calls: 1, 2, 4, ...")
    parser.add_argument(
        "--teacher-steps",
        type=int,
        default=DistillSettings.teacher_steps,
        help="DDIM steps of the first teacher (default: %(default)s)",
    )
    parser.add_argument(
        "--stage-steps",
        type=int,
        default=DistillSettings.stage_steps,
        help="optimizer steps per halving (default: %(default)s)",
    )
    parser.add_argument(
        "--guidance-scale",
        type=float,
        help="the teacher's guidance (default: the run's sample.guidance_scale)",
    )
    parser.add_argument(
        "--lr", type=float, default=LR, help="learning rate at each stage's start (default: %(default)s)"
    )
    parser.add_argument("--batch-size", type=int, help="images per step (default: the teacher run's)")
    parser.add_argument("--resume", action="store_true", help="continue the latest checkpoint of STUDENT")
    args = parser.parse_args(argv)
    try:
        distiller = start_distillation(
            args.run,
            args.out,
            calls=args.calls,
            teacher_steps=args.teacher_steps,
            stage_steps=args.stage_steps,
            guidance_scale=args.guidance_scale,
            method=args.method,
            lr=args.lr,
            batch_size=args.batch_size,
            resume=args.resume,
        )
        distiller.train()
    except USER_ERRORS as error:
        sys.exit(f"error: {error}")
    if distiller.stopped_by is not None:
        sys.exit(128 + distiller.stopped_by)


if __name__ == "__main__":
    main()
