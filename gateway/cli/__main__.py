"""`python -m gateway.cli`: the `vgate` command."""

from gateway.cli.main import main

raise SystemExit(main())
