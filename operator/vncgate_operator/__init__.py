"""vncgate's control plane: a kopf operator that turns VncTarget resources into relay routes."""

__version__ = "0.1.0"
