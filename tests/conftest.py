"""Shared fixtures: small Well-format dataset roots written with h5py and with the_well's writer.

`write_shard` is a tiny independent writer (not noa_dist's generator), so the reader is tested
against the format, not against our own writer. Its values encode where they came from:
field value = 1000 * trajectory + 10 * t + component + 0.01 * x + 0.0001 * y (+ 500 if constant),
with `trajectory` counted across the shards of a split, so a test can tell frames apart.
"""

from __future__ import annotations

import copy
import itertools
import shutil
from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np
import pytest
import yaml
from the_well.utils.dummy_data import write_dummy_data


@dataclass(frozen=True)
class TinyField:
    name: str
    order: int = 0
    time_varying: bool = True
    sample_varying: bool = True
    dim_varying: tuple[bool, ...] = (True, True)


DEFAULT_FIELDS = (
    TinyField("pressure", order=0),
    TinyField("velocity", order=1),
    TinyField("diffusivity", order=0, time_varying=False),
)


def field_values(field: TinyField, first_traj: int, n_traj: int, n_steps: int, grid) -> np.ndarray:
    """Values as stored: [n_traj?, n_steps?, varying dims..., (2,)*order]."""
    traj = np.arange(first_traj, first_traj + n_traj).reshape(-1, 1, 1, 1, 1)
    t = np.arange(n_steps).reshape(1, -1, 1, 1, 1)
    x = np.arange(grid[0]).reshape(1, 1, -1, 1, 1)
    y = np.arange(grid[1]).reshape(1, 1, 1, -1, 1)
    comp = np.arange(2**field.order).reshape(1, 1, 1, 1, -1)
    values = 1000.0 * traj + 10.0 * t + comp + 0.01 * x + 0.0001 * y  # [traj, t, x, y, comp]
    if not field.time_varying:
        values = values[:, 0] + 500.0
    first_spatial_axis = values.ndim - 3
    for axis, varying in reversed(list(enumerate(field.dim_varying))):
        if not varying:
            values = values.take(0, axis=first_spatial_axis + axis)
    values = values.reshape(*values.shape[:-1], *(2,) * field.order)
    if not field.sample_varying:
        values = values[0]
    return values.astype(np.float32)


def write_shard(
    path: Path,
    *,
    n_traj: int = 3,
    n_steps: int = 9,
    grid: tuple[int, int] = (8, 6),
    fields: tuple[TinyField, ...] = DEFAULT_FIELDS,
    first_traj: int = 0,
    dataset_name: str = "tiny",
    compression: str | None = None,
) -> dict[str, np.ndarray]:
    """Write one conforming shard; returns the stored arrays by field name."""
    path.parent.mkdir(parents=True, exist_ok=True)
    arrays = {}
    with h5py.File(path, "w") as f:
        f.attrs.update(
            dataset_name=dataset_name,
            grid_type="cartesian",
            n_spatial_dims=2,
            n_trajectories=n_traj,
            simulation_parameters=["nu"],
            nu=0.1,
        )
        dims = f.create_group("dimensions")
        dims.attrs["spatial_dims"] = ["x", "y"]
        for name, size in (("time", n_steps), ("x", grid[0]), ("y", grid[1])):
            dims.create_dataset(name, data=np.linspace(0, 1, size, dtype=np.float32))
            dims[name].attrs.update(sample_varying=False, time_varying=name == "time")
        bc = f.create_group("boundary_conditions").create_group("x_periodic")
        bc.attrs.update(associated_dims=["x"], associated_fields=[], bc_type="PERIODIC")
        bc.create_dataset("mask", data=np.ones(grid[0], bool))
        scalars = f.create_group("scalars")
        scalars.attrs["field_names"] = ["nu"]
        scalars.create_dataset("nu", data=np.float32(0.1))
        scalars["nu"].attrs.update(sample_varying=False, time_varying=False)
        for order in range(3):
            group = f.create_group(f"t{order}_fields")
            group.attrs["field_names"] = [fl.name for fl in fields if fl.order == order]
            for fl in (fl for fl in fields if fl.order == order):
                arrays[fl.name] = field_values(fl, first_traj, n_traj, n_steps, grid)
                ds = group.create_dataset(fl.name, data=arrays[fl.name], compression=compression)
                ds.attrs.update(
                    dim_varying=list(fl.dim_varying),
                    sample_varying=fl.sample_varying,
                    time_varying=fl.time_varying,
                )
    return arrays


