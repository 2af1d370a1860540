"""Progress bars: every bar of ddpm (training, sampling, FID, bits/dim, the editing loops) is made here, so
that tqdm's own switches reach all of them.

tqdm reads its TQDM_* environment variables (TQDM_DISABLE=1, TQDM_MININTERVAL=5, ...) only as the defaults
of the arguments a caller does not pass: a bar made with an explicit `disable=False` is drawn even under
TQDM_DISABLE=1. So a bar that is wanted is made without `disable`, and only a bar that is not is made with
`disable=True`.
"""

from collections.abc import Iterable
from typing import Any

from tqdm.auto import tqdm


def progress_bar(iterable: Iterable | None = None, *, show: bool = True, **options: Any) -> tqdm:
    """A tqdm bar over `iterable` (or one updated by hand), `options` being tqdm's own keyword arguments
    (desc, total, unit, leave, ...) other than `disable`. `show` False hides it; True leaves it to tqdm's
    defaults, so that TQDM_DISABLE=1 hides it too."""
    if not show:
        options["disable"] = True
    return tqdm(iterable, **options)
