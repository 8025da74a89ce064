"""vncgate's data plane: the relay that serves noVNC and bridges WebSocket to VNC over TCP."""

__version__ = "0.1.0"
