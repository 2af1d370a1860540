"""Training and sampling on a shared CPU: one training run alone, two at once, and one training run beside one
sampling run, under each OpenMP wait policy and thread setting.

    python bench/cpu_load.py [--steps 200] [--rounds 3] [--settings unset,libgomp,passive,...]
        [--sample-n 2048] [--json bench/results/cpu_load.json] [--md bench/results/cpu_load.md]

Every run is `python train.py` (configs/digits.yaml, --steps steps, a fresh output_dir, no grids or
trackers, one checkpoint and one log record at the end) or `python sample.py` (--sample-n images of a
checkpoint made once at the start) in a subprocess of its own, so that its setting is in its environment
before torch loads: GNU OpenMP (libgomp, which torch's CPU wheels ship) reads OMP_WAIT_POLICY and
GOMP_SPINCOUNT only then. Each child runs with OMP_DISPLAY_ENV=verbose and the benchmark records the spin
count its runtime reports, so a setting that did not take is seen.

The settings (--settings, in that order):
- "unset": neither variable set, which is what a user gets: ddpm's own default;
- "libgomp": GOMP_SPINCOUNT=300000, libgomp's default when neither variable is set (a waiting thread spins
  300,000 times, about a millisecond, before it sleeps; libgomp's env.c), i.e. torch's behaviour without
  ddpm's default;
- "passive": OMP_WAIT_POLICY=PASSIVE (spin count 0: a waiting thread sleeps at once);
- "spin-N": GOMP_SPINCOUNT=N (N may end in k: spin-10k);
- "1-thread": libgomp's default spin count with one thread per process (train.cpu_threads=1,
  OMP_NUM_THREADS=1), which leaves one core to each of two runs.

Per round (--rounds; the settings in turn, in reverse order every other round, so that a drift of the machine
falls on all of them alike), per setting: one training run alone; two started together; one sampling run
alone; one training and one sampling run started together. Reported per setting, over rounds (mean, and the
min-max range as the spread): the wall time of a training run alone and its ratio to "libgomp" alone in the
same round (the cost of the setting to a run alone); the wall time of each run of the pair and pair / alone
(a fair share of two cores is 2.0); the training and the sampling run's wall time beside each other over their
own time alone. The training loop's own time (from log.jsonl, without start-up) is in the JSON.

The machine must be quiet: beside every measurement the benchmark records /proc/loadavg before it and the
cores that other processes used during it (busy CPU time from /proc/stat less this benchmark's children's
CPU time, over the wall time). The report is marked preliminary when other processes used more than
--quiet-cores on average over any measurement.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import common

from ddpm.config import load_config
from ddpm.training.run_log import LOG

# The variables a setting may set; the children get none of them from this process's environment.
OPENMP_VARIABLES = ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT", "OMP_NUM_THREADS")
LIBGOMP_DEFAULT_SPINS = "300000"


@dataclass(frozen=True)
class Setting:
    """Environment variables and training overrides of one setting."""

    env: dict[str, str] = field(default_factory=dict)
    train: tuple[str, ...] = ()


def main() -> None:
    args = parse_args()
    settings = {name: setting_named(name) for name in args.settings}
    with tempfile.TemporaryDirectory(prefix="cpu_load-") as tmp:
        workdir = Path(tmp)
        checkpoint = Path(_train_once(workdir, Setting(), steps=2)["run_dir"])
        started = _loadavg()
        measurements = []
        for r in range(args.rounds):
            order = list(settings) if r % 2 == 0 else list(reversed(settings))
            for name in order:
                measurements += measure_setting(
                    name, settings[name], workdir / f"r{r}-{name}", checkpoint=checkpoint, round_=r, args=args
                )
                print(_progress_line(measurements[-4:]), file=sys.stderr, flush=True)
    report = summarize(measurements, list(settings), quiet_cores=args.quiet_cores)
    payload = {
        "options": vars(args),
        "environment": {"cpu": common._cpu_name(), "cores": _cores(), "loadavg_at_start": started},
        "summary": report,
        "measurements": measurements,
    }
    common.write_json(args.json, payload)
    text = markdown(report, args)
    print(text)
    if args.md:
        Path(args.md).parent.mkdir(parents=True, exist_ok=True)
        Path(args.md).write_text(text + "\n")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--steps", type=int, default=200, help="training steps per run (default: %(default)s)"
    )
    parser.add_argument(
        "--rounds", type=int, default=3, help="rounds over the settings (default: %(default)s)"
    )
    parser.add_argument(
        "--settings",
        type=lambda s: s.split(","),
        default=["unset", "libgomp", "passive", "spin-10k", "1-thread"],
        help="comma-separated settings, see above (default: %(default)s)",
    )
    parser.add_argument(
        "--sample-n", type=int, default=2048, help="images per sampling run (default: %(default)s)"
    )
    parser.add_argument(
        "--quiet-cores",
        type=float,
        default=0.15,
        help="other processes' mean CPU use (cores) above which the report is preliminary "
        "(default: %(default)s)",
    )
    parser.add_argument("--json", default="bench/results/cpu_load.json", help="(default: %(default)s)")
    parser.add_argument("--md", default="bench/results/cpu_load.md", help="(default: %(default)s)")
    args = parser.parse_args(argv)
    for name in args.settings:
        setting_named(name)
    return args


def setting_named(name: str) -> Setting:
    """The Setting called `name` (see the module docstring); an unknown name exits naming the valid ones."""
    if name == "unset":
        return Setting()
    if name == "libgomp":
        return Setting({"GOMP_SPINCOUNT": LIBGOMP_DEFAULT_SPINS})
    if name == "passive":
        return Setting({"OMP_WAIT_POLICY": "PASSIVE"})
    if name == "1-thread":
        return Setting(
            {"GOMP_SPINCOUNT": LIBGOMP_DEFAULT_SPINS, "OMP_NUM_THREADS": "1"}, ("train.cpu_threads=1",)
        )
    count = name.removeprefix("spin-")
    if name.startswith("spin-") and count.removesuffix("k").isdigit():
        return Setting({"GOMP_SPINCOUNT": count.replace("k", "000")})
    sys.exit(
        f"error: unknown setting {name!r}; use unset, libgomp, passive, 1-thread or spin-N (e.g. spin-10k)"
    )


def measure_setting(
    name: str, setting: Setting, workdir: Path, *, checkpoint: Path, round_: int, args: argparse.Namespace
) -> list[dict]:
    """The four measurements of one setting in one round: "alone", "pair", "sample alone" and "train+sample",
    each a dict of its runs (wall s, CPU s, loop s for training, the runtime's spin count) and the load."""
    workdir.mkdir(parents=True)
    train = lambda tag: _train_command(workdir / tag, setting, args.steps)  # noqa: E731
    sample = lambda tag: _sample_command(workdir / tag, checkpoint, args.sample_n)  # noqa: E731
    plans = {
        "alone": [train("alone")],
        "pair": [train("pair-a"), train("pair-b")],
        "sample alone": [sample("sample-alone")],
        "train+sample": [train("beside"), sample("sample-beside")],
    }
    return [
        {"round": round_, "setting": name, "kind": kind, **_run_together(commands, setting, workdir)}
        for kind, commands in plans.items()
    ]


def summarize(measurements: list[dict], settings: list[str], *, quiet_cores: float) -> dict:
    """Per setting, over rounds: [mean, min, max] of each reported quantity (see the module docstring), the
    highest loadavg seen before its measurements and the most cores other processes used during one; and
    whether every measurement was quiet."""
    by = {(m["round"], m["setting"], m["kind"]): m for m in measurements}
    rounds = sorted({m["round"] for m in measurements})
    walls = lambda kind, i, s: [by[r, s, kind]["runs"][i]["wall_s"] for r in rounds]  # noqa: E731
    report: dict = {"settings": {}}
    for s in settings:
        alone = walls("alone", 0, s)
        pair = [(a + b) / 2 for a, b in zip(walls("pair", 0, s), walls("pair", 1, s), strict=True)]
        sample_alone = walls("sample alone", 0, s)
        entry = {
            "alone_s": _spread(alone),
            "pair_s": _spread(pair),
            "pair_over_alone": _spread([p / a for p, a in zip(pair, alone, strict=True)]),
            "train_beside_sampling_over_alone": _spread(
                [t / a for t, a in zip(walls("train+sample", 0, s), alone, strict=True)]
            ),
            "sampling_beside_training_over_alone": _spread(
                [t / a for t, a in zip(walls("train+sample", 1, s), sample_alone, strict=True)]
            ),
            "sample_alone_s": _spread(sample_alone),
            "spin_counts": sorted(
                {run["spin_count"] for m in measurements if m["setting"] == s for run in m["runs"]}
            ),
            "max_loadavg_before": max(float(by[k]["loadavg_before"].split()[0]) for k in by if k[1] == s),
            "max_other_cores": max(by[k]["other_cores"] for k in by if k[1] == s),
        }
        if "libgomp" in settings:
            entry["alone_over_libgomp_alone"] = _spread(
                [a / b for a, b in zip(alone, walls("alone", 0, "libgomp"), strict=True)]
            )
        report["settings"][s] = entry
    report["quiet"] = all(m["other_cores"] <= quiet_cores for m in measurements)
    return report


def markdown(report: dict, args: argparse.Namespace) -> str:
    """The summary as a markdown table with a line saying how quiet the machine was."""
    header = (
        "setting",
        "spin count",
        "alone (s)",
        "alone / libgomp alone",
        "pair, each (s)",
        "pair / alone",
        "training beside sampling / alone",
        "sampling beside training / alone",
        "others' cores (max)",
        "loadavg before (max)",
    )
    rows = []
    for name, e in report["settings"].items():
        rows.append(
            [
                name,
                "/".join(e["spin_counts"]),
                _cell(e["alone_s"], ".1f"),
                _cell(e["alone_over_libgomp_alone"], ".2f") if "alone_over_libgomp_alone" in e else "",
                _cell(e["pair_s"], ".1f"),
                _cell(e["pair_over_alone"], ".2f"),
                _cell(e["train_beside_sampling_over_alone"], ".2f"),
                _cell(e["sampling_beside_training_over_alone"], ".2f"),
                f"{e['max_other_cores']:.2f}",
                f"{e['max_loadavg_before']:.2f}",
            ]
        )
    verdict = (
        "The machine was quiet"
        if report["quiet"]
        else "PRELIMINARY: other processes used the CPU during some measurements"
    )
    return (
        f"{args.steps} training steps of configs/digits.yaml per run, sampling {args.sample_n} images; "
        f"{args.rounds} rounds; mean (min-max over rounds). {verdict} (limit {args.quiet_cores} cores).\n\n"
        + common.markdown_table(header, rows)
    )


def _train_command(run_dir: Path, setting: Setting, steps: int) -> tuple[list[str], Path]:
    """`python train.py` on the default config, `steps` steps into `run_dir`, with one log record and one
    checkpoint at the end; and the run directory."""
    overrides = [
        f"output_dir={run_dir}",
        f"train.steps={steps}",
        f"train.log_every={steps}",
        f"train.checkpoint_every={steps}",
        "train.sample_every=0",
        "train.log_with=none",
        *setting.train,
    ]
    return [sys.executable, str(common.REPO / "train.py"), *overrides], run_dir


def _sample_command(out_dir: Path, checkpoint: Path, n: int) -> tuple[list[str], None]:
    out = out_dir / "grid.png"
    return [
        sys.executable,
        str(common.REPO / "sample.py"),
        "--checkpoint",
        str(checkpoint),
        "--n",
        str(n),
        "--out",
        str(out),
    ], None


def _train_once(workdir: Path, setting: Setting, *, steps: int) -> dict:
    """A short training run (for the checkpoint the sampling runs read)."""
    command = _train_command(workdir / "checkpoint-run", setting, steps)
    return _run_together([command], setting, workdir)["runs"][0]


def _run_together(commands: list[tuple[list[str], Path | None]], setting: Setting, workdir: Path) -> dict:
    """Start `commands` at once with the setting's environment and wait for all of them: each run's wall
    time, CPU time, spin count (and loop time for a training run); the loadavg before, and the cores that
    other processes used meanwhile."""
    env = {k: v for k, v in os.environ.items() if k not in OPENMP_VARIABLES}
    env.update(setting.env)
    env["OMP_DISPLAY_ENV"] = "verbose"
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(common.REPO), os.environ.get("PYTHONPATH")]))
    loadavg = _loadavg()
    busy_before, children_before = _busy_cpu_s(), _children_cpu_s()
    runs: list[dict] = [{} for _ in commands]
    start = time.perf_counter()
    threads = []
    for i, (command, run_dir) in enumerate(commands):
        stderr = open(workdir / f"stderr-{time.monotonic_ns()}-{i}.txt", "w+")  # noqa: SIM115
        proc = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=stderr, cwd=workdir)
        threads.append(threading.Thread(target=_wait, args=(proc, stderr, start, runs[i], run_dir)))
        threads[-1].start()
    for thread in threads:
        thread.join()
    failed = [run["error"] for run in runs if "error" in run]
    if failed:
        raise RuntimeError("\n".join(failed))
    wall = time.perf_counter() - start
    others = (_busy_cpu_s() - busy_before) - (_children_cpu_s() - children_before)
    return {"runs": runs, "loadavg_before": loadavg, "other_cores": max(others, 0.0) / wall}


