"""What a run reports as it goes: log.jsonl in the run directory, the trackers of train.log_with
(TensorBoard, Weights & Biases: scalars, sample grids and the config as hyperparameters) and the progress
bar; and the running loss that its records average."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import numpy as np
import torch
from accelerate import Accelerator
from tqdm.auto import tqdm

from ddpm.config import Config
from ddpm.io import atomic_write
from ddpm.progress import progress_bar

LOG = "log.jsonl"


class RunLog:
    """The records of a run, one JSON object a line in `run_dir`/log.jsonl (main process only), also sent to
    the trackers and shown on the progress bar (the last value of each key).

    `open` starts the trackers and the bar (use it in a `with` statement, which closes both);
    `log_steps` writes {"step", "loss", "lr", "images_per_s", "skipped_steps"} for the steps since the
    previous record; `write` any record with a "step"; `write_image` an image to the trackers alone.

    Args:
        accelerator: the run's Accelerator. run_dir: the run directory.
        images_per_step: images per optimizer step over all processes, for "images_per_s".
    """

    def __init__(self, accelerator: Accelerator, run_dir: Path, *, images_per_step: int):
        self.accelerator = accelerator
        self.path = Path(run_dir) / LOG
        self.images_per_step = images_per_step
        self._postfix: dict[str, str] = {}  # what the progress bar shows
        self._bar: tqdm | None = None
        self._since_step, self._since_time = 0, time.perf_counter()

    def trim(self, step: int) -> None:
        """Drop the records after `step`, which a run resumed at `step` logs again, and any line cut short by
        a crash (the file is rewritten whole, atomically)."""
        if not self.accelerator.is_main_process or not self.path.is_file():
            return
        kept = [line for line in self.path.read_text().splitlines() if 0 <= _logged_step(line) <= step]
        with atomic_write(self.path) as tmp:
            tmp.write_text("".join(line + "\n" for line in kept))

    def open(self, config: Config, *, step: int) -> RunLog:
        """Start the trackers (project train.tracker_project; the config, flattened, as hyperparameters) and a
        progress bar at `step` of train.steps.

        TensorBoard writes to RUN/PROJECT/; wandb names its run after the run directory and keeps its files
        in RUN/wandb/ (in $WANDB_DIR/wandb/ when that is set).
        """
        wandb = {"name": self.path.parent.name}
        if not os.environ.get("WANDB_DIR"):
            wandb["dir"] = str(self.path.parent)
        self.accelerator.init_trackers(
            config.train.tracker_project, config=_flat(config.to_dict()), init_kwargs={"wandb": wandb}
        )
        self._bar = progress_bar(
            total=config.train.steps,
            initial=step,
            desc="train",
            show=self.accelerator.is_main_process,
            dynamic_ncols=True,
        )
        self._since_step, self._since_time = step, time.perf_counter()
        return self

    def __enter__(self) -> RunLog:
        return self

    def __exit__(self, *exc_info) -> None:
        self._bar.close()
        self.accelerator.end_training()

    def log_steps(self, step: int, losses: RunningLoss, *, lr: float, skipped_steps: int) -> None:
        """Write the record of the steps since the previous one (a collective: every process calls it)."""
        steps = step - self._since_step
        elapsed = time.perf_counter() - self._since_time
        record = {
            "step": step,
            "loss": losses.mean_since_last_call(self.accelerator, steps=steps),
            "lr": lr,
            "images_per_s": self.images_per_step * steps / max(elapsed, 1e-9),
            "skipped_steps": skipped_steps,
        }
        self.write(record)
        self._since_step, self._since_time = step, time.perf_counter()

    def write(self, record: dict) -> None:
        """Send a record to the trackers, the progress bar and log.jsonl."""
        self.accelerator.log(record, step=record["step"])
        if self.accelerator.is_main_process:
            self._postfix.update(
                {k: f"{v:.4g}" for k, v in record.items() if k not in ("step", "skipped_steps")}
            )
            self._bar.set_postfix(self._postfix)
            with open(self.path, "a") as log:
                log.write(json.dumps(record) + "\n")

    def write_image(self, name: str, image: np.ndarray | None, *, step: int) -> None:
        """Send `image`, (H, W, C) uint8, to the trackers as `name` at `step` (None: nothing to send)."""
        if image is None:
            return
        for tracker in self.accelerator.trackers:
            if tracker.name == "tensorboard":
                tracker.writer.add_image(name, image, global_step=step, dataformats="HWC")
                tracker.writer.flush()
            elif tracker.name == "wandb":
                tracker.log_images({name: [image]}, step=step)  # each image as a wandb.Image

    def advance(self) -> None:
        """Move the progress bar on by one optimizer step."""
        self._bar.update(1)


class RunningLoss:
    """The training loss, summed on the device so that it costs no host sync per step.

    `current`: the mean loss of the current step so far (the sum of its micro-batch losses / grad_accum; each
    is a mean over equally many images); `total`: the sum of the finished steps' means since the last
    `mean_since_last_call`; `first_bad_step`: the first finished step whose mean was NaN or inf (-1: none).
    """

    def __init__(self, grad_accum: int, device: torch.device):
        self.grad_accum = grad_accum
        self.current = torch.zeros((), device=device)
        self.total = torch.zeros((), device=device)
        self.first_bad_step = torch.full((), -1, device=device, dtype=torch.long)

    def add_micro_batch(self, loss: torch.Tensor) -> None:
        self.current += loss.detach().float() / self.grad_accum

    def end_step(self, step: int) -> None:
        """Count the current step's mean as the loss of optimizer step `step`."""
        self.total += self.current
        self.first_bad_step.masked_fill_((self.first_bad_step < 0) & ~torch.isfinite(self.current), step)
        self.current.zero_()

    def drop_step(self) -> None:
        """Forget the current step (it was skipped)."""
        self.current.zero_()

    def mean_since_last_call(self, accelerator: Accelerator, *, steps: int) -> float:
        """The mean step loss over the `steps` steps since the last call, averaged over the processes."""
        mean = accelerator.reduce(self.total, "mean").item() / max(steps, 1)
        self.total.zero_()
        return mean


def _logged_step(line: str) -> int:
    """The step of a log.jsonl line, or -1 when the line is not a whole record."""
    try:
        return int(json.loads(line)["step"])
    except (ValueError, KeyError, TypeError):
        return -1


def _flat(tree: dict, prefix: str = "") -> dict:
    """A nested config as {"section.key": value} for the trackers, which take scalars and strings only
    (TensorBoard's hparams): other values (lists, null) as their JSON text."""
    flat = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(_flat(value, f"{name}."))
        else:
            flat[name] = value if isinstance(value, (int, float, str, bool)) else json.dumps(value)
    return flat
