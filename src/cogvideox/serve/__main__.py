"""`python -m cogvideox.serve serve|worker ...`."""

import sys

from cogvideox.serve.cli import main

sys.exit(main())
