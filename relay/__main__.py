"""`python -m vncgate.relay`: the same as `vncgate-relay`."""

from vncgate.relay.cli import main

raise SystemExit(main())
