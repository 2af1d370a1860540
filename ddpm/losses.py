"""The diffusion training loss: Ho et al. 2020 Eq. 14 for any prediction target and loss weighting, plus the
variational-bound term of Nichol & Dhariwal 2021's hybrid loss when the schedule learns the variance, and the
condition dropout of classifier-free guidance (`drop_conditions`; `drop_labels` for labels as a tensor).

All are plain functions of tensors: the random draws of a training step are the caller's, in this order,
which checkpoints replay exactly: eps = randn_like(x0), then t (`NoiseScheduler.sample_timesteps`, or an
importance sampler's), then `drop_labels` or `drop_conditions`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import torch
import torch.nn.functional as F
from torch import Tensor

from ddpm.conditions import Conditions
from ddpm.schedule import NoiseScheduler
from ddpm.vlb import vlb_term_bpd

HYBRID_VLB_WEIGHT = 0.001  # lambda of L_hybrid = L_simple + lambda L_vlb (Nichol & Dhariwal 2021, Eq. 16)


def diffusion_losses(
    model: Callable[[Tensor, Tensor, Conditions | Tensor | None], Tensor],
    scheduler: NoiseScheduler,
    x0: Tensor,
    noise: Tensor,
    t: Tensor,
    cond: Conditions | Tensor | None = None,
    *,
    weighting: str = "uniform",
    min_snr_gamma: float = 5.0,
) -> Tensor:
    """The loss of each image of a batch: Ho et al. 2020 Eq. 14, generalised to the scheduler's target,

        loss_i = w(t_i) * || prediction_i - target(x0_i, eps_i, t_i) ||^2 / (C H W)

    with x_t = `NoiseScheduler.add_noise`(x0, eps, t) = sqrt(alpha_bar_t) x0 + sqrt(1 - alpha_bar_t) eps,
    prediction = the first C channels of model(x_t, t, cond), target = `NoiseScheduler.training_target` (eps,
    x0 or v) and w = `NoiseScheduler.loss_weight` (uniform or Min-SNR-gamma, Hang et al. 2023).

    When the scheduler learns the variance ("learned_range", the model's next C channels), the hybrid loss
    of Nichol & Dhariwal 2021, Eq. 16: loss_i + lambda T L_t(i), lambda = HYBRID_VLB_WEIGHT, where L_t is the
    variational bound's term at t_i in bits/dim (`ddpm.vlb.vlb_term_bpd`, the decoder NLL at t = 0), so that
    lambda T L_t estimates lambda L_vlb = lambda sum_t L_t under uniform t (improved-diffusion's T / 1000
    rescaling of the term). Its mean is detached (Sec. 3.1: the bound trains the variance only, L_simple the
    mean), and x0 is not clipped. Everything is in float32 whatever the model's dtype.

    Args:
        model: the network call (x_t, t, cond) -> output, e.g. a UNet under autocast.
        scheduler: the noise schedule.
        x0: (N, C, H, W) clean images. noise: (N, C, H, W) eps ~ N(0, I). t: (N,) long timesteps.
        cond: the conditions, handed to the model as they are: a `Conditions` (after `drop_conditions`),
            (N,) long class labels (after `drop_labels`), or None for an unconditional model.
        weighting, min_snr_gamma: as in `NoiseScheduler.loss_weight` (they weight the MSE term only).

    Returns (N,) float32.
    """
    x_t = scheduler.add_noise(x0, noise, t)
    prediction, v = scheduler.split_output(model(x_t, t, cond).float(), x0.shape[1])
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
    model: Callable[[Tensor, Tensor, Conditions | Tensor | None], Tensor],
    scheduler: NoiseScheduler,
    x0: Tensor,
    noise: Tensor,
    t: Tensor,
    cond: Conditions | Tensor | None = None,
    *,
    weighting: str = "uniform",
    min_snr_gamma: float = 5.0,
) -> Tensor:
    """The batch mean of `diffusion_losses` (same arguments): a float32 scalar."""
    return diffusion_losses(
        model, scheduler, x0, noise, t, cond, weighting=weighting, min_snr_gamma=min_snr_gamma
    ).mean()


def drop_labels(labels: Tensor, p: float, null_class: int) -> Tensor:
    """Replace each label by `null_class` with probability p (Ho & Salimans 2022, Algorithm 1).

    labels: (N,) long. Returns (N,) long. Draws N uniforms from the global RNG whatever p is, so that the
    draws of a step do not depend on p.
    """
    dropped = torch.rand(labels.shape, device=labels.device) < p
    return torch.where(dropped, torch.full_like(labels, null_class), labels)


def drop_conditions(cond: Conditions, p: float | Mapping[str, float]) -> Conditions:
    """Condition dropout (Ho & Salimans 2022, Algorithm 1, for every kind of condition): cond with rows
    marked dropped, so that the network sees its learned null there and learns the unconditional model that
    guidance calls on `cond.null()`.

    p: a probability, joint: each row drops all its conditions together with probability p (N uniforms
    drawn, the draws of `drop_labels` for the same labels); or kind -> probability, one for each kind
    `cond` holds, each dropped on its own (N uniforms per kind, in `cond.kinds` order; with several kinds the
    fully unconditional row then comes with the product of the probabilities). The uniforms come from the
    global RNG on the conditions' device whatever the probabilities, so that a step's draws do not depend on
    them. The empty Conditions is returned as it is. Raises ValueError for a probability outside [0, 1] or a
    mapping that does not name exactly cond's kinds.
    """
    if not cond:
        return cond
    probabilities = dict(p) if isinstance(p, Mapping) else None
    if probabilities is not None and set(probabilities) != set(cond.kinds):
        raise ValueError(
            f"condition dropout names {sorted(probabilities)} but the conditions hold {list(cond.kinds)}: "
            "give one probability per kind (0 to never drop one), or one probability for all"
        )
    for kind, value in (probabilities or {"all": p}).items():
        if not 0 <= value <= 1:
            raise ValueError(f"the dropout probability of {kind} must lie in [0, 1], got {value}")
    n, device = cond.batch_size, cond[cond.kinds[0]].device
    if probabilities is None:
        dropped = torch.rand(n, device=device) < p
        return cond.drop({kind: dropped for kind in cond.kinds})
    return cond.drop({kind: torch.rand(n, device=device) < probabilities[kind] for kind in cond.kinds})
