"""Conversion between our models and other libraries' (diffusers' UNet2DModel: `ddpm.interop.diffusers`)."""
