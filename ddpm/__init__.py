"""ddpm: denoising diffusion models, trained and sampled on Accelerate.

The public API: the network (`UNet`) and the conditions it takes (`Conditions`), the noise schedule
(`NoiseScheduler`), the samplers (`sample`, `SAMPLERS`), editing (`inpaint`, `img2img`, `invert`,
`interpolate`), model folders (`save_pretrained`, `load_pretrained`, and `UNet.from_pretrained`,
`save_pretrained`, `push_to_hub` for the network alone; what a model source is: `ddpm.source`), sampling a
trained model (`load_for_sampling`, `generate`), the config (`Config` and its sections, `load_config`,
`save_config`) and the data sets (`build_dataset`). Training is `ddpm.training`, FID `ddpm.fid`, diffusers
interop `ddpm.interop.diffusers`.
"""

from ddpm.openmp import apply_openmp_defaults

# Before anything below imports torch, whose OpenMP runtime reads its wait policy once, as it loads.
apply_openmp_defaults()

import importlib
import importlib.util
from typing import Any

# Where each public name lives. They are imported on first use (PEP 562's module __getattr__), so that what
# needs none of them (`ddpm --help`, `ddpm.cli`, which imports this package first) does not load torch.
_EXPORTS = {
    "Conditions": "ddpm.conditions",
    "Config": "ddpm.config",
    "ConfigError": "ddpm.config",
    "DataConfig": "ddpm.config",
    "SampleConfig": "ddpm.config",
    "TrainConfig": "ddpm.config",
    "load_config": "ddpm.config",
    "save_config": "ddpm.config",
    "build_dataset": "ddpm.data",
    "num_classes_of": "ddpm.data",
    "generate": "ddpm.inference",
    "load_for_sampling": "ddpm.inference",
    "save_pretrained": "ddpm.io",
    "UNet": "ddpm.models.unet",
    "SAMPLERS": "ddpm.samplers",
    "img2img": "ddpm.samplers",
    "inpaint": "ddpm.samplers",
    "interpolate": "ddpm.samplers",
    "invert": "ddpm.samplers",
    "sample": "ddpm.samplers",
    "NoiseScheduler": "ddpm.schedule",
    "load_pretrained": "ddpm.source",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    """A public name (`ddpm.UNet`), imported from its module the first time it is asked for, or a submodule
    (`ddpm.io`), imported as `import ddpm.io` would, as the eager imports of earlier versions left them."""
    if name in _EXPORTS:
        value = getattr(importlib.import_module(_EXPORTS[name]), name)
        globals()[name] = value  # later lookups find it without this function
        return value
    if not name.startswith("_") and importlib.util.find_spec(f"{__name__}.{name}") is not None:
        return importlib.import_module(f"{__name__}.{name}")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({*globals(), *_EXPORTS})