def write_stats(root: Path, arrays_by_field: dict[str, list[np.ndarray]], orders: dict[str, int]):
    """stats.yaml as The Well writes it: per field a float, or a list per component."""

    def per_component(fn, values_list, order):
        values = np.concatenate([v.reshape(-1, 2**order) for v in values_list])
        result = fn(values, axis=0)
        return float(result[0]) if order == 0 else [float(v) for v in result]

    stats: dict[str, dict] = {k: {} for k in ("mean", "std", "rms")}
    for name, values_list in arrays_by_field.items():
        order = orders[name]
        stats["mean"][name] = per_component(np.mean, values_list, order)
        stats["std"][name] = per_component(np.std, values_list, order)
        stats["rms"][name] = per_component(
            lambda v, axis: np.sqrt((v**2).mean(axis)), values_list, order
        )
    for key in ("mean", "std", "rms"):  # the reader ignores *_delta; deep copies avoid YAML anchors
        stats[f"{key}_delta"] = copy.deepcopy(stats[key])
    (root / "stats.yaml").write_text(yaml.safe_dump(stats))


def write_root(
    root: Path,
    shards: dict[str, list[int]] | None = None,
    *,
    fields: tuple[TinyField, ...] = DEFAULT_FIELDS,
    **shard_kwargs,
) -> Path:
    """A dataset root; `shards` maps split -> trajectories per shard. Stats from all data."""
    shards = shards or {"train": [3, 2], "valid": [2], "test": [2]}
    collected: dict[str, list[np.ndarray]] = {f.name: [] for f in fields}
    for split, counts in shards.items():
        offsets = itertools.accumulate(counts, initial=0)
        for i, (first, n_traj) in enumerate(zip(offsets, counts, strict=False)):
            path = root / "data" / split / f"shard_{i:03d}.hdf5"
            arrays = write_shard(
                path, n_traj=n_traj, fields=fields, first_traj=first, **shard_kwargs
            )
            for name, values in arrays.items():
                collected[name].append(values)
    write_stats(root, collected, {f.name: f.order for f in fields})
    return root


@pytest.fixture
def tiny_root(tmp_path: Path) -> Path:
    """train: shards of 3 and 2 trajectories; valid, test: 2; 9 steps on an 8x6 grid."""
    return write_root(tmp_path / "tiny")


@pytest.fixture
def dummy_root(tmp_path: Path) -> Path:
    """the_well's dummy file (2 trajectories, 10 steps, 32x32) in every split, plus stats.yaml."""
    root = tmp_path / "dummy"
    source = tmp_path / "dummy_source.hdf5"
    np.random.seed(0)  # write_dummy_data draws from the global RNG
    write_dummy_data(str(source))
    for split in ("train", "valid", "test"):
        (root / "data" / split).mkdir(parents=True)
        shutil.copy(source, root / "data" / split / "dummy.hdf5")
    with h5py.File(source, "r") as f:
        arrays = {
            "field": [f["t1_fields/field"][()]],
            "constant_field": [f["t0_fields/constant_field"][()]],
        }
    write_stats(root, arrays, {"field": 1, "constant_field": 0})
    return root


@pytest.fixture
def dummy_root_without_test(dummy_root: Path) -> Path:
    """dummy_root with the_well's file in train/ and valid/ only (what training needs)."""
    shutil.rmtree(dummy_root / "data" / "test")
    return dummy_root


from dist_runs import (  # noqa: E402,F401 (launches shared by several modules)
    ddp_faulted,
    ddp_reference,
    ddp_straight,
    tiny_dataset,
    tiny_tokenizer,
)
