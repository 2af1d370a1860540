"""bench/race.py's equal-time machinery: the clock runs one contestant at a time, always the one with the
least training time, counts each one's own time and stops each at the marks; and our Trainer, driven through
its own loop in a thread, stops at the marks with its EMA weights taken there. The bench scripts import each
other as top-level modules, so the scenarios run in a subprocess with bench/ on PYTHONPATH."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

SCENARIOS = r'''
import argparse, json, sys, time
from pathlib import Path

import torch
from accelerate.state import AcceleratorState

import race

ROOT, tmp = Path(sys.argv[1]), Path(sys.argv[2])
report = {}


class SleepingRun:
    """A contestant whose step sleeps `cost` seconds; records when each step ran."""

    def __init__(self, cost):
        self.cost, self.intervals = cost, []

    def loop(self, contestant):
        while True:
            start = time.perf_counter()
            time.sleep(self.cost)
            self.intervals.append((start, time.perf_counter()))
            if not contestant.tick(len(self.intervals), lambda: [(contestant.name, None)]):
                return


def run_all(contestants):
    clock, out = race.TrainingClock(), []
    threads = [race.Contestant(name, loop, clock, marks, out) for name, loop, marks in contestants]
    for thread in threads:
        clock.enter(thread.name)
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    return out, {t.name: (t.is_alive(), None if t.error is None else str(t.error)) for t in threads}


runs = {"fast": SleepingRun(0.004), "slow": SleepingRun(0.02)}
out, states = run_all([(name, run.loop, [0.2, 0.4]) for name, run in runs.items()])
report["clock"] = {
    "marks": [{k: o[k] for k in ("run", "mark", "steps", "seconds")} for o in out],
    "intervals": {name: run.intervals for name, run in runs.items()},
    "states": states,
}


def failing(contestant):
    raise RuntimeError("boom")


other = SleepingRun(0.002)
out, states = run_all([("bad", failing, [0.05]), ("ok", other.loop, [0.05])])
report["failure"] = {"states": states, "ok_steps": len(other.intervals)}

options = argparse.Namespace(config=str(ROOT / "configs" / "digits.yaml"), posthoc_sigma_rels=[0.05, 0.2])
tiny = [
    "data.image_size=8", "data.batch_size=16", "model.image_size=8", "model.base_channels=8",
    "model.channel_mult=[1,2]", "model.norm_groups=4", "model.attention_resolutions=[]", "sample.steps=2",
    "train.posthoc_ema_every=2",
]
loop = race.trainer_loop("tiny", options, {"tiny": tiny}, 0, tmp)
out, states = run_all([("tiny", loop, [0.5, 1.0])])
AcceleratorState._reset_state(reset_partial_state=True)
last = next(o for o in out if o["run"] == "tiny" and o["mark"] == 1.0)
images, labels = last["sample"](4, 0)
report["trainer"] = {
    "marks": [{k: o[k] for k in ("run", "mark", "steps", "seconds")} for o in out],
    "states": states,
    "shape": list(images.shape),
    "finite": bool(torch.isfinite(images).all()),
    "labels": labels.tolist(),
}
print(json.dumps(report))
'''


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("race")
    pythonpath = os.pathsep.join([str(ROOT / "bench"), str(ROOT), os.environ.get("PYTHONPATH", "")])
    done = subprocess.run(
        [sys.executable, "-c", SCENARIOS, str(ROOT), str(tmp)],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": pythonpath},
        timeout=600,
    )
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_the_clock_gives_every_contestant_the_same_time_one_at_a_time(report):
    clock = report["clock"]
    assert clock["states"] == {"fast": [False, None], "slow": [False, None]}
    found = {(m["run"], m["mark"]): m for m in clock["marks"]}
    costs = {"fast": 0.004, "slow": 0.02}
    for name, cost in costs.items():
        for mark in (0.2, 0.4):
            # stopped at the first step past the mark: the mark plus at most one step (and scheduling slack)
            assert mark <= found[name, mark]["seconds"] <= mark + cost + 0.02, (name, mark, found)
        assert found[name, 0.4]["steps"] == len(clock["intervals"][name])
    assert found["fast", 0.4]["steps"] >= 3 * found["slow", 0.4]["steps"]  # 5x cheaper steps, equal time
    every = sorted(i for intervals in clock["intervals"].values() for i in intervals)
    assert all(a[1] <= b[0] for a, b in zip(every, every[1:], strict=False)), "two steps overlapped"


def test_a_contestant_that_fails_frees_the_clock_and_keeps_its_error(report):
    failure = report["failure"]
    assert failure["states"] == {"bad": [False, "boom"], "ok": [False, None]}
    assert failure["ok_steps"] > 0


def test_our_trainer_stops_at_each_mark_with_the_ema_weights_it_had_then(report):
    trainer = report["trainer"]
    assert trainer["states"] == {"tiny": [False, None]}
    assert sorted({m["run"] for m in trainer["marks"]}) == ["tiny", "tiny@0.05", "tiny@0.2"]
    first, last = (
        next(m for m in trainer["marks"] if m["run"] == "tiny" and m["mark"] == t) for t in (0.5, 1.0)
    )
    assert 0 < first["steps"] < last["steps"] and 1.0 <= last["seconds"] < 1.5
    assert trainer["shape"] == [4, 1, 8, 8] and trainer["finite"] and trainer["labels"] == [0, 1, 2, 3]
