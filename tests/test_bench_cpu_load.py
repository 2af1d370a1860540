"""bench/cpu_load.py: each setting reaches the children's OpenMP runtime (read from libgomp's own report), the
summary's ratios are the ones its table names, a measurement beside other work marks the report preliminary,
and an unknown setting is refused before anything runs. The bench scripts import each other as top-level
modules, so each check runs in a subprocess with bench/ on PYTHONPATH."""

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

SETTINGS_REACH_THE_RUNTIME = """
import json, sys, tempfile
from pathlib import Path
import cpu_load

# as train.py and sample.py do: ddpm first, then torch
child = [sys.executable, "-c", "import ddpm, torch; print(torch.ones(2).sum())"]
found = {}
with tempfile.TemporaryDirectory() as tmp:
    for name in ("unset", "libgomp", "passive", "spin-10k", "1-thread"):
        done = cpu_load._run_together([(child, None), (child, None)], cpu_load.setting_named(name), Path(tmp))
        found[name] = [run["spin_count"] for run in done["runs"]]
        assert all(run["wall_s"] > 0 and run["cpu_s"] > 0 for run in done["runs"]), done
        assert done["other_cores"] >= 0
print(json.dumps({"spins": found, "one_thread": list(cpu_load.setting_named("1-thread").train)}))
"""

SUMMARY = """
import argparse, json
import cpu_load

def measurement(r, setting, kind, walls, other=0.0):
    return {"round": r, "setting": setting, "kind": kind, "loadavg_before": "0.50 0.4 0.3 1/100 1",
            "other_cores": other, "runs": [{"wall_s": w, "spin_count": "0"} for w in walls]}

ms = []
for r, (alone, pair) in enumerate([(40.0, (80.0, 84.0)), (50.0, (90.0, 90.0))]):
    ms += [measurement(r, "libgomp", "alone", [alone]), measurement(r, "libgomp", "pair", pair),
           measurement(r, "libgomp", "sample alone", [10.0]),
           measurement(r, "libgomp", "train+sample", [60.0, 20.0])]
    ms += [measurement(r, "passive", "alone", [alone * 1.1]),
           measurement(r, "passive", "pair", [alone * 2.2] * 2),
           measurement(r, "passive", "sample alone", [10.0]),
           measurement(r, "passive", "train+sample", [alone * 1.1, 15.0], other=0.5 * r)]
report = cpu_load.summarize(ms, ["libgomp", "passive"], quiet_cores=0.15)
args = argparse.Namespace(steps=100, sample_n=256, rounds=2, quiet_cores=0.15)
print(json.dumps({"report": report, "text": cpu_load.markdown(report, args)}))
"""


def run_in_bench(code: str, *args: str) -> subprocess.CompletedProcess:
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(ROOT / "bench"), str(ROOT), os.environ.get("PYTHONPATH", "")]),
    }
    return subprocess.run(
        [sys.executable, "-c", code, *args], capture_output=True, text=True, env=env, cwd=ROOT, timeout=300
    )


def test_each_setting_reaches_the_childrens_openmp_runtime():
    done = run_in_bench(SETTINGS_REACH_THE_RUNTIME)
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    # "unset" is what a user gets: ddpm's default, set by the child itself (the benchmark hands it none of
    # the variables); a user's own setting wins over it
    assert result["spins"] == {
        "unset": ["0", "0"],
        "libgomp": ["300000", "300000"],
        "passive": ["0", "0"],
        "spin-10k": ["10000", "10000"],
        "1-thread": ["300000", "300000"],
    }
    assert result["one_thread"] == ["train.cpu_threads=1"]


def test_the_summary_gives_the_ratios_its_table_names():
    done = run_in_bench(SUMMARY)
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    libgomp, passive = result["report"]["settings"]["libgomp"], result["report"]["settings"]["passive"]
    # [mean, min, max] over the two rounds: pairs of 82 and 90 s against 40 and 50 s alone
    assert libgomp["alone_s"] == [45.0, 40.0, 50.0]
    assert libgomp["pair_s"] == [86.0, 82.0, 90.0]
    assert libgomp["pair_over_alone"] == [(82 / 40 + 90 / 50) / 2, 90 / 50, 82 / 40]
    assert libgomp["train_beside_sampling_over_alone"] == [(60 / 40 + 60 / 50) / 2, 60 / 50, 60 / 40]
    assert libgomp["sampling_beside_training_over_alone"] == [2.0, 2.0, 2.0]
    assert [round(v, 9) for v in passive["alone_over_libgomp_alone"]] == [1.1, 1.1, 1.1]
    assert [round(v, 9) for v in passive["pair_over_alone"]] == [2.0, 2.0, 2.0]
    assert passive["max_other_cores"] == 0.5 and passive["max_loadavg_before"] == 0.5
    # round 1's passive pair of training and sampling ran beside half a core of other work
    assert result["report"]["quiet"] is False
    assert "PRELIMINARY: other processes used the CPU" in result["text"]
    assert "| libgomp | 0 | 45.0 (40.0-50.0) | 1.00 (1.00-1.00) | 86.0 (82.0-90.0) |" in result["text"]


def test_an_unknown_setting_is_refused_before_anything_runs():
    done = subprocess.run(
        [sys.executable, str(ROOT / "bench/cpu_load.py"), "--settings", "passive,fast"],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=300,
    )
    assert done.returncode == 1
    assert "unknown setting 'fast'; use unset, libgomp, passive, 1-thread or spin-N" in done.stderr
