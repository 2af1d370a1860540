"""Autoguidance, the guidance interval and rescaled guidance against classifier-free guidance on the digits
(issue 25): trained class-conditional runs of configs/digits.yaml (label dropout 0.1) sampled with no
guidance, with classifier-free guidance (CFG), with CFG only in a noise interval (Kynkaanniemi et al. 2024),
with rescaled CFG (Lin et al. 2023) and with autoguidance by an early checkpoint of the same run (Karras et
al. 2024), scored as bench/quality.py scores, with its real-vs-real floor.

    python bench/autoguidance.py RUN [RUN ...] [--weak step-0000500] [--cfg-scales 1.5,2.5]
        [--autoguide-scales 1.5,2.5] [--interval-scales 2 --interval 0.28 5.42]
        [--rescale-scales 2 --rescale 0.7] [--n-samples 300] [--floor-splits 100] [--json OUT]
    python bench/autoguidance.py --merge A.json B.json ... [--json OUT]

Each RUN is a run directory; its model is the EMA weights of its latest checkpoint, the weak model the EMA
weights of its checkpoint --weak (`load_for_sampling`, as sample.py --autoguide RUN/checkpoints/WEAK loads
it). Every setting samples with the run's own sampler and steps (its config's sample: section): "none" (no
guidance), "cfg" at each --cfg-scales (against the null label), "autoguide" at each --autoguide-scales
(D_weak + w (D - D_weak), the same labels given to both), "cfg-interval" at each --interval-scales (CFG only
at the steps whose sigma = sqrt((1 - alpha_bar_t) / alpha_bar_t) lies in [LO, HI] of --interval, the
conditional model alone elsewhere) and "cfg-rescale" at each --rescale-scales (CFG rescaled by phi =
--rescale); an empty list ('') leaves that kind out. Run RUN (training seed s) samples image i from noise
seeded 1,000,000 s + i with label i mod 10, the same noise and labels in every setting. Scores and floor:
bench/quality.py's `Scorer` (KID on the digit classifier's 1,024 conv features against all 1,797 digits; the
floor: --n-samples real digits against the others, over --floor-splits splits), and the fraction classified as
their label (agreement). Per setting, the mean and std over the runs (the training seeds), and against no
guidance bench/quality.py's verdict (`compare`: a difference only beyond 3 standard errors and the floor's
95th percentile). --merge reports the --json files of runs scored apart (one per run, same settings) as one.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path

import common
import quality

from ddpm.config import load_config
from ddpm.inference import load_for_sampling
from ddpm.run_dir import RUN_CONFIG

METRICS = ("kid_conv", "kid_hidden", "frechet_distance", "agreement")
SAME = (  # what merged files share
    "weak",
    "cfg_scales",
    "autoguide_scales",
    "interval_scales",
    "interval",
    "rescale_scales",
    "rescale",
    "n_samples",
    "floor_splits",
)


def main() -> None:
    args = parse_args()
    if args.merge:
        merge(args.merge, args.json)
        return
    first = load_for_sampling(args.runs[0])
    if first.run_dir is None:
        raise SystemExit(f"error: {args.runs[0]} is not a run directory: name a run of configs/digits.yaml")
    scorer = quality.Scorer(
        load_config(first.run_dir / RUN_CONFIG), splits=args.floor_splits, size=args.n_samples
    )
    print(f"digit classifier held-out accuracy {scorer.accuracy:.3f}", flush=True)
    results = []
    for run in args.runs:
        loaded = load_for_sampling(run)
        weak = load_for_sampling(Path(run) / "checkpoints" / args.weak) if args.autoguide_scales else None
        seed = load_config(loaded.run_dir / RUN_CONFIG).train.seed
        for name, scale, interval, rescale in settings(args):
            sample = dataclasses.replace(loaded.sampling, guidance_scale=scale)
            scores = scorer.score_model(
                loaded.model,
                loaded.scheduler,
                sample=sample,
                n=args.n_samples,
                seed=quality.SAMPLING_SEED_STRIDE * seed,
                autoguide=weak.model if name == "autoguide" else None,
                guidance_interval=interval,
                guidance_rescale=rescale,
            )
            results.append(
                {
                    "run": str(run),
                    "seed": seed,
                    "setting": name,
                    "scale": scale,
                    "sampler": f"{sample.sampler} {sample.steps}",
                    "model": loaded.folder.name,
                    "weak": weak.folder.name if name == "autoguide" else None,
                    "guidance_interval": list(interval) if interval else None,
                    "guidance_rescale": rescale,
                    **{key: scores[key] for key in METRICS},
                }
            )
            print(f"{run} {name} {scale:g}: KID conv {scores['kid_conv']:.4g}", flush=True)
            write(args, scorer.floor, scorer.accuracy, results)  # after every cell: a stop keeps them
    report(args, scorer.floor, results)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("runs", nargs="*", metavar="RUN", help="run directories of configs/digits.yaml")
    parser.add_argument(
        "--weak",
        default="step-0000500",
        help="the checkpoint of each run that guides it (default: step-0000500)",
    )
    parser.add_argument(
        "--cfg-scales", type=_numbers, default=[1.5, 2.5], help="CFG weights (default: 1.5,2.5)"
    )
    parser.add_argument(
        "--autoguide-scales",
        type=_numbers,
        default=[1.5, 2.5],
        help="autoguidance weights (default: 1.5,2.5)",
    )
    parser.add_argument(
        "--interval-scales",
        type=_numbers,
        default=[],
        help="weights of CFG limited to --interval (default: none)",
    )
    parser.add_argument(
        "--interval",
        type=float,
        nargs=2,
        default=[0.28, 5.42],
        metavar=("LO", "HI"),
        help="the noise levels sigma that --interval-scales guide (default: 0.28 5.42, the paper's EDM2-S)",
    )
    parser.add_argument(
        "--rescale-scales",
        type=_numbers,
        default=[],
        help="weights of CFG rescaled by --rescale (default: none)",
    )
    parser.add_argument(
        "--rescale", type=float, default=0.7, help="phi of --rescale-scales, in (0, 1] (default: 0.7)"
    )
    parser.add_argument(
        "--n-samples", type=int, default=300, help="samples scored per setting (default: 300)"
    )
    parser.add_argument(
        "--floor-splits", type=int, default=100, help="real-vs-real splits for the floor (default: 100)"
    )
    parser.add_argument("--merge", nargs="+", metavar="JSON", help="report these --json files as one")
    common.add_report_options(parser)
    args = parser.parse_args()
    if bool(args.runs) == bool(args.merge):
        parser.error("pass run directories, or --merge JSON files, not both")
    if min(args.n_samples, args.floor_splits) < 2:
        parser.error("--n-samples and --floor-splits must be >= 2")
    if 1.0 in args.cfg_scales + args.autoguide_scales + args.interval_scales + args.rescale_scales:
        parser.error("weight 1 is no guidance, the 'none' setting: leave it out of the scales")
    if not 0 <= args.interval[0] <= args.interval[1]:
        parser.error(f"--interval {args.interval[0]:g} {args.interval[1]:g}: expected 0 <= LO <= HI")
    if not 0 < args.rescale <= 1:
        parser.error(f"--rescale {args.rescale:g}: expected phi in (0, 1]")
    return args


def settings(args: argparse.Namespace) -> list[tuple[str, float, tuple[float, float] | None, float]]:
    """(setting, guidance_scale, guidance_interval, guidance_rescale) of every cell: none, then CFG,
    autoguidance, CFG in --interval and CFG rescaled by --rescale at each of their scales."""
    interval = (args.interval[0], args.interval[1])
    return [
        ("none", 1.0, None, 0.0),
        *(("cfg", w, None, 0.0) for w in args.cfg_scales),
        *(("autoguide", w, None, 0.0) for w in args.autoguide_scales),
        *(("cfg-interval", w, interval, 0.0) for w in args.interval_scales),
        *(("cfg-rescale", w, None, args.rescale) for w in args.rescale_scales),
    ]


def report(args: argparse.Namespace, floor: dict, results: list[dict]) -> None:
    """Print per setting the mean and std over the seeds of KID conv, the per-seed values and agreement, and
    each guided setting against no guidance (difference of KID conv, its standard error and the verdict by
    the floor's 95th percentile), and CFG in the interval or rescaled against plain CFG at the same weight;
    then the floor."""
    seeds = sorted({r["seed"] for r in results})
    cells = list(dict.fromkeys((r["setting"], r["scale"]) for r in results))
    summary = {
        cell: quality.summarize([r for r in results if (r["setting"], r["scale"]) == cell], METRICS)
        for cell in cells
    }
    none = summary.get(("none", 1.0))
    rows = []
    for (name, scale), s in summary.items():
        per_seed = ", ".join(
            f"{r['kid_conv']:.3g}" for r in results if (r["setting"], r["scale"]) == (name, scale)
        )
        against = "" if none is None or name == "none" else _against(s, none, floor)
        cfg = summary.get(("cfg", scale)) if name in ("cfg-interval", "cfg-rescale") else None
        rows.append(
            [
                name,
                scale,
                s["kid_conv"]["mean"],
                s["kid_conv"]["std"],
                per_seed,
                s["agreement"]["mean"],
                against,
                "" if cfg is None else _against(s, cfg, floor),
            ]
        )
    header = [
        "guidance",
        "weight",
        "KID conv",
        "std over seeds",
        "per seed",
        "agreement",
        "against none: difference (SE), verdict",
        "against cfg at its weight",
    ]
    sampler = results[0]["sampler"]
    print(
        f"\n{args.n_samples} samples per setting, training seeds {seeds}, {sampler} (the runs' sampler and "
        f"steps); weak model: {args.weak}\n\n"
        + common.markdown_table(header, rows)
        + f"\n\nFloor of KID conv ({quality.floor_label(floor)}, {args.floor_splits} splits): mean "
        f"{floor['kid_conv']['mean']:.4g}, std {floor['kid_conv']['std']:.4g}, 95th percentile of |value| "
        f"{floor['kid_conv']['abs_p95']:.4g}",
        flush=True,
    )


def write(args: argparse.Namespace, floor: dict, accuracy: float, results: list[dict]) -> None:
    options = {key: getattr(args, key) for key in SAME}
    floor = {metric: {k: v for k, v in f.items() if k != "values"} for metric, f in floor.items()}
    common.write_json(
        args.json,
        {
            "benchmark": "autoguidance",
            "options": options,
            "classifier_accuracy": accuracy,
            "floor": floor,
            "results": results,
        },
    )


def merge(paths: list[str], out: str | None) -> None:
    """Report the results of the --json files `paths` (same settings, other runs) as one, and write them to
    `out`."""
    payloads = [json.loads(Path(path).read_text()) for path in paths]
    first = payloads[0]
    # files written before the interval and rescale settings lack them: .get
    differ = sorted(
        {key for p in payloads for key in SAME if p["options"].get(key) != first["options"].get(key)}
    )
    if differ:
        raise SystemExit(f"error: the files differ in {differ}; merge only runs of one setting")
    results = [r for p in payloads for r in p["results"]]
    args = argparse.Namespace(**{key: first["options"].get(key) for key in SAME}, json=out)
    write(args, first["floor"], first["classifier_accuracy"], results)
    report(args, first["floor"], results)


def _against(setting: dict, none: dict, floor: dict) -> str:
    """KID conv of `setting` minus that of `none` (no guidance, or plain CFG), its standard error and
    bench/quality.py's verdict."""
    compared = quality.compare(setting, none, floor, label="", runs=("", ""))["kid_conv"]
    return f"{compared['difference']:+.3g} ({compared['se']:.2g}), {compared['verdict']}"


def _numbers(text: str) -> list[float]:
    return [float(item) for item in text.split(",") if item.strip()]


if __name__ == "__main__":
    main()
