"""`python -m vlkit ...` (and `accelerate launch -m vlkit ...`) runs the CLI."""

import sys

from vlkit.cli import main

sys.exit(main())
