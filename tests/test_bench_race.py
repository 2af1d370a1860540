"""bench/race.py's equal-time machinery and its contestants: the clock runs one contestant at a time, always
the one with the least training time, counts each one's CPU time (not the time it sleeps or waits) and stops
each at the marks; our Trainer, driven through its own loop in a thread, stops at the marks with its EMA
weights taken there; the lucidrains contestant's EMA is ema_pytorch's warm-up from step 0, its network
wrapped for ddpm.sample predicts what its own library predicts, and its own DDIM is ddpm's DDIM on its
schedule; the diffusers contestant keeps the EMA of diffusers' example besides its own; the report scores each
run by its best candidate sampler. The bench scripts import each other as top-level modules, so the scenarios
run in a subprocess with bench/ on PYTHONPATH; each scenario's error, if any, is reported on its own."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

SCENARIOS = r'''
import argparse, dataclasses, json, sys, time, traceback
from pathlib import Path

import torch
from accelerate.state import AcceleratorState

import race
from ddpm import load_config, sample
from ddpm.samplers.sampling import denoiser

ROOT, tmp = Path(sys.argv[1]), Path(sys.argv[2])
report = {}
TINY = [
    "data.image_size=8", "data.batch_size=16", "model.image_size=8", "model.base_channels=8",
    "model.channel_mult=[1,2]", "model.norm_groups=4", "model.attention_resolutions=[]", "sample.steps=4",
]


def scenario(function):
    try:
        report[function.__name__] = function()
    except Exception:
        report[function.__name__] = {"error": traceback.format_exc()}
    AcceleratorState._reset_state(reset_partial_state=True)
    return function


class SleepingRun:
    """A contestant whose step sleeps `cost` seconds, burning CPU for `burn` seconds first; records when each
    step ran."""

    def __init__(self, cost, burn=0.0):
        self.cost, self.burn, self.intervals = cost, burn, []

    def loop(self, contestant):
        while True:
            start = time.perf_counter()
            cpu = time.process_time()
            while time.process_time() - cpu < self.burn:
                pass
            time.sleep(self.cost)
            self.intervals.append((start, time.perf_counter()))
            if not contestant.tick(len(self.intervals), lambda: [(contestant.name, {})]):
                return


def run_all(contestants, timer):
    clock, out = race.TrainingClock(timer), []
    threads = [race.Contestant(name, loop, clock, marks, out) for name, loop, marks in contestants]
    for thread in threads:
        clock.enter(thread.name)
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    states = {t.name: (t.is_alive(), None if t.error is None else str(t.error)) for t in threads}
    marks = [{k: o[k] for k in ("run", "mark", "steps", "seconds", "wall_seconds")} for o in out]
    return out, marks, states


@scenario
def clock():
    # steps that burn CPU, timed by the process's CPU time: other load on the machine changes neither
    runs = {"fast": SleepingRun(0.0, burn=0.004), "slow": SleepingRun(0.0, burn=0.02)}
    contestants = [(name, run.loop, [0.2, 0.4]) for name, run in runs.items()]
    out, marks, states = run_all(contestants, time.process_time)
    intervals = {name: run.intervals for name, run in runs.items()}
    return {"marks": marks, "intervals": intervals, "states": states}


@scenario
def failure():
    def failing(contestant):
        raise RuntimeError("boom")

    other = SleepingRun(0.002)
    out, marks, states = run_all([("bad", failing, [0.05]), ("ok", other.loop, [0.05])], time.perf_counter)
    return {"states": states, "ok_steps": len(other.intervals)}


@scenario
def cpu_clock():
    # the default clock: CPU time over the thread count; the 20 ms of sleep per step are not training time
    run = SleepingRun(0.02, burn=0.01)
    out, marks, states = run_all([("busy", run.loop, [0.05])], race.cpu_seconds)
    return {"marks": marks, "states": states, "threads": torch.get_num_threads(), "burn": run.burn}


@scenario
def trainer():
    options = argparse.Namespace(config=str(ROOT / "configs" / "digits.yaml"), posthoc_sigma_rels=[0.05, 0.2])
    tiny = [*TINY, "sample.steps=2", "train.posthoc_ema_every=2"]
    spacing = race.BestSpacing()
    loop = race.trainer_loop("tiny", options, {"tiny": tiny}, 0, tmp, spacing)
    out, marks, states = run_all([("tiny", loop, [0.5, 1.0])], race.cpu_seconds)
    last = next(o for o in out if o["run"] == "tiny" and o["mark"] == 1.0)
    candidates = sorted(last["samplers"])
    images, labels = last["samplers"][candidates[0]](4, 0)
    return {
        "marks": marks,
        "states": states,
        "candidates": candidates,
        "spacings": spacing.record,
        "shape": list(images.shape),
        "finite": bool(torch.isfinite(images).all()),
        "labels": labels.tolist(),
    }


@scenario
def lucidrains():
    config = load_config(ROOT / "configs" / "digits.yaml", TINY)
    run = race.LucidrainsRun(config, 0)
    raw = []
    for _ in range(6):
        run.step()
        raw.append([p.detach().double().clone() for p in run.diffusion.parameters()])
    # ema_pytorch's EMA from step 0, every step: a copy at the first update, then at update k the decay
    # min(0.995, 1 - k^(-2/3)) (inv_gamma 1, power 2/3)
    expected = raw[0]
    for k, weights in enumerate(raw[1:], start=2):
        decay = min(0.995, 1 - k ** (-2 / 3))
        expected = [e + (1 - decay) * (w - e) for e, w in zip(expected, weights)]
    ema = run.ema.ema_model
    got = [p.detach().double() for p in ema.parameters()]
    ema_vs_expected = max((g - e).abs().max().item() for g, e in zip(got, expected))
    ema_vs_raw = max((g - w).abs().max().item() for g, w in zip(got, raw[-1]))

    # its network as ddpm.sample calls it, against its own x0 and noise predictions (clipped, as it samples)
    model = race.LucidrainsDenoiser(ema.model, 8).eval()
    # at x_t of data in [-1, 1] (its x_t is in the data's range, as ours), from t = 0 to T - 1
    generator = torch.Generator().manual_seed(1)
    t = torch.tensor([0, 1, 250, 500, 998, 999])
    x0 = torch.rand(6, 1, 8, 8, generator=generator) * 2 - 1
    x = run.scheduler.add_noise(x0, torch.randn(6, 1, 8, 8, generator=generator), t)
    with torch.no_grad():
        theirs = ema.model_predictions(x, t, clip_x_start=True, rederive_pred_noise=True)
        _, _, _, their_x0 = ema.p_mean_variance(x, t, clip_denoised=True)
        ours = [denoiser(model, run.scheduler)(x[i : i + 1], t[i]) for i in range(len(t))]
    predictions = {
        "x0": max((o.x0[0] - x0).abs().max().item() for o, x0 in zip(ours, theirs.pred_x_start)),
        "x0_p_mean_variance": max((o.x0[0] - x0).abs().max().item() for o, x0 in zip(ours, their_x0)),
        "eps": max((o.eps[0] - e).abs().max().item() for o, e in zip(ours, theirs.pred_noise)),
    }

    settings = dataclasses.replace(config.sample, guidance_scale=1.0)
    spacing = race.BestSpacing()
    best = spacing(run.scheduler, settings)
    candidates = run.samplers(settings, best)
    own, _ = candidates["ema", "own-ddim4"](3, 123)
    torch.manual_seed(123)
    x_T = torch.randn(3, 1, 8, 8)  # the noise its sampler draws first under that seed
    mine = sample(model, race.with_spacing(run.scheduler, "trailing"), noise=x_T, sampler="ddim", steps=4)
    images, labels = candidates["ema", f"unipc4-{best}"](3, 0)
    return {
        "alpha_bar": (ema.alphas_cumprod.double() - run.scheduler.alphas_cumprod).abs().max().item(),
        "ema_vs_expected": ema_vs_expected,
        "ema_vs_raw": ema_vs_raw,
        "predictions": predictions,
        "own_ddim_vs_ddpm_ddim": (own - mine).abs().max().item(),
        "candidates": sorted(candidates),
        "best": best,
        "spacings": spacing.record,
        "unipc": [list(images.shape), bool(torch.isfinite(images).all()), labels],
    }


@scenario
def diffusers():
    config = load_config(ROOT / "configs" / "digits.yaml", TINY)
    peer = race.DiffusersPeer(config, example_ema=True)
    for _ in range(5):
        peer.step()
    settings = dataclasses.replace(config.sample, guidance_scale=1.0)
    candidates = peer.samplers(settings, "trailing")
    emas = {name: [p.detach().clone() for p in ema.shadow_params] for name, ema in peer.emas.items()}
    images, labels = candidates["example-ema", "unipc4-trailing"](3, 0)
    return {
        "candidates": sorted(candidates),
        "decays": {name: ema.cur_decay_value for name, ema in peer.emas.items()},
        "emas_differ": max((a - b).abs().max().item() for a, b in zip(emas["ema"], emas["example-ema"])),
        "unipc": [list(images.shape), bool(torch.isfinite(images).all()), labels.tolist()],
    }


@scenario
def choice():
    def result(run, mark, seed, sampler, kid):
        return {"run": run, "mark": mark, "seed": seed, "steps": 10, "weights": "ema", "sampler": sampler,
                "kid_conv": kid, "wall_seconds": 2.0}

    results = [
        result("peer", 15, 0, "a", 0.5), result("peer", 15, 1, "a", 0.7),
        result("peer", 15, 0, "b", 0.4), result("peer", 15, 1, "b", 0.6),
        result("peer", 60, 0, "a", 0.1), result("peer", 60, 1, "a", 0.1),
        result("peer", 60, 0, "b", 0.3), result("peer", 60, 1, "b", 0.2),
    ]
    best, candidates = race.best_candidates(results)
    return {
        "best": {f"{run} {mark}": [b["sampler"], b["mean"], b["kids"]] for (run, mark), b in best.items()},
        "candidates": {" ".join(key): means for key, means in candidates.items()},
    }


print(json.dumps(report, default=str))
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
        timeout=900,
    )
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.strip().splitlines()[-1])


def scenario(report: dict, name: str) -> dict:
    result = report[name]
    assert "error" not in result, result["error"]
    return result


def test_the_clock_gives_every_contestant_the_same_time_one_at_a_time(report):
    clock = scenario(report, "clock")
    assert clock["states"] == {"fast": [False, None], "slow": [False, None]}
    found = {(m["run"], m["mark"]): m for m in clock["marks"]}
    costs = {"fast": 0.004, "slow": 0.02}
    for name, cost in costs.items():
        for mark in (0.2, 0.4):
            # stopped at the first step past the mark: the mark plus at most one step (and the loop's own)
            assert mark <= found[name, mark]["seconds"] <= mark + cost + 0.01, (name, mark, found)
        assert found[name, 0.4]["steps"] == len(clock["intervals"][name])
    assert found["fast", 0.4]["steps"] >= 3 * found["slow", 0.4]["steps"]  # 5x cheaper steps, equal time
    every = sorted(i for intervals in clock["intervals"].values() for i in intervals)
    assert all(a[1] <= b[0] for a, b in zip(every, every[1:], strict=False)), "two steps overlapped"


def test_a_contestant_that_fails_frees_the_clock_and_keeps_its_error(report):
    failure = scenario(report, "failure")
    assert failure["states"] == {"bad": [False, "boom"], "ok": [False, None]}
    assert failure["ok_steps"] > 0


def test_the_default_clock_counts_cpu_time_over_the_threads_not_the_time_a_run_sleeps(report):
    busy = scenario(report, "cpu_clock")
    assert busy["states"] == {"busy": [False, None]}
    (mark,) = busy["marks"]
    per_step = busy["burn"] / busy["threads"]  # each step burns 10 ms of one thread, then sleeps 20 ms
    assert 0.05 <= mark["seconds"] <= 0.05 + per_step + 0.01
    assert mark["steps"] * per_step <= mark["seconds"] <= mark["steps"] * per_step + 0.01
    assert mark["wall_seconds"] >= mark["steps"] * 0.03  # the sleeps: on the wall clock, not on the race's


def test_our_trainer_stops_at_each_mark_with_the_ema_weights_it_had_then(report):
    trainer = scenario(report, "trainer")
    assert trainer["states"] == {"tiny": [False, None]}
    assert sorted({m["run"] for m in trainer["marks"]}) == ["tiny", "tiny@0.05", "tiny@0.2"]
    first, last = (
        next(m for m in trainer["marks"] if m["run"] == "tiny" and m["mark"] == t) for t in (0.5, 1.0)
    )
    assert 0 < first["steps"] < last["steps"] and 1.0 <= last["seconds"] < 1.5
    assert trainer["shape"] == [4, 1, 8, 8] and trainer["finite"] and trainer["labels"] == [0, 1, 2, 3]


def test_every_run_is_sampled_on_the_spacing_with_the_least_exact_score_error_and_on_its_own(report):
    trainer = scenario(report, "trainer")
    (measured,) = trainer["spacings"]
    assert set(measured["w1"]) == {"leading", "trailing", "linspace", "karras", "exponential"}
    best = min(measured["w1"], key=measured["w1"].get)
    assert measured["chosen"] == best and measured["sampler"] == "unipc" and measured["steps"] == 2
    # the config's own spacing (exponential) as well, when it is not the best one
    expected = {("ema", f"unipc2-{best}"), ("ema", "unipc2-exponential")}
    assert [tuple(c) for c in trainer["candidates"]] == sorted(expected)


def test_the_lucidrains_ema_is_its_trainers_warm_up_from_the_first_step_not_the_raw_weights(report):
    lucidrains = scenario(report, "lucidrains")
    assert lucidrains["ema_vs_expected"] < 1e-6
    assert lucidrains["ema_vs_raw"] > 1e-3


def test_the_wrapped_lucidrains_network_predicts_what_its_library_predicts(report):
    lucidrains = scenario(report, "lucidrains")
    assert lucidrains["alpha_bar"] < 1e-6  # its sigmoid schedule, rebuilt in float64
    predictions = lucidrains["predictions"]
    assert predictions["x0"] < 1e-6 and predictions["x0_p_mean_variance"] < 1e-6
    # eps = (x_t - sqrt(ab) x0) / sqrt(1 - ab), theirs from float32 tables: rounding grows near t = 0
    assert predictions["eps"] < 2e-5
    # its own DDIM (20 steps in the race, 4 here) is ddpm's DDIM on its schedule with trailing spacing
    assert lucidrains["own_ddim_vs_ddpm_ddim"] < 1e-5


def test_the_lucidrains_contestant_is_sampled_with_our_best_sampler_and_with_its_own(report):
    lucidrains = scenario(report, "lucidrains")
    (measured,) = lucidrains["spacings"]
    assert measured["schedule"] == "TabulatedScheduler" and measured["prediction_type"] == "v_prediction"
    assert lucidrains["best"] == min(measured["w1"], key=measured["w1"].get)
    expected = {("ema", f"unipc4-{lucidrains['best']}"), ("ema", "own-ddim4")}
    assert [tuple(c) for c in lucidrains["candidates"]] == sorted(expected)
    assert lucidrains["unipc"] == [[3, 1, 8, 8], True, None]


def test_the_diffusers_contestant_has_the_ema_of_diffusers_example_besides_the_races(report):
    diffusers = scenario(report, "diffusers")
    # each EMA on the spacing given as the best (trailing here) and on the config's own (exponential)
    assert [tuple(c) for c in diffusers["candidates"]] == [
        (weights, f"unipc4-{spacing}")
        for weights in ("ema", "example-ema")
        for spacing in ("exponential", "trailing")
    ]
    # after 5 updates: the example's use_ema_warmup decay 1 - 5^(-3/4); EMAModel's default (1 + 4) / (10 + 4)
    assert diffusers["decays"]["example-ema"] == pytest.approx(1 - 5 ** (-3 / 4))
    assert diffusers["decays"]["ema"] == pytest.approx(5 / 14)
    assert diffusers["emas_differ"] > 1e-4
    assert diffusers["unipc"] == [[3, 1, 8, 8], True, [0, 1, 2]]


def test_each_run_and_mark_is_scored_by_its_best_candidate_over_the_seeds(report):
    choice = scenario(report, "choice")
    assert choice["best"]["peer 15"] == ["b", pytest.approx(0.5), [0.4, 0.6]]
    assert choice["best"]["peer 60"] == ["a", pytest.approx(0.1), [0.1, 0.1]]
    assert choice["candidates"]["peer ema a"] == {"15": pytest.approx(0.6), "60": pytest.approx(0.1)}
