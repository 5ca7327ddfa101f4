"""stats.yaml: streamed statistics equal numpy's, and the_well's own reader accepts our data."""

from __future__ import annotations

import shutil
from pathlib import Path

import h5py
import numpy as np
import pytest
import yaml
from the_well.data import WellDataset
from the_well.data.normalization import ZScoreNormalization
from the_well.utils.dummy_data import write_dummy_data

from noa_dist.data import stats as stats_module
from noa_dist.data.cli import main
from noa_dist.data.generate import generate_dataset
from noa_dist.data.schema import read_shard_info
from noa_dist.data.stats import compute_stats
from noa_dist.errors import DataError

FIELDS = {"u": 0, "forcing": 0, "diffusivity": 0, "advection_velocity": 1}


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("stats") / "ds"
    return generate_dataset(
        path,
        n_trajectories=6,
        grid=32,
        timesteps=16,
        workers=1,
        trajectories_per_shard=2,
        progress=False,
    )


def _copy_of(root: Path, tmp_path: Path) -> Path:
    copy = tmp_path / "copy"
    shutil.copytree(root, copy)
    return copy


def _train_arrays(root: Path, name: str, order: int) -> np.ndarray:
    group = f"t{order}_fields/{name}"
    shards = sorted((root / "data" / "train").glob("*.hdf5"))
    assert len(shards) > 1  # the streaming has to combine shards
    arrays = []
    for path in shards:
        with h5py.File(path, "r") as f:
            arrays.append(f[group][:].astype(np.float64))
    return np.concatenate(arrays)


def test_noa_data_stats_equals_numpy_on_the_full_arrays(root, tmp_path):
    output = tmp_path / "stats.yaml"
    main(["stats", str(root), "--output", str(output)])
    stats = yaml.safe_load(output.read_text())
    for name, order in FIELDS.items():
        data = _train_arrays(root, name, order)
        axes = tuple(range(data.ndim - order))
        np.testing.assert_allclose(stats["mean"][name], data.mean(axis=axes), rtol=1e-6, atol=1e-12)
        np.testing.assert_allclose(stats["std"][name], data.std(axis=axes), rtol=1e-6)
        np.testing.assert_allclose(
            stats["rms"][name], np.sqrt((data**2).mean(axis=axes)), rtol=1e-6
        )
    delta = np.diff(_train_arrays(root, "u", 0), axis=1)
    np.testing.assert_allclose(stats["mean_delta"]["u"], delta.mean(), rtol=1e-6)
    np.testing.assert_allclose(stats["std_delta"]["u"], delta.std(), rtol=1e-6)
    np.testing.assert_allclose(stats["rms_delta"]["u"], np.sqrt((delta**2).mean()), rtol=1e-6)
    assert set(stats["std_delta"]) == {"u"}  # constant fields have no deltas, as in the Well
    assert len(stats["mean"]["advection_velocity"]) == 2


def test_frame_windows_count_every_delta_once(root, monkeypatch):
    whole = compute_stats(root)
    frame_bytes = 32 * 32 * 4
    monkeypatch.setattr(stats_module, "READ_LIMIT_BYTES", 3 * frame_bytes)  # 17 frames -> 6 reads
    windowed = compute_stats(root)
    for key in whole:
        for name in whole[key]:
            np.testing.assert_allclose(windowed[key][name], whole[key][name], rtol=1e-10)


