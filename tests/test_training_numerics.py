"""The numbers of training: the EMA against its closed form, gradient accumulation against one large batch,
the Trainer's loss against a hand computation, the logged loss, and mixed precision end to end."""

import json
import math

import pytest
import torch
from accelerate.state import AcceleratorState
from test_train import fresh_accelerator_state, tiny_config, weights  # noqa: F401 (a fixture)

from ddpm.ema import EMA
from ddpm.run_dir import list_checkpoints
from ddpm.training.trainer import Trainer


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
    t = trainer.noise_scheduler.sample_timesteps(n, generator=generator)
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
        return trainer._denoising_loss(x0_micro, noise[rows], t[rows], labels_micro)

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


def test_loss_applies_min_snr_weights_to_the_v_prediction_target(tmp_path):
    trainer = Trainer(tiny_config(tmp_path / "run", "model.dropout=0", "train.min_snr_gamma=2"))
    assert trainer.noise_scheduler.prediction_type == "v_prediction"
    x0, labels, noise, t = fixed_batch(trainer, 16)
    loss = trainer._denoising_loss(x0, noise, t, labels)

    # By hand: x_t = sqrt(ab) x0 + sqrt(1 - ab) eps; v = sqrt(ab) eps - sqrt(1 - ab) x0 (Salimans & Ho 2022);
    # w = min(snr, gamma) / (snr + 1) with snr = ab / (1 - ab) (Hang et al. 2023).
    ab = trainer.noise_scheduler.alphas_cumprod.double()[t].view(-1, 1, 1, 1)
    x_t = (ab.sqrt() * x0 + (1 - ab).sqrt() * noise).float()
    v = ab.sqrt() * noise - (1 - ab).sqrt() * x0
    snr = (ab / (1 - ab)).flatten()
    w = snr.clamp(max=2.0) / (snr + 1)
    assert (snr > 2).any() and (snr < 2).any()  # both sides of the cap are exercised
    with torch.no_grad():
        prediction = trainer.accelerator.unwrap_model(trainer.model)(x_t, t, labels).double()
    per_sample = ((prediction - v) ** 2).mean(dim=(1, 2, 3))
    expected = (w * per_sample).mean()
    torch.testing.assert_close(loss.double(), expected, rtol=1e-5, atol=0)
    unweighted = per_sample.mean()
    assert not torch.isclose(expected, unweighted, rtol=1e-2)  # the weights matter for this batch


def test_labels_reach_the_model_and_are_dropped_at_the_configured_rate(tmp_path):
    trainer = Trainer(tiny_config(tmp_path / "run", "train.label_dropout=0.2"))
    null = trainer.ema.module.null_class
    labels = torch.arange(20_000) % 10
    torch.manual_seed(0)
    dropped = trainer._drop_labels(labels)
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
