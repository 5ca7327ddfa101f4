from __future__ import annotations

import multiprocessing as mp
import os
import pickle

import h5py
import numpy as np
import pytest
import torch
import yaml
from conftest import TinyField, write_root, write_shard
from the_well.data import WellDataset
from the_well.data.normalization import ZScoreNormalization
from torch.utils.data import DataLoader

from noa_dist.data.dataset import WellWindowDataset, to_channels_first
from noa_dist.data.schema import FieldSpec, load_stats
from noa_dist.errors import ConfigError, DataError


def open_file_count() -> int:
    return len(h5py.h5f.get_obj_ids(types=h5py.h5f.OBJ_FILE))


def frame_code(u_CHW: torch.Tensor) -> list[float]:
    """The conftest writer's 1000 * trajectory + 10 * t + component at grid point (0, 0)."""
    return u_CHW[:, 0, 0].tolist()


# --- the_well's dummy data ----------------------------------------------------------------------


def test_dummy_data_channels_and_raw_values_equal_h5py(dummy_root):
    ds = WellWindowDataset(dummy_root, "train", timesteps=3, normalize=False)
    assert ds.layout.predicted == ("field_x", "field_y")
    assert ds.layout.conditioning == ("constant_field",)
    assert (ds.n_channels, ds.n_cond_channels, ds.spatial_shape) == (2, 1, (32, 32))
    assert ds.starts == (0, 3, 6) and len(ds) == 2 * 3
    path, row, start = ds.locate(4)
    assert (row, start) == (1, 3)
    item = ds[4]
    # same locking flags as the open reader: HDF5 refuses a second open with other flags
    with h5py.File(path, "r", locking=False) as f:
        field_TXYC = f["t1_fields/field"][row, start : start + 4]
        constant_XY = f["t0_fields/constant_field"][row]
    np.testing.assert_array_equal(item["u0"].numpy(), np.moveaxis(field_TXYC[0], -1, 0))
    np.testing.assert_array_equal(item["target"].numpy(), np.moveaxis(field_TXYC[1:], -1, 1))
    np.testing.assert_array_equal(item["cond"].numpy(), constant_XY[None])
    assert item["index"] == 4


def test_dummy_data_normalised_with_per_component_stats(dummy_root):
    raw = WellWindowDataset(dummy_root, "train", timesteps=3, normalize=False)[5]
    item = WellWindowDataset(dummy_root, "train", timesteps=3)[5]
    stats = load_stats(dummy_root)
    mean_C = np.array(stats["mean"]["field"], np.float32)[:, None, None]
    std_C = np.array(stats["std"]["field"], np.float32)[:, None, None]
    np.testing.assert_allclose(
        item["target"].numpy(), (raw["target"].numpy() - mean_C) / std_C, rtol=1e-5
    )
    cond_mean, cond_std = stats["mean"]["constant_field"], stats["std"]["constant_field"]
    np.testing.assert_allclose(
        item["cond"].numpy(), (raw["cond"].numpy() - cond_mean) / cond_std, rtol=1e-5, atol=1e-6
    )


