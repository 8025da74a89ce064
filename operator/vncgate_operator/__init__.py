"""vncgate's control plane: a kopf operator that turns VncTarget resources into relay routes."""

from vncgate.common import __version__, installed_version

__all__ = ["__version__", "installed_version"]
