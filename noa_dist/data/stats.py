"""Normalisation statistics (the Well's stats.yaml), streamed over one split of any Well dataset.

For every field of t0/t1/t2_fields: `mean`, `std` (population), `rms` over all trajectories,
frames and grid points, one value per tensor component (a float for t0, a list of 2 for t1,
a 2x2 nested list for t2), the layout `the_well.data.normalization` indexes as
`stats["mean"][field]`. Time-varying fields also get `mean_delta`, `std_delta`, `rms_delta`
of the differences between consecutive frames; constant fields get no delta entries, as in
the Well's own stats files (its normalisers fall back to a floor value for them).

Data is read one trajectory (or a window of frames) at a time into float64 accumulators
combined with Chan et al.'s pairwise update, so a split never has to fit in memory. Shards
are listed and validated by schema.py, as for training, so a shard fails here as it would there.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import h5py
import numpy as np
from tqdm import tqdm

from noa_dist.data.schema import (
    MEAN,
    RMS,
    STATS_FILE,
    STATS_KEYS,
    STD,
    FieldSpec,
    delta_key,
    open_hdf5,
    read_split_shards,
)
from noa_dist.data.writer import write_stats_yaml
from noa_dist.errors import ConfigError, DataError

READ_LIMIT_BYTES = 64 * 2**20


class RunningMoments:
    """Count, mean and sum of squared deviations per tensor component, in float64."""

    def __init__(self, component_shape: tuple[int, ...]):
        self.component_shape = component_shape
        self.count = 0
        self.mean = np.zeros(component_shape, dtype=np.float64)
        self.m2 = np.zeros(component_shape, dtype=np.float64)

    def update(self, block: np.ndarray) -> None:
        """Fold in every value of `block` (trailing axes = the tensor components)."""
        values = np.asarray(block, dtype=np.float64).reshape(-1, *self.component_shape)
        n_b = values.shape[0]
        if n_b == 0:
            return
        mean_b = values.mean(axis=0)
        m2_b = ((values - mean_b) ** 2).sum(axis=0)
        n = self.count + n_b
        delta = mean_b - self.mean
        self.mean = self.mean + delta * (n_b / n)
        self.m2 = self.m2 + m2_b + delta**2 * (self.count * n_b / n)
        self.count = n

    def summary(self) -> dict[str, np.ndarray]:
        variance = self.m2 / max(self.count, 1)
        return {
            MEAN: self.mean,
            STD: np.sqrt(variance),
            RMS: np.sqrt(variance + self.mean**2),
        }


def _frames_per_read(dset: h5py.Dataset, time_axis: int) -> int:
    frame_bytes = dset.dtype.itemsize * int(np.prod(dset.shape[time_axis + 1 :]))
    return max(1, READ_LIMIT_BYTES // max(frame_bytes, 1))


def _pieces(dset: h5py.Dataset, field: FieldSpec) -> Iterator[tuple[np.ndarray, np.ndarray | None]]:
    """(values, deltas or None) per trajectory and frame window; windows overlap by one frame
    so that every consecutive-frame difference is counted exactly once."""
    samples: list[tuple[int, ...]] = (
        [(s,) for s in range(dset.shape[0])] if field.sample_varying else [()]
    )
    for sample in samples:
        if not field.time_varying:
            yield dset[sample], None
            continue
        time_axis = len(sample)
        n_frames = dset.shape[time_axis]
        window = _frames_per_read(dset, time_axis)
        for start in range(0, n_frames, window):
            stop = min(start + window, n_frames)
            frames = dset[(*sample, slice(start, min(stop + 1, n_frames)))]
            yield frames[: stop - start], np.diff(frames, axis=0)


def _accumulate(
    dset: h5py.Dataset,
    field: FieldSpec,
    values: dict[str, RunningMoments],
    deltas: dict[str, RunningMoments],
) -> None:
    """Fold every value of `dset`, and its one-step differences, into the field's moments."""
    moments = values.setdefault(field.name, RunningMoments(field.component_shape))
    for block, delta in _pieces(dset, field):
        moments.update(block)
        if delta is not None:
            deltas.setdefault(field.name, RunningMoments(field.component_shape)).update(delta)


def compute_stats(
    root: Path, split: str = "train", progress: bool = False
) -> dict[str, dict[str, Any]]:
    """The Well's stats dict {mean, std, rms, mean_delta, std_delta, rms_delta} for `split`."""
    shards = read_split_shards(root, split, same_n_steps=False)  # also checks fields agree
    values: dict[str, RunningMoments] = {}
    deltas: dict[str, RunningMoments] = {}
    for shard in tqdm(shards, desc=f"stats {split}", unit="shard", disable=not progress):
        with open_hdf5(shard.path) as f:
            for field in shard.fields:
                try:
                    _accumulate(f[field.key], field, values, deltas)
                except OSError as err:  # a damaged chunk: name the file and the field
                    raise DataError(f"{shard.path}: {field.key}: unreadable: {err}") from None
    stats: dict[str, dict[str, Any]] = {key: {} for key in STATS_KEYS}
    for name, moments in values.items():
        for key, value in moments.summary().items():
            stats[key][name] = value
    for name, moments in deltas.items():
        for key, value in moments.summary().items():
            stats[delta_key(key)][name] = value
    return stats


def write_stats(
    root: Path,
    *,
    split: str = "train",
    output: Path | None = None,
    overwrite: bool = False,
    progress: bool = False,
) -> Path:
    """Compute the stats of `split` and write them to `output` (default `<root>/stats.yaml`)."""
    output = Path(output) if output is not None else Path(root) / STATS_FILE
    if output.exists() and not overwrite:
        raise ConfigError(f"{output} already exists; pass --overwrite to replace it")
    return write_stats_yaml(output, compute_stats(root, split, progress=progress))
