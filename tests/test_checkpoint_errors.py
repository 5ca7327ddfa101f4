"""A failed save is one CheckpointError naming path, phase and reason; rotation spares saves
in progress. Single process here; test_checkpoint_dist.py runs the same on 2 ranks."""

from __future__ import annotations

import errno
import os
import time
from pathlib import Path

import pytest
from accelerate import Accelerator
from test_checkpoint import prepared_training, reset_accelerate, save_steps, steps_on_disk

from noa_dist.atomic import atomic_write_text, describe_error
from noa_dist.checkpoint import CheckpointError, latest_checkpoint, save_checkpoint, store


@pytest.fixture
def accelerator():
    reset_accelerate()
    accelerator = Accelerator(cpu=True)
    prepared_training(accelerator)
    yield accelerator
    reset_accelerate()


def test_a_file_where_the_tmp_folder_should_go_is_one_error_naming_path_and_phase(
    accelerator, tmp_path
):
    save_steps(accelerator, tmp_path, [1])
    (tmp_path / ".step-00000002.tmp").write_text("not a folder")
    with pytest.raises(CheckpointError) as err:
        save_checkpoint(accelerator, tmp_path, 2, {})
    message = str(err.value)
    assert message.startswith(f"saving checkpoint {tmp_path / '.step-00000002.tmp'}: ")
    assert "preparing the folder failed on rank 0 (host " in message
    assert "Not a directory" in message
    assert latest_checkpoint(tmp_path) == tmp_path / "step-00000001"


def test_a_checkpoint_dir_that_is_a_file_is_a_checkpoint_error(accelerator, tmp_path):
    (tmp_path / "ckpt").write_text("")
    with pytest.raises(CheckpointError, match=r"preparing the folder failed .*File exists"):
        save_checkpoint(accelerator, tmp_path / "ckpt", 1, {})


def test_a_full_disk_while_sealing_names_the_phase_and_the_free_space(
    accelerator, tmp_path, monkeypatch
):
    def full(path, text):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))

    monkeypatch.setattr(store, "atomic_write_text", full)
    with pytest.raises(CheckpointError) as err:
        save_checkpoint(accelerator, tmp_path, 1, {})
    message = str(err.value)
    assert f"saving checkpoint {tmp_path / 'step-00000001'}: sealing" in message
    assert "No space left on device" in message and "trainer_state.json" in message
    assert " GiB free of " in message
    assert not (tmp_path / "step-00000001").exists()


def test_torch_save_iostream_error_gets_the_path_and_the_free_space(
    accelerator, tmp_path, monkeypatch
):
    def save_state(output_dir):
        raise RuntimeError("basic_ios::clear: iostream error")

    monkeypatch.setattr(accelerator, "save_state", save_state)
    with pytest.raises(CheckpointError) as err:
        save_checkpoint(accelerator, tmp_path, 1, {})
    message = str(err.value)
    assert f"{tmp_path / '.step-00000001.tmp'}: writing (save_state) failed" in message
    assert "RuntimeError: basic_ios::clear: iostream error (torch.save could not write" in message
    assert " GiB free of " in message


def test_describe_error_names_the_path_when_the_os_error_has_none(tmp_path):
    text = describe_error(OSError(errno.EROFS, "Read-only file system"), tmp_path)
    assert text == f"Read-only file system: {tmp_path}"


def test_rotation_leaves_a_save_in_progress_alone_and_deletes_older_leftovers(
    accelerator, tmp_path
):
    """Another job's `.tmp` being written is touched after this save began: keep it."""
    in_progress, stale = tmp_path / ".step-00000009.tmp", tmp_path / ".step-00000007.tmp"
    for folder, when in ((in_progress, time.time() + 3600), (stale, time.time() - 3600)):
        folder.mkdir()
        (folder / "part.bin").write_bytes(b"x")
        os.utime(folder / "part.bin", (when, when))
        os.utime(folder, (when, when))
    save_steps(accelerator, tmp_path, [1])
    assert steps_on_disk(tmp_path) == [".step-00000009.tmp", "step-00000001"]


def test_files_of_rank_finds_accelerate_and_deepspeed_per_rank_names(tmp_path):
    names = [
        "random_states_0.pkl",
        "random_states_1.pkl",
        "random_states_11.pkl",
        "pytorch_model/zero_pp_rank_1_mp_rank_00_model_states.pt",
        "pytorch_model/bf16_zero_pp_rank_1_mp_rank_00_optim_states.pt",
        "pytorch_model/zero_pp_rank_0_mp_rank_00_optim_states.pt",
        "pytorch_model/mp_rank_00_model_states.pt",
        "optimizer.bin",
        ".tmp1fWEyi",  # the main process's atomic write in flight: gone by the time of fsync
    ]
    for name in names:
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_bytes(b"")
    found = sorted(p.relative_to(tmp_path).as_posix() for p in store.files_of_rank(tmp_path, 1))
    assert found == [
        "pytorch_model/bf16_zero_pp_rank_1_mp_rank_00_optim_states.pt",
        "pytorch_model/zero_pp_rank_1_mp_rank_00_model_states.pt",
        "random_states_1.pkl",
    ]


def test_atomic_write_replaces_the_file_and_leaves_no_temporary(tmp_path: Path):
    target = tmp_path / "state.json"
    target.write_text("old")
    atomic_write_text(target, "new")
    assert target.read_text() == "new" and sorted(os.listdir(tmp_path)) == ["state.json"]
