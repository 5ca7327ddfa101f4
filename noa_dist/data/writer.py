"""Write Well-format HDF5 shards and stats.yaml files, each atomically.

One shard holds `n_trajectories` trajectories of a 2D periodic cartesian dataset:

    attrs: dataset_name, grid_type="cartesian", n_spatial_dims=2, n_trajectories,
           simulation_parameters=[names], and one attr per parameter holding the
           per-trajectory values [n_traj] (our parameters vary between trajectories)
    dimensions/{time [T], x [N], y [N]}      spatial_dims=["x", "y"]
    boundary_conditions/{x_periodic, y_periodic}   bc_type="PERIODIC", mask True at both ends
    scalars/<name> [n_traj]                  sample_varying=True, time_varying=False;
                                             float32, or int64 for codes and ids
    t{0,1,2}_fields/<name>                   [n_traj, T, N, N, (2,)*order] if time_varying
                                             else [n_traj, N, N, (2,)*order]; float32

Time-varying fields are chunked one trajectory per chunk (1, T, N, N, ...) so any time
window of one trajectory is a single contiguous read; a chunk larger than 32 MiB is cut
along time into the largest k frames that fit. A shard is written to `<name>.tmp` (which the
Well's `*.hdf5` glob ignores) and renamed only once complete.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any

import h5py
import numpy as np
import yaml

from noa_dist.atomic import atomic_write_text
from noa_dist.data.schema import (
    BC_ASSOCIATED_DIMS_ATTR,
    BC_ASSOCIATED_FIELDS_ATTR,
    BC_MASK,
    BC_TYPE_ATTR,
    BOUNDARY_CONDITIONS,
    CARTESIAN,
    DATASET_NAME_ATTR,
    DEFAULT_SPATIAL_DIMS,
    DIM_VARYING_ATTR,
    DIMENSIONS,
    FIELD_GROUPS,
    FIELD_NAMES_ATTR,
    GRID_TYPE_ATTR,
    N_SPATIAL_DIMS_ATTR,
    N_TRAJECTORIES_ATTR,
    PERIODIC,
    SAMPLE_VARYING_ATTR,
    SCALARS,
    SIMULATION_PARAMETERS_ATTR,
    SPATIAL_DIMS_ATTR,
    TIME,
    TIME_VARYING_ATTR,
    FieldSpec,
    Grid,
    field_spec,
)
from noa_dist.errors import DataError

CHUNK_LIMIT_BYTES = 32 * 2**20
COMPRESSIONS = ("none", "lzf", "gzip")
SPATIAL_DIMS = DEFAULT_SPATIAL_DIMS[:2]  # this writer writes 2-D grids


def grid_2d(time: np.ndarray, x: np.ndarray, y: np.ndarray) -> Grid:
    """The grid of shards with these coordinates, to build their fields with `field_spec`."""
    return Grid(n_steps=len(time), spatial_dims=SPATIAL_DIMS, spatial_shape=(len(x), len(y)))


@dataclass(frozen=True)
class ShardLayout:
    """Everything shared by all shards of one dataset; `fields` lie on the coordinates' grid."""

    dataset_name: str
    fields: tuple[FieldSpec, ...]
    scalar_names: tuple[str, ...]
    simulation_parameters: tuple[str, ...]
    integer_scalars: tuple[str, ...]  # stored as int64 (codes, ids); the rest float32
    time: np.ndarray  # [T]
    x: np.ndarray  # [N]
    y: np.ndarray  # [N]
    compression: str = "none"

    def __post_init__(self) -> None:
        """A field built on another grid would be written with shapes the coordinates deny."""
        grid = grid_2d(self.time, self.x, self.y)
        for field in self.fields:
            on_grid = field_spec(
                field.name,
                field.order,
                grid,
                time_varying=field.time_varying,
                sample_varying=field.sample_varying,
                dim_varying=field.dim_varying,
            )
            if field != on_grid or not field.sample_varying:
                raise ValueError(f"{field.key}: {field} is not a per-trajectory field on {grid}")


@dataclass(frozen=True)
class Trajectory:
    """One simulated trajectory: arrays shaped as their `FieldSpec.shape`, scalar values."""

    fields: dict[str, np.ndarray]
    scalars: dict[str, float]


