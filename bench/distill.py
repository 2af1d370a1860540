"""Few-step sampling on the digits: distilled students (python -m ddpm.distill, progressive or consistency) at
their 1, 2 or 4 network calls against their teacher's solvers at every budget, scored as bench/quality.py
scores, with its real-vs-real floor.

    python bench/distill.py TEACHER STUDENT [STUDENT ...] [--teacher-calls 1,2,4,5,10,20] [--seeds 0,1,2]
        [--samplers ddim,unipc,...] [--n-samples 900] [--table-samples N] [--floor-splits 100] [--json OUT]
    python bench/distill.py --merge SEED0.json SEED1.json ... [--json OUT]

TEACHER is the teacher's run directory (its EMA weights), each STUDENT a run directory that
`python -m ddpm.distill TEACHER --calls N --out STUDENT [--method consistency]` wrote, sampled as sample.py
samples it with no flags (its saved sample: section, read by `ddpm.inference.sampling_settings`: a progressive
student with DDIM at its N steps on the trailing grid it was trained on, a consistency student with the
multistep consistency sampler at N calls). A progressive student's earlier stages are scored too (its
teachers/steps-NNNN folders, DDIM at their NNNN steps): one distillation to 1 call gives the 4- and 2-call
students on the way. A consistency student takes any number of calls: it is scored at its N and at each other
student budget of the targets (1, 2 and 4 calls), as `sample.py --calls C` samples it.

The teacher's table: at each budget of --teacher-calls (network calls, `ddpm.samplers.sampling_budget`), every
solver of --samplers (default: one name per solver of ddpm.samplers.SAMPLERS) that fits in it, each on the
teacher's own timestep spacing and on "trailing" (the digits config's spacing, exponential, is worse than
trailing below about 15 steps), scored on --table-samples images (default --n-samples; fewer keep its cost
down: it makes about 700 network calls of every image per seed). The teacher's best at a budget is the
setting of that table's lowest KID (conv) for the sampling seed, scored again on --n-samples images (the
first --table-samples of them are the table's), as the students are.

The targets (issue 26): the student at 1, 2 and 4 calls against the teacher's best at 5, 10 and 20; the gap
(student minus teacher, per seed) is met when its mean is within the floor.

Seed s samples image i from noise seeded 1,000,000 s + i with label i mod 10 (the images of a seed differ
from seed to seed, the models do not); no guidance. A trial is one teacher run at one sampling seed; its
students are compared with its own teacher's best. --merge reports over the JSON files of several runs of this
script, e.g. one per training seed (the teacher of train.seed=s sampled at seed s), or a teacher's table and
its students scored apart (--teacher-calls "" scores the students only): results of one trial are matched by
its name, and each run's STUDENT k is the others' STUDENT k. Scores and floor: bench/quality.py's
`Scorer` (KID on the digit classifier's 1,024 conv features against all 1,797 digits; the floor: that many
real digits against the others, over --floor-splits splits, for --n-samples and for --table-samples).
Each result records the CPU time (process time) its sampling and scoring took.
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import statistics
import time
from pathlib import Path

import common
import kernel_distance
import quality

from ddpm.config import SampleConfig, load_config
from ddpm.inference import load_for_sampling, sampling_settings
from ddpm.run_dir import RUN_CONFIG
from ddpm.samplers import SAMPLERS, sampling_budget
from ddpm.training.distiller import SETTINGS_FILE, TEACHERS

SPACINGS = ("own", "trailing")  # the teacher's: its saved timestep_spacing, and trailing
TARGETS = {1: 5, 2: 10, 4: 20}  # issue 26: a student's calls -> the teacher's budget it must be no worse than


def main() -> None:
    args = parse_args()
    if args.merge:
        files = [json.loads(Path(path).read_text()) for path in args.merge]
        results = [r for file in files for r in file["results"]]
        keys = [_setting(r) for r in results]
        if len(set(keys)) != len(keys):
            raise SystemExit("error: --merge files score the same setting of one trial twice: name each once")
        floor = {kind: f for file in files for kind, f in file["floor"].items()}
        table = {r["n"] for r in results if r["model"] == "teacher table"} or {files[0]["n_samples"]}
        report(args, results, floor, files[0]["n_samples"], max(table))
        return
    teacher_dir, *students = args.runs
    teacher = load_for_sampling(teacher_dir)
    if teacher.run_dir is None:
        raise SystemExit(f"error: {teacher_dir} is not a run directory: name the teacher's run")
    scorer = quality.Scorer(
        load_config(teacher.run_dir / RUN_CONFIG), splits=args.floor_splits, size=args.n_samples
    )
    floor = {"n_samples": _kid_floor(scorer.floor["kid_conv"], args.floor_splits)}
    if args.table_samples != args.n_samples:
        size = quality.floor_size(len(scorer.images), args.table_samples)
        table_floor = kernel_distance.split_floor(scorer.real["conv"], size=size, splits=args.floor_splits)
        floor["table_samples"] = _kid_floor(table_floor, args.floor_splits)
    print(f"digit classifier held-out accuracy {scorer.accuracy:.3f}", flush=True)
    results = []
    for seed in args.seeds:
        trial = f"{teacher.run_dir.name} seed {seed}"
        score = functools.partial(_score, scorer, seed=seed, trial=trial)

        for index, student in enumerate(students):
            for role, folder, sample in _students(Path(student)):
                loaded = load_for_sampling(folder)
                calls = sampling_budget(sample.sampler, steps=sample.steps).calls
                scores = score(loaded.model, loaded.scheduler, sample, args.n_samples)
                results.append(
                    {"model": role, "student": index, "run": Path(student).name, "calls": calls, **scores}
                )
        for calls in args.teacher_calls:
            table = []
            for spacing in SPACINGS:
                scheduler = teacher.scheduler
                if spacing != "own":
                    if scheduler.timestep_spacing == spacing:
                        continue  # the teacher's own spacing
                    scheduler = type(scheduler)(**{**scheduler.config, "timestep_spacing": spacing})
                for sampler in args.samplers:
                    steps = sampling_budget(sampler, calls=calls).steps
                    if steps < 1:
                        continue  # a Heun step costs two calls
                    sample = SampleConfig(sampler=sampler, steps=steps)
                    scores = score(teacher.model, scheduler, sample, args.table_samples)
                    table.append((scheduler, sample, {"model": "teacher table", "calls": calls, **scores}))
            results += [entry[2] for entry in table]
            scheduler, sample, best = min(table, key=lambda entry: _finite(entry[2]["kid_conv"]))
            if args.table_samples == args.n_samples:
                best = {**best, "cpu_s": 0.0}  # scored in the table already
            else:
                best = {**best, **score(teacher.model, scheduler, sample, args.n_samples)}
            results.append({**best, "model": "teacher"})
        print(f"{trial}: scored", flush=True)
    report(args, results, floor, args.n_samples, args.table_samples)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "runs",
        nargs="*",
        metavar="TEACHER [STUDENT ...]",
        help="the teacher's run directory, then ddpm.distill's",
    )
    parser.add_argument(
        "--merge", nargs="+", metavar="JSON", help="report over the --json files of earlier runs instead"
    )
    parser.add_argument(
        "--teacher-calls",
        type=_integers,
        default=[1, 2, 4, 5, 10, 20],
        help="network-call budgets of the teacher's solvers (default: 1,2,4,5,10,20; empty: students only)",
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
        "--n-samples",
        type=int,
        default=900,
        help="samples scored per student and best setting (default: 900)",
    )
    parser.add_argument(
        "--table-samples", type=int, help="samples per setting of the teacher's table (default: --n-samples)"
    )
    parser.add_argument(
        "--floor-splits", type=int, default=100, help="real-vs-real splits for the floor (default: 100)"
    )
    common.add_report_options(parser)
    args = parser.parse_args()
    if args.table_samples is None:
        args.table_samples = args.n_samples
    if args.merge and args.runs:
        parser.error("--merge reports earlier runs: name no TEACHER or STUDENT with it")
    if not args.merge and (not args.runs or len(args.runs) < 2 and not args.teacher_calls):
        parser.error(
            "name the TEACHER's run directory, and a STUDENT or --teacher-calls (or --merge JSON files)"
        )
    if (
        min(args.n_samples, args.table_samples, args.floor_splits) < 2
        or min(args.teacher_calls, default=1) < 1
    ):
        parser.error("--n-samples, --table-samples and --floor-splits must be >= 2, --teacher-calls >= 1")
    unknown = [name for name in args.samplers if name not in SAMPLERS]
    if unknown:
        parser.error(f"unknown --samplers {unknown}: choose from {', '.join(SAMPLERS)}")
    return args


def report(
    args: argparse.Namespace, results: list[dict], floor: dict, n_samples: int, table_samples: int
) -> None:
    """Print the teacher's table (KID conv of every solver and spacing at every budget, mean and std over the
    trials), the students and the teacher's best per budget, the issue's targets with the per-trial gaps, and
    the floor; write every number to --json."""
    all_trials = sorted({r["trial"] for r in results})
    table: dict[str, dict[int, list[float]]] = {}
    for r in results:
        if r["model"] == "teacher table":
            table.setdefault(f"{r['sampler']} ({r['spacing']})", {}).setdefault(r["calls"], []).append(
                r["kid_conv"]
            )
    budgets = sorted({calls for row in table.values() for calls in row})
    teacher_table = [
        [name, *(_cell(row[calls]) if calls in row else "" for calls in budgets)]
        for name, row in table.items()
    ]
    scored = {}  # (label, calls) -> {trial: result}: each student, and the teacher's best
    for r in results:
        if r["model"] == "teacher":
            scored.setdefault(("teacher's best", r["calls"]), {})[r["trial"]] = r
        elif r["model"].startswith("student"):
            scored.setdefault((f"student {r['student']}", r["calls"]), {})[r["trial"]] = r
    rows = [
        [
            label
            if label.startswith("teacher")
            else f"student ({', '.join(sorted({r['run'] for r in rs.values()}))})",
            calls,
            " / ".join(sorted({f"{r['sampler']} ({r['spacing']})" for r in rs.values()})),
            *_mean_and_std([r["kid_conv"] for r in rs.values()]),
            statistics.fmean(r["agreement"] for r in rs.values()),
        ]
        for (label, calls), rs in sorted(
            scored.items(), key=lambda item: (item[0][0].startswith("t"), item[0])
        )
    ]
    targets = []
    for (label, calls), rs in scored.items():
        teacher = scored.get(("teacher's best", TARGETS.get(calls)))
        trials = sorted(set(rs) & set(teacher or {}))  # the trials scoring both
        if label.startswith("student") and trials:
            gaps = [rs[t]["kid_conv"] - teacher[t]["kid_conv"] for t in trials]
            targets.append(
                {
                    "student": label,
                    "calls": calls,
                    "teacher_calls": TARGETS[calls],
                    "trials": trials,
                    "student_kid": [rs[t]["kid_conv"] for t in trials],
                    "teacher_kid": [teacher[t]["kid_conv"] for t in trials],
                    "gap": gaps,
                    "met": statistics.fmean(gaps) <= floor["n_samples"]["abs_p95"],
                }
            )
    target_rows = [
        [
            t["student"],
            f"{t['calls']} vs {t['teacher_calls']}",
            len(t["trials"]),
            _cell(t["student_kid"]),
            _cell(t["teacher_kid"]),
            _cell(t["gap"]),
            "yes" if t["met"] else "no",
        ]
        for t in sorted(targets, key=lambda t: (t["student"], t["calls"]))
    ]
    cpu = {
        model: sum(r["cpu_s"] for r in results if r["model"].startswith(model))
        for model in ("student", "teacher")
    }
    print(
        f"\nThe teacher's solvers: KID conv on {table_samples} samples per setting, mean (std) over "
        f"{len(all_trials)} trial(s) (sampling seeds; with --merge, of every file)\n\n"
        + common.markdown_table(["solver (spacing)", *(f"{c} calls" for c in budgets)], teacher_table)
        + f"\n\nStudents and the teacher's best (per trial, from the table), {n_samples} samples\n\n"
        + common.markdown_table(
            ["model", "network calls", "sampler (spacing)", "KID conv", "std over trials", "agreement"], rows
        )
        + "\n\nTargets: the student against the teacher's best, per trial (gap: student minus teacher)\n\n"
        + common.markdown_table(
            [
                "model",
                "calls: student vs teacher",
                "trials",
                "student",
                "teacher's best",
                "gap",
                "within the floor",
            ],
            target_rows,
        )
        + "\n\nFloor of KID conv: "
        + "; ".join(
            f"{f['sizes'][0]:,} real digits against the other {f['sizes'][1]:,} ({f['splits']} splits): "
            f"std {f['std']:.4g}, 95th percentile of |value| {f['abs_p95']:.4g}"
            for f in floor.values()
        )
        + f"\nCPU time of sampling and scoring: students {cpu['student']:.0f} s, "
        f"teacher {cpu['teacher']:.0f} s",
        flush=True,
    )
    common.write_json(
        args.json,
        {
            "benchmark": "distill",
            "n_samples": n_samples,
            "table_samples": table_samples,
            "teacher_table": {
                name: {calls: _mean_and_std(v) for calls, v in row.items()} for name, row in table.items()
            },
            "targets": targets,
            "floor": floor,
            "results": results,
        },
    )


def _score(
    scorer: quality.Scorer, model, scheduler, sample: SampleConfig, n: int, *, seed: int, trial: str
) -> dict:
    """Scores of `n` images of `model` sampled with the settings `sample` at sampling seed `seed`, with the
    sampler, the `trial` and the CPU time (process time, s) it took."""
    start = time.process_time()
    scores = scorer.score_model(
        model, scheduler, sample=sample, n=n, seed=quality.SAMPLING_SEED_STRIDE * seed
    )
    return {
        "trial": trial,
        "sampler": sample.sampler,
        "spacing": scheduler.timestep_spacing,
        "n": n,
        "cpu_s": time.process_time() - start,
        **scores,
    }


def _students(run: Path) -> list[tuple[str, Path, SampleConfig]]:
    """(role, weights folder, sampling settings) of every student the distillation `run` gives: its final
    student ("student": the run, sampled as sample.py samples it with no flags, from its saved `sample:`
    section: DDIM at its calls for progressive distillation, the multistep consistency sampler for
    consistency distillation); for progressive distillation the earlier stages' ("student (stage)": the
    teachers/steps-NNNN folders of fewer steps than the first teacher's, DDIM at their NNNN steps); for
    consistency distillation, whose student takes any number of calls, the run again at each other call
    count of TARGETS ("student (calls)": as `sample.py --calls C` samples it)."""
    saved = load_config(run / RUN_CONFIG).sample
    final = _sample_config(saved)
    students = [("student", run, final)]
    if final.sampler == "consistency":
        other = [calls for calls in TARGETS if calls != final.steps]
        return students + [("student (calls)", run, _sample_config(saved, calls=calls)) for calls in other]
    first_teacher = json.loads((run / SETTINGS_FILE).read_text())["teacher_steps"]
    for folder in sorted((run / TEACHERS).iterdir()):
        steps = int(folder.name.removeprefix("steps-"))
        if steps < first_teacher:
            students.append(("student (stage)", folder, SampleConfig(sampler="ddim", steps=steps)))
    return students


def _sample_config(saved: SampleConfig, *, calls: int | None = None) -> SampleConfig:
    """What sample.py samples a run whose `sample:` section is `saved` with (`--calls calls` when given):
    `ddpm.inference.sampling_settings`, its budget in steps."""
    settings = sampling_settings(saved, calls=calls)
    steps = sampling_budget(settings["sampler"], steps=settings["steps"], calls=settings["calls"]).steps
    return SampleConfig(
        sampler=settings["sampler"],
        steps=steps,
        eta=settings["eta"],
        guidance_scale=settings["guidance_scale"],
    )


def _setting(result: dict) -> tuple:
    """What a result scored: the trial, the model and the setting."""
    keys = ("trial", "model", "student", "calls", "sampler", "spacing", "n")
    return tuple(result.get(key) for key in keys)


def _kid_floor(floor: dict, splits: int) -> dict:
    """`kernel_distance.split_floor`'s summary without its values, with the number of splits."""
    return {**{k: v for k, v in floor.items() if k != "values"}, "splits": splits}


def _finite(value: float) -> float:
    """value, or infinity for NaN (a diverged setting must never be the best)."""
    return value if math.isfinite(value) else math.inf


def _mean_and_std(values: list[float]) -> list[float]:
    """[mean, standard deviation] (0 for one value)."""
    return [statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0]


def _cell(values: list[float]) -> str:
    """A table cell: the mean of `values` and, for several, their standard deviation in brackets."""
    mean, std = _mean_and_std(values)
    return f"{mean:.4g}" + (f" ({std:.2g})" if len(values) > 1 else "")


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
    return [int(item) for item in text.split(",") if item]


if __name__ == "__main__":
    main()
