"""Training with learned variance: train.learn_sigma's config checks, the hybrid loss in the trainer, and the
loss-second-moment importance sampler of t (its maths, its exact resume, the losses of every process, and a
NaN loss kept out of its history)."""

import json
import math

import pytest
import torch
from accelerate.state import AcceleratorState
from test_faults import launch, tiny_args
from test_train import tiny_config, weights

from ddpm.config import ConfigError
from ddpm.inference import load_for_sampling
from ddpm.samplers import sample
from ddpm.schedule import NoiseScheduler
from ddpm.training import NonFiniteLossError, Trainer
from ddpm.training.timestep_sampler import HISTORY, UNIFORM_SHARE, LossSecondMomentSampler

LEARNED = [
    "model.out_channels=2",
    "diffusion.variance_type=learned_range",
    "diffusion.num_train_timesteps=4",  # 10 losses per t after 3 steps of 16: the sampler warms up mid-run
    "train.learn_sigma=true",
    "train.timestep_sampling=loss_second_moment",
]


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
    before = sampler.state_dict()
    sampler.update(torch.tensor([0, 1, 2]), torch.tensor([1.0, math.nan, 4.0]))  # records none of them
    sampler.update(torch.tensor([0]), torch.tensor([math.inf]))
    assert sampler.state_dict() == before
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


RECORD_SAMPLER = """
import atexit
import json
import os
from pathlib import Path

import ddpm.training.trainer as trainer
from ddpm.training.timestep_sampler import LossSecondMomentSampler

# Per process: the t it drew and the per-image losses it computed at each micro-batch, and what its sampler
# was given to record.
seen = {"drawn": [], "losses": [], "recorded": []}
sample, update = LossSecondMomentSampler.sample, LossSecondMomentSampler.update
losses_of = trainer.diffusion_losses


def sample_seen(self, n, scheduler, device):
    t, weights = sample(self, n, scheduler, device)
    seen["drawn"].append(t.tolist())
    return t, weights


def losses_seen(*args, **kwargs):
    losses = losses_of(*args, **kwargs)
    seen["losses"].append(losses.tolist())
    return losses


def update_seen(self, t, losses):
    seen["recorded"].append([t.tolist(), losses.tolist()])
    update(self, t, losses)


LossSecondMomentSampler.sample, LossSecondMomentSampler.update = sample_seen, update_seen
trainer.diffusion_losses = losses_seen
atexit.register(lambda: Path(f"seen-{os.environ['RANK']}.json").write_text(json.dumps(seen)))

import train  # noqa: E402

train.main()
"""


def test_two_processes_record_the_losses_of_both_in_the_same_order(tmp_path):
    """accelerate's gather concatenates along dimension 0: each step the sampler of every process records the
    2 x 16 (t, loss) pairs of both processes, process 0's first, and both samplers end identical."""
    (tmp_path / "record.py").write_text(RECORD_SAMPLER)
    run = tmp_path / "run"
    args = tiny_args(
        run, "train.timestep_sampling=loss_second_moment", "train.steps=3", "train.sample_every=0"
    )
    code, out, err = launch(tmp_path / "record.py", *args, cwd=tmp_path, timeout=240)
    assert code == 0, out + err[-3000:]
    seen = [json.loads((tmp_path / f"seen-{rank}.json").read_text()) for rank in (0, 1)]
    assert seen[0]["recorded"] == seen[1]["recorded"] and len(seen[0]["recorded"]) == 3
    assert seen[0]["drawn"] != seen[1]["drawn"]  # each process draws its own t
    for step, (t, losses) in enumerate(seen[0]["recorded"]):
        assert len(t) == len(losses) == 2 * 16
        assert t == seen[0]["drawn"][step] + seen[1]["drawn"][step]
        assert losses == seen[0]["losses"][step] + seen[1]["losses"][step]
    state = json.loads((run / "checkpoints" / "step-0000003" / "trainer_state.json").read_text())
    assert sum(state["timestep_sampler"]["counts"]) == 3 * 2 * 16  # T = 1000: no t holds HISTORY yet


@pytest.mark.parametrize("policy", ["skip", "stop"])
def test_a_nan_per_image_loss_never_enters_the_sampler_history(tmp_path, policy):
    """One image's output made NaN at the first step drawn from the warmed-up sampler (the losses then reach
    the sampler before any finite check): with nan_policy skip the step is skipped and counted, training goes
    on drawing t from finite p_t; with stop, training stops at its next check naming the step, not with
    torch.multinomial's error on the next draw."""
    run = tmp_path / "run"
    config = tiny_config(
        run,
        "diffusion.num_train_timesteps=4",  # the sampler warms up after about 3 steps of 16 images
        "train.timestep_sampling=loss_second_moment",
        f"train.nan_policy={policy}",
        "train.log_every=3",
        "train.sample_every=0",
    )
    trainer = Trainer(config)
    forward, poisoned = trainer.forward, []

    def forward_with_one_nan_image(x, t, y):
        out = forward(x, t, y)
        if trainer.timestep_sampler.warmed_up and not poisoned:
            poisoned.append(trainer.state.step + 1)
            out = torch.cat([torch.full_like(out[:1], math.nan), out[1:]])
        return out

    trainer.forward = forward_with_one_nan_image
    if policy == "stop":
        with pytest.raises(NonFiniteLossError) as error:
            trainer.train()
        bad = poisoned[0]
        assert f"the loss became NaN or infinite at step {bad};" in str(error.value)
        assert bad < 6 and trainer.state.step == math.ceil(bad / 3) * 3  # stopped at the next check
    else:
        last = trainer.train()
        state = json.loads((last / "trainer_state.json").read_text())
        assert poisoned and state["step"] == 6 and state["skipped_steps"] == 1
    sampler = trainer.timestep_sampler
    assert sampler.warmed_up and torch.isfinite(sampler.history).all()
    p = sampler.probabilities()
    assert torch.isfinite(p).all() and p.sum().item() == pytest.approx(1, abs=1e-12)
