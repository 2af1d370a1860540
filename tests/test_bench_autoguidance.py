"""bench/autoguidance.py's report, without its classifier or models: --merge of runs scored apart gives each
setting's mean over the seeds and its verdict against no guidance (beyond 3 standard errors and the floor, or
"no difference"), and refuses files of other settings."""

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SETTINGS = [("none", 1.0), ("cfg", 2.0), ("autoguide", 2.0)]
OPTIONS = {"weak": "step-0000500", "cfg_scales": [2.0], "autoguide_scales": [2.0], "n_samples": 300}
FLOOR = {
    metric: {"mean": 0.0, "std": 0.002, "abs_p95": 0.004, "sizes": [300, 1497]}
    for metric in ("kid_conv", "kid_hidden", "frechet_distance")
}


def scored(tmp_path: Path, seed: int, kid: dict[str, float], settings=SETTINGS, **options) -> Path:
    results = [
        {
            "run": f"runs/digits-s{seed}",
            "seed": seed,
            "setting": setting,
            "scale": scale,
            "sampler": "unipc 20",
            "model": "step-0001500",
            "weak": None,
            "kid_conv": value,
            "kid_hidden": value,
            "frechet_distance": value,
            "agreement": 0.9,
        }  # fmt: skip
        for (setting, scale), value in zip(settings, kid.values(), strict=True)
    ]
    payload = {
        "benchmark": "autoguidance",
        "options": {**OPTIONS, "floor_splits": 100, **options},
        "classifier_accuracy": 0.98,
        "floor": FLOOR,
        "results": results,
    }
    path = tmp_path / f"seed{seed}.json"
    path.write_text(json.dumps(payload))
    return path


def run_bench(*arguments: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "bench"), str(ROOT)])}
    command = [sys.executable, str(ROOT / "bench" / "autoguidance.py"), *arguments]
    return subprocess.run(command, capture_output=True, text=True, env=env, cwd=ROOT, timeout=300)


def test_merged_runs_are_averaged_over_the_seeds_and_judged_against_no_guidance(tmp_path):
    first = scored(tmp_path, 0, {"none": 0.010, "cfg": 0.050, "autoguide": 0.012})
    second = scored(tmp_path, 1, {"none": 0.011, "cfg": 0.052, "autoguide": 0.011})
    done = run_bench("--merge", str(first), str(second), "--json", str(tmp_path / "all.json"))
    assert done.returncode == 0, done.stderr
    rows = {
        line.split(" | ")[0].strip("| "): line for line in done.stdout.splitlines() if line.startswith("| ")
    }
    assert "| 0.0105 |" in rows["none"]
    assert "| 0.051 |" in rows["cfg"] and "+0.0405" in rows["cfg"] and "higher" in rows["cfg"]
    assert "no difference" in rows["autoguide"]  # +0.001: inside the floor's 0.004
    assert "training seeds [0, 1]" in done.stdout and "95th percentile of |value| 0.004" in done.stdout
    merged = json.loads((tmp_path / "all.json").read_text())
    assert len(merged["results"]) == 6 and merged["options"]["cfg_scales"] == [2.0]


def test_files_of_other_settings_are_not_merged(tmp_path):
    first = scored(tmp_path, 0, {"none": 0.01, "cfg": 0.05, "autoguide": 0.01})
    second = scored(tmp_path, 1, {"none": 0.01, "cfg": 0.05, "autoguide": 0.01}, n_samples=500)
    done = run_bench("--merge", str(first), str(second))
    assert done.returncode == 1 and "differ in ['n_samples']" in done.stderr


def test_the_interval_and_rescale_settings_carry_their_parameters():
    code = (
        "import json, sys, autoguidance\n"
        "sys.argv = ['autoguidance.py', 'RUN', '--cfg-scales', '2', '--autoguide-scales', '',"
        " '--interval-scales', '2,3', '--interval', '0.28', '5.42',"
        " '--rescale-scales', '2', '--rescale', '0.5']\n"
        "print(json.dumps(autoguidance.settings(autoguidance.parse_args())))"
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "bench"), str(ROOT)])}
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=ROOT, timeout=300
    )
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout) == [
        ["none", 1.0, None, 0.0],
        ["cfg", 2.0, None, 0.0],
        ["cfg-interval", 2.0, [0.28, 5.42], 0.0],
        ["cfg-interval", 3.0, [0.28, 5.42], 0.0],
        ["cfg-rescale", 2.0, None, 0.5],
    ]


def test_an_empty_interval_is_refused():
    done = run_bench("RUN", "--interval-scales", "2", "--interval", "5", "1")
    assert done.returncode == 2 and "--interval 5 1: expected 0 <= LO <= HI" in done.stderr


def test_the_interval_and_rescale_are_judged_against_cfg_at_their_weight(tmp_path):
    settings = [("none", 1.0), ("cfg", 2.0), ("cfg-interval", 2.0), ("cfg-rescale", 2.0)]
    options = {"autoguide_scales": [], "interval_scales": [2.0], "interval": [0.28, 5.42]}
    kids = [
        {"none": 0.010, "cfg": 0.050, "cfg-interval": 0.011, "cfg-rescale": 0.049},
        {"none": 0.011, "cfg": 0.052, "cfg-interval": 0.012, "cfg-rescale": 0.051},
    ]
    paths = [scored(tmp_path, seed, kid, settings, **options) for seed, kid in enumerate(kids)]
    done = run_bench("--merge", *map(str, paths))
    assert done.returncode == 0, done.stderr
    rows = {
        line.split(" | ")[0].strip("| "): line for line in done.stdout.splitlines() if line.startswith("| ")
    }
    # against none +0.001, inside the floor; against cfg -0.0395, beyond it and 3 standard errors
    assert rows["cfg-interval"].count("no difference") == 1 and "-0.0395" in rows["cfg-interval"]
    assert rows["cfg-rescale"].count("no difference") == 1 and "higher" in rows["cfg-rescale"]
    assert rows["cfg"].rstrip(" |").endswith("higher")  # plain CFG has no column against itself
