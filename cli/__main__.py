"""`python -m fedtune.cli ...` runs the `fedtune` command line."""

import sys

from . import main

sys.exit(main())
