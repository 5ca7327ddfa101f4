"""`python -m noa_dist.sweep` = `noa-sweep`."""

import sys

from noa_dist.sweep.cli import main

sys.exit(main())
