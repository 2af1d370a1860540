"""Our networks as Hugging Face Hub models: `UNet.from_pretrained(folder_or_repo_id)`,
`model.save_pretrained(folder)` and `model.push_to_hub(repo_id)`, through huggingface_hub's
`PyTorchModelHubMixin`.

A model folder holds config.json (the network's class, the package version and its constructor's keyword
arguments, `model.config`), model.safetensors (its state dict), README.md (a model card: the network, the
noise schedule, the sampler settings and the sample grid, when given) and, when a schedule is given,
noise_scheduler.json (`NoiseScheduler`'s keyword arguments) and sample_grid.png. `ddpm.load_pretrained` reads
the network and its schedule together; `from_pretrained` reads the network alone.

What the mixin does here: the model card (its template hook, `MODEL_CARD`, and its card data: library, tags,
pipeline), writing config.json and the weights (`safetensors.torch.save_model`: the state dict's tensors,
contiguous, bit for bit), and the `save_pretrained` / `push_to_hub` / `from_pretrained` API. What it does not,
and why:
- Loading. The mixin's `from_pretrained` loads with strict=False (weights that do not fit would load in part,
  silently), drops config keys it does not know, cannot tell a UNet's folder from a ClassicUNet's or a
  diffusers one, and lets huggingface_hub's offline error through as it is. `from_pretrained` reads the
  folder itself (`from_folder`), fetching a repo id through `ddpm.hub.local_path` (only the model files, and
  its one-line errors).
- The schedule, the sampler settings and the grid, which the mixin's `save_pretrained` and `push_to_hub`
  have no place for: ours take them as keyword arguments.
"""

from __future__ import annotations

import inspect
import json
import shutil
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any, TypeVar

import torch
from huggingface_hub import HfApi, PyTorchModelHubMixin
from safetensors.torch import load_file

from ddpm.hub import local_path
from ddpm.models.weights import load_checked
from ddpm.schedule import NoiseScheduler
from ddpm.version import ddpm_version

CONFIG_NAME = (
    "config.json"  # the network's constructor keyword arguments (diffusers names its config the same)
)
WEIGHTS_NAME = "model.safetensors"  # huggingface_hub's name for a single safetensors file
NOISE_SCHEDULER = "noise_scheduler.json"  # NoiseScheduler's keyword arguments
CARD_NAME = "README.md"
SAMPLE_GRID = "sample_grid"  # + the suffix of the image given to save_pretrained
# The model card, a Jinja template filled in by `_card_fields` (card_data is the mixin's YAML header).
MODEL_CARD = """---
{{ card_data }}
---

# {{ title }}

A denoising diffusion model written by ddpm {{ version }}: {{ network }}.

## Noise schedule

{{ schedule }}

## Sampling

{{ sampling }}

```bash
{{ command }}
```
{% if sample_grid %}
![samples]({{ sample_grid }})

{{ sample_grid_note }}
{% endif %}
## Loading

```python
import ddpm

model, scheduler = ddpm.load_pretrained("{{ source }}")  # the network, in eval mode, and its schedule
network = {{ network_class }}.from_pretrained("{{ source }}")  # or the network alone
```
"""

Model = TypeVar("Model", bound="HubModel")


