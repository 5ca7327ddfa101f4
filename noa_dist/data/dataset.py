"""`WellWindowDataset`: training windows of one Well-format split as normalised float32 tensors.

Sample i is one (trajectory, start) window of timesteps+1 frames: `u0` is frame `start`, `target`
the T frames after it. Shape legend: T timesteps, C predicted channels, Cc conditioning
channels, H, W grid (any number of spatial axes works the same way).

HDF5 files are opened lazily in the process that reads (each DataLoader worker opens its own),
kept open for the next items, and reopened after a fork: h5py handles must not cross a fork.
"""

from __future__ import annotations

import bisect
import itertools
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import torch
from torch.utils.data import Dataset

from noa_dist.data.schema import (
    MEAN,
    STATS_FILE,
    STD,
    ChannelLayout,
    FieldSpec,
    channel_layout,
    delta_key,
    load_stats,
    open_hdf5,
    read_split_info,
    split_dir,
    stats_problems,
)
from noa_dist.errors import ConfigError, DataError

# Chunk cache per open compressed shard, so that consecutive windows of one trajectory decompress
# its chunk once (the generator's chunks are at most 32 MiB). Uncompressed shards get no cache:
# HDF5 then reads exactly the window instead of the whole chunk (half the bytes for T=32 of 65).
RDCC_COMPRESSED_BYTES = 32 * 2**20


@dataclass(frozen=True)
class ChannelNorm:
    """Per-channel mean/std (float32 vectors, layout order) from stats.yaml; std 0 becomes 1."""

    mean_predicted: np.ndarray
    std_predicted: np.ndarray
    mean_conditioning: np.ndarray
    std_conditioning: np.ndarray


def channel_norm(
    layout: ChannelLayout, stats: dict[str, Any], stats_path: str | os.PathLike
) -> ChannelNorm:
    """Mean/std vectors for `layout`; a zero std (a constant field) is replaced by 1.

    Raises one DataError listing every gap (preflight.data_problems reports the same lines
    before the process group starts; this is the check for callers outside training)."""
    problems = stats_problems(
        stats, layout.predicted_fields + layout.conditioning_fields, stats_path
    )
    if problems:
        raise DataError("\n".join(problems))

    def vector(key: str, fields: tuple[FieldSpec, ...]) -> np.ndarray:
        parts = [_component_values(stats[key][f.name], f.n_components) for f in fields]
        return np.concatenate(parts).astype(np.float32) if parts else np.zeros(0, np.float32)

    std_p, std_c = vector(STD, layout.predicted_fields), vector(STD, layout.conditioning_fields)
    return ChannelNorm(
        mean_predicted=vector(MEAN, layout.predicted_fields),
        std_predicted=np.where(std_p == 0, 1, std_p).astype(np.float32),
        mean_conditioning=vector(MEAN, layout.conditioning_fields),
        std_conditioning=np.where(std_c == 0, 1, std_c).astype(np.float32),
    )


def delta_scale(layout: ChannelLayout, stats: dict[str, Any]) -> np.ndarray:
    """Per predicted channel: std of one-step differences / std of the field (both from
    stats.yaml), i.e. the typical normalised change per step; 1 where stats lack `std_delta`."""
    parts, std_delta_key = [], delta_key(STD)
    for f in layout.predicted_fields:
        std = _component_values(stats[STD][f.name], f.n_components)
        if std_delta_key in stats and f.name in stats[std_delta_key]:
            std_delta = _component_values(stats[std_delta_key][f.name], f.n_components)
            parts.append(np.where(std > 0, std_delta / np.where(std > 0, std, 1), 1.0))
        else:
            parts.append(np.ones(f.n_components))
    return np.concatenate(parts).astype(np.float32) if parts else np.zeros(0, np.float32)


