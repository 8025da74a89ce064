"""vncgate's data plane: the relay that serves noVNC and bridges WebSocket to VNC over TCP."""

from vncgate.common import __version__, installed_version

__all__ = ["__version__", "installed_version"]
