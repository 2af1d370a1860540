"""How the EMA weights do during training: sample grids in the run directory and FID against the data."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from accelerate import Accelerator
from PIL import Image

from ddpm.config import Config
from ddpm.fid import frechet_distance, model_statistics, reference_statistics
from ddpm.inference import generate, save_grid
from ddpm.run_dir import SAMPLES
from ddpm.schedule import NoiseScheduler


class Evaluation:
    """Sample grids (samples/step-NNNNNNN-ema.png) and FID of a run's EMA weights, under its autocast.

    With train.fid_every, the Inception statistics of the training data are computed at construction, once
    per run directory (cached in fid_reference.npz) and shared among the processes; a missing
    train.fid_weights file stops here, before training.
    """

    def __init__(self, config: Config, run_dir: Path, accelerator: Accelerator):
        self.config = config
        self.run_dir = Path(run_dir)
        self.accelerator = accelerator
        self.fid_reference = None  # the main process's statistics; None on the others
        if config.train.fid_every:
            self.fid_reference = reference_statistics(
                config.data,
                cache=self.run_dir / "fid_reference.npz",
                weights=config.train.fid_weights,
                device=accelerator.device,
                accelerator=accelerator,
            )

    def sample_grid(
        self, step: int, ema_model: torch.nn.Module, scheduler: NoiseScheduler
    ) -> np.ndarray | None:
        """Write samples/step-NNNNNNN-ema.png of sample.n images (main process only, its own seeded RNG) and
        return it as the trackers take it, (H, W, 3) uint8 read back from the file; None on the other
        processes."""
        if not self.accelerator.is_main_process:
            return None
        sample, data = self.config.sample, self.config.data
        with self.accelerator.autocast():
            images = generate(
                ema_model,
                scheduler,
                sample.n,
                image_shape=(data.channels, data.image_size, data.image_size),
                **sample.sampler_settings(),
                seed=self.config.train.seed,
                device=self.accelerator.device,
            )
        path = save_grid(images, self.run_dir / SAMPLES / f"step-{step:07d}-ema.png")
        with Image.open(path) as grid:
            return np.asarray(grid.convert("RGB"))

    def fid(self, ema_model: torch.nn.Module, scheduler: NoiseScheduler) -> float | None:
        """FID of train.fid_n samples against the data: the value on the main process, None on the others.

        Every process samples and embeds its share of the images (`ddpm.fid.model_statistics`), so FID takes
        1 / num_processes of the time and no process waits idle in a collective for the whole of it.
        """
        train = self.config.train
        with self.accelerator.autocast():
            stats = model_statistics(
                ema_model,
                scheduler,
                train.fid_n,
                sampling=self.config.sample,
                weights=train.fid_weights,
                seed=train.seed,
                progress=False,
                accelerator=self.accelerator,
            )
        if stats is None:
            return None
        reference = self.fid_reference
        return frechet_distance(reference.mu, reference.sigma, stats.mu, stats.sigma)
