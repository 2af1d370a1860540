"""Learning-rate schedules: closed-form values, diffusers' schedules, the config's checks, exact resume."""

import json
import math

import pytest
import torch
from accelerate.state import AcceleratorState
from diffusers.optimization import get_cosine_schedule_with_warmup, get_linear_schedule_with_warmup
from test_train import tiny_config, weights

from ddpm.config import ConfigError, load_config
from ddpm.lr_schedule import LR_SCHEDULES, learning_rate
from ddpm.training import Trainer

SETTINGS = {"lr": 1.0, "steps": 10, "warmup_steps": 2, "lr_min": 0.1}


@pytest.mark.parametrize(
    "schedule, expected",
    [
        # step: 0 and 1 warm up, (s + 1) / 2; then p = (s - 2) / 8: 0, 1/4, 1/2, 7/8 at steps 2, 4, 6, 9
        ("constant", {0: 0.5, 1: 1.0, 2: 1.0, 4: 1.0, 6: 1.0, 9: 1.0}),
        ("cosine", {0: 0.5, 1: 1.0, 2: 1.0, 4: 0.1 + 0.9 * (1 + math.sqrt(0.5)) / 2, 6: 0.55, 9: 0.134254}),
        ("linear", {0: 0.5, 1: 1.0, 2: 1.0, 4: 0.775, 6: 0.55, 9: 0.2125}),
    ],
)
def test_the_schedules_take_their_closed_form_values(schedule, expected):
    lr_min = SETTINGS["lr_min"] if schedule != "constant" else 0.0
    got = {
        step: learning_rate(step, **{**SETTINGS, "lr_min": lr_min}, schedule=schedule) for step in expected
    }
    assert got == pytest.approx(expected, abs=1e-6)


@pytest.mark.parametrize(
    "schedule, theirs",
    [("cosine", get_cosine_schedule_with_warmup), ("linear", get_linear_schedule_with_warmup)],
)
def test_the_decay_is_diffusers_decay_after_the_warm_up(schedule, theirs):
    # diffusers' warm-up starts at 0 (step / warmup) where ours starts at lr / warmup; the decays agree.
    optimizer = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=2e-4)
    reference = theirs(optimizer, num_warmup_steps=50, num_training_steps=1000)
    expected = []
    for _ in range(1000):
        expected.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        reference.step()
    ours = [learning_rate(s, lr=2e-4, steps=1000, warmup_steps=50, schedule=schedule) for s in range(1000)]
    assert ours[50:] == pytest.approx(expected[50:], rel=1e-9, abs=1e-15)
    assert ours[:50] == pytest.approx([2e-4 * (s + 1) / 50 for s in range(50)])


def test_an_unknown_schedule_names_the_valid_ones():
    with pytest.raises(ValueError, match=r"unknown lr_schedule 'cosin'; valid: constant, cosine, linear"):
        learning_rate(0, lr=1.0, steps=10, schedule="cosin")
    assert LR_SCHEDULES == ("constant", "cosine", "linear")


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["train.lr_schedule=cosin"], r"'train\.lr_schedule' .*expected one of constant, cosine, linear"),
        (["train.lr_min=-1e-6"], r"'train\.lr_min' .*expected a number >= 0"),
        (
            ["train.lr_min=1e-5"],
            r"train\.lr_min=1\.0e-05 is only used by a decaying schedule: set train\.lr_sch",
        ),
        (
            ["train.lr_schedule=cosine", "train.lr=1e-4", "train.lr_min=1e-3"],
            r"train\.lr_min=0\.001 is above train\.lr=0\.0001: .*lower train\.lr_min",
        ),
    ],
)
def test_the_config_refuses_settings_that_cannot_work(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, overrides)
    assert load_config(None, ["train.lr_schedule=linear", "train.lr_min=1e-5"]).train.lr_min == 1e-5


def test_a_resumed_decaying_run_takes_the_same_learning_rates_and_ends_with_the_same_weights(tmp_path):
    schedule = ["train.lr_schedule=cosine", "train.lr_min=1e-5", "train.sample_every=0"]
    straight = Trainer(tiny_config(tmp_path / "a", *schedule)).train()
    AcceleratorState._reset_state(reset_partial_state=True)
    # Continue run a's step-3 checkpoint in another directory: what --resume does after a stop at step 3.
    middle = straight.parent / "step-0000003"
    resumed = Trainer(tiny_config(tmp_path / "b", *schedule), resume=str(middle)).train()

    a, b = weights(straight), weights(resumed)
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=0, msg=key)
    logged = {}
    for run in ("a", "b"):
        records = (tmp_path / run / "log.jsonl").read_text().splitlines()
        logged[run] = {r["step"]: r["lr"] for r in map(json.loads, records)}
    config = tiny_config(tmp_path / "a", *schedule).train
    expected = {
        step: learning_rate(
            step - 1, lr=config.lr, steps=6, warmup_steps=4, schedule="cosine", lr_min=config.lr_min
        )
        for step in range(1, 7)
    }
    assert logged["a"] == pytest.approx(expected, rel=1e-12)
    assert logged["b"] == {step: logged["a"][step] for step in (4, 5, 6)}
    assert logged["a"][6] < logged["a"][5] == logged["a"][4] == config.lr  # warm-up to step 4, then decay
