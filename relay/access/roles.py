"""The ClusterRoles the relay names when it refuses someone, or a credential it may not read.

A message must name a role that exists: the chart creates them under names its values may
change (`rbac.viewerClusterRole.name`, ...) and the relay's credentials role under the
release's full name, and passes every name to the relay (`--viewer-role`, ...). The defaults
are the names of a release called `vncgate` with default values.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class RoleNames:
    viewer: str = "vncgate-viewer"  # connect (open a console)
    editor: str = "vncgate-editor"  # share (make share links)
    admin: str = "vncgate-admin"  # sessions, disconnect
    recordings_viewer: str = "vncgate-recordings-viewer"  # get vnctargets/recordings
    # What the relay's ServiceAccount needs, bound in a namespace, to read a target's Secret.
    credentials: str = "vncgate-relay-credentials"

    def for_verb(self, verb: str) -> str:
        """The role that grants `verb` on vnctargets."""
        return {"connect": self.viewer, "share": self.editor}.get(verb, self.admin)


# Flag (and VNCGATE_ variable) of each name: (field, flag, what grants it).
ROLE_FLAGS = (
    ("viewer", "--viewer-role", "opening consoles (connect)"),
    ("editor", "--editor-role", "making share links (share)"),
    ("admin", "--admin-role", "listing and ending sessions (sessions, disconnect)"),
    ("recordings_viewer", "--recordings-viewer-role", "watching recordings"),
    ("credentials", "--credentials-role",
     "the relay reading a target's Secret (bound per namespace)"),
)
