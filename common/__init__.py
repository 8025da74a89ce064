"""What the relay and the operator share: the VncTarget and route models, the registration
client, the small Kubernetes client and the primitives both parse (durations, addresses, CIDRs,
`VNCGATE_*` flags, the RFB greeting). It imports neither side (import-linter says so)."""

from importlib.metadata import PackageNotFoundError, distribution
from pathlib import Path

__version__ = "0.1.0"


def installed_version() -> str:
    """The version of the installed distribution this code was loaded from: `vncgate`, or
    `vncgate-kubectl` (the plugin alone, also inside its zipapp, even when the Python running
    the zipapp has another vncgate installed); else the first of them installed (an editable
    install, whose files are the work tree's); else the source's."""
    here = Path(__file__).resolve()
    found = []
    for name in ("vncgate", "vncgate-kubectl"):
        try:
            dist = distribution(name)
        except PackageNotFoundError:
            continue
        if any(Path(str(dist.locate_file(file))).resolve() == here for file in dist.files or ()
               if file.name == "__init__.py"):
            return dist.version
        found.append(dist.version)
    return found[0] if found else __version__
