"""The diffusion training loss: Ho et al. 2020 Eq. 14 for any prediction target and loss weighting, plus the
variational-bound term of Nichol & Dhariwal 2021's hybrid loss when the schedule learns the variance, the
condition dropout of classifier-free guidance (`drop_conditions`; `drop_labels` for labels as a tensor), and
the losses of progressive distillation (Salimans & Ho 2022) and consistency distillation (Song et al. 2023).

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
from ddpm.samplers import Denoiser
from ddpm.samplers.consistency import consistency_output, frame_sigma_data, ode_step
from ddpm.schedule import NoiseScheduler
from ddpm.vlb import vlb_term_bpd

HYBRID_VLB_WEIGHT = 0.001  # lambda of L_hybrid = L_simple + lambda L_vlb (Nichol & Dhariwal 2021, Eq. 16)
# c of the pseudo-Huber distance is PSEUDO_HUBER_C sqrt(d) for images of d values in [-1, 1] (Song & Dhariwal
# 2023, "Improved Techniques for Training Consistency Models", Sec. 3.3: 0.03 for CIFAR-10's 3 x 32 x 32)
PSEUDO_HUBER_C = 0.00054


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
        x0: (N, C, H, W) clean images.
        noise: (N, C, H, W) eps ~ N(0, I).
        t: (N,) long timesteps.
        cond: the conditions, handed to the model as they are: a `Conditions` (after `drop_conditions`),
            (N,) long class labels (after `drop_labels`), or None for an unconditional model.
        weighting: as in `NoiseScheduler.loss_weight` (it weights the MSE term only).
        min_snr_gamma: as in `NoiseScheduler.loss_weight`.

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


def progressive_target(
    denoise: Denoiser,
    x_t: Tensor,
    t: Tensor,
    t_mid: Tensor,
    ab_t: Tensor,
    ab_mid: Tensor,
    ab_next: Tensor,
) -> Tensor:
    """The target x~ of progressive distillation (Salimans & Ho 2022, Algorithm 2): the x0 estimate with which
    one DDIM step (eta = 0) from x_t lands where two DDIM steps of the teacher land.

    With a = sqrt(alpha_bar), s = sqrt(1 - alpha_bar) at the student's step t -> t'' and the teacher's
    midpoint t' (alpha_bar ab_t < ab_mid < ab_next):
        z_t'  = a_t' x^(z_t) + s_t' eps^(z_t)              (teacher DDIM step, Song et al. 2021 Eq. 12)
        z_t'' = a_t'' x^(z_t') + s_t'' eps^(z_t')         (second teacher step)
        x~    = (z_t'' - (s_t'' / s_t) z_t) / (a_t'' - (s_t'' / s_t) a_t)
    the last solving z_t'' = a_t'' x~ + s_t'' (z_t - a_t x~) / s_t, DDIM's step with x0 = x~. ab_next = 1 (the
    final step, to the data) gives x~ = x^(z_t'), the teacher's last estimate.

    denoise: the teacher as `ddpm.samplers.denoiser` builds it (its parameterisation, clipping and guidance:
    any of eps, x0 or v). x_t: (N, C, H, W). t, t_mid: (N,) timesteps. ab_t, ab_mid, ab_next: alpha_bar at t,
    t_mid and the student's next timestep, (N, 1, 1, 1) in x_t's dtype. Returns x~, (N, C, H, W).
    """
    x0, eps = denoise(x_t, t)
    x_mid = ab_mid.sqrt() * x0 + (1 - ab_mid).sqrt() * eps
    x0_mid, eps_mid = denoise(x_mid, t_mid)
    x_next = ab_next.sqrt() * x0_mid + (1 - ab_next).sqrt() * eps_mid
    ratio = ((1 - ab_next) / (1 - ab_t)).sqrt()  # s_t'' / s_t; s_t >= sqrt(beta_0) > 0
    return (x_next - ratio * x_t) / (ab_next.sqrt() - ratio * ab_t.sqrt())


def progressive_distillation_losses(
    student: Callable[[Tensor, Tensor, Conditions | Tensor | None], Tensor],
    teacher: Denoiser,
    scheduler: NoiseScheduler,
    x0: Tensor,
    noise: Tensor,
    index: Tensor,
    teacher_timesteps: Tensor,
    cond: Conditions | Tensor | None = None,
) -> Tensor:
    """The loss of each image of a batch in one stage of progressive distillation (Salimans & Ho 2022,
    Algorithm 2): the student learns in one DDIM step the two steps of the teacher,

        loss_i = max(SNR(t_i), 1) || x^_student(z_t_i) - x~_i ||^2 / (C H W)

    with z_t = sqrt(alpha_bar_t) x0 + sqrt(1 - alpha_bar_t) eps, x~ = `progressive_target` (no gradient) and
    the paper's truncated SNR weighting (Sec. 4), written on the student's x0 estimate whatever it predicts
    (for x0 prediction it is that loss; for v, || x0 error ||^2 = || v error ||^2 / (1 + SNR)). All of it is
    in the samplers' frame (`NoiseScheduler.add_noise`, `snr`): for the EDM formulation the data over
    sigma_data, where EDM's own loss on F is (1 + SNR) || x0 error ||^2 (`ddpm.edm`), within a factor 2.

    teacher_timesteps: (2n,) descending, the teacher's DDIM grid; the student's has n steps, its step i going
    from teacher_timesteps[2i] to teacher_timesteps[2i + 2] (alpha_bar = 1 after the last), through the
    midpoint teacher_timesteps[2i + 1]. index: (N,) long, each image's student step i in 0..n-1.
    student: the network call (x_t, t, cond) -> its prediction (scheduler.prediction_type; with a learned
    variance, (N, 2C, H, W): the prediction, then the variance values, which the loss leaves out). x0, noise:
    (N, C, H, W); cond: the student's conditions as the network takes them (`network_argument`: labels (N,)
    long, a Conditions, or None; the teacher has its own in `teacher`).
    Returns (N,) float32.
    """
    grid = teacher_timesteps.to(x0.device)
    dtype = torch.promote_types(x0.dtype, torch.float32)
    abars = torch.cat([scheduler.alpha_bar(grid), grid.new_ones(1, dtype=torch.float64)]).to(dtype)

    def at(i: Tensor) -> Tensor:  # alpha_bar at entry i of the grid (and 1 past it), (N, 1, 1, 1)
        return abars[i].reshape(-1, *([1] * (x0.ndim - 1)))

    t, t_mid = grid[2 * index], grid[2 * index + 1]
    ab_t = at(2 * index)
    x_t = scheduler.add_noise(x0, noise, t)  # in the samplers' frame (the data over scheduler.data_scale)
    with torch.no_grad():
        target = progressive_target(teacher, x_t, t, t_mid, ab_t, at(2 * index + 1), at(2 * index + 2))
    # A learned variance's channels ("learned_range") are split off untrained: DDIM never reads them.
    prediction, _ = scheduler.split_output(student(x_t, t, cond).float(), x0.shape[1])
    x0_student, _ = scheduler.predict_x0_and_eps(prediction, x_t.float(), t, clip=False)
    per_sample = F.mse_loss(x0_student, target.float(), reduction="none").mean(dim=(1, 2, 3))  # (N,)
    weight = scheduler.snr(t).clamp(min=1.0)  # max(SNR, 1)
    return weight.to(per_sample.dtype) * per_sample


def consistency_distillation_losses(
    student: Callable[[Tensor, Tensor, Conditions | Tensor | None], Tensor],
    target: Callable[[Tensor, Tensor, Conditions | Tensor | None], Tensor],
    teacher: Denoiser,
    scheduler: NoiseScheduler,
    x0: Tensor,
    noise: Tensor,
    index: Tensor,
    timesteps: Tensor,
    cond: Conditions | Tensor | None = None,
    *,
    solver: str = "heun",
) -> Tensor:
    """The loss of each image of a batch in consistency distillation (Song et al. 2023, Algorithm 2, with
    lambda = 1 as in their experiments): the student's consistency function at x_{n+1} against the target
    network's at the teacher's one ODE step from there to the next lower noise level,

        loss_i = d(f_student(x_{n+1}, sigma_{n+1}), f_target(x^_n, sigma_n)),  x_{n+1} = x0 + sigma_{n+1} eps,
        x^_n = `ode_step`(teacher, x_{n+1}, sigma_{n+1} -> sigma_n, solver)          (no gradient)

    f = `ddpm.samplers.consistency.consistency_output` of each network's x0 estimate (unclipped) and d the
    pseudo-Huber distance sqrt(||a - b||^2 + c^2) - c in data units, c = PSEUDO_HUBER_C sqrt(C H W) (Song &
    Dhariwal 2023, Sec. 3.3: robust to outliers, and better than L2 there).

    timesteps: (K,) descending, the noise levels sigma_0 > ... > sigma_{K-1} of the discretisation as
    timesteps (float64; `ConsistencySettings.timesteps`); index: (N,) long in 0..K-2, each image's pair
    (timesteps[index], timesteps[index + 1]). student, target: the network calls (x_t, t, cond) -> their
    prediction (scheduler.prediction_type; with a learned variance, (N, 2C, H, W): the prediction, then the
    variance values, which the loss leaves out); target is called without gradient. teacher: the teacher's
    denoiser (`ddpm.samplers.denoiser`: guidance and its conditions baked in there). x0, noise: (N, C, H,
    W); cond: the conditions the student and the target are given, as the network takes them
    (`network_argument`: labels (N,) long, a Conditions, or None). Returns (N,) float32 (float64 for
    float64 images).
    """
    grid = timesteps.to(x0.device)
    t, t_next = grid[index], grid[index + 1]
    sigma_data = frame_sigma_data(scheduler)
    x_t = scheduler.add_noise(x0, noise, t)

    def f(network, x: Tensor, at: Tensor) -> Tensor:
        # A learned variance's channels are split off untrained, as in progressive distillation.
        prediction, _ = scheduler.split_output(network(x, at, cond).float(), x.shape[1])
        x0_hat, _ = scheduler.predict_x0_and_eps(prediction, x.float(), at, clip=False)
        return consistency_output(x0_hat, x, at, scheduler, sigma_data)

    with torch.no_grad():
        x_next = ode_step(teacher, x_t, t, t_next, scheduler, solver=solver)
        wanted = f(target, x_next, t_next)
    diff = (f(student, x_t, t) - wanted) * scheduler.data_scale
    c = PSEUDO_HUBER_C * diff[0].numel() ** 0.5
    return (diff.flatten(1).square().sum(dim=1) + c**2).sqrt() - c
