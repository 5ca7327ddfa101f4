"""The Well format on disk: its names, the field spec, shard metadata, split consistency,
stats.yaml and the channel mapping.

A dataset root is `<root>/data/{train,valid,test}/*.hdf5` plus `<root>/stats.yaml`. The names of
groups, attributes and stats.yaml keys are defined here once; writer.py writes with them and
`field_spec` builds the one FieldSpec type both the reader and the writer use. Nothing here
reads field values: dataset.py reads training windows, stats.py moments, check.py NaN/Inf.
Every failure raises one `DataError` line `<file>: <group/key>: <what was expected>`.
"""

from __future__ import annotations

import itertools
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import yaml

from noa_dist.errors import DataError

REQUIRED_SPLITS = ("train", "valid")  # what training reads
SPLITS = (*REQUIRED_SPLITS, "test")  # test is for evaluation only and may be absent
DATA_DIR = "data"  # <root>/data/<split>/*.hdf5
SHARD_SUFFIXES = (".hdf5", ".h5")
STATS_FILE = "stats.yaml"

# Groups of a shard; a field's group is FIELD_GROUPS[its tensor order].
DIMENSIONS = "dimensions"
BOUNDARY_CONDITIONS = "boundary_conditions"
SCALARS = "scalars"
FIELD_GROUPS = ("t0_fields", "t1_fields", "t2_fields")
REQUIRED_GROUPS = (DIMENSIONS, BOUNDARY_CONDITIONS, SCALARS, *FIELD_GROUPS)

# Attributes. Root: what the dataset is; group: which datasets it lists; dataset: how it varies.
DATASET_NAME_ATTR = "dataset_name"
GRID_TYPE_ATTR = "grid_type"
N_SPATIAL_DIMS_ATTR = "n_spatial_dims"
N_TRAJECTORIES_ATTR = "n_trajectories"
SIMULATION_PARAMETERS_ATTR = "simulation_parameters"  # names; one root attr per name holds values
REQUIRED_ROOT_ATTRS = (
    DATASET_NAME_ATTR,
    GRID_TYPE_ATTR,
    N_SPATIAL_DIMS_ATTR,
    N_TRAJECTORIES_ATTR,
    SIMULATION_PARAMETERS_ATTR,
)
FIELD_NAMES_ATTR = "field_names"
DIM_VARYING_ATTR = "dim_varying"
SAMPLE_VARYING_ATTR = "sample_varying"
TIME_VARYING_ATTR = "time_varying"
FIELD_ATTRS = (DIM_VARYING_ATTR, SAMPLE_VARYING_ATTR, TIME_VARYING_ATTR)
SPATIAL_DIMS_ATTR = "spatial_dims"  # on `dimensions`; absent means DEFAULT_SPATIAL_DIMS
TIME = "time"  # the time coordinate in `dimensions`
DEFAULT_SPATIAL_DIMS = ("x", "y", "z")
CARTESIAN = "cartesian"  # a grid_type
BC_TYPE_ATTR = "bc_type"
BC_ASSOCIATED_DIMS_ATTR = "associated_dims"
BC_ASSOCIATED_FIELDS_ATTR = "associated_fields"
BC_MASK = "mask"  # dataset of a boundary_conditions/<name> group: True on boundary points
PERIODIC = "PERIODIC"  # a bc_type

# stats.yaml: {key: {field name: value or list per component}}; normalisation needs mean, std.
MEAN, STD, RMS = "mean", "std", "rms"
STATS_MOMENTS = (MEAN, STD, RMS)
NORMALIZATION_KEYS = (MEAN, STD)


def delta_key(moment: str) -> str:
    """The stats.yaml key of `moment` over one-step differences, e.g. std -> std_delta."""
    return f"{moment}_delta"


STATS_KEYS = (*STATS_MOMENTS, *map(delta_key, STATS_MOMENTS))


