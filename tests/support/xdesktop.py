"""X clients on a test's Xvnc display that report what the VNC server delivered to them.

`KeyLog` holds the keyboard focus and records the keysyms of the key events it gets (which keys
arrived, in which order). `TypedText` runs a real xterm whose shell copies what is typed into a
file: the characters as the X server and xterm made them from the key events, read back without
a screen grab.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import threading
from pathlib import Path

from Xlib import XK, X
from Xlib import display as xdisplay
from Xlib.xobject.drawable import Window

from harness import reaper
from harness.waiting import wait_until

XTERM = shutil.which("xterm") or "/usr/bin/xterm"

KEY_NAMES = ["Control_L", "Alt_L", "Delete", "Super_L", "Tab", "Shift_L", "Escape", "Return",
             "BackSpace", "Left", "Up", "Right", "Down", "Home", "End", "Prior", "Next",
             "Insert", *(f"F{i}" for i in range(1, 13))]
NAMES = {XK.string_to_keysym(name): name for name in KEY_NAMES}


class KeyLog:
    """An X client on the VNC server's display holding the keyboard focus; it records the
    keysyms of the key events the server delivers as ("down"|"up", name) pairs."""

    def __init__(self, display_number: int) -> None:
        self.display = xdisplay.Display(f":{display_number}")
        screen = self.display.screen()
        self.window = screen.root.create_window(
            0, 0, 200, 200, 0, screen.root_depth,
            event_mask=X.KeyPressMask | X.KeyReleaseMask)
        self.window.map()
        self.display.sync()
        self.window.set_input_focus(X.RevertToParent, X.CurrentTime)
        self.display.sync()
        self.events: list[tuple[str, str]] = []
        self.stopped = False
        self.thread = threading.Thread(target=self._read, daemon=True)
        self.thread.start()

    def _read(self) -> None:
        while not self.stopped:
            if not self.display.pending_events():
                threading.Event().wait(0.02)
                continue
            event = self.display.next_event()
            if event.type in (X.KeyPress, X.KeyRelease):
                keysym = self.display.keycode_to_keysym(event.detail, 0)
                name = NAMES.get(keysym, hex(keysym))
                if name != "Shift_L":  # Xvnc's own fake Shift, to reach a keysym's level
                    self.events.append(("down" if event.type == X.KeyPress else "up", name))

    def presses(self) -> list[str]:
        return [name for kind, name in self.events if kind == "down"]

    def close(self) -> None:
        self.stopped = True
        self.thread.join(timeout=5)
        self.display.close()


class TypedText:
    """A real xterm on the display, focused, running `cat` into `path`: each line typed into
    it (ended by Return) lands in the file as the characters xterm made of the key events."""

    TITLE = "vncgate-typed-text"

    def __init__(self, display_number: int, path: Path) -> None:
        self.path = path
        path.write_bytes(b"")
        env = {**os.environ, "DISPLAY": f":{display_number}", "LC_ALL": "C.UTF-8",
               "LANG": "C.UTF-8"}
        self.proc = reaper.popen(
            [XTERM, "-u8", "-title", self.TITLE, "-geometry", "100x20+0+0",
             "-e", "sh", "-c", 'stty -echo; exec cat > "$0"', str(path)],
            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        self.display = xdisplay.Display(f":{display_number}")
        try:
            window = wait_until(self._window, "the xterm's window mapped", timeout=30)
            assert window is not None
            window.set_input_focus(X.RevertToParent, X.CurrentTime)
            self.display.sync()
        except BaseException:
            self.close()
            raise

    def _window(self) -> Window | None:
        if self.proc.poll() is not None:
            raise RuntimeError(f"xterm exited with {self.proc.returncode}")
        for child in self.display.screen().root.query_tree().children:
            if child.get_wm_name() == self.TITLE and \
                    child.get_attributes().map_state == X.IsViewable:
                return child
        return None

    def text(self) -> str:
        return self.path.read_bytes().decode("utf-8", "replace")

    def close(self) -> None:
        self.display.close()
        reaper.end(self.proc)
