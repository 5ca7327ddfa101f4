from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest
from conftest import write_shard

from noa_dist.data import check
from noa_dist.data.check import check_dataset, describe_dataset
from noa_dist.data.cli import main


def shard_path(root: Path, split: str = "train", i: int = 0) -> Path:
    return root / "data" / split / f"shard_{i:03d}.hdf5"


def put_nan(path: Path, key: str, index: tuple) -> None:
    with h5py.File(path, "r+") as f:
        f[key][index] = np.nan


def test_conforming_dataset_has_no_problems(tiny_root, dummy_root):
    assert check_dataset(tiny_root, timesteps=8, n_channels=3, grid=(8, 6)) == []
    assert check_dataset(dummy_root, timesteps=3, n_channels=2, grid=32) == []


def test_nan_missing_stats_and_other_grid_are_all_reported(tiny_root):
    put_nan(shard_path(tiny_root), "t1_fields/velocity", (2, 5, 1, 1, 0))  # trajectory (row) 2
    (tiny_root / "stats.yaml").unlink()
    odd_grid = shard_path(tiny_root, i=1)
    write_shard(odd_grid, n_traj=2, grid=(8, 8))
    problems = check_dataset(tiny_root)
    assert len(problems) == 3, problems
    (nan,) = [p for p in problems if "NaN/Inf" in p]
    (stats,) = [p for p in problems if "stats.yaml:" in p]
    (grid,) = [p for p in problems if "grid" in p]
    assert nan.startswith(str(shard_path(tiny_root)))
    assert "t1_fields/velocity: NaN/Inf in trajectories [2]" in nan
    assert stats.startswith(str(tiny_root / "stats.yaml")) and "not found" in stats
    assert grid.startswith(str(odd_grid)) and "grid [8, 8] != [8, 6]" in grid


def test_missing_split_corrupt_file_and_missing_attr_are_all_reported(tiny_root):
    shutil.rmtree(tiny_root / "data" / "valid")
    shard_path(tiny_root, "test").write_bytes(b"\x00" * 64)
    with h5py.File(shard_path(tiny_root, i=1), "r+") as f:
        del f["t1_fields/velocity"].attrs["sample_varying"]
    problems = check_dataset(tiny_root)
    joined = "\n".join(problems)
    assert len(problems) == 3, joined
    assert f"{tiny_root / 'data' / 'valid'}: split directory not found" in joined
    assert f"{shard_path(tiny_root, 'test')}: cannot open as HDF5" in joined
    assert (
        f"{shard_path(tiny_root, i=1)}: /t1_fields/velocity: missing attrs ['sample_varying']"
        in joined
    )


def test_train_and_valid_only_passes_with_a_note_about_test(dummy_root_without_test, capsys):
    root = dummy_root_without_test
    assert check_dataset(root, timesteps=3, n_channels=2, grid=32) == []
    main(["check", str(root)])  # returns: exit status 0
    out = capsys.readouterr().out
    assert f"note: {root / 'data' / 'test'}: no test split (optional" in out
    assert out.splitlines()[-1] == (
        f"OK: {root}: train 1 shards/2 trajectories, valid 1 shards/2 trajectories; "
        "n_steps 10, grid [32, 32], 2 predicted channels"
    )
    assert "  test   absent (optional)" in describe_dataset(root).splitlines()


def test_an_empty_test_directory_is_a_note_but_a_missing_train_or_valid_is_a_problem(tiny_root):
    for path in (tiny_root / "data" / "test").iterdir():
        path.unlink()
    assert check_dataset(tiny_root) == []
    assert len(check.dataset_notes(tiny_root)) == 1
    for split in ("train", "valid"):
        shutil.rmtree(tiny_root / "data" / split)
        assert f"{tiny_root / 'data' / split}: split directory not found" in "\n".join(
            check_dataset(tiny_root)
        )


def test_empty_split_and_stats_gaps(tiny_root):
    shard_path(tiny_root, "valid").unlink()
    stats = (tiny_root / "stats.yaml").read_text().replace("  pressure:", "  pressure_renamed:")
    (tiny_root / "stats.yaml").write_text(stats)
    problems = check_dataset(tiny_root)
    assert f"{tiny_root / 'data' / 'valid'}: empty split, no .hdf5 shards" in problems
    for key in ("mean", "std"):
        expected = f"{tiny_root / 'stats.yaml'}: {key}/pressure: missing, expected 1 value(s)"
        assert expected in problems


