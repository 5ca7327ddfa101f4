"""`python -m noa_dist.diagnose` = `noa-diagnose`."""

import sys

from noa_dist.diagnose.cli import main

sys.exit(main())
