"""``python -m tui.ftctl``: what the tests and a checkout without the console script run."""

import sys

from tui.ftctl.main import main

sys.exit(main())
