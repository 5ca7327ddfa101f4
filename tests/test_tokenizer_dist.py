"""noa-train-vqvae on two processes (DDP over gloo): codebooks and weights agree on both ranks.

The test launches this file under `accelerate launch --multi_gpu --num_processes 2`; as a
script it runs the real CLI and, per rank, dumps what the test compares (world size, the
training windows it held, its codebooks and weights) to $NOA_TEST_OUT/rank<r>.pt.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch
from trainrun import launch, make_tiny_dataset


def _worker(argv: list[str]) -> int:
    """Run the CLI with two observers: which windows each rank trains on, and what each rank
    holds when training ends (just before the CLI checks agreement itself)."""
    from noa_dist.tokenizer import cli, data  # imported here: the test process needs neither

    out, seen = Path(os.environ["NOA_TEST_OUT"]), {}
    real_open, real_check = data.open_split, cli.check_codebooks_agree

    def recording_open(root, split, **kw):
        source = real_open(root, split, **kw)
        seen[split] = list(source.indices)
        return source

    def dumping_check(accelerator, model):
        torch.save(
            {
                "rank": accelerator.process_index,
                "world_size": accelerator.num_processes,
                "indices": seen,
                "codebooks": [c.clone() for c in model.codebooks()],
                "state": {k: v.clone() for k, v in model.state_dict().items()},
            },
            out / f"rank{accelerator.process_index}.pt",
        )
        real_check(accelerator, model)

    data.open_split, cli.check_codebooks_agree = recording_open, dumping_check
    return cli.main(argv)


pytestmark = [pytest.mark.dist, pytest.mark.slow, pytest.mark.timeout(600)]


def test_two_process_training_keeps_codebooks_identical_on_both_ranks(tmp_path):
    dataset = make_tiny_dataset(tmp_path / "data")
    out = tmp_path / "tok"
    flags = ["--dataset", str(dataset), "--out", str(out), "--window", "2", "--epochs", "4"]
    flags += ["--batch-size", "4", "--codebook-size", "8", "--wandb-mode", "disabled"]
    result = launch(2, flags, tmp_path / "ranks", timeout=420, script=Path(__file__))
    ranks = [torch.load(tmp_path / "ranks" / f"rank{r}.pt") for r in range(2)]
    assert [r["world_size"] for r in ranks] == [2, 2] and [r["rank"] for r in ranks] == [0, 1]
    train = [set(r["indices"]["train"]) for r in ranks]
    assert len(train[0]) == len(train[1]) > 0 and not train[0] & train[1]  # sharded, equal
    for a, b in zip(ranks[0]["codebooks"], ranks[1]["codebooks"], strict=True):
        assert torch.equal(a, b)
    assert ranks[0]["state"].keys() == ranks[1]["state"].keys()
    for key in ranks[0]["state"]:
        assert torch.equal(ranks[0]["state"][key], ranks[1]["state"][key]), key
    assert "codebooks identical on all 2 ranks" in result.stdout
    from noa_dist.tokenizer import load_tokenizer

    tok = load_tokenizer(out, n_channels=1)
    for saved, trained in zip(tok.model.codebooks(), ranks[0]["codebooks"], strict=True):
        assert torch.equal(saved, trained)
    assert tok.metrics["world_size"] == 2
    assert tok.metrics["final"]["summary"]["n"] == 16  # every valid window, counted once


if __name__ == "__main__":
    sys.exit(_worker(sys.argv[1:]))
