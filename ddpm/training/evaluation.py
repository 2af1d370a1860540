"""How the EMA weights do during training: sample grids in the run directory, and FID, KID and
precision/recall against the data."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from accelerate import Accelerator
from PIL import Image

from ddpm.conditions import Conditions
from ddpm.config import Config, ConfigError
from ddpm.fid import (
    MissingDependencyError,
    compare,
    model_statistics,
    reference_statistics,
    require_fidelity,
    resolve_weights,
)
from ddpm.inference import generate, save_grid
from ddpm.run_dir import SAMPLES
from ddpm.schedule import NoiseScheduler


class Evaluation:
    """Sample grids (samples/step-NNNNNNN-ema.png) and FID, KID and precision/recall of a run's EMA weights,
    under its autocast.

    With train.fid_every, the Inception features of the training data are computed at construction, once per
    run directory (cached in fid_reference.npz) and shared among the processes; a missing torch-fidelity
    (ConfigError) or train.fid_weights file stops here, before training, and the default weights are
    downloaded here on first use, by the main process alone. grid_cond: the conditions of the grid's
    sample.n images where the model takes more than labels (data.task's: `ddpm.data.batch_conditions` of
    the first images of the data); None: labels 0, 1, ... as `generate` gives them.
    """

    def __init__(
        self,
        config: Config,
        run_dir: Path,
        accelerator: Accelerator,
        *,
        grid_cond: Conditions | None = None,
    ):
        self.config = config
        self.grid_cond = grid_cond  # the conditions of the grid's sample.n images, for a data.task
        self.run_dir = Path(run_dir)
        self.accelerator = accelerator
        self.fid_reference = None  # the main process's statistics; None on the others
        if config.train.fid_every:
            try:
                require_fidelity()
            except MissingDependencyError as error:
                raise ConfigError(f"train.fid_every={config.train.fid_every}: {error}") from None
            with accelerator.main_process_first():
                resolve_weights(config.train.fid_weights)
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
                cond=self.grid_cond,
            )
        path = save_grid(images, self.run_dir / SAMPLES / f"step-{step:07d}-ema.png")
        with Image.open(path) as grid:
            return np.asarray(grid.convert("RGB"))

    def metrics(self, ema_model: torch.nn.Module, scheduler: NoiseScheduler) -> dict[str, float]:
        """FID, KID (and its std) and precision/recall of train.fid_n samples against the data
        (`ddpm.fid.compare`: "fid", "kid", "kid_std", "precision", "recall") on the main process, {} on the
        others.

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
        return {} if stats is None else compare(self.fid_reference, stats)
