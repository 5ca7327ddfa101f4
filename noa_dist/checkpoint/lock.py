"""One job per run folder: a `run.lock` file that the running job holds with flock.

Two jobs writing the same run folder (a requeued job whose previous instance still runs, or
a second submission with the same --run-name) would rotate each other's checkpoints away and
interleave their saves. The main process takes an exclusive `fcntl.flock` on
`<run_dir>/run.lock` for the whole run. The kernel drops the lock when its holder dies, even
by SIGKILL or a node crash (for NFS, once the server notices), so a lock file left by a dead
job is simply taken again; the file's JSON only names the holder (host, pid, SLURM job, start
time) for the refusal message. The file is never deleted: unlinking a locked file lets a
third process lock a new file of the same name while a second one still holds the old one.
"""

from __future__ import annotations

import errno
import fcntl
import json
import logging
import os
import socket
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from accelerate import Accelerator

from noa_dist.checkpoint.agree import exchange_failures
from noa_dist.checkpoint.layout import RUN_LOCK
from noa_dist.errors import ConfigError

logger = logging.getLogger(__name__)
_UNSUPPORTED = (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL)


class RunLock:
    """Exclusive use of a run folder by this process: `acquire()` / `release()` or `with`.

    Call on the main process only, and make the other ranks follow its outcome (they must
    not start training while it raises). A second job's `acquire()` raises ConfigError
    "<run_dir> is in use by pid P on host H (SLURM job J) since T; ...". On a file system
    without flock support the run goes on unlocked, with a warning.
    """

    def __init__(self, run_dir: Path) -> None:
        self.run_dir = Path(run_dir)
        self.path = self.run_dir / RUN_LOCK
        self._fd: int | None = None

    @property
    def held(self) -> bool:
        return self._fd is not None

    def acquire(self, wait_s: float = 0.0) -> RunLock:
        """Take the lock, retrying for up to wait_s seconds (a requeued job whose previous
        instance is still shutting down); ConfigError naming the holder if it stays taken."""
        if self.held:
            return self
        try:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666)
        except OSError as err:
            raise ConfigError(f"cannot create the run lock {self.path}: {err}") from None
        deadline = time.monotonic() + wait_s
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    os.close(fd)
                    raise ConfigError(self._refusal()) from None
                time.sleep(min(1.0, max(deadline - time.monotonic(), 0.01)))
            except OSError as err:
                if err.errno not in _UNSUPPORTED:
                    os.close(fd)
                    raise
                logger.warning(
                    "%s: file locks unsupported here (%s); running unlocked", self.path, err
                )
                break
        self._fd = fd
        self._write_holder()
        return self

    def release(self) -> None:
        """Clear the holder record and drop the lock (the file stays, see module docstring)."""
        if self._fd is None:
            return
        fd, self._fd = self._fd, None
        try:
            os.ftruncate(fd, 0)
        finally:
            os.close(fd)  # closing the last descriptor releases the flock

    def __enter__(self) -> RunLock:
        return self.acquire()

    def __exit__(self, *exc_info: object) -> None:
        self.release()

    def _write_holder(self) -> None:
        holder = {
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "slurm_job_id": os.environ.get("SLURM_JOB_ID"),
            "since": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        }
        os.ftruncate(self._fd, 0)
        os.pwrite(self._fd, (json.dumps(holder) + "\n").encode(), 0)
        os.fsync(self._fd)

    def _refusal(self) -> str:
        holder = read_holder(self.path)
        if holder is None:
            who = "another process (its lock file names no holder yet)"
        else:
            job = holder.get("slurm_job_id")
            who = f"pid {holder.get('pid')} on host {holder.get('host')}"
            who += f" (SLURM job {job})" if job else ""
            who += f" since {holder.get('since')}"
        return f"{self.run_dir} is in use by {who}; wait for it to end, or use another --run-name"


def read_holder(path: Path) -> dict[str, Any] | None:
    """The holder record in a lock file, or None if it is empty or unreadable."""
    try:
        holder = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return holder if isinstance(holder, dict) else None


def lock_run_dir(accelerator: Accelerator, run_dir: Path, wait_s: float = 0.0) -> RunLock:
    """Call on every rank: the main process takes the RunLock, and if it cannot, every rank
    raises the same ConfigError (one broadcast). Release the returned lock at the end of the
    run on every rank (a no-op where it is not held)."""
    lock, failure = RunLock(run_dir), None
    if accelerator.is_main_process:
        try:
            lock.acquire(wait_s)
        except ConfigError as err:
            failure = str(err)
    failures = exchange_failures(accelerator, failure, main_only=True)
    if failures:
        raise ConfigError(failures[0])
    return lock
