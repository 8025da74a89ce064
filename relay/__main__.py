"""`python -m relay`: the same as `vncgate-relay`."""

from relay.cli import main

raise SystemExit(main())
