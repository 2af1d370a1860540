"""The diffusion training loss: Ho et al. 2020 Eq. 14 for any prediction target and loss weighting, and the
label dropout of classifier-free guidance.

Both are plain functions of tensors: the random draws of a training step are the caller's, in this order,
which checkpoints replay exactly: eps = randn_like(x0), then t = `NoiseScheduler.sample_timesteps`, then
`drop_labels`.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from ddpm.schedule import NoiseScheduler


def diffusion_loss(
    model: Callable[[Tensor, Tensor, Tensor | None], Tensor],
    scheduler: NoiseScheduler,
    x0: Tensor,
    noise: Tensor,
    t: Tensor,
    labels: Tensor | None = None,
    *,
    weighting: str = "uniform",
    min_snr_gamma: float = 5.0,
) -> Tensor:
    """The weighted denoising loss of a batch: Ho et al. 2020 Eq. 14, generalised to the scheduler's target.

        loss = mean_i [ w(t_i) * || model(x_t_i, t_i, y_i) - target(x0_i, eps_i, t_i) ||^2 / (C H W) ]

    with x_t = `NoiseScheduler.add_noise`(x0, eps, t) = sqrt(alpha_bar_t) x0 + sqrt(1 - alpha_bar_t) eps,
    target = `NoiseScheduler.training_target` (eps, x0 or v) and w = `NoiseScheduler.loss_weight` (uniform or
    Min-SNR-gamma, Hang et al. 2023). The squared error is taken in float32 whatever the model's dtype.

    Args:
        model: the network call (x_t, t, labels) -> prediction, e.g. a UNet under autocast.
        scheduler: the noise schedule.
        x0: (N, C, H, W) clean images. noise: (N, C, H, W) eps ~ N(0, I). t: (N,) long timesteps.
        labels: (N,) long class labels (after `drop_labels`), or None for an unconditional model.
        weighting, min_snr_gamma: as in `NoiseScheduler.loss_weight`.

    Returns a float32 scalar.
    """
    x_t = scheduler.add_noise(x0, noise, t)
    prediction = model(x_t, t, labels)
    target = scheduler.training_target(x0, noise, t)
    per_sample = F.mse_loss(prediction.float(), target.float(), reduction="none").mean(dim=(1, 2, 3))  # (N,)
    weight = scheduler.loss_weight(t, weighting=weighting, min_snr_gamma=min_snr_gamma)
    return (weight.to(per_sample.dtype) * per_sample).mean()


def drop_labels(labels: Tensor, p: float, null_class: int) -> Tensor:
    """Replace each label by `null_class` with probability p (Ho & Salimans 2022, Algorithm 1).

    labels: (N,) long. Returns (N,) long. Draws N uniforms from the global RNG whatever p is, so that the
    draws of a step do not depend on p.
    """
    dropped = torch.rand(labels.shape, device=labels.device) < p
    return torch.where(dropped, torch.full_like(labels, null_class), labels)
