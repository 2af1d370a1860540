"""bench/race.py's equal-time machinery: the clock runs one contestant at a time, always the one with the
least training time, counts each one's own time and stops each at the marks; and our Trainer, driven through
its own loop in a thread, stops at the marks with its EMA weights taken there."""

import argparse
import importlib
import os
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
from accelerate.state import AcceleratorState

ROOT = Path(__file__).resolve().parents[1]
TINY = [
    "data.image_size=8",
    "data.batch_size=16",
    "model.image_size=8",
    "model.base_channels=8",
    "model.channel_mult=[1,2]",
    "model.norm_groups=4",
    "model.attention_resolutions=[]",
    "sample.steps=2",
]


@pytest.fixture(scope="module")
def race():
    """bench/race.py as a module, os.environ left as it was (it sets OMP_WAIT_POLICY for its own process)."""
    saved = dict(os.environ)
    sys.path.insert(0, str(ROOT / "bench"))
    try:
        yield importlib.import_module("race")
    finally:
        sys.path.remove(str(ROOT / "bench"))
        os.environ.clear()
        os.environ.update(saved)


class SleepingRun:
    """A contestant whose optimizer step takes `cost` seconds (sleeping, so the clock's accounting is all that
    differs between contestants); records when each step ran."""

    def __init__(self, cost: float):
        self.cost, self.intervals = cost, []

    def loop(self, contestant) -> None:
        steps = 0
        while contestant.tick(steps, lambda: [(contestant.name, None)]):
            start = time.perf_counter()
            time.sleep(self.cost)
            self.intervals.append((start, time.perf_counter()))
            steps += 1


def test_the_clock_gives_every_contestant_the_same_time_one_at_a_time(race):
    clock, marks, out = race.TrainingClock(), [0.2, 0.4], []
    runs = {"fast": SleepingRun(0.004), "slow": SleepingRun(0.02)}
    threads = []
    for name, run in runs.items():
        clock.enter(name)
        threads.append(race.Contestant(name, run.loop, clock, marks, out))
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=10)
        assert not thread.is_alive() and thread.error is None
    steps = {(o["run"], o["mark"]): o["steps"] for o in out}
    seconds = {(o["run"], o["mark"]): o["seconds"] for o in out}
    for name, run in runs.items():
        for mark in marks:
            # stopped at the first step past the mark: its time is the mark plus at most one step (and slack)
            assert mark <= seconds[name, mark] <= mark + run.cost + 0.02, (name, mark, seconds)
        assert steps[name, marks[-1]] == len(run.intervals)
    assert steps["fast", 0.4] >= 3 * steps["slow", 0.4]  # 5x cheaper steps, equal time
    every = sorted(i for run in runs.values() for i in run.intervals)
    assert all(a[1] <= b[0] for a, b in zip(every, every[1:], strict=False)), "two steps overlapped"


def test_a_contestant_that_fails_frees_the_clock_and_the_error_reaches_the_caller(race):
    clock, out = race.TrainingClock(), []

    def failing(contestant):
        contestant.tick(0, list)
        raise RuntimeError("boom")

    other = SleepingRun(0.002)
    threads = [
        race.Contestant("bad", failing, clock, [0.05], out),
        race.Contestant("ok", other.loop, clock, [0.05], out),
    ]
    for thread in threads:
        clock.enter(thread.name)
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=10)
        assert not thread.is_alive()
    assert str(threads[0].error) == "boom" and threads[1].error is None and other.intervals


def test_our_trainer_stops_at_each_mark_with_the_ema_weights_it_had_then(race, tmp_path):
    options = argparse.Namespace(config=str(ROOT / "configs" / "digits.yaml"), posthoc_sigma_rels=[0.05, 0.2])
    variants = {"tiny": [*TINY, "train.posthoc_ema_every=2"]}
    clock, out, marks = race.TrainingClock(), [], [0.5, 1.0]
    try:
        loop = race.trainer_loop("tiny", options, variants, 0, tmp_path)
        clock.enter("tiny")
        contestant = race.Contestant("tiny", loop, clock, marks, out)
        contestant.start()
        contestant.join(timeout=120)
    finally:
        AcceleratorState._reset_state(reset_partial_state=True)
    assert contestant.error is None, contestant.error
    assert sorted({o["run"] for o in out}) == ["tiny", "tiny@0.05", "tiny@0.2"]
    first, last = (next(o for o in out if o["run"] == "tiny" and o["mark"] == m) for m in marks)
    assert 0 < first["steps"] < last["steps"] and marks[-1] <= last["seconds"] < marks[-1] + 0.5
    images, labels = last["sample"](4, 0)
    assert images.shape == (4, 1, 8, 8) and torch.isfinite(images).all() and labels.tolist() == [0, 1, 2, 3]
    assert not any(thread.name == "tiny" and thread.is_alive() for thread in threading.enumerate())
