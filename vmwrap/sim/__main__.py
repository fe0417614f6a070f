"""`python -m vmwrap.sim build`: compile the simulator's engine (vmwrap/sim/native.py)."""

import sys

from .native import main

sys.exit(main(sys.argv[1:]))
