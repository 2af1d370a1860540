"""Vector conditioning on measurable attributes (issue 25): do digits drawn by a run of
configs/attributes_digits.yaml (data.task: attributes) have the ink, thickness and slant they were asked for?

    python bench/vector_condition.py RUN [RUN ...] [--guidance-scales 1,0,2] [--points 9] [--per-point 16]
        [--floor-splits 100] [--figure PNG] [--json OUT]
    python bench/vector_condition.py --merge A.json B.json ... [--json OUT]

Each RUN is a run directory (its latest checkpoint's EMA weights, its own sampler and steps, the attributes'
units from its task.json: `load_for_sampling`). Two sets of asked attributes, each attribute measured on the
outputs by the function that made the training conditions (`ddpm.attributes.measure_attributes`):
- "held_out": the attributes of the 176 held-out digits (split test, never trained on), all three asked
  together, one image each;
- "sweep": one attribute at a time at --points values evenly from -2 to +2 training standard deviations,
  the other two at 0 (the training mean), --per-point images per value.
Held-out image i starts from noise seeded i, and the sweep's k-th image at each value from noise seeded k
(the same noises at every value, so that only the asked value changes along the sweep), the same in every
setting and run. Per attribute, the Spearman
rank correlation between asked and measured (held_out: over the 176 images; sweep: over the points x
per-point images); for the sweep also the mean measured at each point, in the attribute's own units. Each at
each --guidance-scales: 1 is the plain conditional model, 0 the unconditional one (the null vector alone,
learnt through the condition dropout: the reference whose outputs ignore what is asked; its sweep is not
drawn, as its images are the same at every value and its rho 0 by construction), above 1 classifier-free
guidance. The held-out set's images are also scored as bench/quality.py scores (KID on the digit
classifier's conv features against all 1,797 digits, with its floor: 176 real digits against the others;
the classifier's mean confidence), so that control is not bought by images that stop looking like digits.
--figure PATH writes the first run's sweep at guidance 1 as a grid: per attribute, FIGURE_NOISES rows (one
noise each) of its --points values from low to high.
--merge reports the --json files of runs scored apart (one per training seed) as one: each number's mean
and standard deviation over the runs.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
from pathlib import Path

import common
import quality
import torch
from scipy.stats import spearmanr

from ddpm.attributes import (
    ATTRIBUTES,
    measure_attributes,
    standardise_attributes,
    unstandardise_attributes,
)
from ddpm.conditions import Conditions
from ddpm.config import load_config
from ddpm.data import split_digits
from ddpm.inference import generate, load_for_sampling, save_grid
from ddpm.run_dir import RUN_CONFIG

SWEEP_RANGE = (-2.0, 2.0)  # the sweep's asked values, in training standard deviations
FIGURE_NOISES = 4  # --figure's rows per attribute
SAME = ("guidance_scales", "points", "per_point", "floor_splits")  # what merged files share


def main() -> None:
    args = parse_args()
    if args.merge:
        merge(args.merge, args.json)
        return
    first = load_for_sampling(args.runs[0])
    if first.run_dir is None or first.task["task"] != "attributes":
        raise SystemExit(
            f"error: {args.runs[0]} is not a run of data.task=attributes (attributes_digits.yaml)"
        )
    config = load_config(first.run_dir / RUN_CONFIG)
    real = split_digits("test", config.data.image_size)[0] * 2 - 1  # (176, 1, S, S) in [-1, 1]
    # the scorer's classifier learns the digits' labels, which the runs themselves do not take
    labelled = dataclasses.replace(config, data=dataclasses.replace(config.data, labels=True))
    scorer = quality.Scorer(labelled, splits=args.floor_splits, size=len(real))
    print(f"digit classifier held-out accuracy {scorer.accuracy:.3f}", flush=True)
    results = [
        score_run(run, real, scorer, args, figure=args.figure if i == 0 else None)
        for i, run in enumerate(args.runs)
    ]
    floor = {k: v for k, v in scorer.floor["kid_conv"].items() if k != "values"}
    payload = {
        "benchmark": "vector_condition",
        "options": {key: getattr(args, key) for key in SAME},
        "attributes": list(ATTRIBUTES),
        "classifier_accuracy": scorer.accuracy,
        "real_held_out": {
            "confidence": scorer.score(real, None)["confidence"],
            "attribute_spearman": _cross_correlations(measure_attributes(real)),
        },
        "kid_conv_floor": floor,
        "results": results,
    }
    common.write_json(args.json, payload)
    report(payload)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("runs", nargs="*", help="run directories of configs/attributes_digits.yaml")
    parser.add_argument("--guidance-scales", type=_numbers, default=[1.0, 0.0, 2.0])
    parser.add_argument("--points", type=int, default=9, help="asked values per attribute in the sweep")
    parser.add_argument("--per-point", type=int, default=16, help="images per asked value in the sweep")
    parser.add_argument("--floor-splits", type=int, default=100)
    parser.add_argument("--figure", type=Path, help="write the first run's sweep at guidance 1 here")
    parser.add_argument("--merge", nargs="+", metavar="JSON", help="report these --json files as one")
    parser.add_argument("--json")
    args = parser.parse_args()
    if not args.merge and not args.runs:
        parser.error("name at least one RUN, or --merge files")
    return args


def score_run(
    run: str, real: torch.Tensor, scorer: quality.Scorer, args: argparse.Namespace, *, figure: Path | None
) -> dict:
    """The held-out and sweep measurements of one run at each guidance scale (see the module docstring);
    `figure`: where to write its sweep at guidance 1 (`save_sweep`), or None."""
    loaded = load_for_sampling(run)
    mean, std = loaded.task["attribute_mean"], loaded.task["attribute_std"]
    seed = load_config(loaded.run_dir / RUN_CONFIG).train.seed
    asked_held_out = measure_attributes(real)  # (176, A) in the attributes' own units
    sweep_vectors, sweep_z = sweep(args.points, args.per_point)  # (A, P x K, A), (P x K,)
    result = {"run": str(loaded.folder), "train_seed": seed, "weights": loaded.weights, "settings": []}
    for scale in args.guidance_scales:
        images = draw(loaded, standardise_attributes(asked_held_out, mean, std), scale)
        measured = measure_attributes(images)
        scores = scorer.score(images, None)
        setting = {
            "guidance_scale": scale,
            "held_out": {
                "spearman": _spearman_each(asked_held_out, measured),
                "kid_conv": scores["kid_conv"],
                "confidence": scores["confidence"],
            },
            "sweep": {},
        }
        swept = []  # each attribute's sweep images
        for a, name in enumerate(ATTRIBUTES if scale > 0 else ()):  # at 0 rho is 0 by construction
            # one value at a time: its per_point images from the noises seeded 0, 1, ...
            images = torch.cat([draw(loaded, v, scale) for v in sweep_vectors[a].split(args.per_point)])
            measured = measure_attributes(images)[:, a]
            swept.append(images)
            means = measured.view(args.points, args.per_point).mean(1)
            asked = unstandardise_attributes(sweep_vectors[a], mean, std)[:: args.per_point, a]
            setting["sweep"][name] = {
                "spearman": float(spearmanr(sweep_z, measured).statistic),
                "asked": asked.tolist(),
                "mean_measured": means.tolist(),
            }
        if figure is not None and scale == 1:
            save_sweep(figure, swept, args.points)
        result["settings"].append(setting)
        print(f"{run} guidance {scale:g}: {json.dumps(_brief(setting))}", flush=True)
    return result


def sweep(points: int, per_point: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The sweep's standardised vectors, (A, points x per_point, A): for attribute a, the asked value z of
    each image in its own entry (points values evenly over SWEEP_RANGE, per_point images each, in order),
    0 in the others; and those z (points x per_point,)."""
    z = torch.linspace(*SWEEP_RANGE, points).repeat_interleave(per_point)
    vectors = torch.zeros(len(ATTRIBUTES), len(z), len(ATTRIBUTES))
    for a in range(len(ATTRIBUTES)):
        vectors[a, :, a] = z
    return vectors, z


