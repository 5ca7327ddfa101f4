"""The demo-data generator: Well layout, determinism, splits, realizations, CLI behaviour."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest

from noa_dist.data.cli import main
from noa_dist.data.generate import (
    FAMILIES,
    GeneratorSettings,
    build_layout,
    generate_dataset,
    plan_trajectories,
    split_counts,
)
from noa_dist.data.schema import field_spec, read_shard_info
from noa_dist.data.writer import ShardLayout, ShardWriter, Trajectory, chunk_shape, grid_2d
from noa_dist.errors import ConfigError, DataError

SMALL = {"n_trajectories": 6, "grid": 32, "timesteps": 16, "progress": False}


def _shards(root: Path, split: str = "train") -> list[Path]:
    return sorted((root / "data" / split).glob("*.hdf5"))


@pytest.fixture(scope="module")
def small_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("demo") / "ds"
    return generate_dataset(root, workers=1, trajectories_per_shard=2, **SMALL)


def test_shards_follow_the_well_layout(small_root):
    with h5py.File(_shards(small_root)[0], "r") as f:
        assert f.attrs["grid_type"] == "cartesian" and f.attrs["n_spatial_dims"] == 2
        assert f.attrs["n_trajectories"] == 2
        for name in f.attrs["simulation_parameters"]:
            assert np.array_equal(f.attrs[name], f["scalars"][name][:])
        assert list(f["dimensions"].attrs["spatial_dims"]) == ["x", "y"]
        assert f["dimensions/time"].shape == (17,) and f["dimensions/x"].shape == (32,)
        for dim in ("x", "y"):
            bc = f[f"boundary_conditions/{dim}_periodic"]
            assert bc.attrs["bc_type"] == "PERIODIC" and list(bc.attrs["associated_dims"]) == [dim]
            assert bc["mask"][0] and bc["mask"][-1] and not bc["mask"][1:-1].any()
        assert list(f["t0_fields"].attrs["field_names"]) == ["u", "forcing", "diffusivity"]
        assert list(f["t1_fields"].attrs["field_names"]) == ["advection_velocity"]
        assert len(f["t2_fields"].attrs["field_names"]) == 0
        u = f["t0_fields/u"]
        assert u.shape == (2, 17, 32, 32) and u.dtype == np.float32 and u.chunks == (1, 17, 32, 32)
        assert u.attrs["time_varying"] and u.attrs["sample_varying"]
        velocity = f["t1_fields/advection_velocity"]
        assert velocity.shape == (2, 32, 32, 2) and velocity.chunks == (1, 32, 32, 2)
        assert not velocity.attrs["time_varying"] and list(velocity.attrs["dim_varying"]) == [
            True,
            True,
        ]
        assert f["scalars/family"].shape == (2,) and f["scalars/family"].attrs["sample_varying"]


def test_constant_fields_carry_each_familys_coefficients(small_root):
    seen = set()
    for split in ("train", "valid", "test"):
        for path in _shards(small_root, split):
            with h5py.File(path, "r") as f:
                s = {name: f["scalars"][name][:] for name in f["scalars"].attrs["field_names"]}
                coefficient = f["t0_fields/diffusivity"][:, 0, 0]
                velocity = f["t1_fields/advection_velocity"][:, 5, 7]
                forcing = f["t0_fields/forcing"][:]
            for i, code in enumerate(s["family"]):
                family = FAMILIES[code]
                seen.add(family)
                expected = {
                    "advection_diffusion": s["diffusivity"][i],
                    "allen_cahn": s["epsilon"][i] ** 2,
                }
                np.testing.assert_allclose(
                    coefficient[i], expected.get(family, s["viscosity"][i]), rtol=1e-6
                )
                np.testing.assert_allclose(
                    velocity[i], [s["velocity_x"][i], s["velocity_y"][i]], rtol=1e-6
                )
                assert (np.abs(forcing[i]).max() > 0) == (family == "navier_stokes")
    assert seen == set(FAMILIES)


def _all_arrays(root: Path) -> dict[str, np.ndarray]:
    """Every dataset of every shard, keyed by shard name and dataset path."""
    arrays = {}
    for path in sorted((root / "data").rglob("*.hdf5")):
        with h5py.File(path, "r") as f:
            names: list[str] = []
            f.visit(names.append)
            arrays.update(
                {f"{path.name}/{n}": f[n][()] for n in names if isinstance(f[n], h5py.Dataset)}
            )
    return arrays


def test_same_seed_gives_identical_bytes_with_one_or_two_workers(small_root, tmp_path):
    two_workers = generate_dataset(tmp_path / "ds", workers=2, trajectories_per_shard=2, **SMALL)
    expected, got = _all_arrays(small_root), _all_arrays(two_workers)
    assert expected.keys() == got.keys() and any(k.endswith("t0_fields/u") for k in got)
    for key in expected:
        assert expected[key].tobytes() == got[key].tobytes(), key


def test_another_seed_gives_other_trajectories(small_root, tmp_path):
    other = generate_dataset(tmp_path / "ds", workers=1, trajectories_per_shard=2, seed=1, **SMALL)
    with h5py.File(_shards(small_root)[0], "r") as f, h5py.File(_shards(other)[0], "r") as g:
        assert not np.array_equal(f["t0_fields/u"][0], g["t0_fields/u"][0])


def test_realizations_share_initial_state_and_parameters_but_not_noise(tmp_path):
    root = generate_dataset(
        tmp_path / "ds", n_realizations=2, workers=1, split_fractions=(1, 0, 0), **SMALL
    )
    with h5py.File(_shards(root)[0], "r") as f:
        u = f["t0_fields/u"][:]
        s = {name: f["scalars"][name][:] for name in f["scalars"].attrs["field_names"]}
    assert list(s["ic_id"]) == [0, 0, 1, 1, 2, 2] and list(s["realization"]) == [0, 1] * 3
    assert np.all(s["noise_amplitude"] > 0)
    for a in (0, 2, 4):
        assert np.array_equal(u[a, 0], u[a + 1, 0])
        assert (
            s["diffusivity"][a] == s["diffusivity"][a + 1]
            and s["epsilon"][a] == s["epsilon"][a + 1]
        )
        assert not np.allclose(u[a, -1], u[a + 1, -1])


def test_every_split_gets_every_family_and_realizations_stay_together():
    plan = plan_trajectories(GeneratorSettings(n_trajectories=60, n_realizations=2))
    assert [len(plan[s]) for s in ("train", "valid", "test")] == [48, 6, 6]
    ic_splits = {}
    for split, specs in plan.items():
        assert {spec.family for spec in specs} == set(FAMILIES)
        for spec in specs:
            assert ic_splits.setdefault(spec.ic_id, split) == split


def test_small_splits_still_get_a_trajectory_each():
    assert split_counts(6, (0.8, 0.1, 0.1)) == [4, 1, 1]
    assert split_counts(10, (1.0, 0.0, 0.0)) == [10, 0, 0]
    assert sum(split_counts(257, (0.8, 0.1, 0.1))) == 257


def test_chunks_hold_one_trajectory_until_32_mib():
    assert chunk_shape((65, 64, 64), time_varying=True) == (1, 65, 64, 64)
    assert chunk_shape((100, 512, 512, 2), time_varying=True) == (
        1,
        16,
        512,
        512,
        2,
    )  # 2 MiB frames
    assert chunk_shape((64, 64, 2), time_varying=False) == (1, 64, 64, 2)


def test_compression_option_is_applied(tmp_path):
    root = generate_dataset(
        tmp_path / "ds",
        n_trajectories=2,
        grid=16,
        timesteps=2,
        workers=1,
        compression="lzf",
        progress=False,
    )
    with h5py.File(_shards(root)[0], "r") as f:
        assert f["t0_fields/u"].compression == "lzf"


def test_invalid_settings_are_reported_together(tmp_path):
    with pytest.raises(ConfigError) as error:
        generate_dataset(
            tmp_path,
            n_trajectories=5,
            n_realizations=2,
            families=("heat",),
            split_fractions=(0.5, 0.1),
            progress=False,
        )
    message = str(error.value)
    assert "n_realizations=2" in message and "heat" in message and "split=" in message


def test_refuses_to_overwrite_a_dataset_without_the_flag(small_root, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["generate", str(small_root), "--n-trajectories", "2"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "--overwrite" in err and "Traceback" not in err


def test_overwrite_replaces_only_the_dataset(tmp_path):
    root = generate_dataset(
        tmp_path / "ds",
        n_trajectories=4,
        grid=16,
        timesteps=2,
        workers=1,
        progress=False,
        trajectories_per_shard=1,
    )
    (root / "notes.txt").write_text("keep me")
    generate_dataset(
        root,
        n_trajectories=2,
        grid=16,
        timesteps=2,
        workers=1,
        progress=False,
        overwrite=True,
        split_fractions=(1, 0, 0),
    )
    assert len(_shards(root)) == 1 and not _shards(root, "valid") and (root / "notes.txt").exists()


def test_noa_data_generate_cli_prints_a_summary(tmp_path):
    out = tmp_path / "ds"
    argv = [
        "generate",
        str(out),
        "--n-trajectories",
        "3",
        "--grid",
        "16",
        "--timesteps",
        "2",
        "--workers",
        "1",
        "--split",
        "1,0,0",
    ]
    result = subprocess.run(
        [sys.executable, "-c", "from noa_dist.data.cli import main; main()", *argv],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    assert "train:     3 trajectories in 1 shard(s)" in result.stdout and "MiB" in result.stdout
    assert (out / "stats.yaml").exists()


def test_a_failed_shard_names_the_field_and_leaves_no_file(tmp_path):
    layout = build_layout(grid=8, timesteps=2, compression="none")
    with (
        pytest.raises(DataError, match="'u'.*expected \\(3, 8, 8\\)"),
        ShardWriter(tmp_path / "s.hdf5", layout, 1) as writer,
    ):
        writer.write(0, Trajectory(fields={"u": np.zeros((2, 8, 8))}, scalars={}))
    assert list(tmp_path.iterdir()) == []


def test_a_shard_missing_trajectories_is_discarded(tmp_path):
    layout = build_layout(grid=8, timesteps=2, compression="none")
    with (
        pytest.raises(DataError, match="only 0 of 1 trajectories"),
        ShardWriter(tmp_path / "s.hdf5", layout, 1),
    ):
        pass
    assert list(tmp_path.iterdir()) == []


def test_a_written_shard_reads_back_as_the_layouts_field_specs(small_root):
    """Writer and reader share schema.FieldSpec: what the layout declares is what is read."""
    layout = build_layout(grid=32, timesteps=16, compression="none")
    info = read_shard_info(_shards(small_root)[0])
    assert info.fields == layout.fields
    assert (info.n_steps, info.spatial_dims, info.spatial_shape) == (17, ("x", "y"), (32, 32))


def test_a_layout_refuses_a_field_built_on_another_grid():
    layout = build_layout(grid=8, timesteps=2, compression="none")
    other_grid = grid_2d(layout.time, layout.x, layout.y[:4])
    stray = field_spec("u", 0, other_grid, time_varying=True)
    with pytest.raises(ValueError, match="t0_fields/u"):
        ShardLayout(**{**layout.__dict__, "fields": (stray,)})
