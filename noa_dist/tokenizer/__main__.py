"""`python -m noa_dist.tokenizer` (and `accelerate launch -m noa_dist.tokenizer`): noa-train-vqvae."""

from noa_dist import distributed
from noa_dist.tokenizer.cli import main

if __name__ == "__main__":
    distributed.exit_process(main())
