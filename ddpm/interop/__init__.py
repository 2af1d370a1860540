"""Conversion between our models and other libraries' (diffusers' UNet2DModel and schedulers:
`ddpm.interop.diffusers`; OpenAI's guided-diffusion and improved-diffusion checkpoints:
`ddpm.interop.openai`)."""
