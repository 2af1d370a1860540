"""The networks: `UNet`, the denoising U-Net (`ddpm.models.unet`); `ClassicUNet`, the seed write-up's plain
U-Net, time-free or as a diffusion backbone (`ddpm.models.classic`); whether saved weights fit one
(`ddpm.models.weights`).

`ARCHITECTURES` names them for a config's `model.architecture` ("unet", the default, or "classic").
"""

from ddpm.models.classic import ClassicUNet
from ddpm.models.unet import UNet

ARCHITECTURES = {"unet": UNet, "classic": ClassicUNet}

__all__ = ["ARCHITECTURES", "ClassicUNet", "UNet"]
