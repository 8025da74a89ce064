"""One console session from admission to its ending, and where consoles live."""
