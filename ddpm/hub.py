"""The local file or folder a model source names: an existing path as it is, a Hugging Face Hub repo id
(`google/ddpm-cifar10-32`, or `google/ddpm-cifar10-32@REVISION` for a branch, tag or commit) as the folder of
its snapshot in the Hub cache, fetched with huggingface_hub's `snapshot_download` the first time, and any
other name as a path that does not exist. Which string is which is rule 1-3 of `ddpm.source`'s docstring;
`local_path` applies them, once per source, at the entry of whatever takes one.

The cache is huggingface_hub's own: `HF_HOME` (or `HF_HUB_CACHE`) says where it is, `HF_HUB_OFFLINE=1`
forbids the network (a cached snapshot is then used as is), `HF_ENDPOINT` names a mirror, and a token from
`hf auth login` opens private repos. Only the files a model folder needs are fetched (`MODEL_FILES`): never a
repo's other checkpoints, images or `.bin` copies of safetensors weights.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from huggingface_hub import constants, snapshot_download
from huggingface_hub.errors import (
    GatedRepoError,
    HFValidationError,
    LocalEntryNotFoundError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)
from huggingface_hub.utils import validate_repo_id

# What a model folder of either kind needs, at the top or in a diffusers pipeline's unet/ and scheduler/:
# ours (config.json, model.safetensors, noise_scheduler.json, task.json) and diffusers' (config.json, its
# weights, scheduler_config.json, model_index.json).
MODEL_FILES = [
    "model_index.json",
    "config.json",
    "model.safetensors",
    "noise_scheduler.json",
    "task.json",
    "scheduler_config.json",
    "diffusion_pytorch_model.safetensors",
    "unet/config.json",
    "unet/diffusion_pytorch_model.safetensors",
    "scheduler/scheduler_config.json",
]
# The pickled weights of repos published before safetensors (google/ddpm-* among them), fetched only when a
# snapshot holds no safetensors weights.
PICKLED_WEIGHTS = ["diffusion_pytorch_model.bin", "unet/diffusion_pytorch_model.bin"]
# Endings of the files a model source may be (or a config/statistics file beside one): a name ending so is a
# path, never a repo id, though `owner/model.pt` is a valid one.
FILE_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt", ".safetensors", ".json", ".yaml", ".yml", ".npz")
# The environment variables that move huggingface_hub's cache, in the order it reads them.
CACHE_VARIABLES = ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE", "HF_HOME", "XDG_CACHE_HOME")
_SAFETENSORS_WEIGHTS = [name for name in MODEL_FILES if name.endswith(".safetensors")]
_REPO_ID = re.compile(r"^(?P<repo>[^/@\s]+/[^/@\s]+)(?:@(?P<revision>\S+))?$")


class HubError(FileNotFoundError):
    """A Hub repo id whose model folder cannot be had: not on the Hub, or offline and not in the cache. The
    message is one line saying which and what to do."""


def local_path(source: str | Path) -> Path:
    """The local file or folder of a model source (`ddpm.source`, rules 1-3): `source` itself when it exists,
    the snapshot folder of the Hub repo it names (`hub_repo_id`, `hub_folder`), else FileNotFoundError
    "SOURCE: no such file or folder", naming the absolute path tried and the current folder, without asking
    the Hub anything. Raises HubError for a repo id whose snapshot cannot be had."""
    named = hub_repo_id(source)
    if named is not None:
        return hub_folder(str(source), *named)
    path = Path(source)
    if not path.exists():
        raise FileNotFoundError(
            f"{source}: no such file or folder (looked for {os.path.abspath(path.expanduser())}; the current "
            f"folder is {Path.cwd()})"
        )
    return path


def hub_repo_id(source: str | Path) -> tuple[str, str | None] | None:
    """(repo id, revision or None) when `source` is a Hub model name, `namespace/name[@revision]` valid by the
    Hub's rules; None for anything else. A `Path` is always local, and so is a string that names an existing
    path, whose namespace is an existing local folder (`runs/typo` where runs/ is), or that ends in a file
    suffix (FILE_SUFFIXES): write `./namespace/name` for a local folder that does not exist yet."""
    if not isinstance(source, str) or Path(source).exists():
        return None
    match = _REPO_ID.match(source)
    if match is None or Path(match["repo"].split("/")[0]).is_dir() or source.endswith(FILE_SUFFIXES):
        return None
    try:
        validate_repo_id(match["repo"])
    except HFValidationError:
        return None
    return match["repo"], match["revision"]


def hub_folder(source: str, repo: str, revision: str | None) -> Path:
    """The local folder of the snapshot of Hub repo `repo` at `revision` (None: main) in the Hub cache,
    downloaded the first time (online, later calls ask the Hub for the revision's commit and fetch only what
    changed; offline, the cached snapshot is used). Only `MODEL_FILES` are fetched, and the pickled `.bin`
    weights only for a repo without safetensors ones. `source` is the name as given, for messages.

    Raises HubError, one line naming the repo id and the fix: not on the Hub (or private), an unknown
    revision, no model folder in it, or offline (HF_HUB_OFFLINE=1, or the Hub unreachable) with the snapshot
    not in the cache.
    """
    folder = _snapshot(source, repo, revision, MODEL_FILES)
    if not any((folder / name).is_file() for name in _SAFETENSORS_WEIGHTS):
        folder = _snapshot(source, repo, revision, MODEL_FILES + PICKLED_WEIGHTS)
    if not any((folder / name).is_file() for name in ("config.json", "unet/config.json")):
        raise HubError(
            f"the Hub repo {repo} holds no model folder (no config.json or unet/config.json at its top): "
            "name a repo written by ddpm.save_pretrained, python -m ddpm.export or diffusers' save_pretrained"
        )
    return folder


def _snapshot(source: str, repo: str, revision: str | None, patterns: list[str]) -> Path:
    """snapshot_download of `patterns`, its errors turned into one-line HubErrors."""
    try:
        return Path(snapshot_download(repo, revision=revision, allow_patterns=patterns))
    except RevisionNotFoundError:
        raise HubError(
            f"the Hub repo {repo} has no revision {revision!r}; drop @{revision} or fix it"
        ) from None
    except (RepositoryNotFoundError, GatedRepoError):  # 401 and 404 alike: the Hub does not tell them apart
        raise HubError(
            f"{source} is neither a local folder nor a model on the Hub (or it is private or gated: log in "
            "with `hf auth login`)"
        ) from None
    except LocalEntryNotFoundError:  # also an incomplete snapshot (IncompleteSnapshotError)
        reason = "HF_HUB_OFFLINE is set" if constants.HF_HUB_OFFLINE else "the Hub could not be reached"
        fetch = f"hf download {repo}" + (f" --revision {revision}" if revision else "")
        cache = constants.HF_HUB_CACHE
        raise HubError(
            f"{source} is not a local folder, and the Hub model {repo} is not in the Hub cache at {cache} "
            f"({_cache_origin()}) while {reason}: fetch it on a machine with internet with `{fetch}` and "
            f"copy that machine's Hub cache to {cache}, or pass a local model folder"
        ) from None


def _cache_origin() -> str:
    """What put the Hub cache where it is: the first of CACHE_VARIABLES that is set, else the default."""
    variable = next((name for name in CACHE_VARIABLES if os.environ.get(name)), None)
    return f"set by {variable}" if variable else "huggingface_hub's default"
