"""The trainer's own progress, stored as JSON next to Accelerate's model/optimizer state."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any


@dataclass
class TrainState:
    """Where training is; enough to resume at the next batch of the same epoch."""

    epoch: int = 0  # current epoch (0-indexed)
    batch_in_epoch: int = 0  # micro-batches this rank has consumed in `epoch`
    global_step: int = 0  # optimizer steps taken, applied or skipped
    applied_steps: int = 0  # optimizer steps that updated the weights (= scheduler position)
    skipped_steps: int = 0
    consecutive_skips: int = 0
    best_val_loss: float = math.inf
    epochs_without_improvement: int = 0
    history: dict[str, list[Any]] = field(
        default_factory=lambda: {
            "step": [],
            "train_loss": [],
            "epoch": [],
            "val_loss": [],
            "skipped": [],
        }
    )
    wandb_run_id: str | None = None
    run_dir: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrainState:
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})