def save_sweep(path: Path, swept: list[torch.Tensor], points: int) -> None:
    """Write each attribute's sweep images (points x per_point, C, H, W), in the order drawn, as one grid:
    per attribute FIGURE_NOISES rows, one noise each, of the points from low to high."""
    blocks = []
    for images in swept:
        by_point = images.view(points, -1, *images.shape[1:])[:, :FIGURE_NOISES]  # (P, K', C, H, W)
        blocks.append(by_point.transpose(0, 1).reshape(-1, *images.shape[1:]))  # rows of one noise
    save_grid(torch.cat(blocks), path, nrow=points)
    print(f"wrote {path}", flush=True)


def draw(loaded, vectors: torch.Tensor, scale: float) -> torch.Tensor:
    """One image per standardised vector (N, A), image i from noise seeded i, with the run's sampler and
    steps at guidance `scale` (against the null vector)."""
    config = loaded.model.config
    return generate(
        loaded.model,
        loaded.scheduler,
        len(vectors),
        image_shape=(config["in_channels"], config["image_size"], config["image_size"]),
        sampler=loaded.sampling.sampler,
        steps=loaded.sampling.steps,
        cond=Conditions({"vector": vectors}),
        guidance_scale=scale,
        seed=0,
        batch_size=256,
    )


