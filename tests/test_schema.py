from __future__ import annotations

from pathlib import Path

import h5py
import numpy as np
import pytest
import yaml
from conftest import TinyField, write_shard

from noa_dist.data.dataset import channel_norm
from noa_dist.data.schema import (
    channel_layout,
    load_stats,
    read_shard_info,
    read_split_info,
)
from noa_dist.errors import DataError


def shard_path(root: Path, split: str = "train", i: int = 0) -> Path:
    return root / "data" / split / f"shard_{i:03d}.hdf5"


def test_dummy_data_has_constant_scalar_field_and_vector_field(dummy_root):
    info = read_shard_info(dummy_root / "data" / "train" / "dummy.hdf5")
    assert (info.n_trajectories, info.n_steps, info.spatial_shape) == (2, 10, (32, 32))
    by_name = {f.name: f for f in info.fields}
    assert by_name["constant_field"].time_varying is False
    assert by_name["constant_field"].shape == (32, 32)
    assert by_name["field"].components == ("x", "y")
    assert by_name["field"].shape == (10, 32, 32, 2)
    layout = channel_layout(info.fields)
    assert layout.predicted == ("field_x", "field_y")
    assert layout.conditioning == ("constant_field",)
    assert [s.name for s in info.scalars] == ["a", "b", "time_varying_scalar"]


def test_channels_ordered_t0_t1_t2_with_tensor_components_flattened(tmp_path):
    fields = (
        TinyField("stress", order=2),
        TinyField("velocity", order=1),
        TinyField("rho", order=0),
        TinyField("mask", order=0, time_varying=False),
        TinyField("forcing", order=1, time_varying=False),
    )
    write_shard(tmp_path / "s.hdf5", fields=fields)
    layout = channel_layout(read_shard_info(tmp_path / "s.hdf5").fields)
    assert layout.predicted == (
        "rho",
        "velocity_x",
        "velocity_y",
        "stress_xx",
        "stress_xy",
        "stress_yx",
        "stress_yy",
    )
    assert layout.conditioning == ("mask", "forcing_x", "forcing_y")


def test_split_info_sums_trajectories_over_sorted_shards(tiny_root):
    info = read_split_info(tiny_root, "train")
    assert [s.path.name for s in info.shards] == ["shard_000.hdf5", "shard_001.hdf5"]
    assert (info.n_trajectories, info.n_steps, info.spatial_shape) == (5, 9, (8, 6))


def test_channel_norm_zero_std_becomes_one_and_scalar_entry_covers_components(tiny_root):
    stats = load_stats(tiny_root)
    stats["std"]["diffusivity"] = 0.0
    stats["mean"]["velocity"] = 3.0
    layout = channel_layout(read_split_info(tiny_root, "train").fields)
    norm = channel_norm(layout, stats, "stats.yaml")
    assert norm.std_conditioning.tolist() == [1.0]
    assert norm.mean_predicted[1:].tolist() == [3.0, 3.0]
    assert norm.mean_predicted.dtype == np.float32


# --- every bad input is one DataError naming the file and key ---------------------------------


def _edit(path: Path, edit) -> None:
    with h5py.File(path, "r+") as f:
        edit(f)


def _replace(f: h5py.File, key: str, data: np.ndarray) -> None:
    attrs = dict(f[key].attrs)
    del f[key]
    f.create_dataset(key, data=data).attrs.update(attrs)


SHARD_BREAKAGES = {
    "missing root attr": (
        lambda f: f.attrs.__delitem__("n_trajectories"),
        ["/: missing attrs ['n_trajectories']"],
    ),
    "non-integer attr": (
        lambda f: f.attrs.__setitem__("n_spatial_dims", "two"),
        ["/: attr n_spatial_dims='two', expected an integer"],
    ),
    "missing group": (lambda f: f.__delitem__("scalars"), ["/: missing groups ['scalars']"]),
    "missing field attr": (
        lambda f: f["t1_fields/velocity"].attrs.__delitem__("time_varying"),
        ["/t1_fields/velocity", "missing attrs ['time_varying']"],
    ),
    "listed field absent": (
        lambda f: f.__delitem__("t0_fields/pressure"),
        ["/t0_fields", "field_names", "['pressure']"],
    ),
    "missing time coordinate": (
        lambda f: f.__delitem__("dimensions/time"),
        ["/dimensions", "missing datasets ['time']"],
    ),
    "field of wrong rank": (
        lambda f: _replace(f, "t1_fields/velocity", np.zeros((3, 9, 8, 6), np.float32)),
        ["/t1_fields/velocity", "shape (3, 9, 8, 6)", "expected (3, 9, 8, 6, 2)", "component"],
    ),
    "field on another grid": (
        lambda f: _replace(f, "t0_fields/pressure", np.zeros((3, 9, 8, 5), np.float32)),
        ["/t0_fields/pressure", "expected (3, 9, 8, 6)", "n_trajectories, n_steps, x, y"],
    ),
    "n_trajectories attr disagrees with arrays": (
        lambda f: f.attrs.__setitem__("n_trajectories", 4),
        ["/t0_fields/pressure", "shape (3, 9, 8, 6)", "expected (4, 9, 8, 6)"],
    ),
}