@dataclass(frozen=True)
class FieldSpec:
    """One field dataset such as `t1_fields/velocity`; build one with `field_spec`.

    `components` are the suffixes of its flattened channels: ("",) for a scalar field,
    ("x", "y") for a 2-D vector, ("xx", "xy", "yx", "yy") for a 2-D tensor (The Well's order).
    `shape` is one trajectory's stored shape (the trajectory axis, if any, dropped).
    """

    name: str
    group: str
    order: int
    components: tuple[str, ...]
    time_varying: bool
    sample_varying: bool
    dim_varying: tuple[bool, ...]
    shape: tuple[int, ...]

    @property
    def key(self) -> str:
        return f"{self.group}/{self.name}"

    @property
    def n_components(self) -> int:
        return len(self.components)

    @property
    def component_shape(self) -> tuple[int, ...]:
        """The trailing tensor axes of `shape`: () for a scalar, (d,) for a vector, (d, d) ..."""
        return self.shape[len(self.shape) - self.order :]

    @property
    def channel_names(self) -> tuple[str, ...]:
        return tuple(f"{self.name}_{c}" if c else self.name for c in self.components)


@dataclass(frozen=True)
class Grid:
    """The time and space axes that every field of a shard shares."""

    n_steps: int
    spatial_dims: tuple[str, ...]
    spatial_shape: tuple[int, ...]


def field_spec(
    name: str,
    order: int,
    grid: Grid,
    *,
    time_varying: bool,
    sample_varying: bool = True,
    dim_varying: tuple[bool, ...] | None = None,
) -> FieldSpec:
    """The spec of field `name` of tensor `order` on `grid` (varying along every axis unless
    told otherwise): the reader and the writer both derive group, components and shape here."""
    n_dims = len(grid.spatial_dims)
    dim_varying = (True,) * n_dims if dim_varying is None else dim_varying
    axes = _trajectory_axes(order, time_varying, dim_varying, grid)
    return FieldSpec(
        name=name,
        group=FIELD_GROUPS[order],
        order=order,
        components=tuple("".join(p) for p in itertools.product(grid.spatial_dims, repeat=order)),
        time_varying=time_varying,
        sample_varying=sample_varying,
        dim_varying=dim_varying,
        shape=tuple(size for _, size in axes),
    )


def _trajectory_axes(order: int, time_varying: bool, dim_varying, grid: Grid):
    """(label, size) of each axis of one trajectory: [n_steps?, varying dims..., components...]."""
    axes = [("n_steps", grid.n_steps)] if time_varying else []
    axes += [
        (dim, size)
        for dim, size, varying in zip(
            grid.spatial_dims, grid.spatial_shape, dim_varying, strict=True
        )
        if varying
    ]
    return axes + [("component", len(grid.spatial_dims))] * order


@dataclass(frozen=True)
class ScalarSpec:
    """One entry of the `scalars` group (simulation parameters and scalar time series)."""

    name: str
    time_varying: bool
    sample_varying: bool


@dataclass(frozen=True)
class ShardInfo:
    """Validated metadata of one `.hdf5` shard."""

    path: Path
    dataset_name: str
    grid_type: str
    n_trajectories: int
    n_steps: int
    spatial_dims: tuple[str, ...]
    spatial_shape: tuple[int, ...]
    fields: tuple[FieldSpec, ...]
    scalars: tuple[ScalarSpec, ...]
    simulation_parameters: tuple[str, ...]
    compressed: bool  # some field passes through an HDF5 filter (gzip, lzf, ...)


@dataclass(frozen=True)
class DatasetInfo:
    """All shards of one split; they agree on fields, n_steps and grid (checked on reading)."""

    root: Path
    split: str
    shards: tuple[ShardInfo, ...]
    dataset_name: str
    n_steps: int
    spatial_shape: tuple[int, ...]
    fields: tuple[FieldSpec, ...]
    n_trajectories: int


@dataclass(frozen=True)
class ChannelLayout:
    """Model channels: `predicted` from time-varying fields, `conditioning` from constant ones.

    Order: t0, then t1, then t2 fields, each in its group's `field_names` order, components
    flattened (the order of the_well's `WellDataset`).
    """

    predicted_fields: tuple[FieldSpec, ...]
    conditioning_fields: tuple[FieldSpec, ...]

    @property
    def predicted(self) -> tuple[str, ...]:
        return tuple(n for f in self.predicted_fields for n in f.channel_names)

    @property
    def conditioning(self) -> tuple[str, ...]:
        return tuple(n for f in self.conditioning_fields for n in f.channel_names)


