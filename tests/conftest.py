"""Fixtures every test file shares."""

from pathlib import Path

import pytest
import yaml
from accelerate.state import AcceleratorState

from ddpm.config import load_config
from ddpm.training import Trainer

ROOT = Path(__file__).resolve().parents[1]
# The tiny network of the test runs: 8x8 digits, 8 base channels (every file's tiny run starts from it).
TINY_MODEL = [
    "data.image_size=8",
    "data.batch_size=16",
    "model.image_size=8",
    "model.base_channels=8",
    "model.channel_mult=[1,2]",
    "model.norm_groups=4",
]
# A tiny digits run (8x8, 10 steps): the teacher of the distillation tests.
TINY_TEACHER = [
    *TINY_MODEL,
    "model.attention_resolutions=[4]",
    "train.steps=10",
    "train.checkpoint_every=10",
    "train.sample_every=0",
    "train.log_every=1",
    "train.log_with=none",
]


@pytest.fixture(autouse=True)
def fresh_accelerator_state():
    """Each Trainer builds an Accelerator; its process-wide state must not leak into the next test."""
    yield
    AcceleratorState._reset_state(reset_partial_state=True)


@pytest.fixture(scope="module")
def teacher(tmp_path_factory) -> Path:
    """A tiny class-conditional v-prediction run on the digits (configs/digits.yaml, 10 steps), trained once
    per test module that asks for it."""
    run = tmp_path_factory.mktemp("teacher") / "run"
    config = load_config(ROOT / "configs" / "digits.yaml", [*TINY_TEACHER, f"output_dir={run}"])
    Trainer(config).train()
    AcceleratorState._reset_state(reset_partial_state=True)
    return run


@pytest.fixture(scope="module")
def edm_teacher(tmp_path_factory) -> Path:
    """The tiny run of `teacher` with the EDM formulation (diffusion: {formulation: edm}, its defaults),
    trained once per test module that asks for it."""
    folder = tmp_path_factory.mktemp("edm_teacher")
    raw = yaml.safe_load((ROOT / "configs" / "digits.yaml").read_text())
    (folder / "digits_edm.yaml").write_text(yaml.safe_dump({**raw, "diffusion": {"formulation": "edm"}}))
    run = folder / "run"
    Trainer(load_config(folder / "digits_edm.yaml", [*TINY_TEACHER, f"output_dir={run}"])).train()
    AcceleratorState._reset_state(reset_partial_state=True)
    return run
