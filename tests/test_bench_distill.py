"""bench/distill.py's choices, without its classifier: the students it scores (a distillation's final
student at its calls and the earlier stages' at theirs, never the first teacher), its refusal of unknown
samplers, and its report over several trainings (--merge): the teacher's table, the targets' gaps."""

import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

import pytest

from ddpm.config import Config, save_config

ROOT = Path(__file__).resolve().parents[1]
STUDENTS = """
import json, sys
from pathlib import Path
import distill
students = distill._students(Path(sys.argv[1]))
print(json.dumps([[name, str(folder), sample.sampler, sample.steps] for name, folder, sample in students]))
"""


def run_in_bench(*arguments: str) -> subprocess.CompletedProcess:
    """A Python process in bench/'s own environment (its modules import each other as top-level modules)."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "bench"), str(ROOT)])}
    return subprocess.run(
        [sys.executable, *arguments], capture_output=True, text=True, env=env, cwd=ROOT, timeout=300
    )


def test_every_stage_student_is_scored_at_its_steps_and_the_first_teacher_is_not(tmp_path):
    run = tmp_path / "student"
    config = Config.from_dict({"sample": {"sampler": "ddim", "steps": 1}, "output_dir": str(run)})
    save_config(config, run / "config.yaml")
    (run / "distill.json").write_text(json.dumps({"calls": 1, "teacher_steps": 8}))
    for steps in (8, 4, 2):  # the first teacher, then the students of the 4- and 2-step stages
        (run / "teachers" / f"steps-{steps:04d}").mkdir(parents=True)

    done = run_in_bench("-c", STUDENTS, str(run))

    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout) == [
        ["student", str(run), "ddim", 1],
        ["student (stage)", str(run / "teachers" / "steps-0002"), "ddim", 2],
        ["student (stage)", str(run / "teachers" / "steps-0004"), "ddim", 4],
    ]


def test_a_consistency_student_is_scored_with_its_own_sampler_at_its_calls_and_the_other_targets(tmp_path):
    # What sample.py --checkpoint STUDENT samples with no flags: the multistep consistency sampler at the
    # run's sample.calls (here set, so it wins over sample.steps, as in sample.py), never DDIM; then the
    # same sampler at the targets' other budgets, the student's own calls not twice.
    run = tmp_path / "student"
    sample = {"sampler": "consistency", "steps": 7, "calls": 2}
    save_config(Config.from_dict({"sample": sample, "output_dir": str(run)}), run / "config.yaml")
    (run / "distill.json").write_text(json.dumps({"calls": 2, "method": "consistency"}))
    (run / "teacher").mkdir()

    done = run_in_bench("-c", STUDENTS, str(run))

    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout) == [
        ["student", str(run), "consistency", 2],
        ["student (calls)", str(run), "consistency", 1],
        ["student (calls)", str(run), "consistency", 4],
    ]


def test_an_unknown_sampler_is_refused_before_any_work(tmp_path):
    done = run_in_bench(str(ROOT / "bench" / "distill.py"), "teacher", "student", "--samplers", "ddim,bogus")
    assert done.returncode == 2
    assert "unknown --samplers ['bogus']: choose from ddpm, ddim" in done.stderr


def _result(trial: str, model: str, calls: int, kid: float, **setting) -> dict:
    """One scored setting as bench/distill.py writes it to --json."""
    return {
        "trial": trial,
        "model": model,
        "calls": calls,
        "sampler": setting.get("sampler", "ddim"),
        "spacing": setting.get("spacing", "trailing"),
        "n": setting.get("n", 900),
        "cpu_s": 1.0,
        "kid_conv": kid,
        "agreement": 0.9,
        **{key: setting[key] for key in ("student", "run") if key in setting},
    }


def _file(path: Path, results: list[dict], floor: float) -> str:
    sizes = {"mean": 0.0, "std": floor / 2, "abs_p95": floor, "sizes": [900, 897], "splits": 100}
    path.write_text(
        json.dumps(
            {"n_samples": 900, "table_samples": 900, "floor": {"n_samples": sizes}, "results": results}
        )
    )
    return str(path)


def test_merge_matches_each_trials_student_with_its_own_teachers_best_and_judges_the_gap_by_the_floor(
    tmp_path,
):
    # Two trainings, each file one of them: the students scored apart from the teacher's table (as
    # --teacher-calls "" writes them) merge with it by trial.
    teachers, students = [], []
    for trial, (best, student_1, student_2) in {
        "s0 seed 0": (0.001, 0.004, 0.020),
        "s1 seed 1": (0.003, 0.008, 0.030),
    }.items():
        teachers += [
            _result(trial, "teacher table", 5, best + 0.01, sampler="ddim", n=300),
            _result(trial, "teacher table", 5, best, sampler="unipc", n=300),
            _result(trial, "teacher", 5, best, sampler="unipc"),
            _result(trial, "teacher table", 10, best, sampler="unipc", n=300),
            _result(trial, "teacher", 10, best, sampler="unipc"),
        ]
        students += [
            _result(trial, "student", 1, student_1, student=0, run=f"{trial[:2]}-1call"),
            _result(trial, "student (stage)", 2, student_2, student=0, run=f"{trial[:2]}-1call"),
        ]
    teachers += [_result("s2 seed 2", "teacher", 5, 0.5, sampler="unipc")]  # a trial without a student
    files = [
        _file(tmp_path / "teacher.json", teachers, 0.005),
        _file(tmp_path / "students.json", students, 0.005),
    ]

    done = run_in_bench(
        str(ROOT / "bench" / "distill.py"), "--merge", *files, "--json", str(tmp_path / "out.json")
    )

    assert done.returncode == 0, done.stderr
    out = json.loads((tmp_path / "out.json").read_text())
    assert out["table_samples"] == 300
    assert out["teacher_table"]["ddim (trailing)"]["5"] == pytest.approx(
        [0.012, statistics.stdev([0.011, 0.013])]
    )
    targets = {t["calls"]: t for t in out["targets"]}
    assert set(targets) == {1, 2}  # no 4-call student, no 20-call teacher
    assert targets[1]["teacher_calls"] == 5 and targets[2]["teacher_calls"] == 10
    assert targets[1]["gap"] == pytest.approx([0.003, 0.005])  # each trial against its own teacher's best
    assert targets[1]["met"]  # mean gap 0.004 within the floor's 0.005
    assert targets[2]["gap"] == pytest.approx([0.019, 0.027]) and not targets[2]["met"]
    assert (
        "| student 0 | 1 vs 5 | 2 | 0.006 (0.0028) | 0.002 (0.0014) | 0.004 (0.0014) | yes |" in done.stdout
    )


def test_merge_refuses_a_setting_scored_twice(tmp_path):
    twice = [_result("s0 seed 0", "teacher table", 5, 0.01, n=300)] * 2
    done = run_in_bench(
        str(ROOT / "bench" / "distill.py"), "--merge", _file(tmp_path / "a.json", twice, 0.005)
    )
    assert done.returncode == 1
    assert "score the same setting of one trial twice" in done.stderr