def report(payload: dict) -> None:
    """Print, per guidance scale and attribute, the mean and std over runs of each Spearman correlation,
    the per-run values, and the held-out images' KID conv and confidence with the floor."""
    results = payload["results"]
    seeds = [r["train_seed"] for r in results]
    rows = []
    for i, setting in enumerate(results[0]["settings"]):
        scale = setting["guidance_scale"]
        per_run = [r["settings"][i] for r in results]
        for name in ATTRIBUTES:
            held = [s["held_out"]["spearman"][name] for s in per_run]
            swept = [s["sweep"][name]["spearman"] for s in per_run if s["sweep"]]
            rows.append([f"{scale:g}", name, *_spread(held), *(_spread(swept) if swept else ["-", "-"])])
        kid = [s["held_out"]["kid_conv"] for s in per_run]
        confidence = [s["held_out"]["confidence"] for s in per_run]
        rows.append([f"{scale:g}", "KID conv / confidence", *_spread(kid), *_spread(confidence)])
    header = ["guidance", "attribute", "held-out rho", "per run", "sweep rho", "per run"]
    floor = payload["kid_conv_floor"]
    print(
        f"\ntraining seeds {seeds}; Spearman rho between asked and measured, mean +- std over runs\n\n"
        + common.markdown_table(header, rows)
        + f"\n\nKID conv floor ({floor['sizes'][0]} real digits against the other {floor['sizes'][1]}, "
        f"{payload['options']['floor_splits']} splits): mean {floor['mean']:.4g}, std {floor['std']:.4g}, "
        f"95th percentile of |value| {floor['abs_p95']:.4g}; real held-out digits' confidence "
        f"{payload['real_held_out']['confidence']:.3f}; rank correlations between the attributes over the "
        f"real held-out digits: {json.dumps(payload['real_held_out']['attribute_spearman'])}",
        flush=True,
    )


def merge(paths: list[str], out: str | None) -> None:
    """Report the results of the --json files `paths` (same options, other runs) as one; write them to
    `out`."""
    payloads = [json.loads(Path(path).read_text()) for path in paths]
    first = payloads[0]
    differ = sorted({key for p in payloads for key in SAME if p["options"][key] != first["options"][key]})
    if differ:
        raise SystemExit(f"error: the files differ in {differ}; merge only runs scored with the same options")
    merged = {**first, "results": [r for p in payloads for r in p["results"]]}
    common.write_json(out, merged)
    report(merged)


def _spearman_each(asked: torch.Tensor, measured: torch.Tensor) -> dict[str, float]:
    """Per attribute, Spearman's rho between asked (N, A) and measured (N, A)."""
    return {
        name: float(spearmanr(asked[:, a], measured[:, a]).statistic) for a, name in enumerate(ATTRIBUTES)
    }


def _cross_correlations(values: torch.Tensor) -> dict[str, float]:
    """Spearman's rho between each pair of attributes over a set of images (N, A)."""
    pairs = [(a, b) for a in range(len(ATTRIBUTES)) for b in range(a + 1, len(ATTRIBUTES))]
    return {
        f"{ATTRIBUTES[a]}-{ATTRIBUTES[b]}": round(float(spearmanr(values[:, a], values[:, b]).statistic), 3)
        for a, b in pairs
    }


def _spread(values: list[float]) -> list[str]:
    """[mean +- std (std only for 2 or more), the values], as table cells."""
    mean = statistics.fmean(values)
    std = f" +- {statistics.stdev(values):.3f}" if len(values) > 1 else ""
    return [f"{mean:.3f}{std}", ", ".join(f"{v:.3f}" for v in values)]


def _brief(setting: dict) -> dict:
    held = setting["held_out"]
    return {
        "held_out": {k: round(v, 3) for k, v in held["spearman"].items()},
        "sweep": {k: round(v["spearman"], 3) for k, v in setting["sweep"].items()},
        "kid_conv": round(held["kid_conv"], 4),
        "confidence": round(held["confidence"], 3),
    }


def _numbers(text: str) -> list[float]:
    return [float(item) for item in text.split(",")]


if __name__ == "__main__":
    main()
