"""The run folder as users meet it, single process through the real command: a second run in
the same folder, two jobs at once, flags changed on resume, unwritable folders, NaN data."""

from __future__ import annotations

import shutil
import subprocess
import sys
import time
from types import SimpleNamespace

import h5py
import numpy as np
import pytest
from accelerate.utils import DistributedType
from trainrun import REPO, env_for_test, kill_tree, train_flags
from wandb_read import find_offline_runs

from noa_dist.config import load_config
from noa_dist.errors import ConfigError
from noa_dist.train import _check_resumable
from noa_dist.trainer import _rng_problem

TRAIN = REPO / "noa_dist" / "train.py"
pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]


def train(args: list[str], tmp_path, **popen) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(TRAIN), *args],
        cwd=REPO,
        env=env_for_test(tmp_path),
        capture_output=True,
        text=True,
        timeout=600,
        **popen,
    )


def one_error_line(res: subprocess.CompletedProcess) -> str:
    assert res.returncode == 2, (res.stdout + res.stderr)[-3000:]
    assert "Traceback" not in res.stderr, res.stderr[-3000:]
    errors = [line for line in res.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, res.stderr[-3000:]
    return res.stderr[res.stderr.index("error: ") :]


def test_rerunning_the_same_command_is_refused_with_the_two_commands(tiny_dataset, tmp_path):
    flags = train_flags(tiny_dataset, tmp_path / "runs", "--epochs", "1")
    assert train(flags, tmp_path).returncode == 0
    message = one_error_line(train(flags, tmp_path))
    assert "runs/run already holds a run (its latest checkpoint is step-00000012)" in message
    assert "--resume auto" in message and "--run-name run-2" in message

    # the same checkpoint, as a resume with another process count or an unreadable RNG file sees it
    step = tmp_path / "runs" / "run" / "checkpoints" / "step-00000012"
    two_ranks = SimpleNamespace(num_processes=2, distributed_type=DistributedType.DEEPSPEED)
    cfg = load_config([*flags, "--resume", "auto"])
    with pytest.raises(ConfigError, match=r"number of processes: checkpoint 1, now 2 \(ZeRO"):
        _check_resumable(cfg, two_ranks, step)
    assert _rng_problem(step, 0) is not None  # not restored in this process: reported, no ✓
    copy = tmp_path / "copy"
    shutil.copytree(step, copy)
    (copy / "random_states_0.pkl").write_bytes(b"garbage")
    assert "cannot read" in _rng_problem(copy, 0)


def test_a_second_job_in_a_folder_in_use_is_refused_naming_the_first(tiny_dataset, tmp_path):
    flags = train_flags(tiny_dataset, tmp_path / "runs", "--epochs", "1", "--save-every", "2")
    first = subprocess.Popen(
        [sys.executable, str(TRAIN), *flags, "--debug-hang-in-save", "2"],
        cwd=REPO,
        env=env_for_test(tmp_path),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        for line in first.stdout:
            if "hanging inside the checkpoint save of step 2" in line:
                break
        second = train([*flags, "--resume", "auto", "--run-lock-wait", "1"], tmp_path)
        message = one_error_line(second)
        assert f"is in use by pid {first.pid}" in message and "another --run-name" in message
    finally:
        kill_tree(first)
    # the first job's lock died with it: the folder can be resumed now
    assert train([*flags, "--resume", "auto"], tmp_path).returncode == 0


def test_resume_applies_a_new_lr_and_refuses_schedule_changes_before_wandb_resumes(
    tiny_dataset, tmp_path
):
    flags = train_flags(tiny_dataset, tmp_path / "runs", "--epochs", "2", "--lr", "1e-3")
    flags[flags.index("--wandb-mode") + 1] = "offline"
    stopped = train([*flags, "--stop-at-step", "3"], tmp_path)
    assert stopped.returncode == 0, stopped.stderr[-3000:]
    changed = [*flags, "--resume", "auto", "--epochs", "3", "--warmup-steps", "5", "--lr", "1e-4"]
    message = one_error_line(train(changed, tmp_path))
    assert (
        "--epochs: checkpoint 2, now 3" in message
        and "--warmup-steps: checkpoint 2, now 5" in message
    )
    assert "--init-from" in message
    assert len(find_offline_runs(tmp_path / "runs" / "run" / "wandb")) == 1, "W&B was not resumed"
    resumed = train([*flags, "--resume", "auto", "--lr", "1e-4"], tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "--lr changed: 0.001 -> 0.0001 (applied to the optimizer)" in resumed.stdout
    lrs = [
        float(line.split("lr=")[1].split()[0])
        for line in resumed.stdout.splitlines()
        if " lr=" in line
    ]
    assert lrs and max(lrs) <= 1e-4 * 1.0001, lrs  # the old peak was 1e-3


def test_an_unwritable_checkpoint_folder_is_refused_before_training(tiny_dataset, tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    flags = train_flags(tiny_dataset, tmp_path / "runs", "--checkpoint-dir", str(blocker / "ckpt"))
    message = one_error_line(train(flags, tmp_path))
    assert "--checkpoint-dir" in message and str(blocker) in message


def test_nan_in_the_validation_split_stops_with_the_samples_named(tiny_dataset, tmp_path):
    root = tmp_path / "nan_data"
    shutil.copytree(tiny_dataset, root)
    shard = sorted((root / "data" / "valid").glob("*.hdf5"))[0]
    with h5py.File(shard, "r+") as f:
        values = f["t0_fields/u"][1]
        values[2] = np.nan
        f["t0_fields/u"][1] = values
    started = time.monotonic()
    message = one_error_line(train(train_flags(root, tmp_path / "runs", "--epochs", "3"), tmp_path))
    assert "the validation split holds NaN/Inf in" in message and "noa-data check" in message
    assert shard.name in message
    assert time.monotonic() - started < 300
