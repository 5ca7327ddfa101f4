"""Durable files: the project's one atomic-write helper, fsync, folder replacement, probes.

A file is durable once its data and the folder entry naming it are both on disk: write to
a temporary name in the same folder, fsync the file, rename it over the target, fsync the
folder. A reader then sees the old file or the new one, never a torn one, even after a
power cut. Files land with mode 0666 minus the umask (0644 usually), like `open()` makes
them; safetensors and mkstemp would otherwise leave 0600 files a group cannot read.
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import socket
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO

from noa_dist.errors import ConfigError

DISK_FULL_ERRNOS = (errno.ENOSPC, errno.EDQUOT)
# torch.save's C++ writer reports a failed write without errno or path.
TORCH_WRITE_FAILURES = ("iostream error", "file write failed", "PytorchStreamWriter failed")


def fsync_path(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    except OSError as err:
        # Some network file systems refuse fsync on a folder; its entries are then synced
        # by the server on close, which is all that can be had.
        if not (path.is_dir() and err.errno in (errno.EINVAL, errno.ENOTSUP)):
            raise
    finally:
        os.close(fd)


def fsync_tree(root: Path, *, missing_ok: bool = False) -> None:
    """Flush every file and folder under root to disk. missing_ok: skip entries that vanish
    while walking (another rank may be writing into the same tree)."""
    for folder, _, files in os.walk(root):
        for path in [*(Path(folder) / name for name in files), Path(folder)]:
            try:
                fsync_path(path)
            except FileNotFoundError:
                if not missing_ok:
                    raise


def atomic_write(path: Path, write: Callable[[BinaryIO], None]) -> Path:
    """Replace `path` with what `write(file)` writes, atomically and durably (see module doc).

    The temporary name (`.NAME.PID.tmp`) is unique per process and removed on failure.
    Errors propagate unchanged; `describe_error` turns them into one line for the user.
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o666)  # umask applies
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        fsync_path(path.parent)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def atomic_write_bytes(path: Path, data: bytes) -> Path:
    return atomic_write(path, lambda f: f.write(data))


def atomic_write_text(path: Path, text: str) -> Path:
    return atomic_write_bytes(path, text.encode("utf-8"))


def replace_folder(tmp: Path, final: Path, old: Path) -> None:
    """Rename a durable tmp folder to final; an existing final is first moved to old, then
    deleted. Only the instant between the two renames has neither name."""
    if final.exists():
        shutil.rmtree(old, ignore_errors=True)
        os.rename(final, old)
    os.rename(tmp, final)
    fsync_path(final.parent)
    shutil.rmtree(old, ignore_errors=True)


def current_umask() -> int:
    try:  # Linux >= 4.7: read it without changing it (os.umask would, for all threads)
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def grant_default_mode(root: Path) -> None:
    """Add the read/write bits the umask allows to every file under root (safetensors writes
    0600); bits already set are kept."""
    wanted = 0o666 & ~current_umask()
    for folder, _, files in os.walk(root):
        for name in files:
            path = Path(folder) / name
            mode = path.stat().st_mode & 0o7777
            if mode | wanted != mode:
                os.chmod(path, mode | wanted)


def free_space(path: Path) -> str:
    """'X GiB free of Y GiB at FOLDER' for the nearest existing folder of path."""
    folder = Path(path).absolute()
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    try:
        usage = shutil.disk_usage(folder)
    except OSError as err:
        return f"free space unknown ({err})"
    return f"{usage.free / 2**30:.2f} GiB free of {usage.total / 2**30:.2f} GiB at {folder}"


def describe_error(err: BaseException, path: Path) -> str:
    """One line for a failed write: the OS reason and file, plus free space if the disk may
    be full (ENOSPC, a quota, or torch.save's errno-less C++ write failure)."""
    if isinstance(err, OSError) and err.strerror:
        text = f"{err.strerror}: {err.filename if err.filename is not None else path}"
    elif isinstance(err, OSError):
        text = f"{err} ({path})"
    else:
        text = f"{type(err).__name__}: {err}"
    if isinstance(err, OSError) and err.errno in DISK_FULL_ERRNOS:
        return f"{text}; {free_space(path)}"
    if any(marker in str(err) for marker in TORCH_WRITE_FAILURES):
        return f"{text} (torch.save could not write; a full disk or quota?); {free_space(path)}"
    return text


def write_probe(folder: Path) -> None:
    """Write, fsync and delete a small file in folder; the OSError if the folder cannot take
    one (read-only, permission denied, no space, missing). The name is unique per host and
    process, so every rank may probe the same folder at once."""
    probe = Path(folder) / f".noa-probe-{socket.gethostname()}-{os.getpid()}"
    try:
        fd = os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o666)
        try:
            os.write(fd, b"noa-dist write probe\n")
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError:
        with contextlib.suppress(OSError):
            probe.unlink(missing_ok=True)
        raise
    probe.unlink()  # rotation deletes too: a folder that refuses it should fail here


def probe_writable(folder: Path, what: str) -> None:
    """Create folder and write a probe file in it (`write_probe`); ConfigError naming the
    folder, what it is for (e.g. "--checkpoint-dir") and the OS reason if that fails.

    Run it before training: an unwritable folder is otherwise found at the first save,
    hours into a job. Safe to call on every rank at once.
    """
    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        write_probe(folder)
    except OSError as err:
        raise ConfigError(
            f"{what} {folder} is not writable: {describe_error(err, folder)}"
        ) from None