class HubModel(
    PyTorchModelHubMixin,
    library_name="ddpm",
    model_card_template=MODEL_CARD,
    pipeline_tag="unconditional-image-generation",
    tags=["ddpm", "diffusion"],
):
    """The Hub model API of a network whose `config` is its constructor's keyword arguments (UNet,
    ClassicUNet): `from_pretrained`, `save_pretrained`, `push_to_hub`. See the module docstring."""

    @classmethod
    def from_pretrained(
        cls: type[Model],
        source: str | Path,
        *,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> Model:
        """The network saved in a model folder, local or on the Hub (`namespace/name[@revision]`, fetched into
        the Hub cache: `ddpm.hub`), on `device` in `dtype`, in eval mode. A checkpoint folder and its ema/ are
        model folders too. Raises FileNotFoundError for a missing path (HubError for a repo that cannot be
        had) and ValueError for a folder of another network (see `from_folder`)."""
        return cls.from_folder(local_path(source), device=device, dtype=dtype)

    @classmethod
    def from_folder(
        cls: type[Model],
        folder: str | Path,
        *,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> Model:
        """`from_pretrained` of a local folder; `HubModel.from_folder` builds whichever of its subclasses
        (UNet, ClassicUNet) the folder's config.json names. Raises FileNotFoundError for a missing folder or
        file, and ValueError, saying what to do, for a config of another class (or a diffusers one), unknown
        config keys and weights that do not fit the config."""
        folder = Path(folder)
        saved_class, config = _read_config(folder)
        networks = {network.__name__: network for network in HubModel.__subclasses__()}
        if saved_class not in networks:
            raise ValueError(
                f"{folder / CONFIG_NAME} describes a {saved_class}, not one of ddpm's networks "
                f"({', '.join(networks)})"
            )
        if cls is HubModel:
            cls = networks[saved_class]
        elif saved_class != cls.__name__:
            raise ValueError(
                f"{folder / CONFIG_NAME} describes a {saved_class}, not a {cls.__name__}: load it with "
                f"{saved_class}.from_pretrained, or with ddpm.load_pretrained"
            )
        valid = [name for name in inspect.signature(cls.__init__).parameters if name != "self"]
        unknown = sorted(set(config) - set(valid))
        if unknown:
            raise ValueError(
                f"unknown config key(s) {unknown} in {folder / CONFIG_NAME}; valid keys: {valid}. "
                "Remove them, or upgrade ddpm if the folder was written by a newer version"
            )
        model = cls(**config)
        load_checked(
            model,
            load_file(str(folder / WEIGHTS_NAME)),
            f"the weights in {folder / WEIGHTS_NAME} do not fit the config in {folder / CONFIG_NAME}",
            "save the weights and the config together with ddpm.save_pretrained",
        )
        return model.to(device=device, dtype=dtype).eval()

    def save_pretrained(
        self,
        save_directory: str | Path,
        *,
        scheduler: NoiseScheduler | None = None,
        sampling: Mapping[str, Any] | None = None,
        sample_grid: str | Path | None = None,
        repo_id: str | None = None,
    ) -> None:
        """Write a model folder `save_directory` (created if missing): config.json, model.safetensors and the
        model card README.md (the mixin keeps one that is already there), and with `scheduler` its
        noise_scheduler.json, which `ddpm.load_pretrained` needs. `sampling`, the sampler settings to
        recommend (`SampleConfig`'s fields: `dataclasses.asdict(config.sample)`), and `sample_grid`, an image
        drawn with them (copied in as sample_grid.png, or its own suffix), go into the card; `repo_id` is the
        card's title and the name its snippets load (default: "path/to/this/folder"). The files are written
        in place, one after another: `ddpm.io.save_pretrained` writes a folder whole."""
        folder = Path(save_directory)
        grid = f"{SAMPLE_GRID}{Path(sample_grid).suffix}" if sample_grid is not None else None
        config = {"class": type(self).__name__, "ddpm_version": ddpm_version(), **self.config}
        card = _card_fields(self, repo_id, scheduler, sampling, grid)
        super().save_pretrained(folder, config=config, model_card_kwargs=card)
        if scheduler is not None:
            (folder / NOISE_SCHEDULER).write_text(json.dumps(scheduler.config, indent=2) + "\n")
        if sample_grid is not None:
            shutil.copyfile(sample_grid, folder / grid)

    def push_to_hub(
        self,
        repo_id: str,
        *,
        scheduler: NoiseScheduler | None = None,
        sampling: Mapping[str, Any] | None = None,
        sample_grid: str | Path | None = None,
        commit_message: str = "Upload a ddpm model",
        private: bool | None = None,
        token: str | None = None,
        branch: str | None = None,
        create_pr: bool | None = None,
    ) -> str:
        """Upload the model folder `save_pretrained` writes (with the same `scheduler`, `sampling` and
        `sample_grid`) to the Hub repo `repo_id` in one commit, creating the repo when missing; returns the
        commit's URL. What the mixin's `push_to_hub` does, with our arguments for `save_pretrained`."""
        api = HfApi(token=token)
        repo_id = api.create_repo(repo_id, private=private, exist_ok=True).repo_id
        with tempfile.TemporaryDirectory() as tmp:
            self.save_pretrained(
                tmp, scheduler=scheduler, sampling=sampling, sample_grid=sample_grid, repo_id=repo_id
            )
            return api.upload_folder(
                repo_id=repo_id,
                folder_path=tmp,
                commit_message=commit_message,
                revision=branch,
                create_pr=create_pr,
            )


def _read_config(folder: Path) -> tuple[str, dict[str, Any]]:
    """(class name, constructor keyword arguments) of the network a model folder holds, from its config.json
    (a folder written before the class was recorded holds a UNet). Raises FileNotFoundError for a missing
    folder or file, and ValueError for a diffusers config."""
    if not folder.is_dir():
        raise FileNotFoundError(
            f"{folder} is not a directory; pass the folder written by ddpm.save_pretrained(folder, model, "
            "scheduler)"
        )
    for name in (CONFIG_NAME, WEIGHTS_NAME):
        if not (folder / name).is_file():
            raise FileNotFoundError(
                f"{folder / name} not found; a model folder holds {CONFIG_NAME} and {WEIGHTS_NAME} as "
                "written by ddpm.save_pretrained(folder, model, scheduler)"
            )
    config = json.loads((folder / CONFIG_NAME).read_text())
    if "_class_name" in config:
        raise ValueError(
            f"{folder / CONFIG_NAME} describes a diffusers {config['_class_name']}: load it with "
            "ddpm.load_pretrained (or ddpm.interop.diffusers.unet_from_diffusers)"
        )
    config.pop("ddpm_version", None)
    return config.pop("class", "UNet"), config


def _card_fields(
    model: HubModel,
    repo_id: str | None,
    scheduler: NoiseScheduler | None,
    sampling: Mapping[str, Any] | None,
    sample_grid: str | None,
) -> dict[str, str]:
    """The variables of MODEL_CARD for `model`, titled and loaded in the card's snippets as `repo_id`."""
    source = repo_id or "path/to/this/folder"
    config = model.config
    size = config.get("image_size")
    network = f"`{type(model).__name__}`, {sum(p.numel() for p in model.parameters()):,} parameters"
    network += f", {config['in_channels']}-channel {size}x{size} images" if size else ""
    if config.get("num_classes"):
        network += f", {config['num_classes']} classes"
    if scheduler is None:
        schedule = (
            f"None was saved with these weights, so `ddpm.load_pretrained` refuses the folder: put the "
            f"{NOISE_SCHEDULER} of the run they came from beside them, or name one with `ddpm sample "
            "--schedule FILE`."
        )
    else:
        rows = "\n".join(f"| `{key}` | `{json.dumps(value)}` |" for key, value in scheduler.config.items())
        schedule = (
            f"The schedule the weights were trained with ({NOISE_SCHEDULER}); sampling with another one "
            f"gives noise.\n\n| setting | value |\n|---|---|\n{rows}"
        )
    command = f"ddpm sample --checkpoint {source} --n {(sampling or {}).get('n', 16)}"
    if sampling is None:
        said = (
            "No sampler settings were saved with these weights: `ddpm sample` takes those of the run the "
            "folder belongs to, else its own defaults."
        )
    else:
        budget = (
            f"{sampling['calls']} network calls"
            if sampling.get("calls") is not None
            else f"{sampling['steps']} steps"
        )
        said = f"Recommended: the `{sampling['sampler']}` sampler with {budget}"
        command += f" --sampler {sampling['sampler']}"
        command += (
            f" --calls {sampling['calls']}" if sampling.get("calls") else f" --steps {sampling['steps']}"
        )
        if sampling.get("eta") and sampling["sampler"] == "ddim":
            said += f", eta {sampling['eta']:g}"
            command += f" --eta {sampling['eta']:g}"
        if sampling.get("guidance_scale", 1) != 1:
            said += f", guidance scale {sampling['guidance_scale']:g}"
            command += f" --guidance-scale {sampling['guidance_scale']:g}"
        for name, value in sorted(dict(sampling.get("options") or {}).items()):
            said += f", {name}={value}"
            command += f" --option {name}={value}"
        said += "."
    return {
        "title": repo_id or "A ddpm model",
        "version": ddpm_version(),
        "network": network,
        "network_class": f"{type(model).__module__}.{type(model).__name__}",
        "schedule": schedule,
        "sampling": said,
        "command": command,
        "sample_grid": sample_grid or "",
        "sample_grid_note": "Drawn with the settings above." if sampling is not None else "",
        "source": source,
    }
