"""The numbers of training: the EMA against its closed form, gradient accumulation against one large batch,
the loss (ddpm.losses) against closed forms and the Trainer's loss against a hand computation, the logged
loss, and mixed precision end to end."""

import json
import math

import pytest
import torch
from accelerate.state import AcceleratorState
from test_train import tiny_config, weights

from ddpm.ema import EMA
from ddpm.losses import diffusion_loss, drop_labels
from ddpm.run_dir import list_checkpoints
from ddpm.schedule import NoiseScheduler
from ddpm.training import Trainer


class Scalar(torch.nn.Module):
    """One scalar parameter and one buffer: the smallest network an EMA can average."""

    def __init__(self, value: float):
        super().__init__()
        self.theta = torch.nn.Parameter(torch.tensor(value, dtype=torch.float64))
        self.register_buffer("count", torch.tensor(0))


def closed_form_ema(thetas: list[float], decays: list[float]) -> float:
    """ema_n = (prod_{k=1..n} d_k) theta_0 + sum_{k=1..n} (1 - d_k) (prod_{j=k+1..n} d_j) theta_k."""
    n = len(thetas) - 1
    value = math.prod(decays[1 : n + 1]) * thetas[0]
    for k in range(1, n + 1):
        value += (1 - decays[k]) * math.prod(decays[k + 1 : n + 1]) * thetas[k]
    return value


@pytest.mark.parametrize("warmup", [True, False])
def test_ema_follows_the_closed_form_of_its_decay_schedule(warmup):
    decay, steps = 0.9, 40  # the warm-up (1 + n) / (10 + n) passes 0.9 at n = 80: all of it is warm-up
    thetas = [math.sin(0.3 * k) + 0.05 * k for k in range(steps + 1)]
    model = Scalar(thetas[0])
    ema = EMA(model, decay, warmup=warmup)
    decays = [math.nan] + [min(decay, (1 + k) / (10 + k)) if warmup else decay for k in range(1, steps + 1)]
    for k in range(1, steps + 1):
        with torch.no_grad():
            model.theta.fill_(thetas[k])
            model.count.fill_(k)
        ema.update(model)
        assert ema.updates == k and isinstance(ema.updates, int)  # counted on the host
        torch.testing.assert_close(
            ema.module.theta.item(), closed_form_ema(thetas[: k + 1], decays), rtol=1e-12, atol=1e-12
        )
        assert ema.module.count.item() == k  # buffers are copied, not averaged
    assert not ema.module.theta.requires_grad and not ema.module.training


def test_ema_decay_is_capped_after_the_warm_up():
    ema = EMA(Scalar(0.0), 0.99, warmup=True)
    assert [ema.decay_at(n) for n in (1, 10, 890, 891, 10_000)] == [
        2 / 11,
        11 / 20,
        891 / 900,
        0.99,
        0.99,
    ]
    assert EMA(Scalar(0.0), 0.99, warmup=False).decay_at(1) == 0.99


def test_trainer_ema_is_the_closed_form_of_the_raw_weights(tmp_path):
    """Each optimizer step updates the EMA once, from the weights after that step, with the warm-up."""
    trainer = Trainer(tiny_config(tmp_path / "run", "train.ema_decay=0.9", "train.sample_every=0"))
    model = trainer.accelerator.unwrap_model(trainer.model)
    trajectory = [model.conv_out.bias.detach().double().clone()]
    update = trainer.ema.update

    def recording_update(network):
        trajectory.append(network.conv_out.bias.detach().double().clone())
        update(network)

    trainer.ema.update = recording_update
    trainer.train()
    decays = [math.nan] + [min(0.9, (1 + k) / (10 + k)) for k in range(1, len(trajectory))]
    expected = [closed_form_ema([float(w[i]) for w in trajectory], decays) for i in range(len(trajectory[0]))]
    assert len(trajectory) == 7
    torch.testing.assert_close(
        trainer.ema.module.conv_out.bias.double(), torch.tensor(expected, dtype=torch.float64)
    )


# -- gradient accumulation and the loss


def fixed_batch(trainer: Trainer, n: int):
    """n images and labels of the dataset with fixed noise, timesteps and (undropped) labels."""
    x0 = torch.stack([trainer.dataset[i][0] for i in range(n)])
    labels = torch.tensor([int(trainer.dataset[i][1]) for i in range(n)])
    generator = torch.Generator().manual_seed(1)
    noise = torch.randn(x0.shape, generator=generator)
    t = trainer.scheduler.sample_timesteps(n, generator=generator)
    return x0, labels, noise, t


