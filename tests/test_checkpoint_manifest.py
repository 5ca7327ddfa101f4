"""The COMPLETE marker proves a checkpoint is whole: damaged ones are skipped or refused.

Also: file modes of what a save writes, and `--resume` pointed at a weights export.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import stat
from pathlib import Path

import pytest
import torch
from accelerate import Accelerator
from test_checkpoint import prepared_training, reset_accelerate, save_steps, steps_on_disk

from noa_dist.checkpoint import (
    COMPLETE,
    TRAINER_STATE,
    WEIGHTS,
    latest_checkpoint,
    load_checkpoint,
    load_model_weights,
    load_weights,
    resolve_resume,
    save_model_weights,
    verify_checkpoint,
)
from noa_dist.checkpoint.manifest import SMALL_FILE_BYTES, inventory
from noa_dist.errors import ConfigError


@pytest.fixture
def accelerator():
    reset_accelerate()
    yield Accelerator(cpu=True)
    reset_accelerate()


@pytest.fixture
def two_steps(accelerator, tmp_path) -> Path:
    """step-00000001 and step-00000002 of a tiny model, saved for real."""
    prepared_training(accelerator)
    save_steps(accelerator, tmp_path, [1, 2])
    return tmp_path


def truncate(path: Path) -> None:
    with open(path, "r+b") as f:
        f.truncate(path.stat().st_size // 2)


def flip_a_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


def test_complete_lists_every_file_with_its_size_and_the_hash_of_small_ones(two_steps):
    folder = two_steps / "step-00000002"
    files = json.loads((folder / COMPLETE).read_text())["files"]
    on_disk = {p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file()}
    assert set(files) == on_disk - {COMPLETE}
    assert {WEIGHTS, TRAINER_STATE, "random_states_0.pkl", "optimizer.bin"} <= set(files)
    for rel, entry in files.items():
        assert entry["size"] == (folder / rel).stat().st_size
        assert ("sha256" in entry) == (entry["size"] < SMALL_FILE_BYTES)
    assert verify_checkpoint(folder) is None


def test_auto_resume_skips_a_checkpoint_whose_weights_were_truncated_and_logs_why(
    two_steps, caplog
):
    truncate(two_steps / "step-00000002" / WEIGHTS)
    with caplog.at_level(logging.WARNING, logger="noa_dist.checkpoint"):
        assert resolve_resume("auto", two_steps) == two_steps / "step-00000001"
    assert "step-00000002: model.safetensors has" in caplog.text
    assert "damaged or replaced after the save" in caplog.text


@pytest.mark.parametrize("name", ["random_states_0.pkl", "scheduler.bin", TRAINER_STATE])
def test_auto_resume_skips_a_checkpoint_with_a_flipped_byte_in_a_small_file(
    two_steps, caplog, name
):
    flip_a_byte(two_steps / "step-00000002" / name)
    with caplog.at_level(logging.WARNING, logger="noa_dist.checkpoint"):
        assert latest_checkpoint(two_steps) == two_steps / "step-00000001"
    assert f"{name} does not match the sha256 recorded in COMPLETE" in caplog.text


def test_a_missing_file_is_a_reason_and_an_explicit_resume_to_it_is_refused(accelerator, two_steps):
    damaged = two_steps / "step-00000002"
    (damaged / "optimizer.bin").unlink()
    assert verify_checkpoint(damaged) == "optimizer.bin is missing (listed in COMPLETE)"
    with pytest.raises(
        ConfigError, match=r"step-00000002: optimizer.bin is missing .*--resume auto"
    ):
        resolve_resume(str(damaged), two_steps)
    with pytest.raises(ConfigError, match=r"cannot load checkpoint .*optimizer.bin is missing"):
        load_checkpoint(accelerator, damaged)


def test_readers_refuse_damaged_step_checkpoints_and_exports(accelerator, two_steps):
    truncate(two_steps / "step-00000002" / WEIGHTS)
    with pytest.raises(ConfigError, match=r"model.safetensors has \d+ bytes, COMPLETE recorded"):
        load_weights(two_steps / "step-00000002")
    model, _, _ = prepared_training(accelerator)
    best = save_model_weights(accelerator, model, two_steps / "best", {"step": 2})
    flip_a_byte(best / WEIGHTS)  # a few hundred bytes: hashed
    with pytest.raises(ConfigError, match=r"cannot load weights from .*does not match the sha256"):
        load_model_weights(best)


def test_a_marker_without_a_file_list_is_accepted_on_the_old_rule(two_steps):
    """Checkpoints written before COMPLETE listed files stay resumable."""
    folder = two_steps / "step-00000002"
    (folder / COMPLETE).write_text(json.dumps({"global_step": 2, "world_size": 1}))
    assert verify_checkpoint(folder) is None
    (folder / TRAINER_STATE).write_text("{broken")
    assert "trainer_state.json is not readable JSON" in verify_checkpoint(folder)


def test_a_damaged_checkpoint_does_not_count_towards_keep_last(accelerator, tmp_path):
    prepared_training(accelerator)
    save_steps(accelerator, tmp_path, [1, 2, 3], keep_last=2)
    truncate(tmp_path / "step-00000003" / WEIGHTS)
    save_steps(accelerator, tmp_path, [4], keep_last=2)
    # step 2 is the previous whole one: kept; the damaged step 3 is left for inspection.
    assert steps_on_disk(tmp_path) == ["step-00000002", "step-00000003", "step-00000004"]


def test_saved_files_get_the_umask_default_mode_including_model_safetensors(accelerator, tmp_path):
    old = os.umask(0o022)
    try:
        model, _, _ = prepared_training(accelerator)
        save_steps(accelerator, tmp_path / "ckpt", [1])
        best = save_model_weights(accelerator, model, tmp_path / "best", {})
    finally:
        os.umask(old)
    for folder in (tmp_path / "ckpt" / "step-00000001", best):
        for rel in inventory(folder):
            mode = stat.S_IMODE((folder / rel).stat().st_mode)
            assert mode == 0o644, f"{folder / rel} is {oct(mode)}"


def test_resume_of_a_weights_export_points_to_init_from(accelerator, tmp_path):
    model, _, _ = prepared_training(accelerator)
    best = save_model_weights(accelerator, model, tmp_path / "best", {})
    with pytest.raises(ConfigError) as err:
        resolve_resume(str(best), tmp_path / "checkpoints")
    assert str(err.value) == (
        f"{best} is a weights export (best/, final/): to start a new run from these weights use "
        f"--init-from {best}; --resume takes a step-XXXXXXXX checkpoint"
    )


def test_a_copied_checkpoint_folder_verifies_where_it_was_copied(two_steps, tmp_path_factory):
    """The marker holds relative paths: moving a run folder keeps its checkpoints valid."""
    moved = shutil.copytree(two_steps, tmp_path_factory.mktemp("moved") / "ckpt")
    assert latest_checkpoint(moved) == moved / "step-00000002"
    assert torch.load(moved / "step-00000002" / "random_states_0.pkl", weights_only=False)
