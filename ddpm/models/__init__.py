"""The networks: `UNet`, the denoising U-Net."""

from ddpm.models.unet import UNet

__all__ = ["UNet"]
