"""The networks: `UNet`, the denoising U-Net (`ddpm.models.unet`); whether saved weights fit one
(`ddpm.models.weights`)."""

from ddpm.models.unet import UNet

__all__ = ["UNet"]
