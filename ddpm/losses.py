"""The diffusion training loss: Ho et al. 2020 Eq. 14 for any prediction target and loss weighting, plus the
variational-bound term of Nichol & Dhariwal 2021's hybrid loss when the schedule learns the variance, and the
label dropout of classifier-free guidance.

All are plain functions of tensors: the random draws of a training step are the caller's, in this order,
which checkpoints replay exactly: eps = randn_like(x0), then t (`NoiseScheduler.sample_timesteps`, or an
importance sampler's), then `drop_labels`.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from ddpm.schedule import NoiseScheduler
from ddpm.vlb import vlb_term_bpd

HYBRID_VLB_WEIGHT = 0.001  # lambda of L_hybrid = L_simple + lambda L_vlb (Nichol & Dhariwal 2021, Eq. 16)


def diffusion_losses(
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
    """The loss of each image of a batch: Ho et al. 2020 Eq. 14, generalised to the scheduler's target,

        loss_i = w(t_i) * || prediction_i - target(x0_i, eps_i, t_i) ||^2 / (C H W)

    with x_t = `NoiseScheduler.add_noise`(x0, eps, t) = sqrt(alpha_bar_t) x0 + sqrt(1 - alpha_bar_t) eps,
    prediction = the first C channels of model(x_t, t, y), target = `NoiseScheduler.training_target` (eps,
    x0 or v) and w = `NoiseScheduler.loss_weight` (uniform or Min-SNR-gamma, Hang et al. 2023).

    When the scheduler learns the variance ("learned_range", the model's next C channels), the hybrid loss
    of Nichol & Dhariwal 2021, Eq. 16: loss_i + lambda T L_t(i), lambda = HYBRID_VLB_WEIGHT, where L_t is the
    variational bound's term at t_i in bits/dim (`ddpm.vlb.vlb_term_bpd`, the decoder NLL at t = 0), so that
    lambda T L_t estimates lambda L_vlb = lambda sum_t L_t under uniform t (improved-diffusion's T / 1000
    rescaling of the term). Its mean is detached (Sec. 3.1: the bound trains the variance only, L_simple the
    mean), and x0 is not clipped. Everything is in float32 whatever the model's dtype.

    Args:
        model: the network call (x_t, t, labels) -> output, e.g. a UNet under autocast.
        scheduler: the noise schedule.
        x0: (N, C, H, W) clean images. noise: (N, C, H, W) eps ~ N(0, I). t: (N,) long timesteps.
        labels: (N,) long class labels (after `drop_labels`), or None for an unconditional model.
        weighting, min_snr_gamma: as in `NoiseScheduler.loss_weight` (they weight the MSE term only).

    Returns (N,) float32.
    """
    x_t = scheduler.add_noise(x0, noise, t)
    prediction, v = scheduler.split_output(model(x_t, t, labels).float(), x0.shape[1])
    target = scheduler.training_target(x0, noise, t)
    per_sample = F.mse_loss(prediction, target.float(), reduction="none").mean(dim=(1, 2, 3))  # (N,)
    weight = scheduler.loss_weight(t, weighting=weighting, min_snr_gamma=min_snr_gamma)
    losses = weight.to(per_sample.dtype) * per_sample
    if v is None:
        return losses
    x0_pred, _ = scheduler.predict_x0_and_eps(prediction.detach(), x_t.float(), t, clip=False)
    vlb = vlb_term_bpd(scheduler, x0.float(), x_t.float(), t, x0_pred, v)
    return losses + HYBRID_VLB_WEIGHT * scheduler.num_train_timesteps * vlb


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
    """The batch mean of `diffusion_losses` (same arguments): a float32 scalar."""
    return diffusion_losses(
        model, scheduler, x0, noise, t, labels, weighting=weighting, min_snr_gamma=min_snr_gamma
    ).mean()


def drop_labels(labels: Tensor, p: float, null_class: int) -> Tensor:
    """Replace each label by `null_class` with probability p (Ho & Salimans 2022, Algorithm 1).

    labels: (N,) long. Returns (N,) long. Draws N uniforms from the global RNG whatever p is, so that the
    draws of a step do not depend on p.
    """
    dropped = torch.rand(labels.shape, device=labels.device) < p
    return torch.where(dropped, torch.full_like(labels, null_class), labels)
