"""`python -m noa_dist.tokenizer` (and `accelerate launch -m noa_dist.tokenizer`): noa-train-vqvae."""

import sys

from noa_dist.tokenizer.cli import main

if __name__ == "__main__":
    sys.exit(main())
