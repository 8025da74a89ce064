"""The VNC protocol (RFB) itself: the viewer's stream parsed, the relay's own login to a server."""
