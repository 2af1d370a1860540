"""Conversion between our models and other libraries' (diffusers' UNet2DModel and schedulers:
`ddpm.interop.diffusers`, with the pipeline class of a class-conditional export,
`ddpm.interop.class_conditional_pipeline`, which imports diffusers; OpenAI's guided-diffusion and
improved-diffusion checkpoints: `ddpm.interop.openai`)."""