def test_the_well_loads_our_dataset_and_normalizes_with_our_stats(root):
    dataset = WellDataset(
        path=str(root),
        well_split_name="train",
        n_steps_input=1,
        n_steps_output=1,
        use_normalization=True,
        normalization_type=ZScoreNormalization,
    )
    stats = yaml.safe_load((root / "stats.yaml").read_text())
    mean, std = stats["mean"], stats["std"]
    first_shard = sorted((root / "data" / "train").glob("*.hdf5"))[0]
    index, trajectory, t = 17, 1, 1  # 16 windows per trajectory: sample 17 = trajectory 1, t 1
    sample = dataset[index]
    with h5py.File(first_shard, "r") as f:
        u = f["t0_fields/u"][trajectory, t : t + 2]
        forcing = f["t0_fields/forcing"][trajectory]
        coefficient = f["t0_fields/diffusivity"][trajectory]
        velocity = f["t1_fields/advection_velocity"][trajectory]
        family = f["scalars/family"][trajectory]
    normalized_u = (u - mean["u"]) / std["u"]
    np.testing.assert_allclose(
        sample["input_fields"][..., 0].numpy(), normalized_u[:1], rtol=1e-5, atol=1e-5
    )
    np.testing.assert_allclose(
        sample["output_fields"][..., 0].numpy(), normalized_u[1:], rtol=1e-5, atol=1e-5
    )
    constants = np.stack(
        [
            (forcing - mean["forcing"]) / max(std["forcing"], 1e-4),
            (coefficient - mean["diffusivity"]) / std["diffusivity"],
            *np.moveaxis(
                (velocity - mean["advection_velocity"]) / np.asarray(std["advection_velocity"]),
                -1,
                0,
            ),
        ],
        axis=-1,
    )
    np.testing.assert_allclose(sample["constant_fields"].numpy(), constants, rtol=1e-5, atol=1e-5)
    assert sample["constant_scalars"][0].item() == family
    assert sample["boundary_conditions"].tolist() == [[2, 2], [2, 2]]  # PERIODIC on both axes
    assert len(dataset) == 4 * 16  # 4 train trajectories of 17 frames, 16 windows each


def test_stats_work_on_the_wells_own_dummy_file(tmp_path):
    split_dir = tmp_path / "data" / "train"
    split_dir.mkdir(parents=True)
    write_dummy_data(str(split_dir / "dummy.hdf5"))
    with h5py.File(split_dir / "dummy.hdf5", "r") as f:
        field = f["t1_fields/field"][:].astype(np.float64)
        constant = f["t0_fields/constant_field"][:].astype(np.float64)
    stats = compute_stats(tmp_path)
    np.testing.assert_allclose(stats["mean"]["field"], field.mean(axis=(0, 1, 2, 3)), rtol=1e-6)
    np.testing.assert_allclose(
        stats["std_delta"]["field"], np.diff(field, axis=1).std(axis=(0, 1, 2, 3)), rtol=1e-6
    )
    np.testing.assert_allclose(
        stats["rms"]["constant_field"], np.sqrt((constant**2).mean()), rtol=1e-6
    )


def test_stats_refuse_to_replace_an_existing_file_without_the_flag(root, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["stats", str(root)])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "stats.yaml already exists" in err and "--overwrite" in err


def test_a_missing_split_names_the_directory(tmp_path):
    with pytest.raises(DataError, match=r"data/valid: split directory not found"):
        compute_stats(tmp_path, split="valid")


def test_stats_validate_shards_exactly_as_the_reader_does(root, tmp_path):
    """stats.py reads through schema.py: a broken shard fails with the reader's own message."""
    copy = _copy_of(root, tmp_path)
    shard = sorted((copy / "data" / "train").glob("*.hdf5"))[1]
    with h5py.File(shard, "r+") as f:
        del f["t1_fields/advection_velocity"].attrs["sample_varying"]
    with pytest.raises(DataError) as from_reader:
        read_shard_info(shard)
    with pytest.raises(DataError) as from_stats:
        compute_stats(copy)
    assert str(from_stats.value) == str(from_reader.value)
    assert "missing attrs ['sample_varying']" in str(from_stats.value)


def test_stats_combine_shards_of_different_lengths(root, tmp_path):
    """Statistics need no common n_steps (windows do): a shorter shard still counts."""
    copy = _copy_of(root, tmp_path)
    shards = sorted((copy / "data" / "train").glob("*.hdf5"))
    with h5py.File(shards[0], "r") as f:
        u = f["t0_fields/u"][:]
    with h5py.File(shards[0], "r+") as f:
        del f["t0_fields/u"]
        f["t0_fields"].create_dataset("u", data=u[:, :9])
        f["t0_fields/u"].attrs.update(
            dim_varying=[True, True], sample_varying=True, time_varying=True
        )
        time = f["dimensions/time"][:9]
        del f["dimensions/time"]
        f["dimensions"].create_dataset("time", data=time)
    stats = compute_stats(copy)
    data = np.concatenate([u[:, :9].ravel(), _train_arrays(root, "u", 0)[u.shape[0] :].ravel()])
    np.testing.assert_allclose(stats["mean"]["u"], data.mean(), rtol=1e-6)
