"""Sampling: `sample(model, scheduler, ...)` (in `sampling`) runs one of the solvers (in `solvers`), chosen by
name from SAMPLERS: "ddpm" (`ddpm_ancestral`), "ddim" (`ddim`), "euler" (`euler`), "euler_a"
(`euler_ancestral`) and "heun" (`heun`) in `solvers`; "dpm++2m" and its alias "dpm++" (`dpmpp_2m`), "dpm++3m"
(`dpmpp_3m`), "dpm++2m_sde" (`dpmpp_2m_sde`) and "unipc" (`unipc`) in `multistep`; "consistency"
(`consistency`, the multistep sampler of consistency models, not of diffusion models) in `consistency`.
Every solver has one signature, `solver(denoise, x, timesteps, scheduler, *, <its own options>, disable) ->
x0`; see
`ddpm.samplers.solvers`. Editing images (`inpaint`, `img2img`, `invert`, `interpolate`) is in `editing`."""

from ddpm.samplers.consistency import consistency
from ddpm.samplers.editing import img2img, inpaint, interpolate, invert
from ddpm.samplers.multistep import dpmpp_2m, dpmpp_2m_sde, dpmpp_3m, step_order, unipc
from ddpm.samplers.sampling import (
    DROP_LAST,
    SAMPLE_KEYWORDS,
    SAMPLERS,
    Budget,
    SampleOptionError,
    check_autoguide,
    check_sample_options,
    denoiser,
    model_denoiser,
    sample,
    sampling_budget,
    sampling_timesteps,
    solver_options,
)
from ddpm.samplers.solvers import (
    Denoised,
    Denoiser,
    alpha_bars,
    ancestral_step,
    ddim,
    ddim_step,
    ddpm_ancestral,
    euler,
    euler_ancestral,
    heun,
    network_calls,
    posterior,
)

__all__ = [
    "DROP_LAST",
    "SAMPLE_KEYWORDS",
    "SAMPLERS",
    "Budget",
    "Denoised",
    "Denoiser",
    "SampleOptionError",
    "alpha_bars",
    "ancestral_step",
    "check_autoguide",
    "check_sample_options",
    "consistency",
    "ddim",
    "ddim_step",
    "ddpm_ancestral",
    "denoiser",
    "dpmpp_2m",
    "dpmpp_2m_sde",
    "dpmpp_3m",
    "euler",
    "euler_ancestral",
    "heun",
    "img2img",
    "inpaint",
    "interpolate",
    "invert",
    "model_denoiser",
    "network_calls",
    "posterior",
    "sample",
    "sampling_budget",
    "sampling_timesteps",
    "solver_options",
    "step_order",
    "unipc",
]