@pytest.mark.parametrize("normalize", [False, True])
def test_same_samples_as_the_well_reader(dummy_root, normalize):
    """With window_stride=1 both readers index (trajectory, start) in the same order."""
    T = 3
    ours = WellWindowDataset(dummy_root, "train", T, window_stride=1, normalize=normalize)
    theirs = WellDataset(
        path=str(dummy_root),
        well_split_name="train",
        n_steps_input=1,
        n_steps_output=T,
        use_normalization=normalize,
        normalization_type=ZScoreNormalization if normalize else None,
        return_grid=False,
        boundary_return_type=None,
    )
    assert len(ours) == len(theirs) == 2 * (10 - T)
    for i in (0, 3, len(ours) - 1):
        mine, well = ours[i], theirs[i]
        well_u0_CHW = well["input_fields"][0].permute(2, 0, 1)
        well_target_TCHW = well["output_fields"].permute(0, 3, 1, 2)
        torch.testing.assert_close(mine["u0"], well_u0_CHW, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(mine["target"], well_target_TCHW, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(mine["cond"], well["constant_fields"].permute(2, 0, 1))


# --- windows ------------------------------------------------------------------------------------


def test_window_holds_frames_start_to_start_plus_timesteps(tiny_root):
    ds = WellWindowDataset(tiny_root, "train", timesteps=2, normalize=False)
    assert ds.starts == (0, 2, 4, 6)  # n_steps 9, non-overlapping windows of 3 frames
    assert len(ds) == 5 * 4
    item = ds[6]  # trajectory 1, third window
    assert ds.locate(6)[1:] == (1, 4)
    # channels: pressure, velocity_x, velocity_y; value = 1000 traj + 10 t + component
    assert frame_code(item["u0"]) == [1040, 1040, 1041]
    assert [frame_code(u) for u in item["target"]] == [[1050, 1050, 1051], [1060, 1060, 1061]]
    assert frame_code(item["cond"]) == [1500]
    assert item["target"].shape == (2, 3, 8, 6) and item["u0"].dtype == torch.float32


def test_window_stride_sets_start_times(tiny_root):
    assert WellWindowDataset(tiny_root, "train", 2, window_stride=1).starts == tuple(range(7))
    assert WellWindowDataset(tiny_root, "train", 2, window_stride=3).starts == (0, 3, 6)
    assert WellWindowDataset(tiny_root, "train", 8).starts == (0,)


def test_index_continues_across_shards(tiny_root):
    ds = WellWindowDataset(tiny_root, "train", timesteps=4, normalize=False)  # starts 0, 4
    assert len(ds) == (3 + 2) * 2
    path, row, start = ds.locate(7)  # second shard (3 trajectories x 2 windows before it)
    assert (path.name, row, start) == ("shard_001.hdf5", 0, 4)
    assert ds.trajectory_id(7) == 3
    assert frame_code(ds[7]["u0"])[0] == 3040
    assert "shard_001.hdf5 trajectory 0 (#3" in ds.describe_sample(7)
    with pytest.raises(IndexError):
        ds[len(ds)]


def test_n_samples_keeps_the_first_indices(tiny_root):
    full = WellWindowDataset(tiny_root, "train", timesteps=2, normalize=False)
    subset = WellWindowDataset(tiny_root, "train", timesteps=2, n_samples=5, normalize=False)
    assert len(subset) == 5
    torch.testing.assert_close(subset[4]["target"], full[4]["target"])
    with pytest.raises(IndexError):
        subset[5]


def test_n_samples_beyond_available_names_the_count(tiny_root):
    with pytest.raises(
        DataError,
        match=r"21 windows requested \(--n-samples/--val-samples\) but only 20 are available",
    ):
        WellWindowDataset(tiny_root, "train", timesteps=2, n_samples=21)


def test_timesteps_without_room_for_targets_names_split_n_steps_and_flag(tiny_root):
    with pytest.raises(DataError) as err:
        WellWindowDataset(tiny_root, "valid", timesteps=9)
    message = str(err.value)
    for part in ("data/valid", "--timesteps 9", "n_steps=9", "--timesteps <= 8"):
        assert part in message


def test_non_positive_timesteps_or_stride_is_a_config_error(tiny_root):
    with pytest.raises(ConfigError, match="--timesteps 0"):
        WellWindowDataset(tiny_root, "train", timesteps=0)
    with pytest.raises(ConfigError, match="--window-stride 0"):
        WellWindowDataset(tiny_root, "train", timesteps=2, window_stride=0)


# --- normalisation and broadcasting ---------------------------------------------------------------


def test_constant_field_with_zero_std_is_only_centred(tiny_root):
    stats = load_stats(tiny_root)
    stats["std"]["diffusivity"] = 0.0
    (tiny_root / "stats.yaml").write_text(yaml.safe_dump(stats))
    raw = WellWindowDataset(tiny_root, "train", 2, normalize=False)[0]
    item = WellWindowDataset(tiny_root, "train", 2)[0]
    torch.testing.assert_close(item["cond"], raw["cond"] - stats["mean"]["diffusivity"])


def test_no_conditioning_fields_gives_empty_cond(tmp_path):
    root = write_root(tmp_path / "r", {"train": [2]}, fields=(TinyField("u"),))
    batch = next(iter(DataLoader(WellWindowDataset(root, "train", 2), batch_size=2)))
    assert batch["cond"].shape == (2, 0, 8, 6)
    assert batch["u0"].shape == (2, 1, 8, 6)


def test_fields_shared_by_trajectories_or_constant_along_an_axis_are_broadcast(tmp_path):
    fields = (
        TinyField("u"),
        TinyField("forcing", sample_varying=False),
        TinyField("profile", time_varying=False, dim_varying=(False, True)),
    )
    root = write_root(tmp_path / "r", {"train": [3]}, fields=fields)
    ds = WellWindowDataset(root, "train", 2, normalize=False)
    item = ds[ds.starts.index(4) + 2 * len(ds.starts)]  # trajectory 2, start 4
    assert frame_code(item["u0"]) == [2040, 40]  # forcing stored once, for trajectory 0
    profile_HW = item["cond"][0]
    assert profile_HW.shape == (8, 6)
    # profile varies along y only: every x row equals the first one
    torch.testing.assert_close(profile_HW, profile_HW[:1].expand(8, 6))
    assert profile_HW[0, 1].item() == pytest.approx(2500.0001)


def test_to_channels_first_flattens_tensor_components_row_major():
    spec = FieldSpec("s", "t2_fields", 2, ("xx", "xy", "yx", "yy"), True, True, (True, True), ())
    values = np.arange(2 * 3 * 4 * 4, dtype=np.float32).reshape(2, 3, 4, 2, 2)
    out = to_channels_first(values, spec, (3, 4))
    assert out.shape == (2, 4, 3, 4)
    np.testing.assert_array_equal(out[:, 1], values[..., 0, 1])  # xy
    np.testing.assert_array_equal(out[:, 2], values[..., 1, 0])  # yx


# --- file handles -------------------------------------------------------------------------------


def test_no_file_is_open_after_init_and_one_handle_is_reused(tiny_root):
    before = open_file_count()
    ds = WellWindowDataset(tiny_root, "train", timesteps=2)
    assert open_file_count() == before
    assert ds._files == {}
    ds[0]
    handle = ds._files[0]
    ds[1]
    assert ds._files[0] is handle and open_file_count() == before + 1
    ds[len(ds) - 1]  # second shard
    assert open_file_count() == before + 2
    ds.close()
    assert open_file_count() == before


def test_forked_process_opens_its_own_handles(tiny_root):
    ds = WellWindowDataset(tiny_root, "train", timesteps=2)
    parent_item = ds[0]
    inherited = ds._files[0]  # the child inherits this open handle and must not use it
    ctx = mp.get_context("fork")
    queue = ctx.Queue()

    def child() -> None:
        item = ds[0]
        fresh = ds._files[0] is not inherited and ds._pid == os.getpid()
        queue.put((fresh, torch.equal(item["u0"], parent_item["u0"])))

    process = ctx.Process(target=child)
    process.start()
    fresh, same_values = queue.get(timeout=60)
    process.join(timeout=60)
    assert fresh and same_values and process.exitcode == 0
    assert ds._files[0] is inherited  # the parent keeps its own


def test_pickled_dataset_carries_no_handles(tiny_root):
    ds = WellWindowDataset(tiny_root, "train", timesteps=2)
    expected = ds[3]
    clone = pickle.loads(pickle.dumps(ds))
    assert clone._files == {}
    torch.testing.assert_close(clone[3]["target"], expected["target"])
    ds.close()
    clone.close()


def test_dataloader_with_two_workers_yields_every_sample_once(tiny_root):
    ds = WellWindowDataset(tiny_root, "train", timesteps=2)
    loader = DataLoader(ds, batch_size=3, num_workers=2, shuffle=False)
    batches = list(loader)
    indices = torch.cat([b["index"] for b in batches]).tolist()
    assert indices == list(range(len(ds)))
    assert ds._files == {}  # the workers opened the files, not this process
    assert batches[0]["target"].shape == (3, 2, 3, 8, 6)
    torch.testing.assert_close(batches[-1]["u0"][-1], ds[len(ds) - 1]["u0"])


def test_compressed_shard_reads_the_same_values(tiny_root):
    plain = WellWindowDataset(tiny_root, "train", 2)[4]
    write_shard(tiny_root / "data" / "train" / "shard_000.hdf5", compression="lzf")
    ds = WellWindowDataset(tiny_root, "train", 2)
    assert [s.compressed for s in ds.info.shards] == [True, False]
    item = ds[4]
    for key in ("u0", "target", "cond"):
        torch.testing.assert_close(item[key], plain[key])