@pytest.mark.parametrize("breakage", list(SHARD_BREAKAGES), ids=list(SHARD_BREAKAGES))
def test_broken_shard_raises_one_error_naming_file_and_key(tiny_root, breakage):
    edit, expected = SHARD_BREAKAGES[breakage]
    path = shard_path(tiny_root)
    _edit(path, edit)
    with pytest.raises(DataError) as err:
        read_shard_info(path)
    message = str(err.value)
    assert "\n" not in message
    assert message.startswith(str(path))
    for part in expected:
        assert part in message


def test_only_constant_fields_is_an_error(tmp_path):
    path = tmp_path / "s.hdf5"
    write_shard(path, fields=(TinyField("mask", time_varying=False),))
    with pytest.raises(DataError, match="no time-varying field, nothing to predict"):
        read_shard_info(path)


def test_missing_file_names_the_path(tmp_path):
    with pytest.raises(DataError, match=r"nope\.hdf5: no such file"):
        read_shard_info(tmp_path / "nope.hdf5")


def test_text_file_is_not_hdf5(tmp_path):
    path = tmp_path / "notes.hdf5"
    path.write_text("not hdf5\n")
    with pytest.raises(DataError, match=r"notes\.hdf5: cannot open as HDF5"):
        read_shard_info(path)


def test_truncated_shard_is_reported_as_corrupt(tiny_root):
    path = shard_path(tiny_root)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(DataError) as err:
        read_shard_info(path)
    assert str(path) in str(err.value)
    assert "truncated or corrupt" in str(err.value)


def test_shards_on_different_grids_name_both_files(tiny_root):
    second = shard_path(tiny_root, i=1)
    write_shard(second, n_traj=2, grid=(8, 8))
    with pytest.raises(DataError) as err:
        read_split_info(tiny_root, "train")
    message = str(err.value)
    assert str(second) in message and str(shard_path(tiny_root)) in message
    assert "grid [8, 8] != [8, 6]" in message


def test_shards_with_different_n_steps_disagree(tiny_root):
    write_shard(shard_path(tiny_root, i=1), n_traj=2, n_steps=12)
    with pytest.raises(DataError, match="n_steps 12 != 9"):
        read_split_info(tiny_root, "train")


def test_missing_split_directory(tiny_root):
    with pytest.raises(DataError, match=r"data/extra: split directory not found"):
        read_split_info(tiny_root, "extra")


def test_empty_split(tiny_root):
    for path in (tiny_root / "data" / "valid").iterdir():
        path.unlink()
    with pytest.raises(DataError, match=r"data/valid: empty split"):
        read_split_info(tiny_root, "valid")


def test_missing_stats_yaml(tiny_root):
    (tiny_root / "stats.yaml").unlink()
    with pytest.raises(DataError, match=r"stats\.yaml: not found"):
        load_stats(tiny_root)


@pytest.mark.parametrize(
    ("edit", "expected"),
    [
        (lambda s: s["mean"].pop("velocity"), "mean/velocity: missing, expected 2 value(s)"),
        (lambda s: s["std"].__setitem__("velocity", [1.0, 2.0, 3.0]), "std/velocity: 3 values"),
        (lambda s: s["std"].__setitem__("pressure", -1.0), "std/pressure: negative std"),
        (lambda s: s.pop("std"), "key 'std': missing"),
    ],
)
def test_stats_gap_names_stats_file_and_field(tiny_root, edit, expected):
    stats_file = tiny_root / "stats.yaml"
    stats = yaml.safe_load(stats_file.read_text())
    edit(stats)
    stats_file.write_text(yaml.safe_dump(stats))
    layout = channel_layout(read_split_info(tiny_root, "train").fields)
    with pytest.raises(DataError) as err:
        channel_norm(layout, load_stats(tiny_root), stats_file)
    assert str(err.value).startswith(str(stats_file))
    assert expected in str(err.value)
