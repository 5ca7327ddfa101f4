"""`python -m noa_dist.evaluation` = `noa-eval` (also under `accelerate launch -m`)."""

from noa_dist import distributed
from noa_dist.evaluation.cli import main

distributed.exit_process(main())