def open_hdf5(path: str | os.PathLike, rdcc_nbytes: int | None = None) -> h5py.File:
    """Open read-only, without file locking unless HDF5_USE_FILE_LOCKING is set (network FS)."""
    kwargs: dict[str, Any] = {}
    if "HDF5_USE_FILE_LOCKING" not in os.environ:
        kwargs["locking"] = False
    if rdcc_nbytes is not None:
        kwargs["rdcc_nbytes"] = rdcc_nbytes
    try:
        try:
            return h5py.File(path, "r", **kwargs)
        except OSError as err:
            if "locking" not in str(err) or "locking" not in kwargs:
                raise
            # HDF5 refuses a second open in this process with other locking flags: match them.
            del kwargs["locking"]
            return h5py.File(path, "r", **kwargs)
    except FileNotFoundError:
        raise DataError(f"{path}: no such file (expected a Well-format .hdf5 shard)") from None
    except OSError as err:
        raise DataError(
            f"{path}: cannot open as HDF5 (not an HDF5 file, truncated or corrupt): {err}"
        ) from None


def read_shard_info(path: str | os.PathLike) -> ShardInfo:
    """Read and validate the metadata of one shard (no field values are read)."""
    path = Path(path)
    with open_hdf5(path) as f:
        try:
            return _read_open_shard(f, path)
        except OSError as err:  # metadata blocks cut off or damaged after a valid superblock
            raise DataError(f"{path}: corrupt HDF5 metadata: {err}") from None
        except (TypeError, ValueError) as err:  # e.g. n_spatial_dims="two"
            raise DataError(f"{path}: malformed metadata: {err}") from None


def split_dir(root: str | os.PathLike, split: str) -> Path:
    """`<root>/data/<split>`, where a split's shards live."""
    return Path(root) / DATA_DIR / split


def list_shards(root: str | os.PathLike, split: str) -> list[Path]:
    """Sorted shard files of `<root>/data/<split>`; the directory must exist."""
    directory = split_dir(root, split)
    if not directory.is_dir():
        raise DataError(
            f"{directory}: split directory not found "
            "(expected <root>/data/{train,valid,test}/*.hdf5)"
        )
    return sorted(p for p in directory.iterdir() if p.is_file() and p.suffix in SHARD_SUFFIXES)


def read_split_shards(
    root: str | os.PathLike, split: str, *, same_n_steps: bool = True
) -> tuple[ShardInfo, ...]:
    """Every shard of a split, validated, agreeing on fields and grid (and n_steps if asked),
    holding at least one trajectory in all. Statistics need no common n_steps; windows do."""
    if not Path(root).is_dir():
        raise DataError(f"{root}: dataset root not found")
    paths = list_shards(root, split)
    if not paths:
        raise DataError(f"{split_dir(root, split)}: empty split, no .hdf5 shards")
    shards = tuple(read_shard_info(p) for p in paths)
    for other in shards[1:]:
        difference = shard_difference(shards[0], other, compare_steps=same_n_steps)
        if difference:
            shared = "fields, n_steps and grid" if same_n_steps else "fields and grid"
            raise DataError(
                f"{other.path}: disagrees with {shards[0].path}: {difference} "
                f"(all shards of a split must share {shared})"
            )
    if sum(s.n_trajectories for s in shards) == 0:
        raise DataError(f"{split_dir(root, split)}: empty split, its shards hold 0 trajectories")
    return shards


def read_split_info(root: str | os.PathLike, split: str) -> DatasetInfo:
    """Read all shards of a split and check that they agree on fields, n_steps and grid."""
    shards = read_split_shards(root, split)
    first = shards[0]
    return DatasetInfo(
        root=Path(root),
        split=split,
        shards=shards,
        dataset_name=first.dataset_name,
        n_steps=first.n_steps,
        spatial_shape=first.spatial_shape,
        fields=first.fields,
        n_trajectories=sum(s.n_trajectories for s in shards),
    )


def shard_difference(a: ShardInfo, b: ShardInfo, *, compare_steps: bool = True) -> str | None:
    """What makes two shards incompatible in one dataset, or None if they agree."""
    if a.dataset_name != b.dataset_name:
        return f"dataset_name {b.dataset_name!r} != {a.dataset_name!r}"
    if a.spatial_shape != b.spatial_shape:
        return f"grid {list(b.spatial_shape)} != {list(a.spatial_shape)}"
    if compare_steps and a.n_steps != b.n_steps:
        return f"n_steps {b.n_steps} != {a.n_steps}"
    keys_a, keys_b = [f.key for f in a.fields], [f.key for f in b.fields]
    if keys_a != keys_b:
        return f"fields {keys_b} != {keys_a}"
    for fa, fb in zip(a.fields, b.fields, strict=True):
        for attr in ("time_varying", "sample_varying", "dim_varying"):  # FieldSpec attributes
            if getattr(fa, attr) != getattr(fb, attr):
                return f"{fb.key} attr {attr} {getattr(fb, attr)} != {getattr(fa, attr)}"
    return None


