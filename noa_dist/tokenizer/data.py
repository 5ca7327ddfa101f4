"""Features of ground-truth windows of one split, computed once per rank for its shard.

A window is what the NOA loss sees: the state a TBPTT window starts from (`u0`) and the W
states after it (`target`), read by `WellWindowDataset` with --timesteps W, normalised with
stats.yaml exactly as the trainer reads them. Training shards are equal across ranks (the
last len % world_size windows are left out) so every rank runs the same number of forwards.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Subset

from noa_dist.data.dataset import WellWindowDataset
from noa_dist.data.schema import DIMENSIONS, TIME, open_hdf5
from noa_dist.errors import DataError
from noa_dist.features import FeatureConfig, trajectory_features

log = logging.getLogger("noa_dist")

EXTRACT_BATCH = 64  # windows per feature batch (features are per sample: any size gives the same)


@dataclass(frozen=True)
class WindowSource:
    """One split's windows and where this rank's shard of them lies."""

    dataset: WellWindowDataset
    indices: list[int]  # this rank's windows

    @property
    def n_total(self) -> int:
        return len(self.dataset)


def open_split(
    root: str | Path,
    split: str,
    *,
    window: int,
    stride: int | None,
    n_samples: int | None,
    rank: int,
    world_size: int,
    equal_shards: bool,
) -> WindowSource:
    try:
        dataset = WellWindowDataset(
            root, split, window, n_samples=n_samples, window_stride=stride, normalize=True
        )
    except DataError as err:  # its flags are the trainer's: say which of ours they are
        raise DataError(
            f"{err}\n(noa-train-vqvae reads windows as the trainer does: --window is its "
            "--timesteps, --n-samples/--val-samples the same, --window-stride the same)"
        ) from None
    n = len(dataset)
    usable = n - n % world_size if equal_shards else n
    return WindowSource(dataset, list(range(rank, usable, world_size)))


def frame_dt(dataset: WellWindowDataset) -> float:
    """Physical time between stored frames (mean spacing of `dimensions/time`); 1.0 if the
    coordinate has fewer than two values."""
    with open_hdf5(dataset.info.shards[0].path) as f:
        time_coordinate = np.asarray(f[DIMENSIONS][TIME][()], dtype=np.float64)
    row = time_coordinate.reshape(-1, time_coordinate.shape[-1])[0]
    return float(np.diff(row).mean()) if row.size > 1 else 1.0


def extract_features(
    source: WindowSource,
    *,
    dt: float,
    config: FeatureConfig,
    n_features: int,
    num_workers: int,
    label: str,
    is_main: bool,
) -> torch.Tensor:
    """[len(source.indices), F] float32 features of this rank's windows, in index order."""
    start = time.perf_counter()
    loader = DataLoader(
        Subset(source.dataset, source.indices),
        batch_size=EXTRACT_BATCH,
        shuffle=False,
        num_workers=num_workers,
    )
    parts = []
    with torch.no_grad():
        for batch in loader:
            parts.append(
                trajectory_features(batch["target"], batch["u0"], dt=dt, config=config).vector_BF
            )
    features = torch.cat(parts) if parts else torch.zeros(0, n_features)
    if is_main:
        log.info(
            f"  {label}: features of {len(source.indices)} windows on this rank "
            f"({source.n_total} in the split) in {time.perf_counter() - start:.1f}s"
        )
    return features
