"""`python -m cogvideox ...` runs the command line."""

import sys

from cogvideox.cli import main

sys.exit(main())