def channel_layout(fields: tuple[FieldSpec, ...] | list[FieldSpec]) -> ChannelLayout:
    """Split fields into predicted (time-varying) and conditioning (constant) channels."""
    ordered = sorted(fields, key=lambda f: FIELD_GROUPS.index(f.group))  # stable within a group
    return ChannelLayout(
        predicted_fields=tuple(f for f in ordered if f.time_varying),
        conditioning_fields=tuple(f for f in ordered if not f.time_varying),
    )


def load_stats(root: str | os.PathLike) -> dict[str, Any]:
    """Parse `<root>/stats.yaml` (keys mean, std, ... -> field -> value(s)); see stats_problems."""
    path = Path(root) / STATS_FILE
    if not path.is_file():
        raise DataError(f"{path}: not found (expected per-field mean/std for normalisation)")
    try:
        stats = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        raise DataError(f"{path}: not valid YAML: {err}") from None
    if not isinstance(stats, dict):
        raise DataError(f"{path}: expected a mapping with keys mean, std, got {stats!r:.60}")
    return stats


def stats_problems(stats: dict[str, Any], fields, stats_path: str | os.PathLike) -> list[str]:
    """Every way stats.yaml fails to give a finite mean/std per component of `fields`, one line
    per key and field (`<stats.yaml>: mean/pressure: missing ...`), so that all show at once."""
    problems = []
    for key in NORMALIZATION_KEYS:
        table = stats.get(key)
        if not isinstance(table, dict):
            problems.append(f"{stats_path}: key {key!r}: missing, expected field name -> value(s)")
            continue
        for field in fields:
            if field.name not in table:
                problem = f"missing, expected {field.n_components} value(s)"
            else:
                problem = _stats_value_problem(table[field.name], field, key)
            if problem:
                problems.append(f"{stats_path}: {key}/{field.name}: {problem}")
    return problems


def _stats_value_problem(value: Any, field: FieldSpec, key: str) -> str | None:
    try:
        values = np.asarray(value, dtype=np.float64).ravel()
    except (TypeError, ValueError):
        return f"expected a number or a list of numbers, got {value!r}"
    if values.size not in (1, field.n_components):
        return f"{values.size} values, expected {field.n_components} (one per component)"
    if not np.isfinite(values).all():
        return f"non-finite value {value!r}"
    if key == STD and (values < 0).any():
        return f"negative std {value!r}"
    return None


def _strings(value: Any) -> tuple[str, ...]:
    """An HDF5 string-list attribute as a tuple of str (h5py returns str, bytes or arrays)."""
    return tuple(v.decode() if isinstance(v, bytes) else str(v) for v in np.atleast_1d(value))


def _int_attr(attrs: h5py.AttributeManager, key: str, path: Path) -> int:
    value = attrs[key]
    if not np.issubdtype(np.asarray(value).dtype, np.integer) or np.ndim(value) != 0:
        raise DataError(f"{path}: /: attr {key}={value!r}, expected an integer")
    return int(value)


def _require(container: Any, names, where: str, what: str, path: Path) -> None:
    """One error listing every name in `names` absent from a group or attribute set."""
    missing = [n for n in names if n not in container]
    if missing:
        raise DataError(f"{path}: {where}: missing {what} {missing}")


def _read_open_shard(f: h5py.File, path: Path) -> ShardInfo:
    _require(f.attrs, REQUIRED_ROOT_ATTRS, "/", "attrs", path)
    _require(f, REQUIRED_GROUPS, "/", "groups", path)
    n_dims, n_traj = (
        _int_attr(f.attrs, k, path) for k in (N_SPATIAL_DIMS_ATTR, N_TRAJECTORIES_ATTR)
    )
    grid = _read_dimensions(f[DIMENSIONS], path, n_dims)
    fields = tuple(
        _read_field(f[group], name, order, grid, n_traj, path)
        for order, group in enumerate(FIELD_GROUPS)
        for name in _field_names(f[group], path)
    )
    if not any(field.time_varying for field in fields):
        raise DataError(f"{path}: t0/t1/t2_fields: no time-varying field, nothing to predict")
    return ShardInfo(
        path=path,
        dataset_name=str(f.attrs[DATASET_NAME_ATTR]),
        grid_type=str(f.attrs[GRID_TYPE_ATTR]),
        n_trajectories=n_traj,
        n_steps=grid.n_steps,
        spatial_dims=grid.spatial_dims,
        spatial_shape=grid.spatial_shape,
        fields=fields,
        scalars=_read_scalars(f[SCALARS], path),
        simulation_parameters=_strings(f.attrs[SIMULATION_PARAMETERS_ATTR]),
        compressed=any(f[x.key].id.get_create_plist().get_nfilters() > 0 for x in fields),
    )


