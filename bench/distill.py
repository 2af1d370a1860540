"""Few-step sampling on the digits: progressively distilled students (python -m ddpm.distill) at their 1, 2 or
4 network calls against their teacher's best solver at each budget, scored as bench/quality.py scores, with
its real-vs-real floor.

    python bench/distill.py TEACHER STUDENT [STUDENT ...] [--teacher-calls 1,2,4,5,10,20] [--seeds 0,1,2]
        [--samplers ddim,unipc,...] [--n-samples 900] [--floor-splits 100] [--json OUT]

TEACHER is the teacher's run directory (its EMA weights), each STUDENT a run directory that
`python -m ddpm.distill TEACHER --calls N --out STUDENT` wrote, sampled as sample.py samples it with no flags
(DDIM at its N steps on the trailing grid it was trained on), and so are the students of its earlier stages
(its teachers/steps-NNNN folders, at their NNNN steps): one distillation to 1 call gives the 4- and 2-call
students on the way. The teacher is sampled at each budget of --teacher-calls (network calls,
`ddpm.samplers.sampling_budget`) with every solver of --samplers (default: all of ddpm.samplers.SAMPLERS)
that fits in it, each on the teacher's own timestep spacing and on "trailing" (the digits config's spacing,
exponential, is worse than trailing below about 15 steps); its best is the setting of the lowest mean KID
(conv) over the seeds. Seed s samples image i from noise seeded 1,000,000 s + i with label i mod 10 (the
images of a seed differ from seed to seed, the models do not); no guidance. Scores and floor:
bench/quality.py's `Scorer` (KID on the digit classifier's 1,024 conv features against all 1,797 digits; the
floor: --n-samples real digits against the others, over --floor-splits splits).
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

import common
import quality

from ddpm.config import SampleConfig, load_config
from ddpm.inference import load_for_sampling
from ddpm.run_dir import RUN_CONFIG
from ddpm.samplers import SAMPLERS, sampling_budget
from ddpm.training.distiller import SETTINGS_FILE, TEACHERS

SPACINGS = ("own", "trailing")  # the teacher's: its saved timestep_spacing, and trailing


def main() -> None:
    args = parse_args()
    teacher = load_for_sampling(args.teacher)
    if teacher.run_dir is None:
        raise SystemExit(f"error: {args.teacher} is not a run directory: name the teacher's run")
    scorer = quality.Scorer(
        load_config(teacher.run_dir / RUN_CONFIG), splits=args.floor_splits, size=args.n_samples
    )
    print(f"digit classifier held-out accuracy {scorer.accuracy:.3f}", flush=True)
    results = []
    for seed in args.seeds:
        noise_seed = quality.SAMPLING_SEED_STRIDE * seed
        for student in args.students:
            for name, folder, calls in _students(Path(student)):
                loaded = load_for_sampling(folder)
                sample = SampleConfig(sampler="ddim", steps=calls)
                scores = scorer.score_model(
                    loaded.model, loaded.scheduler, sample=sample, n=args.n_samples, seed=noise_seed
                )
                results.append(_result(name, calls, "ddim", loaded.scheduler.timestep_spacing, seed, scores))
        for calls in args.teacher_calls:
            for spacing in SPACINGS:
                scheduler = teacher.scheduler
                if spacing != "own":
                    scheduler = type(scheduler)(**{**scheduler.config, "timestep_spacing": spacing})
                for sampler in args.samplers:
                    steps = sampling_budget(sampler, calls=calls).steps
                    if steps < 1:
                        continue  # a Heun step costs two calls
                    sample = SampleConfig(sampler=sampler, steps=steps)
                    scores = scorer.score_model(
                        teacher.model, scheduler, sample=sample, n=args.n_samples, seed=noise_seed
                    )
                    results.append(
                        _result("teacher", calls, sampler, scheduler.timestep_spacing, seed, scores)
                    )
        report(args, scorer, results)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("teacher", metavar="TEACHER", help="the teacher's run directory")
    parser.add_argument("students", nargs="+", metavar="STUDENT", help="run directories of ddpm.distill")
    parser.add_argument(
        "--teacher-calls",
        type=_integers,
        default=[1, 2, 4, 5, 10, 20],
        help="network-call budgets of the teacher's solvers (default: 1,2,4,5,10,20)",
    )
    parser.add_argument(
        "--samplers",
        type=lambda text: text.split(","),
        default=_distinct_samplers(),
        help="the teacher's solvers, comma-separated (default: every solver of ddpm.samplers.SAMPLERS)",
    )
    parser.add_argument(
        "--seeds", type=_integers, default=[0, 1, 2], help="sampling seeds, comma-separated (default: 0,1,2)"
    )
    parser.add_argument(
        "--n-samples", type=int, default=900, help="samples scored per setting (default: 900)"
    )
    parser.add_argument(
        "--floor-splits", type=int, default=100, help="real-vs-real splits for the floor (default: 100)"
    )
    common.add_report_options(parser)
    args = parser.parse_args()
    if min(args.n_samples, args.floor_splits) < 2 or min(args.teacher_calls) < 1:
        parser.error("--n-samples and --floor-splits must be >= 2, --teacher-calls >= 1")
    unknown = [name for name in args.samplers if name not in SAMPLERS]
    if unknown:
        parser.error(f"unknown --samplers {unknown}: choose from {', '.join(SAMPLERS)}")
    return args


def report(args: argparse.Namespace, scorer: quality.Scorer, results: list[dict]) -> None:
    """Print the students and the teacher's best setting per budget (mean and std over the seeds of KID conv,
    and the label agreement), the floor, and write every number to --json."""
    groups: dict[tuple, list[dict]] = {}
    for r in results:
        groups.setdefault((r["model"], r["calls"], r["sampler"], r["spacing"]), []).append(r)
    summary = [
        {
            "model": model,
            "calls": calls,
            "sampler": sampler,
            "spacing": spacing,
            "seeds": [r["seed"] for r in rs],
            **{f"{key}_mean": statistics.fmean(r[key] for r in rs) for key in ("kid_conv", "agreement")},
            "kid_conv_std": statistics.stdev([r["kid_conv"] for r in rs]) if len(rs) > 1 else 0.0,
        }
        for (model, calls, sampler, spacing), rs in groups.items()
    ]
    students = [s for s in summary if s["model"].startswith("student")]
    best = {}
    for s in summary:
        if s["model"].startswith("teacher") and (
            s["calls"] not in best or s["kid_conv_mean"] < best[s["calls"]]["kid_conv_mean"]
        ):
            best[s["calls"]] = s
    rows = [
        [
            s["model"],
            s["calls"],
            f"{s['sampler']} ({s['spacing']})",
            s["kid_conv_mean"],
            s["kid_conv_std"],
            s["agreement_mean"],
        ]
        for s in [*sorted(students, key=lambda s: s["calls"]), *(best[c] for c in sorted(best))]
    ]
    floor = {metric: {k: v for k, v in f.items() if k != "values"} for metric, f in scorer.floor.items()}
    seeds = sorted({r["seed"] for r in results})
    print(
        f"\n{args.n_samples} samples per setting, sampling seeds {seeds}; teacher: the best of every solver "
        "and spacing per budget\n\n"
        + common.markdown_table(
            ["model", "network calls", "sampler (spacing)", "KID conv", "std over seeds", "agreement"], rows
        )
        + f"\n\nFloor of KID conv ({quality.floor_label(floor)}, {args.floor_splits} splits): mean "
        f"{floor['kid_conv']['mean']:.4g}, std {floor['kid_conv']['std']:.4g}, 95th percentile of |value| "
        f"{floor['kid_conv']['abs_p95']:.4g}",
        flush=True,
    )
    common.write_json(
        args.json,
        {
            "benchmark": "distill",
            "n_samples": args.n_samples,
            "summary": summary,
            "results": results,
            "floor": floor,
        },
    )


def _students(run: Path) -> list[tuple[str, Path, int]]:
    """(name, weights folder, DDIM steps) of the student of every stage of the distillation `run`: its
    final student (the run, sampled at its sample.steps, as sample.py does) and the earlier stages' (the
    teachers/steps-NNNN folders of fewer steps than the first teacher's)."""
    settings = json.loads((run / SETTINGS_FILE).read_text())
    final = load_config(run / RUN_CONFIG).sample.steps
    stages = [
        (f"student {run.name} (stage)", folder, int(folder.name.removeprefix("steps-")))
        for folder in sorted((run / TEACHERS).iterdir())
    ]
    earlier = [s for s in stages if s[2] < settings["teacher_steps"]]
    return [(f"student {run.name}", run, final), *earlier]


def _result(model: str, calls: int, sampler: str, spacing: str, seed: int, scores: dict) -> dict:
    return {"model": model, "calls": calls, "sampler": sampler, "spacing": spacing, "seed": seed, **scores}


def _distinct_samplers() -> list[str]:
    """The names of SAMPLERS, one per solver (the alias "dpm++" of "dpm++2m" left out), but the sampler of
    consistency models, which is not a diffusion model's solver."""
    seen, names = set(), []
    for name, solver in SAMPLERS.items():
        if solver not in seen and name != "consistency":
            seen.add(solver)
            names.append(name)
    return names


def _integers(text: str) -> list[int]:
    return [int(item) for item in text.split(",")]


if __name__ == "__main__":
    main()
