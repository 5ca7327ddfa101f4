"""RunLock: one job per run folder, with a real second process; probe_writable."""

from __future__ import annotations

import errno
import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from trainrun import REPO

from noa_dist import atomic
from noa_dist.checkpoint import RUN_LOCK, RunLock, probe_writable
from noa_dist.checkpoint.lock import read_holder
from noa_dist.errors import ConfigError

HOLDER = """
import sys, time
from noa_dist.checkpoint import RunLock
lock = RunLock(sys.argv[1]).acquire()
print("held", flush=True)
time.sleep(600)
"""


@pytest.fixture
def holder(tmp_path):
    """A subprocess (SLURM job 4242) that holds the lock on tmp_path/run until killed."""
    env = dict(os.environ, SLURM_JOB_ID="4242", PYTHONPATH=str(REPO))
    child = subprocess.Popen(
        [sys.executable, "-c", HOLDER, str(tmp_path / "run")],
        stdout=subprocess.PIPE,
        text=True,
        env=env,
    )
    try:
        assert child.stdout.readline().strip() == "held"
        yield child
    finally:
        child.kill()
        child.wait(timeout=30)


@pytest.mark.timeout(60)
def test_a_second_job_is_refused_until_the_holder_is_killed(tmp_path, holder):
    run = tmp_path / "run"
    with pytest.raises(ConfigError) as err:
        RunLock(run).acquire()
    message = str(err.value)
    assert message.startswith(
        f"{run} is in use by pid {holder.pid} on host {socket.gethostname()} (SLURM job 4242) since "
    )
    assert message.endswith("; wait for it to end, or use another --run-name")

    holder.send_signal(signal.SIGKILL)  # no cleanup runs: the lock file stays, naming it
    holder.wait(timeout=30)
    assert read_holder(run / RUN_LOCK)["pid"] == holder.pid
    with RunLock(run) as lock:
        assert lock.held and read_holder(run / RUN_LOCK)["pid"] == os.getpid()
    assert not lock.held and read_holder(run / RUN_LOCK) is None


def test_the_lock_is_exclusive_within_one_process_too_and_release_hands_it_over(tmp_path):
    first = RunLock(tmp_path).acquire()
    with pytest.raises(ConfigError, match=f"in use by pid {os.getpid()}"):
        RunLock(tmp_path).acquire()
    first.release()
    RunLock(tmp_path).acquire().release()


def test_a_lock_file_left_by_a_dead_process_is_taken(tmp_path):
    (tmp_path / RUN_LOCK).write_text(json.dumps({"host": "gone", "pid": 999999}))
    with RunLock(tmp_path) as lock:
        assert lock.held and read_holder(tmp_path / RUN_LOCK)["host"] == socket.gethostname()


def test_acquire_waits_for_a_holder_that_ends_within_wait_s(tmp_path):
    first = RunLock(tmp_path).acquire()
    with pytest.raises(ConfigError, match="in use"):
        RunLock(tmp_path).acquire(wait_s=0.3)
    first.release()
    assert RunLock(tmp_path).acquire(wait_s=0.3).held


def test_probe_writable_creates_the_folder_and_leaves_nothing(tmp_path):
    probe_writable(tmp_path / "a" / "ckpt", "--checkpoint-dir")
    assert list((tmp_path / "a" / "ckpt").iterdir()) == []


def test_probe_writable_names_the_folder_its_purpose_and_the_os_reason(tmp_path):
    (tmp_path / "file").write_text("")
    with pytest.raises(ConfigError) as err:
        probe_writable(tmp_path / "file" / "ckpt", "--checkpoint-dir")
    assert str(err.value).startswith(
        f"--checkpoint-dir {tmp_path / 'file' / 'ckpt'} is not writable: "
    )
    assert "Not a directory" in str(err.value)


@pytest.mark.parametrize(
    ("code", "reason"),
    [(errno.EROFS, "Read-only file system"), (errno.EACCES, "Permission denied")],
)
def test_probe_writable_reports_read_only_and_permission_errors(
    tmp_path, monkeypatch, code, reason
):
    """Simulated: these tests run as root, which chmod cannot lock out."""

    def refuse(folder: Path) -> None:
        raise OSError(code, os.strerror(code), str(folder / ".noa-probe"))

    monkeypatch.setattr(atomic, "write_probe", refuse)
    with pytest.raises(
        ConfigError, match=f"--checkpoint-dir {tmp_path} is not writable: .*{reason}"
    ):
        probe_writable(tmp_path, "--checkpoint-dir")


def test_probe_writable_reports_free_space_when_the_disk_is_full(tmp_path, monkeypatch):
    def full(folder: Path) -> None:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(folder / ".noa-probe"))

    monkeypatch.setattr(atomic, "write_probe", full)
    with pytest.raises(ConfigError, match=r"No space left on device.*GiB free of"):
        probe_writable(tmp_path, "--output-dir")
