"""bench/vector_condition.py's report, without its classifier or models: --merge of runs scored apart gives
each Spearman correlation's mean and std over the training seeds, and refuses files of other options."""

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ATTRIBUTES = ("ink", "thickness", "slant")
OPTIONS = {"guidance_scales": [1.0, 0.0], "points": 9, "per_point": 16, "floor_splits": 100}


def scored(tmp_path: Path, seed: int, rho: float, **options) -> Path:
    """A file of one run scored at guidance 1 (every rho `rho`) and 0 (every rho 0, no sweep)."""

    def setting(scale: float, value: float) -> dict:
        sweep = {name: {"spearman": value, "asked": [], "mean_measured": []} for name in ATTRIBUTES}
        return {
            "guidance_scale": scale,
            "held_out": {
                "spearman": dict.fromkeys(ATTRIBUTES, value),
                "kid_conv": 0.01,
                "confidence": 0.9,
            },
            "sweep": sweep if scale > 0 else {},
        }

    settings = [setting(1.0, rho), setting(0.0, 0)]
    payload = {
        "benchmark": "vector_condition",
        "options": {**OPTIONS, **options},
        "attributes": list(ATTRIBUTES),
        "classifier_accuracy": 0.98,
        "real_held_out": {"confidence": 0.99, "attribute_spearman": {"ink-thickness": 0.65}},
        "kid_conv_floor": {"mean": 0.0, "std": 0.002, "abs_p95": 0.004, "sizes": [176, 1621]},
        "results": [{"run": f"r{seed}", "train_seed": seed, "weights": "ema", "settings": settings}],
    }
    path = tmp_path / f"seed{seed}.json"
    path.write_text(json.dumps(payload))
    return path


def run_bench(*arguments: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "bench"), str(ROOT)])}
    command = [sys.executable, str(ROOT / "bench" / "vector_condition.py"), *arguments]
    return subprocess.run(command, capture_output=True, text=True, env=env, cwd=ROOT, timeout=300)


def test_merged_runs_give_each_correlations_mean_and_spread_over_the_seeds(tmp_path):
    first, second = scored(tmp_path, 0, 0.90), scored(tmp_path, 1, 0.80)
    done = run_bench("--merge", str(first), str(second), "--json", str(tmp_path / "all.json"))
    assert done.returncode == 0, done.stderr
    rows = [line for line in done.stdout.splitlines() if line.startswith("| 1 | ink")]
    # held-out and sweep: mean 0.85, std over the two seeds 0.0707
    assert rows == ["| 1 | ink | 0.850 +- 0.071 | 0.900, 0.800 | 0.850 +- 0.071 | 0.900, 0.800 |"]
    assert "| 0 | slant | 0.000 +- 0.000 | 0.000, 0.000 | - | - |" in done.stdout  # no sweep at 0
    assert "training seeds [0, 1]" in done.stdout and "176 real digits against the other 1621" in done.stdout
    assert len(json.loads((tmp_path / "all.json").read_text())["results"]) == 2


def test_files_of_other_options_are_not_merged(tmp_path):
    first, second = scored(tmp_path, 0, 0.9), scored(tmp_path, 1, 0.9, points=5)
    done = run_bench("--merge", str(first), str(second))
    assert done.returncode == 1 and "differ in ['points']" in done.stderr