def test_config_mismatches_name_split_and_flag(tiny_root):
    problems = check_dataset(tiny_root, timesteps=9, n_channels=4, grid=64)
    train = tiny_root / "data" / "train"
    assert (
        f"{train}: --timesteps 9 needs 10 frames per window (u0 + targets) but n_steps=9"
        in problems
    )
    assert f"{train}: grid [8, 6] but --grid expects [64, 64]" in problems
    assert any(
        p.startswith(f"{train}: 3 predicted channels") and "n_channels=4" in p for p in problems
    )
    assert len(problems) == 3 * 3  # each of the three splits


def test_splits_may_differ_in_n_steps_but_not_in_fields(tiny_root):
    write_shard(shard_path(tiny_root, "test"), n_traj=2, n_steps=20)
    assert check_dataset(tiny_root) == []
    write_shard(shard_path(tiny_root, "valid"), n_traj=2, grid=(6, 6))
    (problem,) = check_dataset(tiny_root)
    assert problem.startswith(
        f"{shard_path(tiny_root, 'valid')}: split 'valid' disagrees with split 'train'"
    )


def test_nonfinite_scan_names_every_bad_trajectory_and_constant_fields(tiny_root):
    path = shard_path(tiny_root)
    put_nan(path, "t0_fields/pressure", (0, 8, 7, 5))  # last frame, last grid point
    with h5py.File(path, "r+") as f:
        f["t0_fields/pressure"][2, 0, 0, 0] = np.inf
        f["t0_fields/diffusivity"][1, 3, 3] = np.nan
    problems = check_dataset(tiny_root)
    assert f"{path}: t0_fields/pressure: NaN/Inf in trajectories [0, 2]" in problems
    assert f"{path}: t0_fields/diffusivity: NaN/Inf in trajectories [1]" in problems


def test_scan_reads_in_blocks_and_still_finds_the_last_frame(tiny_root, monkeypatch):
    monkeypatch.setattr(check, "SCAN_BLOCK_BYTES", 8 * 6 * 2 * 4 * 2)  # two frames per block
    put_nan(shard_path(tiny_root, i=1), "t1_fields/velocity", (1, 8, 0, 0, 1))
    (problem,) = check_dataset(tiny_root)
    assert problem.endswith("t1_fields/velocity: NaN/Inf in trajectories [1]")


def test_describe_lists_splits_channels_scalars_and_stats(tiny_root):
    text = describe_dataset(tiny_root)
    assert "dataset  tiny" in text
    assert "train     2 shards      5 trajectories  n_steps 9" in text
    assert "grid     8 x 6 cartesian (x, y)" in text
    assert "predicted channels (3): pressure, velocity_x, velocity_y" in text
    assert "conditioning channels (1): diffusivity" in text
    assert "scalars (1)\n  nu                       0.1" in text
    (tiny_root / "stats.yaml").unlink()
    assert "MISSING" in describe_dataset(tiny_root)


def test_cli_check_ok_and_failure(tiny_root, capsys):
    main(["check", str(tiny_root), "--timesteps", "4", "--n-channels", "3"])
    out = capsys.readouterr().out
    assert out.startswith(f"OK: {tiny_root}: train 2 shards/5 trajectories")
    (tiny_root / "stats.yaml").unlink()
    with pytest.raises(SystemExit) as exit_info:
        main(["check", str(tiny_root)])
    assert exit_info.value.code == 1
    (line,) = capsys.readouterr().out.splitlines()
    assert line.startswith(f"{tiny_root / 'stats.yaml'}: not found")


def test_cli_info_prints_the_description(tiny_root, capsys):
    main(["info", str(tiny_root)])
    assert capsys.readouterr().out == describe_dataset(tiny_root) + "\n"


def test_noa_data_check_in_a_subprocess_exits_1_with_one_line_per_problem(tiny_root):
    put_nan(shard_path(tiny_root), "t0_fields/pressure", (1, 0, 0, 0))
    result = subprocess.run(
        [
            sys.executable,
            "-c",
            "from noa_dist.data.cli import main; main()",
            "check",
            str(tiny_root),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 1
    assert result.stdout.splitlines() == [
        f"{shard_path(tiny_root)}: t0_fields/pressure: NaN/Inf in trajectories [1]"
    ]
    assert "FAILED: 1 problem(s)" in result.stderr
