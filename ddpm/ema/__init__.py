"""Moving averages of a network's weights, the weights samples are drawn from.

`EMA` (classic.py): the classic exponential moving average with decay warm-up, the default. `PowerFunctionEMA`
and the maths of post-hoc EMA (power.py; Karras et al. 2024): power-function profiles tracked during training
and least-squares reconstruction of any other profile afterwards. Both are low in the package's layout (torch
and numpy only); posthoc.py (snapshot files of a run, reconstruction into a model folder, scoring) sits above
the run directory, and `python -m ddpm.ema` (__main__.py) is its command line.
"""

from ddpm.ema.classic import EMA
from ddpm.ema.power import (
    DEFAULT_SIGMA_RELS,
    SIGMA_REL_MAX,
    PowerFunctionEMA,
    gamma_to_sigma_rel,
    posthoc_coefficients,
    power_beta,
    profile_inner_products,
    sigma_rel_to_gamma,
)

__all__ = [
    "DEFAULT_SIGMA_RELS",
    "EMA",
    "SIGMA_REL_MAX",
    "PowerFunctionEMA",
    "gamma_to_sigma_rel",
    "posthoc_coefficients",
    "power_beta",
    "profile_inner_products",
    "sigma_rel_to_gamma",
]
