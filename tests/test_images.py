"""PNG files: `PngWriter` (what --save-images and `save_images_to` write) against torchvision's save_image."""

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.utils import save_image

from ddpm.images import PngWriter, to_uint8
from ddpm.inference import save_images_to


def images(n: int, channels: int, seed: int = 0) -> torch.Tensor:
    """Values beyond [-1, 1] too, as a sampler may return."""
    return torch.rand(n, channels, 8, 8, generator=torch.Generator().manual_seed(seed)) * 2.4 - 1.2


@pytest.mark.parametrize("channels", [1, 3])
def test_the_files_are_the_bytes_save_image_writes(tmp_path, channels):
    x = images(4, channels)
    paths = save_images_to(x, tmp_path / "ours", start=7)
    assert [p.name for p in paths] == ["000007.png", "000008.png", "000009.png", "000010.png"]
    for image, path in zip(x, paths, strict=True):
        theirs = tmp_path / f"theirs-{path.name}"
        save_image(image, theirs, normalize=True, value_range=(-1, 1), padding=0)
        assert path.read_bytes() == theirs.read_bytes()


def test_many_batches_are_written_whole_and_in_order(tmp_path):
    batches = [images(150, 3, seed) for seed in range(3)]
    with PngWriter(tmp_path, threads=4) as writer:
        for i, batch in enumerate(batches):
            writer.write(batch, 150 * i)  # returns before the files exist; leaving the block waits for them
    written = sorted(tmp_path.iterdir())
    assert [p.name for p in written] == [f"{i:06d}.png" for i in range(450)] == [p.name for p in writer.paths]
    pixels = torch.stack([torch.from_numpy(np.array(Image.open(p))) for p in written]).permute(0, 3, 1, 2)
    assert torch.equal(pixels, to_uint8(torch.cat(batches)))


def test_a_file_that_cannot_be_written_is_named(tmp_path):
    (tmp_path / "000001.png").mkdir()  # a folder where the second image should go
    with pytest.raises(OSError, match=r"cannot write .*000001\.png"), PngWriter(tmp_path) as writer:
        writer.write(images(3, 1), 0)
    assert Path(tmp_path / "000000.png").is_file() and Path(tmp_path / "000002.png").is_file()
