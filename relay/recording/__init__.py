"""Session recordings: the capture (format, tap, writer), the service, the store, the CLI."""
