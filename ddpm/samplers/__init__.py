"""Sampling: `sample(model, scheduler, ...)` (in `sampling`) runs one of the solvers (in `solvers`), chosen by
name from SAMPLERS: "ddpm" (`ddpm_ancestral`), "ddim" (`ddim`), "euler" (`euler`), "euler_a"
(`euler_ancestral`) and "heun" (`heun`) in `solvers`; "dpm++2m" and its alias "dpm++" (`dpmpp_2m`), "dpm++3m"
(`dpmpp_3m`), "dpm++2m_sde" (`dpmpp_2m_sde`) and "unipc" (`unipc`) in `multistep`. Every solver has one
signature, `solver(denoise, x, timesteps, scheduler, *, <its own options>, disable) -> x0`; see
`ddpm.samplers.solvers`."""

from ddpm.samplers.multistep import dpmpp_2m, dpmpp_2m_sde, dpmpp_3m, step_order, unipc
from ddpm.samplers.sampling import (
    DROP_LAST,
    SAMPLE_KEYWORDS,
    SAMPLERS,
    Budget,
    SampleOptionError,
    check_sample_options,
    denoiser,
    sample,
    sampling_budget,
    solver_options,
)
from ddpm.samplers.solvers import (
    Denoised,
    Denoiser,
    alpha_bars,
    ancestral_step,
    ddim,
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
    "check_sample_options",
    "ddim",
    "ddpm_ancestral",
    "denoiser",
    "dpmpp_2m",
    "dpmpp_2m_sde",
    "dpmpp_3m",
    "euler",
    "euler_ancestral",
    "heun",
    "network_calls",
    "posterior",
    "sample",
    "sampling_budget",
    "solver_options",
    "step_order",
    "unipc",
]
