"""`python -m cluster.cli`: the `caravan` command."""

import sys

from cluster.cli import main

sys.exit(main())
