"""bench/distill.py's choices, without its classifier: the students it scores (a distillation's final
student at its calls and the earlier stages' at theirs, never the first teacher) and its refusal of unknown
samplers."""

import json
import os
import subprocess
import sys
from pathlib import Path

from ddpm.config import Config, save_config

ROOT = Path(__file__).resolve().parents[1]
STUDENTS = """
import json, sys
from pathlib import Path
import distill
students = distill._students(Path(sys.argv[1]))
print(json.dumps([[name, str(folder), calls] for name, folder, calls in students]))
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
        ["student student", str(run), 1],
        ["student student (stage)", str(run / "teachers" / "steps-0002"), 2],
        ["student student (stage)", str(run / "teachers" / "steps-0004"), 4],
    ]


def test_an_unknown_sampler_is_refused_before_any_work(tmp_path):
    done = run_in_bench(str(ROOT / "bench" / "distill.py"), "teacher", "student", "--samplers", "ddim,bogus")
    assert done.returncode == 2
    assert "unknown --samplers ['bogus']: choose from ddpm, ddim" in done.stderr
