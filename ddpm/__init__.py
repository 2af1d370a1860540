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

from ddpm.conditions import Conditions
from ddpm.config import Config, ConfigError, DataConfig, SampleConfig, TrainConfig, load_config, save_config
from ddpm.data import build_dataset, num_classes_of
from ddpm.inference import generate, load_for_sampling
from ddpm.io import save_pretrained
from ddpm.models.unet import UNet
from ddpm.samplers import SAMPLERS, img2img, inpaint, interpolate, invert, sample
from ddpm.schedule import NoiseScheduler
from ddpm.source import load_pretrained

__all__ = [
    "SAMPLERS",
    "Conditions",
    "Config",
    "ConfigError",
    "DataConfig",
    "NoiseScheduler",
    "SampleConfig",
    "TrainConfig",
    "UNet",
    "build_dataset",
    "generate",
    "img2img",
    "inpaint",
    "interpolate",
    "invert",
    "load_config",
    "load_for_sampling",
    "load_pretrained",
    "num_classes_of",
    "sample",
    "save_config",
    "save_pretrained",
]
