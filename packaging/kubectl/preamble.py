"""Run by the kubectl-vnc zipapp (shiv's --preamble) before the plugin: a Python too old for it
gets a sentence instead of a traceback."""

import sys

if sys.version_info < (3, 11):  # noqa: UP036 (runs under any python3 the user has)
    sys.exit(f"kubectl vnc needs Python 3.11 or newer; {sys.executable} is "
             f"{sys.version.split()[0]}. Run the archive with a newer one: python3.11 "
             f"{sys.argv[0]} ...")
