"""Conditions read from files: those of each image of a folder data set (data.conditions, data.paired) and
sample.py's --cond.

Naming, for an image `cat.png` of data.root (any sub-folder) and data.conditions {KIND: NAME, ...}:
    cat.NAME.png (any image extension)   its image condition ("image"): an image or a mask, read in
                                         model.cond_channels (1 grey, 3 RGB) and resized as the images are
    cat.NAME.npy or cat.NAME.safetensors a vector ("vector", shape (cond_dim,)) or a token sequence
                                         ("context", (L, context_dim), L free: sequences of different lengths
                                         are padded in the batch, with the padding mask "context_mask")
A name part keeps the condition files out of the images: `cat.cond.png` is no training image when "cond"
names the image condition. The paired layout for image-to-image (data.paired): data.root/targets/ holds the
images, data.root/inputs/ each one's image condition at the same relative path and stem (any extension).

Every file is found and its shape checked when the data set is built (`ddpm.data.ConditionFiles`), so that
a missing or mis-shaped file stops the run before it starts, with one error naming the file and the shape
expected.
A .safetensors file holds one tensor (of any name), or for --cond one per kind, named "vector" and "context".
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file
from torch import Tensor

from ddpm.conditions import Conditions, collate_conditions

FILE_KINDS = ("image", "vector", "context")  # the kinds of condition a file can give
ARRAY_SUFFIXES = (".npy", ".safetensors")
# The network's argument that sets the size of each kind (ddpm.models.unet.CONDITION_ARGUMENTS).
SIZE_ARGUMENTS = {"image": "cond_channels", "vector": "cond_dim", "context": "context_dim"}


class ConditionFileError(ValueError):
    """A condition file that is missing, unreadable or of the wrong shape; the message names it."""


def is_condition_file(path: Path, names: Mapping[str, str]) -> bool:
    """Whether the image file `path` is an image condition (`cat.NAME.png` with NAME data.conditions'
    "image"), which the folder data set leaves out of its images."""
    name = names.get("image")
    return name is not None and Path(path.stem).suffix == f".{name}"


def read_array(path: Path) -> Tensor:
    """The array of a .npy file or the one tensor of a .safetensors file, as float32."""
    if path.suffix == ".npy":
        return torch.from_numpy(np.load(path, allow_pickle=False).astype(np.float32))
    tensors = load_file(str(path))
    if len(tensors) != 1:
        raise ConditionFileError(f"{path}: holds {len(tensors)} tensors {sorted(tensors)}; expected one")
    return next(iter(tensors.values())).float()


def array_shapes(path: Path) -> dict[str, tuple[int, ...]]:
    """The shapes of the arrays of a .npy file ({"": shape}) or a .safetensors file (name -> shape), read
    from their headers without their data. Raises ConditionFileError naming the file when it is unreadable."""
    try:
        if path.suffix == ".npy":
            return {"": tuple(np.load(path, mmap_mode="r", allow_pickle=False).shape)}
        with safe_open(str(path), "pt") as f:
            return {name: tuple(f.get_slice(name).get_shape()) for name in f.keys()}  # noqa: SIM118
    except (OSError, ValueError, SafetensorError) as error:
        raise ConditionFileError(f"cannot read {path}: {error}") from None


def shape_problem(path: Path, kind: str, size: int) -> str | None:
    """What is wrong with the shape of the array file `path` as a condition of `kind` ("vector" or
    "context") for a network of that `size` (None when nothing is), read from its header (`array_shapes`)."""
    shapes = list(array_shapes(path).values())
    if len(shapes) != 1:
        return f"{path}: holds {len(shapes)} tensors; expected one of shape {expected_shape(kind, size)}"
    if not fits(shapes[0], kind, size):
        return f"{path}: shape {shapes[0]}, expected {expected_shape(kind, size)}"
    return None


def fits(shape: Sequence[int], kind: str, size: int) -> bool:
    """Whether an array of `shape` is a condition of `kind` for a network of that `size`: a vector (size,),
    a token sequence (L, size) with L >= 1."""
    shape = tuple(shape)
    if kind == "vector":
        return shape == (size,)
    return len(shape) == 2 and shape[0] >= 1 and shape[1] == size


def expected_shape(kind: str, size: int) -> str:
    """The shape of a condition of `kind` for a network of that `size`, as errors say it."""
    return f"({size},) (model.cond_dim)" if kind == "vector" else f"(L, {size}) (L >= 1, model.context_dim)"


def find_beside(image: Path, name: str, suffixes: Sequence[str]) -> tuple[Path | None, str]:
    """(the file `STEM.NAME.SUFFIX` beside `image`, the first of `suffixes` that exists, or None; what was
    looked for, for the error)."""
    candidates = [image.with_name(f"{image.stem}.{name}{suffix}") for suffix in suffixes]
    found = next((c for c in candidates if c.is_file()), None)
    return found, f"{image.parent / image.stem}.{name}{{{','.join(suffixes)}}}"


def read_cond_files(path: str | Path, sizes: Mapping[str, int | None]) -> Conditions:
    """sample.py's --cond: the .npy or .safetensors file `path`, or every such file in the folder `path`
    (sorted by name), each the conditions of one image: the vector and/or token sequence the network takes
    (sizes: cond_dim, context_dim; None for a kind it does not take). A .npy file gives one kind, told by its
    shape ((cond_dim,) a vector, (L, context_dim) a sequence); a .safetensors file gives "vector" and
    "context" by name (or one tensor of any name, as a .npy). Sequences of different lengths are padded
    (`collate_conditions`). Raises ConditionFileError naming the file and the shapes expected."""
    path = Path(path)
    if not path.exists():
        raise ConditionFileError(
            f"--cond {path}: no such file or folder; expected a .npy or .safetensors file"
        )
    files = sorted(p for p in path.iterdir() if p.suffix in ARRAY_SUFFIXES) if path.is_dir() else [path]
    if not files or any(file.suffix not in ARRAY_SUFFIXES for file in files):
        raise ConditionFileError(f"--cond {path}: expected a .npy or .safetensors file, or a folder of them")
    wanted = {kind: sizes.get(SIZE_ARGUMENTS[kind]) for kind in ("vector", "context")}
    wanted = {kind: size for kind, size in wanted.items() if size is not None}
    expected = " and ".join(f"{kind} {expected_shape(kind, size)}" for kind, size in wanted.items())
    items = []
    for file in files:
        item = _kinds_of(file, wanted)
        if any(kind not in item or not fits(item[kind].shape, kind, size) for kind, size in wanted.items()):
            got = {kind: tuple(tensor.shape) for kind, tensor in item.items()} or array_shapes(file)
            raise ConditionFileError(f"--cond {file}: holds {got}; the model takes {expected}")
        items.append(item)
    return collate_conditions(items)


def _kinds_of(file: Path, kinds: Sequence[str]) -> dict[str, Tensor]:
    """The conditions of `kinds` an array file holds: a .safetensors file's tensors named by their kind;
    else its one array, a vector when 1-d, a token sequence when 2-d (nothing for other shapes)."""
    shapes = array_shapes(file)
    if file.suffix == ".safetensors" and set(shapes) & set(kinds):
        return {name: t.float() for name, t in load_file(str(file)).items() if name in kinds}
    if len(shapes) != 1:
        return {}
    kind = {1: "vector", 2: "context"}.get(len(next(iter(shapes.values()))))
    return {kind: read_array(file)} if kind in kinds else {}
