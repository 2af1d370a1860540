"""Distil a trained model into a sampler of 1, 2 or 4 network calls.

    ddpm-distill RUN --calls N --out STUDENT [--method consistency] [--steps 700] [--sigmas 20]
        [--target-ema 0.95] [--solver heun] [--guidance-scale S] [--lr 2e-4] [--batch-size B] [--resume]
    ddpm-distill RUN --calls N --out STUDENT --method progressive [--teacher-steps 16] [--stage-steps 200]
        [--guidance-scale S] [--lr 5e-4] [--batch-size B] [--resume]

Consistency distillation (Song et al. 2023, Alg. 2; the default): the student, started from the teacher,
learns the consistency function of the teacher's ODE on a Karras grid of --sigmas noise levels, one teacher
Heun (or Euler, --solver) step per pair, against a target network that follows it with EMA decay
--target-ema, for --steps optimizer steps; `ddpm-sample --checkpoint STUDENT` samples it with the multistep
consistency sampler (Alg. 1) at --calls calls, with no flags. See `ddpm.training.consistency`.

Progressive distillation (Salimans & Ho 2022): the student, started from the teacher's EMA weights, learns to
take in one DDIM step two of the teacher's; each stage halves the steps, from --teacher-steps down to --calls.
`ddpm-sample --checkpoint STUDENT` samples it with DDIM at --calls steps, the timesteps it was trained on,
with no flags. See `ddpm.training.distiller`.

Either way STUDENT is a run directory; a conditioned teacher (class labels, data.task's image or vector,
condition files, a data set's conditions) is distilled on the conditions its training gave it, with one
guidance scale baked in (--guidance-scale, default the teacher run's sample.guidance_scale), and the student
is sampled without guidance, given its conditions as the teacher is (--cond-image, --mask, --cond);
`--resume` with the same settings continues the latest checkpoint of STUDENT; each method refuses the other's
options. On the digits the consistency student at 1 call is within the kernel distance's
floor of the real digits; the progressive one is not (BENCHMARKS.md section 9).

(`python -m ddpm.distill` and `ddpm distill` are the same.)

Exit status: 0 when distillation finished; 1 with a one-line `error: ...` on stderr for bad input or a
failure; 128 + the signal number when a signal stopped it after saving a checkpoint (as ddpm-train).
"""

import argparse
import sys

from ddpm.config import ConfigError
from ddpm.prog import command_name
from ddpm.training import USER_ERRORS
from ddpm.training.consistency import (
    CONSISTENCY_LR,
    ConsistencySettings,
    check_resumed_method,
    start_consistency_distillation,
)
from ddpm.training.distiller import LR, METHODS, DistillSettings, start_distillation

# The options of one method only (their dest): None when not given, so that the other method refuses them.
OWN_OPTIONS = {
    "progressive": ("teacher_steps", "stage_steps"),
    "consistency": ("steps", "sigmas", "target_ema", "solver"),
}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog=command_name("ddpm.distill"),
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("run", metavar="RUN", help="the teacher: a run directory or one of its checkpoints")
    parser.add_argument("--out", required=True, metavar="STUDENT", help="the student's run directory")
    parser.add_argument(
        "--method", choices=("consistency", *METHODS), default="consistency", help="(default: %(default)s)"
    )
    parser.add_argument("--calls", type=int, required=True, help="the student's network calls: 1, 2, 4, ...")
    parser.add_argument(
        "--teacher-steps",
        type=int,
        help=f"progressive: DDIM steps of the first teacher (default: {DistillSettings.teacher_steps})",
    )
    parser.add_argument(
        "--stage-steps",
        type=int,
        help=f"progressive: optimizer steps per halving (default: {DistillSettings.stage_steps})",
    )
    parser.add_argument(
        "--steps", type=int, help=f"consistency: optimizer steps (default: {ConsistencySettings.steps})"
    )
    parser.add_argument(
        "--sigmas",
        type=int,
        help=f"consistency: noise levels N of the Karras grid (default: {ConsistencySettings.sigmas})",
    )
    parser.add_argument(
        "--target-ema",
        type=float,
        help=f"consistency: the target network's EMA decay mu (default: {ConsistencySettings.target_ema})",
    )
    parser.add_argument(
        "--solver",
        help=f"consistency: the teacher's ODE step, heun or euler (default: {ConsistencySettings.solver})",
    )
    parser.add_argument(
        "--guidance-scale",
        type=float,
        help="the teacher's guidance (default: the run's sample.guidance_scale)",
    )
    parser.add_argument(
        "--lr",
        type=float,
        help=f"learning rate: progressive at each stage's start (default: {LR}), consistency constant "
        f"(default: {CONSISTENCY_LR})",
    )
    parser.add_argument("--batch-size", type=int, help="images per step (default: the teacher run's)")
    parser.add_argument("--resume", action="store_true", help="continue the latest checkpoint of STUDENT")
    args = parser.parse_args(argv)
    try:
        distiller = _start(args)
        distiller.train()
    except USER_ERRORS as error:
        sys.exit(f"error: {error}")
    if distiller.stopped_by is not None:
        sys.exit(128 + distiller.stopped_by)


def _start(args: argparse.Namespace):
    """The distiller of args.method from the options given (the others at the method's defaults); raises
    ConfigError for an option of the other method."""
    for method, options in OWN_OPTIONS.items():
        given = [name for name in options if getattr(args, name) is not None]
        if method != args.method and given:
            option = "--" + given[0].replace("_", "-")
            raise ConfigError(
                f"{option} is an option of --method {method}, not of {args.method}: drop it (or pass "
                f"--method {method})"
            )
    check_resumed_method(args.out, args.method, resume=args.resume)
    own = {name: getattr(args, name) for name in OWN_OPTIONS[args.method] if getattr(args, name) is not None}
    common = {
        "calls": args.calls,
        "guidance_scale": args.guidance_scale,
        "batch_size": args.batch_size,
        "resume": args.resume,
    }
    if args.method == "consistency":
        lr = CONSISTENCY_LR if args.lr is None else args.lr
        return start_consistency_distillation(args.run, args.out, **common, **own, lr=lr)
    lr = LR if args.lr is None else args.lr
    return start_distillation(args.run, args.out, **common, **own, method=args.method, lr=lr)


if __name__ == "__main__":
    main()
