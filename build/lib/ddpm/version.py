"""The version of this package, as recorded in the files it writes."""

from importlib.metadata import PackageNotFoundError, version


def ddpm_version() -> str:
    """The installed version of this package, or "unknown" when it runs from a source tree not installed."""
    try:
        return version("ddpm")
    except PackageNotFoundError:
        return "unknown"
