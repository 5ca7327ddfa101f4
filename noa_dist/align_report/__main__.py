"""`python -m noa_dist.align_report` = `noa-align-report` (also under `accelerate launch -m`)."""

import sys

from noa_dist.align_report.cli import main

sys.exit(main())
