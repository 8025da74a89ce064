"""The HTTP surfaces of the relay: its ports, handlers, pages, forms, the WebSocket upgrade, TLS."""