def _read_dimensions(dims: h5py.Group, path: Path, n_dims: int) -> Grid:
    """The shard's grid from the `dimensions` group (spatial_dims attr, coordinate lengths)."""
    if SPATIAL_DIMS_ATTR in dims.attrs:
        spatial_dims = _strings(dims.attrs[SPATIAL_DIMS_ATTR])
    else:
        spatial_dims = DEFAULT_SPATIAL_DIMS[:n_dims]
    if len(spatial_dims) != n_dims:
        raise DataError(
            f"{path}: /dimensions: spatial_dims {list(spatial_dims)} but n_spatial_dims={n_dims}"
        )
    _require(dims, (TIME, *spatial_dims), dims.name, "datasets", path)
    for name in (TIME, *spatial_dims):
        if dims[name].ndim == 0:
            raise DataError(f"{path}: /dimensions/{name}: scalar, expected a 1-D coordinate array")
    spatial_shape = tuple(int(dims[d].shape[-1]) for d in spatial_dims)
    return Grid(int(dims[TIME].shape[-1]), spatial_dims, spatial_shape)


def _field_names(group: h5py.Group, path: Path) -> tuple[str, ...]:
    _require(group.attrs, (FIELD_NAMES_ATTR,), group.name, "attrs", path)
    listed = np.atleast_1d(group.attrs[FIELD_NAMES_ATTR])
    names = _strings(listed) if listed.size else ()  # h5py stores [] as an empty float array
    _require(group, names, group.name, "datasets listed in field_names", path)
    return names


def _read_field(
    group: h5py.Group, name: str, order: int, grid: Grid, n_traj: int, path: Path
) -> FieldSpec:
    ds = group[name]
    _require(ds.attrs, FIELD_ATTRS, ds.name, "attrs", path)
    n_dims = len(grid.spatial_dims)
    dim_varying = tuple(bool(v) for v in np.atleast_1d(ds.attrs[DIM_VARYING_ATTR]))
    if len(dim_varying) != n_dims:
        raise DataError(
            f"{path}: {ds.name}: dim_varying {list(dim_varying)}, expected {n_dims} flags"
        )
    spec = field_spec(
        name,
        order,
        grid,
        time_varying=bool(ds.attrs[TIME_VARYING_ATTR]),
        sample_varying=bool(ds.attrs[SAMPLE_VARYING_ATTR]),
        dim_varying=dim_varying,
    )
    axes = [(N_TRAJECTORIES_ATTR, n_traj)] if spec.sample_varying else []
    axes += _trajectory_axes(order, spec.time_varying, dim_varying, grid)
    expected = tuple(size for _, size in axes)
    if ds.shape != expected:
        legend = ", ".join(label for label, _ in axes)
        raise DataError(f"{path}: {ds.name}: shape {ds.shape}, expected {expected} = [{legend}]")
    if not (np.issubdtype(ds.dtype, np.floating) or np.issubdtype(ds.dtype, np.integer)):
        raise DataError(f"{path}: {ds.name}: dtype {ds.dtype}, expected a real number type")
    return spec


def _read_scalars(group: h5py.Group, path: Path) -> tuple[ScalarSpec, ...]:
    listed = FIELD_NAMES_ATTR in group.attrs
    names = _field_names(group, path) if listed else tuple(group.keys())
    flags = [
        (
            group[n].attrs.get(TIME_VARYING_ATTR, False),
            group[n].attrs.get(SAMPLE_VARYING_ATTR, False),
        )
        for n in names
    ]
    return tuple(
        ScalarSpec(n, bool(tv), bool(sv)) for n, (tv, sv) in zip(names, flags, strict=True)
    )
