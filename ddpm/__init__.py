"""ddpm: denoising diffusion models, trained and sampled on Accelerate."""

from ddpm.config import Config, ConfigError, DataConfig, SampleConfig, TrainConfig, load_config, save_config
from ddpm.data import build_dataset, num_classes_of
from ddpm.io import load_pretrained, save_pretrained
from ddpm.models.unet import UNet
from ddpm.samplers import SAMPLERS, sample
from ddpm.schedule import NoiseScheduler

__all__ = [
    "SAMPLERS",
    "Config",
    "ConfigError",
    "DataConfig",
    "NoiseScheduler",
    "SampleConfig",
    "TrainConfig",
    "UNet",
    "build_dataset",
    "load_config",
    "load_pretrained",
    "num_classes_of",
    "sample",
    "save_config",
    "save_pretrained",
]