def _wait(proc: subprocess.Popen, stderr, start: float, run: dict, run_dir: Path | None) -> None:
    """Wait for `proc` (its own resource usage, which subprocess does not give) and fill in `run`."""
    _, status, usage = os.wait4(proc.pid, 0)
    run["wall_s"] = time.perf_counter() - start
    proc.returncode = os.waitstatus_to_exitcode(status)
    stderr.seek(0)
    text = stderr.read()
    stderr.close()
    if proc.returncode != 0:
        run["error"] = f"{' '.join(proc.args)} exited with {proc.returncode}:\n{text[-2000:]}"
        return
    run["cpu_s"] = usage.ru_utime + usage.ru_stime
    run["spin_count"] = _reported(text, "GOMP_SPINCOUNT")
    if run_dir is not None:
        record = json.loads((run_dir / LOG).read_text().splitlines()[-1])
        run["loop_s"] = record["step"] * _images_per_step(run_dir) / record["images_per_s"]
        run["run_dir"] = str(run_dir)


def _images_per_step(run_dir: Path) -> int:
    config = load_config(run_dir / "config.yaml")
    return config.data.batch_size * config.train.grad_accum


def _reported(stderr: str, variable: str) -> str:
    """The value libgomp's OMP_DISPLAY_ENV report gives `variable` ("?" if it printed none)."""
    for line in stderr.splitlines():
        if line.strip().startswith(f"{variable} = "):
            return line.split("=", 1)[1].strip().strip("'")
    return "?"


def _spread(values: list[float]) -> list[float]:
    return [statistics.fmean(values), min(values), max(values)]


def _cell(spread: list[float], fmt: str) -> str:
    mean, low, high = spread
    return f"{mean:{fmt}} ({low:{fmt}}-{high:{fmt}})"


def _progress_line(measurements: list[dict]) -> str:
    m = measurements[0]
    walls = "; ".join(
        f"{x['kind']}: " + ", ".join(f"{r['wall_s']:.1f}" for r in x["runs"]) for x in measurements
    )
    others = max(x["other_cores"] for x in measurements)
    load = m["loadavg_before"]
    return f"round {m['round']} {m['setting']}: {walls} s (others' cores up to {others:.2f}, loadavg {load})"


def _loadavg() -> str:
    return Path("/proc/loadavg").read_text().strip()


def _busy_cpu_s() -> float:
    """CPU seconds all processes have used since boot (every core; /proc/stat less idle and iowait)."""
    fields = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    idle = fields[3] + fields[4]
    return (sum(fields[:8]) - idle) / os.sysconf("SC_CLK_TCK")


def _children_cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def _cores() -> int:
    return len(os.sched_getaffinity(0))


if __name__ == "__main__":
    main()