def gradients_and_update(grad_accum: int, batch: int, run) -> tuple[list[torch.Tensor], dict]:
    """One optimizer step over the same 16 images: `grad_accum` micro-batches of `batch` images."""
    trainer = Trainer(
        tiny_config(run, f"train.grad_accum={grad_accum}", f"data.batch_size={batch}", "model.dropout=0")
    )
    x0, labels, noise, t = fixed_batch(trainer, 16)
    starts = iter(range(0, 16, batch))

    def fixed_loss(x0_micro, labels_micro):
        rows = slice(start := next(starts), start + batch)
        train = trainer.config.train
        return diffusion_loss(
            trainer._predict,
            trainer.scheduler,
            x0_micro,
            noise[rows],
            t[rows],
            labels_micro,
            weighting=train.loss_weighting,
            min_snr_gamma=train.min_snr_gamma,
        )

    trainer._loss = fixed_loss
    seen = []
    step = trainer.optimizer.step

    def recording_step(*args, **kwargs):
        if trainer.accelerator.sync_gradients:  # Accelerate's step is a no-op on the other micro-batches
            seen.extend(p.grad.clone() for p in trainer.model.parameters())
        return step(*args, **kwargs)

    trainer.optimizer.step = recording_step
    for start in range(0, 16, batch):
        applied = trainer._train_micro_step(x0[start : start + batch], labels[start : start + batch])
    assert applied and trainer.accelerator.sync_gradients
    state = {k: v.clone() for k, v in trainer.accelerator.unwrap_model(trainer.model).state_dict().items()}
    AcceleratorState._reset_state(reset_partial_state=True)
    return seen, state


