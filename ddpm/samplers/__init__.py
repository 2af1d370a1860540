"""Sampling: `sample(model, scheduler, ...)` (in `sampling`) runs one of the solvers (in `solvers`), chosen by
name from SAMPLERS: "ddpm" (`ddpm_ancestral`), "ddim" (`ddim`) and "dpm++" (`dpmpp_2m`). Every solver has
one signature, `solver(denoise, x, timesteps, scheduler, *, <its own options>, disable) -> x0`; see
`ddpm.samplers.solvers`."""

from ddpm.samplers.sampling import SAMPLERS, SampleOptionError, check_sample_options, sample, solver_options
from ddpm.samplers.solvers import VARIANCES, Denoiser, ddim, ddpm_ancestral, dpmpp_2m, posterior

__all__ = [
    "SAMPLERS",
    "VARIANCES",
    "Denoiser",
    "SampleOptionError",
    "check_sample_options",
    "ddim",
    "ddpm_ancestral",
    "dpmpp_2m",
    "posterior",
    "sample",
    "solver_options",
]