def to_channels_first(
    values: np.ndarray, field: FieldSpec, spatial_shape: tuple[int, ...]
) -> np.ndarray:
    """Stored field values -> [T?, n_components, *grid] (a read-only broadcast view).

    `values` is one trajectory as stored: [T?, varying dims..., components...]. Axes that the
    field does not vary along (dim_varying False) are broadcast to the full grid.
    """
    lead = values.shape[:1] if field.time_varying else ()
    grid_or_one = tuple(
        n if v else 1 for n, v in zip(spatial_shape, field.dim_varying, strict=True)
    )
    values = values.reshape(*lead, *grid_or_one, field.n_components)
    values = np.moveaxis(values, -1, len(lead))
    return np.broadcast_to(values, (*lead, field.n_components, *spatial_shape))


class WellWindowDataset(Dataset):
    """Map-style dataset of (trajectory, start) windows, trajectory-major order.

    Start times per trajectory are `range(0, n_steps - timesteps, window_stride)`
    (window_stride defaults to timesteps: non-overlapping windows). `n_samples` keeps the
    first n_samples indices. Items: `u0` [C, H, W], `target` [T, C, H, W], `cond` [Cc, H, W]
    (Cc may be 0), `index` (int), normalised with stats.yaml unless normalize=False.
    """

    def __init__(
        self,
        root: str | os.PathLike,
        split: str,
        timesteps: int,
        *,
        n_samples: int | None = None,
        window_stride: int | None = None,
        normalize: bool = True,
    ):
        stride = timesteps if window_stride is None else window_stride
        _check_positive({"--timesteps": timesteps, "--window-stride": stride})
        self.root = Path(root)
        self.split = split
        self.info = read_split_info(root, split)  # opens each shard briefly, closes it again
        if timesteps >= self.info.n_steps:
            raise DataError(
                f"{split_dir(self.root, split)}: --timesteps {timesteps} needs {timesteps + 1} "
                f"frames per window (u0 + targets) but the split stores n_steps="
                f"{self.info.n_steps}; use --timesteps <= {self.info.n_steps - 1}"
            )
        self.timesteps = timesteps
        self.layout = channel_layout(self.info.fields)
        stats_path = self.root / STATS_FILE
        self.norm = channel_norm(self.layout, load_stats(root), stats_path) if normalize else None
        self.starts = tuple(range(0, self.info.n_steps - timesteps, stride))
        windows = (s.n_trajectories * len(self.starts) for s in self.info.shards)
        self._sample_offsets = list(itertools.accumulate(windows, initial=0))
        trajectories = (s.n_trajectories for s in self.info.shards)
        self._trajectory_offsets = list(itertools.accumulate(trajectories, initial=0))
        self._len = self._checked_length(n_samples, stride)
        self._pid: int | None = None
        self._files: dict[int, h5py.File] = {}
        self._datasets: dict[int, dict[str, h5py.Dataset]] = {}

    def _checked_length(self, n_samples: int | None, stride: int) -> int:
        available = self._sample_offsets[-1]
        if n_samples is None:
            return available
        if not 1 <= n_samples <= available:
            raise DataError(
                f"{split_dir(self.root, self.split)}: {n_samples} windows requested "
                f"(--n-samples/--val-samples) but only {available} are available "
                f"({self.info.n_trajectories} trajectories x {len(self.starts)} starts with "
                f"--timesteps {self.timesteps}, stride {stride})"
            )
        return n_samples

    @property
    def n_channels(self) -> int:
        return len(self.layout.predicted)

    @property
    def n_cond_channels(self) -> int:
        return len(self.layout.conditioning)

    @property
    def spatial_shape(self) -> tuple[int, ...]:
        return self.info.spatial_shape

    def __len__(self) -> int:
        return self._len

    def _locate(self, index: int) -> tuple[int, int, int]:
        """Global index -> (shard number, row in the shard, start frame)."""
        if not 0 <= index < self._len:
            raise IndexError(f"index {index} out of range for {self._len} samples")
        shard = bisect.bisect_right(self._sample_offsets, index) - 1
        row, window = divmod(index - self._sample_offsets[shard], len(self.starts))
        return shard, row, self.starts[window]

    def locate(self, index: int) -> tuple[Path, int, int]:
        """(shard path, trajectory row in that shard, start frame) of sample `index`."""
        shard, row, start = self._locate(index)
        return self.info.shards[shard].path, row, start

    def trajectory_id(self, index: int) -> int:
        """Trajectory number within the split (shards in sorted order) of sample `index`."""
        shard, row, _ = self._locate(index)
        return self._trajectory_offsets[shard] + row

    def describe_sample(self, index: int) -> str:
        """Human-readable origin of a sample, for error messages."""
        path, row, start = self.locate(index)
        return (
            f"{path} trajectory {row} (#{self.trajectory_id(index)} in split {self.split!r}), "
            f"frames {start}..{start + self.timesteps}"
        )

    def __getitem__(self, index: int) -> dict[str, Any]:
        shard, row, start = self._locate(index)
        datasets = self._open(shard)
        try:
            frames_TCHW = self._read(datasets, self.layout.predicted_fields, row, start)
            cond_CHW = self._read(datasets, self.layout.conditioning_fields, row, start)
        except OSError as err:
            raise DataError(f"cannot read {self.describe_sample(index)}: {err}") from None
        if self.norm is not None:
            n_grid = len(self.spatial_shape)
            _normalize(frames_TCHW, self.norm.mean_predicted, self.norm.std_predicted, n_grid)
            _normalize(cond_CHW, self.norm.mean_conditioning, self.norm.std_conditioning, n_grid)
        return {
            "u0": torch.from_numpy(frames_TCHW[0]),
            "target": torch.from_numpy(frames_TCHW[1:]),
            "cond": torch.from_numpy(cond_CHW),
            "index": index,
        }

    def _read(self, datasets, fields: tuple[FieldSpec, ...], row: int, start: int) -> np.ndarray:
        """Channels of `fields` as a new float32 array [T+1, C, *grid] or [C, *grid]."""
        window = slice(start, start + self.timesteps + 1)
        parts = []
        for field in fields:
            index = ((row,) if field.sample_varying else ()) + (
                (window,) if field.time_varying else ()
            )
            values = datasets[field.key][index]  # only the window, never the whole trajectory
            parts.append(to_channels_first(values, field, self.spatial_shape))
        if not parts:
            return np.zeros((0, *self.spatial_shape), np.float32)
        channel_axis = -1 - len(self.spatial_shape)
        return np.concatenate(parts, axis=channel_axis, dtype=np.float32)

    def _open(self, shard: int) -> dict[str, h5py.Dataset]:
        """Datasets of `shard`, opened once per process; a forked worker opens its own."""
        if self._pid != os.getpid():
            self._files, self._datasets, self._pid = {}, {}, os.getpid()
        if shard not in self._datasets:
            info = self.info.shards[shard]
            f = open_hdf5(info.path, rdcc_nbytes=RDCC_COMPRESSED_BYTES if info.compressed else 0)
            self._files[shard] = f
            self._datasets[shard] = {field.key: f[field.key] for field in self.info.fields}
        return self._datasets[shard]

    def close(self) -> None:
        """Close the files this process opened (they reopen on the next read)."""
        if self._pid == os.getpid():
            for f in self._files.values():
                f.close()
        self._files, self._datasets, self._pid = {}, {}, None

    def __getstate__(self) -> dict[str, Any]:
        """Pickle without open handles (spawned workers open their own)."""
        state = self.__dict__.copy()
        state.update(_files={}, _datasets={}, _pid=None)
        return state


def _normalize(values_xC: np.ndarray, mean_C: np.ndarray, std_C: np.ndarray, n_grid: int) -> None:
    """In place (values - mean) / std; the channel axis C comes just before the n_grid axes."""
    shape = (-1,) + (1,) * n_grid
    values_xC -= mean_C.reshape(shape)
    values_xC /= std_C.reshape(shape)


def _component_values(value: Any, n_components: int) -> np.ndarray:
    """A stats entry as a flat vector; one number for a multi-component field applies to all."""
    values = np.asarray(value, dtype=np.float64).ravel()
    return np.broadcast_to(values, (n_components,)) if values.size == 1 else values


def _check_positive(flags: dict[str, int]) -> None:
    bad = [f"{flag} {value}: must be an integer >= 1" for flag, value in flags.items() if value < 1]
    if bad:
        raise ConfigError("\n".join(bad))
