"""`python -m chaos.sim`: the simulated worker without the `vgate` command."""

import sys

from chaos.sim.cli import main

sys.exit(main())
