"""`python -m noa_dist.align_report` = `noa-align-report` (also under `accelerate launch -m`)."""

from noa_dist import distributed
from noa_dist.align_report.cli import main

distributed.exit_process(main())
