"""Importance sampling of the training timesteps by the loss's second moment (Nichol & Dhariwal 2021,
Sec. 3.3, Eq. 18): `train.timestep_sampling: loss_second_moment`.

t is drawn with p_t proportional to sqrt(E[L_t^2]), estimated from the last HISTORY losses seen at each t,
and each image's loss is weighted by 1 / (T p_t) so that the objective's expectation stays that of uniform t.
Until every t holds HISTORY losses, t is uniform (the same draw as `NoiseScheduler.sample_timesteps`), and a
small UNIFORM_SHARE of p stays uniform. The history is part of the training state: `state_dict` goes into
trainer_state.json, so that a resumed run draws the same timesteps as one never interrupted. The trainer
records the losses of all processes once per applied optimizer step (a skipped step records nothing), and
`update` refuses a batch holding a NaN or inf loss: one would make every later p_t NaN.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ddpm.schedule import NoiseScheduler

HISTORY = 10  # losses kept per timestep
UNIFORM_SHARE = 0.001  # of the probability mass spread uniformly, so that no t is never drawn


class LossSecondMomentSampler:
    """Timesteps drawn by the root mean square of their recent losses; every process holds the same history
    (the caller updates it with the losses of all processes)."""

    def __init__(self, num_timesteps: int):
        self.num_timesteps = num_timesteps
        self.history = torch.zeros(num_timesteps, HISTORY, dtype=torch.float64)  # (T, HISTORY), oldest first
        self.counts = torch.zeros(num_timesteps, dtype=torch.long)  # (T,) losses held, up to HISTORY

    @property
    def warmed_up(self) -> bool:
        """Whether every timestep holds HISTORY losses (before: uniform t)."""
        return bool((self.counts == HISTORY).all())

    def probabilities(self) -> Tensor:
        """p_t, (T,) float64 summing to 1: (1 - UNIFORM_SHARE) sqrt(mean of L_t^2) / sum + UNIFORM_SHARE / T
        once warmed up, else uniform."""
        T = self.num_timesteps
        if not self.warmed_up:
            return torch.full((T,), 1.0 / T, dtype=torch.float64)
        rms = self.history.pow(2).mean(dim=1).sqrt()
        return (1 - UNIFORM_SHARE) * rms / rms.sum() + UNIFORM_SHARE / T

    def sample(self, n: int, scheduler: NoiseScheduler, device: torch.device) -> tuple[Tensor, Tensor]:
        """(t (n,) long, weights (n,) float32 = 1 / (T p_t)) on `device`, drawn from the global RNG of
        `device`: uniform (`scheduler.sample_timesteps`, weights 1) until warmed up."""
        if not self.warmed_up:
            return scheduler.sample_timesteps(n, device=device), torch.ones(n, device=device)
        p = self.probabilities()
        t = torch.multinomial(p.to(device), n, replacement=True)
        weights = 1.0 / (self.num_timesteps * p.to(device)[t])
        return t, weights.float()

    def update(self, t: Tensor, losses: Tensor) -> None:
        """Record the losses (N,) seen at timesteps t (N,), in order (a full timestep drops its oldest);
        record nothing when any of them is NaN or infinite. Call it with the same values on every process
        (those of all processes, gathered), so that every process takes the same decision."""
        if not torch.isfinite(losses).all():
            return
        for step, loss in zip(t.tolist(), losses.double().tolist(), strict=True):
            if self.counts[step] == HISTORY:
                self.history[step] = torch.roll(self.history[step], -1)
                self.history[step, -1] = loss
            else:
                self.history[step, self.counts[step]] = loss
                self.counts[step] += 1

    def state_dict(self) -> dict:
        """The history as plain lists (JSON-able, exact for float64)."""
        return {"history": self.history.tolist(), "counts": self.counts.tolist()}

    def load_state_dict(self, state: dict) -> None:
        """Restore what `state_dict` returned; its shape must be this sampler's (T, HISTORY)."""
        history = torch.tensor(state["history"], dtype=torch.float64)
        if history.shape != self.history.shape:
            raise ValueError(
                f"the timestep sampler's history has shape {tuple(history.shape)}, expected "
                f"{tuple(self.history.shape)} (num_train_timesteps, {HISTORY})"
            )
        self.history = history
        self.counts = torch.tensor(state["counts"], dtype=torch.long)
