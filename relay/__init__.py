"""vncgate's data plane: the relay that serves noVNC and bridges WebSocket to VNC over TCP."""

from importlib.metadata import PackageNotFoundError, version

__version__ = "0.1.0"


def installed_version() -> str:
    """The version of the installed `vncgate` distribution (the source's, when run uninstalled)."""
    try:
        return version("vncgate")
    except PackageNotFoundError:
        return __version__
