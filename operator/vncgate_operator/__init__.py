"""vncgate's control plane: a kopf operator that turns VncTarget resources into relay routes."""

from importlib.metadata import PackageNotFoundError, version

__version__ = "0.1.0"


def installed_version() -> str:
    """The version of the installed `vncgate` distribution (the source's, when run uninstalled)."""
    try:
        return version("vncgate")
    except PackageNotFoundError:
        return __version__