def test_two_accumulated_micro_batches_give_the_gradients_of_one_large_batch(tmp_path):
    grads_accumulated, after_accumulated = gradients_and_update(2, 8, tmp_path / "a")
    grads_large, after_large = gradients_and_update(1, 16, tmp_path / "b")
    assert len(grads_accumulated) == len(grads_large) > 0
    assert any(g.abs().sum() > 0 for g in grads_large)
    for a, b in zip(grads_accumulated, grads_large, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
    for key in after_large:
        torch.testing.assert_close(after_accumulated[key], after_large[key], rtol=1e-5, atol=1e-6, msg=key)


def test_trainer_loss_draws_noise_then_timesteps_then_label_dropout_and_applies_min_snr_weights(tmp_path):
    trainer = Trainer(
        tiny_config(
            tmp_path / "run",
            "model.dropout=0",
            "train.loss_weighting=min_snr",
            "train.min_snr_gamma=2",
            "train.label_dropout=0.5",
        )
    )
    assert trainer.scheduler.prediction_type == "v_prediction"
    x0, labels, _, _ = fixed_batch(trainer, 16)
    torch.manual_seed(3)
    loss = trainer._loss(x0, labels)

    # The draws of a step, in the order that checkpoints replay: eps, then t, then the label dropout.
    torch.manual_seed(3)
    noise = torch.randn_like(x0)
    t = torch.randint(0, trainer.scheduler.num_train_timesteps, (16,))
    y = drop_labels(labels, 0.5, trainer.null_class)
    assert (y == trainer.null_class).any() and (y == labels).any()
    # By hand: x_t = sqrt(ab) x0 + sqrt(1 - ab) eps; v = sqrt(ab) eps - sqrt(1 - ab) x0 (Salimans & Ho 2022);
    # w = min(snr, gamma) / (snr + 1) with snr = ab / (1 - ab) (Hang et al. 2023).
    ab = trainer.scheduler.alphas_cumprod.double()[t].view(-1, 1, 1, 1)
    x_t = (ab.sqrt() * x0 + (1 - ab).sqrt() * noise).float()
    v = ab.sqrt() * noise - (1 - ab).sqrt() * x0
    snr = (ab / (1 - ab)).flatten()
    w = snr.clamp(max=2.0) / (snr + 1)
    assert (snr > 2).any() and (snr < 2).any()  # both sides of the cap are exercised
    with torch.no_grad():
        prediction = trainer.accelerator.unwrap_model(trainer.model)(x_t, t, y).double()
    per_sample = ((prediction - v) ** 2).mean(dim=(1, 2, 3))
    expected = (w * per_sample).mean()
    torch.testing.assert_close(loss.double(), expected, rtol=1e-5, atol=0)
    unweighted = per_sample.mean()
    assert not torch.isclose(expected, unweighted, rtol=1e-2)  # the weights matter for this batch


def loss_inputs(prediction_type: str) -> tuple[NoiseScheduler, torch.Tensor, torch.Tensor, torch.Tensor]:
    """A schedule and x0, eps, t for 6 images of 2x4x4, t on both sides of snr = 5."""
    scheduler = NoiseScheduler(prediction_type=prediction_type)
    generator = torch.Generator().manual_seed(0)
    x0 = torch.rand(6, 2, 4, 4, generator=generator) * 2 - 1
    noise = torch.randn(x0.shape, generator=generator)
    t = torch.tensor([0, 10, 100, 400, 700, 999])
    return scheduler, x0, noise, t


def target_by_hand(prediction_type: str, scheduler, x0, noise, t) -> torch.Tensor:
    ab = scheduler.alphas_cumprod.double()[t].view(-1, 1, 1, 1)
    v = ab.sqrt() * noise - (1 - ab).sqrt() * x0
    return {"epsilon": noise, "sample": x0, "v_prediction": v.float()}[prediction_type]


@pytest.mark.parametrize("prediction_type", ["epsilon", "sample", "v_prediction"])
def test_diffusion_loss_of_the_exact_target_is_zero_and_of_zeros_the_mean_square_target(prediction_type):
    scheduler, x0, noise, t = loss_inputs(prediction_type)
    labels = torch.arange(6)
    target = target_by_hand(prediction_type, scheduler, x0, noise, t)
    ab = scheduler.alphas_cumprod.double()[t].view(-1, 1, 1, 1)
    seen = []

    def exact(x_t, t_, y):
        seen.append((x_t, t_, y))
        return target

    assert diffusion_loss(exact, scheduler, x0, noise, t, labels).item() == pytest.approx(0.0, abs=1e-12)
    x_t, t_seen, y_seen = seen[0]
    torch.testing.assert_close(x_t, (ab.sqrt() * x0 + (1 - ab).sqrt() * noise).float())  # Ho et al. Eq. 4
    assert torch.equal(t_seen, t) and torch.equal(y_seen, labels)
    loss = diffusion_loss(lambda x_t, t_, y: torch.zeros_like(x_t), scheduler, x0, noise, t)
    assert loss.dtype == torch.float32
    torch.testing.assert_close(loss, (target.float() ** 2).mean())


def test_min_snr_diffusion_loss_of_an_epsilon_model_weights_each_image_by_min_snr_gamma_over_snr():
    scheduler, x0, noise, t = loss_inputs("epsilon")
    ab = scheduler.alphas_cumprod.double()[t]
    snr = ab / (1 - ab)
    assert (snr > 5).any() and (snr < 5).any()
    zeros = lambda x_t, t_, y: torch.zeros_like(x_t)  # noqa: E731
    loss = diffusion_loss(zeros, scheduler, x0, noise, t, weighting="min_snr", min_snr_gamma=5.0)
    expected = (snr.clamp(max=5.0) / snr * (noise.double() ** 2).mean(dim=(1, 2, 3))).mean()
    torch.testing.assert_close(loss.double(), expected, rtol=1e-6, atol=0)


def test_labels_reach_the_model_and_are_dropped_at_the_configured_rate(tmp_path):
    trainer = Trainer(tiny_config(tmp_path / "run", "train.label_dropout=0.2"))
    null = trainer.ema.module.null_class
    labels = torch.arange(20_000) % 10
    torch.manual_seed(0)
    dropped = drop_labels(labels, 0.2, null)
    is_null = dropped == null
    assert torch.equal(dropped[~is_null], labels[~is_null])  # the others pass unchanged
    rate, sigma = is_null.float().mean().item(), math.sqrt(0.2 * 0.8 / labels.numel())
    assert abs(rate - 0.2) < 4 * sigma

    seen = []
    forward = trainer.forward
    trainer.forward = lambda x, t, y: seen.append(y) or forward(x, t, y)
    x0, labels, _, _ = fixed_batch(trainer, 16)
    trainer.config.train.label_dropout = 0.0
    trainer._loss(x0, labels)
    trainer.config.train.label_dropout = 1.0
    trainer._loss(x0, labels)
    assert torch.equal(seen[0], labels) and torch.equal(seen[1], torch.full_like(labels, null))


def test_logged_loss_is_the_mean_over_the_micro_batches_of_the_step(tmp_path):
    run = tmp_path / "run"
    trainer = Trainer(tiny_config(run, "train.grad_accum=2", "train.steps=4", "train.sample_every=0"))
    original, losses = trainer._loss, []

    def recording_loss(x0, labels):
        loss = original(x0, labels)
        losses.append(loss.item())
        return loss

    trainer._loss = recording_loss
    trainer.train()
    log = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    assert len(losses) == 8 and [r["step"] for r in log] == [1, 2, 3, 4]
    for record, pair in zip(log, zip(losses[::2], losses[1::2], strict=True), strict=True):
        assert record["loss"] == pytest.approx(sum(pair) / 2, rel=1e-6)


# -- mixed precision


def test_bf16_training_runs_under_autocast_and_resumes_exactly(tmp_path):
    trainer = Trainer(tiny_config(tmp_path / "a", "train.mixed_precision=bf16"))
    dtypes = []  # of the last layer's output, inside the autocast region (Accelerate returns float32)
    conv_out = trainer.accelerator.unwrap_model(trainer.model).conv_out
    conv_out.register_forward_hook(lambda module, inputs, output: dtypes.append(output.dtype))
    straight = trainer.train()
    assert set(dtypes) == {torch.bfloat16}  # the network ran under autocast
    assert all(w.dtype == torch.float32 and torch.isfinite(w).all() for w in weights(straight).values())
    AcceleratorState._reset_state(reset_partial_state=True)

    Trainer(tiny_config(tmp_path / "b", "train.mixed_precision=bf16", "train.steps=3")).train()
    AcceleratorState._reset_state(reset_partial_state=True)
    resumed = Trainer(tiny_config(tmp_path / "b", "train.mixed_precision=bf16"), resume="latest").train()
    assert [p.name for p in list_checkpoints(tmp_path / "b")] == ["step-0000003", "step-0000006"]
    a, b = weights(straight), weights(resumed)
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=0, msg=key)
