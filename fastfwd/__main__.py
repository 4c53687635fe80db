"""``python -m fastfwd``: the command line, which lives in ``control.cli``."""

import sys

from control.cli import main

sys.exit(main())
