"""Train under `accelerate launch` and dump, per rank, what the distributed tests compare.

Usage: NOA_TEST_OUT=DIR accelerate launch ... tests/dist/train_worker.py [train.py flags]
Writes DIR/rank<r>.pt: world size, final parameters, the dataset indices this rank
trained on, the trainer state (history, skips) and why training stopped.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import torch

from noa_dist import distributed, train
from noa_dist.config import load_config


class RecordingLoader:
    """Wraps the training DataLoader and records the dataset indices it serves."""

    def __init__(self, loader, seen: list[int]) -> None:
        self.loader, self.seen = loader, seen

    def __iter__(self):
        for batch in self.loader:
            self.seen.extend(batch["index"].tolist())
            yield batch


def main() -> None:
    out = Path(os.environ["NOA_TEST_OUT"])
    trainer = train.prepare(load_config(sys.argv[1:]))
    seen: list[int] = []
    trainer.train_loader = RecordingLoader(trainer.train_loader, seen)
    outcome = trainer.fit()
    acc = trainer.accelerator
    # get_state_dict gathers ZeRO-3 partitions (a collective: every rank calls it)
    state_dict = acc.get_state_dict(trainer.model) or {}  # None off the main process under ZeRO-3
    params = {k: v.detach().cpu().float().clone() for k, v in state_dict.items()}
    torch.save(
        {
            "rank": acc.process_index,
            "world_size": acc.num_processes,
            "params": params,
            "seen": seen,
            "state": trainer.state.to_dict(),
            "stopped_by": outcome.stopped_by,
        },
        out / f"rank{acc.process_index}.pt",
    )
    distributed.shutdown(acc)


if __name__ == "__main__":
    main()
