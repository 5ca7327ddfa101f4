"""Checkpoint failure scenarios on 2 ranks (gloo); run by tests/test_checkpoint_dist.py.

Usage: accelerate launch --multi_gpu --num_processes 2 tests/dist/checkpoint_scenarios.py OUT
Each scenario runs on both ranks; OUT/results<rank>.json maps its name to {"ok": value} or
{"error": type, "message": text}, plus "seconds". Faults are injected by patching on one
rank here, in the test, never in noa_dist. The process group times out after 60 s, so a
scenario that strands a rank fails the launch quickly instead of hanging for 30 minutes.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import sys
import time
from contextlib import contextmanager
from datetime import timedelta
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import InitProcessGroupKwargs

from noa_dist import distributed
from noa_dist.checkpoint import (
    COMPLETE,
    agree_on_resume,
    load_checkpoint,
    save_checkpoint,
    store,
)

out = Path(sys.argv[1])
accelerator = Accelerator(cpu=True, kwargs_handlers=[InitProcessGroupKwargs(timeout=timedelta(seconds=60))])
rank = accelerator.process_index
assert accelerator.num_processes == 2, accelerator.num_processes
model = accelerator.prepare(torch.nn.Linear(4, 3))
results: dict[str, dict] = {}


def scenario(name: str, action) -> None:
    start = time.monotonic()
    try:
        results[name] = {"ok": action()}
    except Exception as err:
        results[name] = {"error": type(err).__name__, "message": str(err)}
    results[name]["seconds"] = time.monotonic() - start
    accelerator.wait_for_everyone()


@contextmanager
def patched(obj, name: str, replacement, *, on_rank: int):
    """obj.name = replacement on one rank only, for the duration of the block."""
    original = getattr(obj, name)
    if rank == on_rank:
        setattr(obj, name, replacement)
    try:
        yield
    finally:
        setattr(obj, name, original)


def raise_(err: BaseException):
    def fail(*args, **kwargs):
        raise err

    return fail


def save(folder: Path, step: int) -> str:
    return str(save_checkpoint(accelerator, folder, step, {"global_step": step}))


# ---------------------------------------------------------------- saves that fail

if rank == 0:
    (out / "blocked").mkdir()
    (out / "blocked" / ".step-00000001.tmp").write_text("a file where the tmp folder goes")
accelerator.wait_for_everyone()
scenario("tmp_is_a_file", lambda: save(out / "blocked", 1))

disk_full = OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(out / "x"))
with patched(store, "atomic_write_text", raise_(disk_full), on_rank=0):
    scenario("seal_fails_on_main", lambda: save(out / "ckpt", 1))

iostream = RuntimeError("basic_ios::clear: iostream error")
with patched(accelerator, "save_state", raise_(iostream), on_rank=1):
    scenario("save_state_fails_on_rank1", lambda: save(out / "ckpt", 1))

# ---------------------------------------------------------------- a good save: who fsyncs what

synced: list[str] = []
real_fsync = os.fsync


def recording_fsync(fd: int) -> None:
    synced.append(os.readlink(f"/proc/self/fd/{fd}"))
    real_fsync(fd)


with patched(os, "fsync", recording_fsync, on_rank=1):
    scenario("good_save", lambda: save(out / "ckpt", 2))
results["rank1_fsynced"] = {"ok": [Path(p).name for p in synced]}

# ---------------------------------------------------------------- resume agreement

scenario("resume_shared", lambda: str(agree_on_resume(accelerator, "auto", out / "ckpt")))
scenario("resume_bad_path", lambda: agree_on_resume(accelerator, str(out / "nope"), out / "ckpt"))


def node_local(setup) -> str:
    """Each rank in its own cwd with a relative checkpoint folder: the same path string
    names different folders, as on node-local disks."""
    home = out / f"node{rank}"
    home.mkdir(exist_ok=True)
    shutil.rmtree(home / "local", ignore_errors=True)
    (home / "local").mkdir()
    setup(home / "local")
    cwd = os.getcwd()
    os.chdir(home)
    try:
        return str(agree_on_resume(accelerator, "auto", Path("local")))
    finally:
        os.chdir(cwd)


def copy_good(local: Path, *, restamp: bool = False) -> None:
    step = shutil.copytree(out / "ckpt" / "step-00000002", local / "step-00000008")
    if restamp:  # same files, a marker written at another time
        marker = json.loads((step / COMPLETE).read_text())
        (step / COMPLETE).write_text(json.dumps({**marker, "saved_at": "another time"}))


scenario("resume_rank1_sees_nothing", lambda: node_local(lambda d: rank == 0 and copy_good(d)))
scenario("resume_other_marker", lambda: node_local(lambda d: copy_good(d, restamp=rank == 1)))
scenario("resume_main_sees_nothing", lambda: node_local(lambda d: rank == 1 and copy_good(d)))

# ---------------------------------------------------------------- loads that fail

broken = RuntimeError("unpickling failed on this rank")
with patched(accelerator, "load_state", raise_(broken), on_rank=1):
    scenario("load_fails_on_rank1", lambda: load_checkpoint(accelerator, out / "ckpt" / "step-00000002"))

(out / f"results{rank}.json").write_text(json.dumps(results, indent=1))
distributed.shutdown(accelerator)
distributed.exit_process(0)
