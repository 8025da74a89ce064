"""What the relay and the operator share: the VncTarget and route models, the registration
client, the small Kubernetes client and the primitives both parse (durations, addresses, CIDRs,
`VNCGATE_*` flags, the RFB greeting). It imports neither side (import-linter says so)."""

from importlib.metadata import PackageNotFoundError, version

__version__ = "0.1.0"


def installed_version() -> str:
    """The version of the installed `vncgate` distribution, else of `vncgate-kubectl` (the plugin
    alone), else the source's (run uninstalled, or from the plugin's zipapp)."""
    for distribution in ("vncgate", "vncgate-kubectl"):
        try:
            return version(distribution)
        except PackageNotFoundError:
            continue
    return __version__