def chunk_shape(
    trajectory_shape: tuple[int, ...], time_varying: bool, itemsize: int = 4
) -> tuple[int, ...]:
    """(1, k, ...) with the largest k <= T whose chunk fits CHUNK_LIMIT_BYTES; (1, ...) if constant."""
    if not time_varying:
        return (1, *trajectory_shape)
    n_frames, frame_shape = trajectory_shape[0], trajectory_shape[1:]
    frame_bytes = itemsize * int(np.prod(frame_shape))
    k = max(1, min(n_frames, CHUNK_LIMIT_BYTES // frame_bytes))
    return (1, k, *frame_shape)


def _compression_kwargs(compression: str) -> dict[str, Any]:
    if compression not in COMPRESSIONS:
        raise DataError(f"compression={compression!r}: expected one of {', '.join(COMPRESSIONS)}")
    return {} if compression == "none" else {"compression": compression}


class ShardWriter:
    """Context manager filling one shard trajectory by trajectory; renamed on clean exit."""

    def __init__(self, path: Path, layout: ShardLayout, n_trajectories: int):
        self.path = Path(path)
        self.tmp_path = self.path.with_name(self.path.name + ".tmp")
        self.layout = layout
        self.n_trajectories = n_trajectories
        self._file: h5py.File | None = None
        self._written: set[int] = set()

    def __enter__(self) -> ShardWriter:
        self._file = h5py.File(self.tmp_path, "w")
        self._write_header(self._file)
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        assert self._file is not None
        complete = exc_type is None and len(self._written) == self.n_trajectories
        if complete:
            self._write_parameter_attrs(self._file)
        self._file.close()
        if complete:
            os.replace(self.tmp_path, self.path)
            return
        self.tmp_path.unlink(missing_ok=True)
        if exc_type is None:
            raise DataError(
                f"{self.path}: only {len(self._written)} of {self.n_trajectories} trajectories "
                "were written; the shard was discarded"
            )

    def write(self, index: int, trajectory: Trajectory) -> None:
        """Store `trajectory` as row `index` of every field and scalar dataset."""
        assert self._file is not None
        for field in self.layout.fields:
            array = trajectory.fields.get(field.name)
            if array is None or array.shape != field.shape:
                got = None if array is None else array.shape
                raise DataError(
                    f"{self.path}: field {field.name!r} has shape {got}, expected {field.shape}"
                )
            self._file[field.key][index] = array.astype(np.float32)
        for name in self.layout.scalar_names:
            if name not in trajectory.scalars:
                raise DataError(f"{self.path}: trajectory {index} has no scalar {name!r}")
            self._file[SCALARS][name][index] = trajectory.scalars[name]
        self._written.add(index)

    def _write_header(self, f: h5py.File) -> None:
        f.attrs[DATASET_NAME_ATTR] = self.layout.dataset_name
        f.attrs[GRID_TYPE_ATTR] = CARTESIAN
        f.attrs[N_SPATIAL_DIMS_ATTR] = len(SPATIAL_DIMS)
        f.attrs[N_TRAJECTORIES_ATTR] = self.n_trajectories
        f.attrs[SIMULATION_PARAMETERS_ATTR] = list(self.layout.simulation_parameters)
        self._write_dimensions(f.create_group(DIMENSIONS))
        self._write_boundary_conditions(f.create_group(BOUNDARY_CONDITIONS))
        self._create_scalars(f.create_group(SCALARS))
        for group in FIELD_GROUPS:
            self._create_fields(f.create_group(group))

    def _write_dimensions(self, group: h5py.Group) -> None:
        group.attrs[SPATIAL_DIMS_ATTR] = list(SPATIAL_DIMS)
        x_name, y_name = SPATIAL_DIMS
        arrays = {TIME: self.layout.time, x_name: self.layout.x, y_name: self.layout.y}
        for name, values in arrays.items():
            dset = group.create_dataset(name, data=np.asarray(values, dtype=np.float32))
            dset.attrs[SAMPLE_VARYING_ATTR] = False
            dset.attrs[TIME_VARYING_ATTR] = name == TIME

    def _write_boundary_conditions(self, group: h5py.Group) -> None:
        for dim, coords in zip(SPATIAL_DIMS, (self.layout.x, self.layout.y), strict=True):
            bc = group.create_group(f"{dim}_periodic")
            bc.attrs[BC_ASSOCIATED_DIMS_ATTR] = [dim]
            bc.attrs[BC_ASSOCIATED_FIELDS_ATTR] = []
            bc.attrs[BC_TYPE_ATTR] = PERIODIC
            bc.attrs[SAMPLE_VARYING_ATTR] = False
            bc.attrs[TIME_VARYING_ATTR] = False
            mask = np.zeros(len(coords), dtype=bool)
            mask[[0, -1]] = True  # the boundary sits at both ends of the axis
            bc.create_dataset(BC_MASK, data=mask)

    def _create_scalars(self, group: h5py.Group) -> None:
        group.attrs[FIELD_NAMES_ATTR] = list(self.layout.scalar_names)
        for name in self.layout.scalar_names:
            dtype = np.int64 if name in self.layout.integer_scalars else np.float32
            dset = group.create_dataset(name, shape=(self.n_trajectories,), dtype=dtype)
            dset.attrs[SAMPLE_VARYING_ATTR] = True
            dset.attrs[TIME_VARYING_ATTR] = False

    def _create_fields(self, group: h5py.Group) -> None:
        """The group's datasets, one trajectory per row (every field varies across samples)."""
        fields = [f for f in self.layout.fields if f.group == group.name.strip("/")]
        group.attrs[FIELD_NAMES_ATTR] = [f.name for f in fields]
        for field in fields:
            dset = group.create_dataset(
                field.name,
                shape=(self.n_trajectories, *field.shape),
                dtype=np.float32,
                chunks=chunk_shape(field.shape, field.time_varying),
                **_compression_kwargs(self.layout.compression),
            )
            dset.attrs[DIM_VARYING_ATTR] = list(field.dim_varying)
            dset.attrs[SAMPLE_VARYING_ATTR] = field.sample_varying
            dset.attrs[TIME_VARYING_ATTR] = field.time_varying

    def _write_parameter_attrs(self, f: h5py.File) -> None:
        for name in self.layout.simulation_parameters:
            f.attrs[name] = f[SCALARS][name][:]


def _to_builtin(value: Any) -> Any:
    """numpy arrays/scalars -> plain floats and nested lists (what yaml.safe_dump accepts)."""
    if isinstance(value, dict):
        return {str(k): _to_builtin(v) for k, v in value.items()}
    if isinstance(value, np.ndarray | np.generic):
        return np.asarray(value, dtype=np.float64).tolist()
    if isinstance(value, Sequence) and not isinstance(value, str):
        return [_to_builtin(v) for v in value]
    return float(value)


def write_stats_yaml(path: Path, stats: dict[str, dict[str, Any]]) -> Path:
    """Write the Well's stats.yaml ({stat: {field: value}}) atomically (its presence marks a
    finished dataset)."""
    return atomic_write_text(Path(path), yaml.safe_dump(_to_builtin(stats), sort_keys=True))
