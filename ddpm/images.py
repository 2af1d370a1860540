"""Image files: float images in [-1, 1] as the uint8 pixels a PNG holds (`to_uint8`), and many images written
as one PNG each on a pool of threads (`PngWriter`), so that encoding them overlaps what the caller does next,
such as sampling the next batch on the GPU."""

from __future__ import annotations

import os
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
from PIL import Image

PNG_THREADS = 8  # at most; PNG encoding releases the GIL, so threads encode in parallel


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """Float images in [-1, 1] -> uint8, shape kept: the values `save_image(x, normalize=True,
    value_range=(-1, 1))` writes to a PNG, floor((clamp(x, -1, 1) + 1) / 2 * 255 + 0.5), in the same float32
    operations."""
    return images.float().clamp(-1, 1).add(1).div(2).mul(255).add(0.5).clamp(0, 255).to(torch.uint8)


class PngWriter:
    """Writes images (N, C, H, W) in [-1, 1] as FOLDER/000000.png, 000001.png, ... (numbered from `start`),
    each with the pixels torchvision's `save_image(image, normalize=True, value_range=(-1, 1))` writes (a
    1-channel image as gray RGB, as it does), so the files are the same bytes.

    `write` converts a batch to pixels at once and hands the encoding to `threads` threads (default: the
    cores, at most PNG_THREADS), returning before the files exist. Use it as a context manager: leaving it
    waits for every file and raises the first error of any (an OSError naming the file).
    """

    def __init__(self, folder: str | Path, *, threads: int | None = None):
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.paths: list[Path] = []  # every file asked for, in order
        workers = threads or min(PNG_THREADS, os.cpu_count() or 1)
        self._pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="png")
        self._pending: list[Future] = []

    def write(self, images: torch.Tensor, start: int) -> list[Path]:
        """Queue images (N, C, H, W), C = 1 or 3, as the files numbered start .. start + N - 1; returns their
        paths."""
        pixels = to_uint8(images.detach().cpu())
        if pixels.shape[1] == 1:
            pixels = pixels.expand(-1, 3, -1, -1)
        arrays = pixels.permute(0, 2, 3, 1).contiguous().numpy()  # (N, H, W, 3)
        paths = [self.folder / f"{start + offset:06d}.png" for offset in range(len(arrays))]
        self._pending = [future for future in self._pending if not future.done() or future.exception()]
        self._pending += [self._pool.submit(_save_png, a, p) for a, p in zip(arrays, paths, strict=True)]
        self.paths += paths
        return paths

    def close(self) -> None:
        """Wait for every queued file; raise the first error, if any."""
        self._pool.shutdown(wait=True)
        for future in self._pending:
            future.result()
        self._pending = []

    def __enter__(self) -> PngWriter:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()


def _save_png(pixels: np.ndarray, path: Path) -> None:
    try:
        Image.fromarray(pixels).save(path)
    except OSError as error:
        raise OSError(f"cannot write {path}: {error}") from error
