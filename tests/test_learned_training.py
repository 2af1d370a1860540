"""Training with learned variance: train.learn_sigma's config checks, the hybrid loss in the trainer, and the
loss-second-moment importance sampler of t (its maths and its exact resume)."""

import json

import pytest
import torch
from accelerate.state import AcceleratorState
from test_train import tiny_config, weights

from ddpm.config import ConfigError
from ddpm.inference import load_for_sampling
from ddpm.samplers import sample
from ddpm.schedule import NoiseScheduler
from ddpm.training import Trainer
from ddpm.training.timestep_sampler import HISTORY, UNIFORM_SHARE, LossSecondMomentSampler

LEARNED = [
    "model.out_channels=2",
    "diffusion.variance_type=learned_range",
    "diffusion.num_train_timesteps=4",  # 10 losses per t after 3 steps of 16: the sampler warms up mid-run
    "train.learn_sigma=true",
    "train.timestep_sampling=loss_second_moment",
]


@pytest.fixture(autouse=True)
def fresh_accelerator_state():
    yield
    AcceleratorState._reset_state(reset_partial_state=True)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (
            ["train.learn_sigma=true"],
            r"model.out_channels=1 but data.channels=1 \(train.learn_sigma=true: the prediction, then the "
            r"variance values\): set model.out_channels=2 .*train.learn_sigma=true but "
            r"diffusion.variance_type=fixed_small \(NoiseScheduler's default\): .* set "
            "diffusion.variance_type=learned_range or train.learn_sigma=false",
        ),
        (
            ["diffusion.variance_type=learned_range", "model.out_channels=2"],
            r"model.out_channels=2 but data.channels=1: set model.out_channels=1 .*"
            r"train.learn_sigma=false but diffusion.variance_type=learned_range: .* "
            "set train.learn_sigma=true",
        ),
        (
            ["train.learn_sigma=true", "diffusion.variance_type=learned_range"],
            r"^model.out_channels=1 but data.channels=1 \(train.learn_sigma=true.*set model.out_channels=2",
        ),
        (["train.timestep_sampling=importance"], "expected one of uniform, loss_second_moment"),
    ],
)
def test_learn_sigma_is_refused_unless_the_model_and_the_schedule_learn_the_variance(
    tmp_path, overrides, message
):
    with pytest.raises(ConfigError, match=message):
        tiny_config(tmp_path / "run", *overrides)


def test_sampler_is_uniform_until_every_t_holds_its_history_then_follows_the_rms_loss():
    scheduler = NoiseScheduler(num_train_timesteps=3)
    sampler = LossSecondMomentSampler(3)
    for _ in range(HISTORY - 1):
        sampler.update(torch.tensor([0, 1, 2]), torch.tensor([1.0, 2.0, 4.0]))
    assert not sampler.warmed_up
    torch.testing.assert_close(sampler.probabilities(), torch.full((3,), 1 / 3, dtype=torch.float64))
    torch.manual_seed(0)
    t, w = sampler.sample(5, scheduler, torch.device("cpu"))
    torch.manual_seed(0)
    assert torch.equal(t, scheduler.sample_timesteps(5)) and torch.equal(w, torch.ones(5))
    sampler.update(torch.tensor([0, 1, 2, 2]), torch.tensor([1.0, 2.0, 4.0, 7.0]))  # t = 2 drops its oldest
    assert sampler.warmed_up and sampler.history[2, -1] == 7.0 and sampler.history[2, 0] == 4.0
    rms = torch.tensor([1.0, 2.0, ((9 * 16 + 49) / 10) ** 0.5], dtype=torch.float64)
    expected = (1 - UNIFORM_SHARE) * rms / rms.sum() + UNIFORM_SHARE / 3
    torch.testing.assert_close(sampler.probabilities(), expected)
    t, w = sampler.sample(4000, scheduler, torch.device("cpu"))
    torch.testing.assert_close(w, (1 / (3 * expected[t])).float())
    assert torch.bincount(t, minlength=3).double().div(4000).sub(expected).abs().max() < 0.03
    again = LossSecondMomentSampler(3)
    again.load_state_dict(json.loads(json.dumps(sampler.state_dict())))
    assert torch.equal(again.history, sampler.history) and torch.equal(again.counts, sampler.counts)
    with pytest.raises(ValueError, match=r"history has shape \(3, 10\), expected \(4, 10\)"):
        LossSecondMomentSampler(4).load_state_dict(sampler.state_dict())


def test_learned_variance_run_resumes_exactly_and_samples_without_flags(tmp_path):
    """The hybrid loss with importance-sampled t: a run stopped at step 3 (the sampler just warmed up) and
    resumed ends with the same weights as one never stopped; its checkpoint carries the loss history and a
    noise_scheduler.json with learned_range, so sampling needs no flag."""
    straight = Trainer(tiny_config(tmp_path / "a", *LEARNED)).train()
    AcceleratorState._reset_state(reset_partial_state=True)
    Trainer(tiny_config(tmp_path / "b", *LEARNED, "train.steps=3")).train()
    AcceleratorState._reset_state(reset_partial_state=True)
    resumed = Trainer(tiny_config(tmp_path / "b", *LEARNED), resume="latest").train()
    a, b = weights(straight), weights(resumed)
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=0, msg=key)
    state = json.loads((straight / "trainer_state.json").read_text())["timestep_sampler"]
    assert state["counts"] == [HISTORY] * 4
    log = [json.loads(line) for line in (tmp_path / "a" / "log.jsonl").read_text().splitlines()]
    assert all(r["loss"] > 0 for r in log if "loss" in r)
    loaded = load_for_sampling(tmp_path / "a")
    assert loaded.scheduler.variance_type == "learned_range" and loaded.model.config["out_channels"] == 2
    images = sample(
        loaded.model, loaded.scheduler, (2, 1, 8, 8), sampler="ddpm", steps=4, y=torch.tensor([1, 2])
    )
    assert torch.isfinite(images).all()
