"""Model folders from the Hugging Face Hub: a repo id such as `google/ddpm-cifar10-32` (or
`google/ddpm-cifar10-32@REVISION`, a branch, tag or commit) becomes the local folder of its snapshot in the
Hub cache, fetched with huggingface_hub's `snapshot_download` the first time.

`model_folder(path)` is the one place where this happens; every loader that takes a model folder calls it
(`ddpm.load_pretrained`, `unet_from_diffusers`, `sample.py --checkpoint`, `python -m ddpm.fid`). The cache is
huggingface_hub's own: `HF_HOME` (or `HF_HUB_CACHE`) says where it is, `HF_HUB_OFFLINE=1` forbids the network
(a cached snapshot is then used as is), `HF_ENDPOINT` names a mirror, and a token from `hf auth login` opens
private repos. Only the files a model folder needs are fetched (`MODEL_FILES`): never a repo's other
checkpoints, images or `.bin` copies of safetensors weights.
"""

from __future__ import annotations

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
# ours (config.json, model.safetensors, noise_scheduler.json) and diffusers' (config.json, its weights,
# scheduler_config.json, model_index.json).
MODEL_FILES = [
    "model_index.json",
    "config.json",
    "model.safetensors",
    "noise_scheduler.json",
    "scheduler_config.json",
    "diffusion_pytorch_model.safetensors",
    "unet/config.json",
    "unet/diffusion_pytorch_model.safetensors",
    "scheduler/scheduler_config.json",
]
# The pickled weights of repos published before safetensors (google/ddpm-* among them), fetched only when a
# snapshot holds no safetensors weights.
PICKLED_WEIGHTS = ["diffusion_pytorch_model.bin", "unet/diffusion_pytorch_model.bin"]
_SAFETENSORS_WEIGHTS = [name for name in MODEL_FILES if name.endswith(".safetensors")]
_REPO_ID = re.compile(r"^(?P<repo>[^/@\s]+/[^/@\s]+)(?:@(?P<revision>\S+))?$")


class HubError(FileNotFoundError):
    """A Hub repo id whose model folder cannot be had: not on the Hub, or offline and not in the cache. The
    message is one line saying which and what to do."""


def hub_repo_id(path: str | Path) -> tuple[str, str | None] | None:
    """(repo id, revision or None) when `path` is a Hub model name: a string `namespace/name[@revision]`
    (valid by the Hub's rules) that is not an existing local path; None for anything else. A `Path` is always
    local, as in huggingface_hub; write `./namespace/name` for a local folder that does not exist yet."""
    if not isinstance(path, str) or Path(path).exists():
        return None
    match = _REPO_ID.match(path)
    if match is None:
        return None
    try:
        validate_repo_id(match["repo"])
    except HFValidationError:
        return None
    return match["repo"], match["revision"]


def model_folder(path: str | Path) -> Path:
    """The local folder of a model: `path` itself when it is local, else the snapshot of the Hub repo it names
    (see `hub_repo_id`) in the Hub cache, downloaded the first time (online, later calls ask the Hub for the
    revision's commit and fetch only what changed; offline, the cached snapshot is used). Only `MODEL_FILES`
    are fetched, and the pickled `.bin` weights only for a repo without safetensors ones.

    Raises HubError, one line naming the repo id and the fix: not on the Hub (or private), an unknown
    revision, or offline (HF_HUB_OFFLINE=1, or the Hub unreachable) with the snapshot not in the cache.
    """
    named = hub_repo_id(path)
    if named is None:
        return Path(path)
    repo, revision = named
    folder = _snapshot(path, repo, revision, MODEL_FILES)
    if not any((folder / name).is_file() for name in _SAFETENSORS_WEIGHTS):
        folder = _snapshot(path, repo, revision, MODEL_FILES + PICKLED_WEIGHTS)
    if not any((folder / name).is_file() for name in ("config.json", "unet/config.json")):
        raise HubError(
            f"the Hub repo {repo} holds no model folder (no config.json or unet/config.json at its top): "
            "name a repo written by ddpm.save_pretrained, python -m ddpm.export or diffusers' save_pretrained"
        )
    return folder


def _snapshot(path: str, repo: str, revision: str | None, patterns: list[str]) -> Path:
    """snapshot_download of `patterns`, its errors turned into one-line HubErrors."""
    try:
        return Path(snapshot_download(repo, revision=revision, allow_patterns=patterns))
    except RevisionNotFoundError:
        raise HubError(
            f"the Hub repo {repo} has no revision {revision!r}; drop @{revision} or fix it"
        ) from None
    except (RepositoryNotFoundError, GatedRepoError):  # 401 and 404 alike: the Hub does not tell them apart
        raise HubError(
            f"{path} is neither a local folder nor a model on the Hub (or it is private or gated: log in "
            "with `hf auth login`)"
        ) from None
    except LocalEntryNotFoundError:  # also an incomplete snapshot (IncompleteSnapshotError)
        reason = "HF_HUB_OFFLINE is set" if constants.HF_HUB_OFFLINE else "the Hub could not be reached"
        fetch = f"hf download {repo}" + (f" --revision {revision}" if revision else "")
        raise HubError(
            f"{path} is not a local folder, and the Hub model {repo} is not in the Hub cache at "
            f"{constants.HF_HUB_CACHE} (set by HF_HOME) while {reason}: fetch it on a machine with internet "
            f"with `{fetch}` (same HF_HOME) and copy the cache here, or pass a local model folder"
        ) from None
