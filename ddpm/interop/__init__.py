"""Conversion between our models and other libraries' (diffusers' UNet2DModel and schedulers:
`ddpm.interop.diffusers`)."""
