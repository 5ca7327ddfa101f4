"""Names on disk: what a step checkpoint, a weights export and their leftovers are called.

<checkpoint_dir>/step-00001200/        a training checkpoint (accelerate's save_state files,
                                      trainer_state.json, COMPLETE written last)
<checkpoint_dir>/.step-00001200.tmp/   a save in progress (or killed); never loaded
<checkpoint_dir>/.step-00001200.old/   a replaced copy of the same step, being deleted
<run_dir>/best/, <run_dir>/final/      weights exports (model.safetensors, meta.json, COMPLETE)
<run_dir>/run.lock                     names the job that uses the run folder (lock.py)
"""

from __future__ import annotations

import re
from pathlib import Path

COMPLETE = "COMPLETE"
TRAINER_STATE = "trainer_state.json"
WEIGHTS = "model.safetensors"
META = "meta.json"
RUN_LOCK = "run.lock"
MIN_KEEP = 2  # rotation never keeps fewer: the previous checkpoint survives a damaged newest one
STEP_DIR = re.compile(r"step-(\d{8,})")
LEFTOVER_DIR = re.compile(r"\.step-\d{8,}\.(tmp|old)")


def step_dir_name(global_step: int) -> str:
    return f"step-{global_step:08d}"


def step_of(folder: Path) -> int | None:
    """The step of a `step-XXXXXXXX` folder name, None for any other name."""
    match = STEP_DIR.fullmatch(folder.name)
    return int(match.group(1)) if match else None


def tmp_dir(final: Path) -> Path:
    """Where a save of `final` is written before it is renamed."""
    return final.with_name(f".{final.name}.tmp")


def old_dir(final: Path) -> Path:
    """Where an existing `final` is moved while a new copy of it is committed."""
    return final.with_name(f".{final.name}.old")
