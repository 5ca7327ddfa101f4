"""Atomic, numbered training checkpoints that a crash can never leave half-usable.

Accelerate's own `total_limit` rotation deletes the oldest checkpoint before the new one is
written, so a crash mid-save can leave nothing loadable. Here every save goes to a hidden
`.step-XXXXXXXX.tmp` folder; every rank fsyncs the files it wrote; the main process writes
trainer_state.json, fsyncs the tree, writes a COMPLETE marker listing every file (manifest.py),
renames the folder to `step-XXXXXXXX` and only then deletes checkpoints beyond `keep_last`.

Every function that takes an `accelerator` must be called on every rank: DeepSpeed's save is
a collective, and each phase ends in one small collective that makes every rank raise the same
CheckpointError if the phase failed anywhere (agree.py). Only the main process changes the
folder layout. Weights are stored under canonical (unwrapped) keys: `save_state` saves the
modules accelerate registered before wrapping them in DDP / torch.compile.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import re
import shutil
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from accelerate import Accelerator
from accelerate.utils.constants import RNG_STATE_NAME

from noa_dist.atomic import (
    atomic_write_text,
    fsync_path,
    fsync_tree,
    grant_default_mode,
    replace_folder,
    write_probe,
)
from noa_dist.checkpoint import manifest
from noa_dist.checkpoint.agree import exchange_failures, run_phase
from noa_dist.checkpoint.layout import (
    COMPLETE,
    LEFTOVER_DIR,
    MIN_KEEP,
    TRAINER_STATE,
    old_dir,
    step_dir_name,
    step_of,
    tmp_dir,
)
from noa_dist.checkpoint.lookup import step_dirs, verify_checkpoint
from noa_dist.checkpoint.trainer_state import dumps_state, loads_state
from noa_dist.errors import ConfigError

logger = logging.getLogger(__name__)


def save_checkpoint(
    accelerator: Accelerator,
    checkpoint_dir: Path,
    global_step: int,
    trainer_state: dict[str, Any],
    *,
    keep_last: int = 3,
    protect: Iterable[Path] = (),
) -> Path:
    """Save model/optimizer/scheduler/RNG + trainer_state atomically as `step-XXXXXXXX`.

    Call on every rank. Afterwards only whole checkpoints beyond the newest
    `max(keep_last, 2)` are deleted; the new one and those in `protect` are always kept.
    Saving a step that already exists replaces it only once the new copy is sealed. Any
    failure raises the same CheckpointError on every rank (path, phase, rank, reason).
    """
    checkpoint_dir = Path(checkpoint_dir)
    final = checkpoint_dir / step_dir_name(global_step)
    tmp = tmp_dir(final)
    state_json = dumps_state(trainer_state)  # on every rank: a bad value fails all, none hangs
    marker = {"global_step": global_step, "world_size": accelerator.num_processes}

    begun = run_phase(
        accelerator, "preparing the folder", tmp, lambda: _prepare(tmp), main_only=True
    )
    # Before DeepSpeed's own barriers: a rank that cannot write must not strand the others.
    run_phase(accelerator, "checking that every rank can write", tmp, lambda: _probe(tmp))
    run_phase(accelerator, "writing (save_state)", tmp, lambda: _write_state(accelerator, tmp))
    run_phase(
        accelerator,
        "sealing (trainer_state.json, COMPLETE, rename)",
        final,
        lambda: _seal(tmp, final, state_json, marker),
        main_only=True,
    )
    run_phase(
        accelerator,
        "deleting old checkpoints (the new one is saved)",
        checkpoint_dir,
        lambda: rotate(checkpoint_dir, final, keep_last, protect, begun),
        main_only=True,
    )
    return final


def _prepare(tmp: Path) -> float:
    """Make an empty tmp folder; returns its mtime, when this save began by the file
    system's own clock (rotation compares leftovers' mtimes with it)."""
    tmp.parent.mkdir(parents=True, exist_ok=True)
    if tmp.exists() or tmp.is_symlink():
        shutil.rmtree(tmp)  # left by a killed save of this step; a file here is an error
    tmp.mkdir()
    return tmp.stat().st_mtime


def _probe(tmp: Path) -> None:
    if not tmp.is_dir():
        raise FileNotFoundError(
            errno.ENOENT,
            "the main process created this folder but this rank does not see it; "
            "the checkpoint folder must be shared by all ranks",
            str(tmp),
        )
    write_probe(tmp)


def _write_state(accelerator: Accelerator, tmp: Path) -> None:
    """accelerate's save_state, then every other rank fsyncs what it wrote: on another node
    its files sit in that node's page cache, where the main process's fsync cannot reach
    them. The main process fsyncs the whole tree when it seals."""
    accelerator.save_state(str(tmp))
    if not accelerator.is_main_process:
        for path in files_of_rank(tmp, accelerator.process_index):
            fsync_path(path)


def files_of_rank(root: Path, rank: int) -> list[Path]:
    """Files under root whose relative path carries `rank` as a separate number: how
    accelerate (`random_states_1.pkl`) and DeepSpeed (`zero_pp_rank_1_mp_rank_00_...`) name
    what each rank writes. Finding a few more (a `_1` second model) only costs an fsync.
    Dot files are skipped: another rank's atomic write in flight (`.tmp1fWEyi`), renamed or
    gone a moment later (fsyncing one failed a save, seen once in the full suite)."""
    token = re.compile(rf"(?<![0-9]){rank}(?![0-9])")
    found = []
    for folder, _, names in os.walk(root):
        for name in names:
            if name.startswith("."):
                continue
            path = Path(folder) / name
            if token.search(path.relative_to(root).as_posix()):
                found.append(path)
    return found


def _seal(tmp: Path, final: Path, state_json: str, marker: dict[str, Any]) -> None:
    atomic_write_text(tmp / TRAINER_STATE, state_json)
    _check_every_rank_wrote(tmp, marker["world_size"])
    grant_default_mode(tmp)  # safetensors writes model.safetensors 0600
    fsync_tree(tmp)
    manifest.seal(tmp, marker)
    replace_folder(tmp, final, old_dir(final))
    logger.info("saved checkpoint %s", final)


def _check_every_rank_wrote(tmp: Path, world_size: int) -> None:
    """Each rank's RNG file must be here: if not, that rank wrote into a folder of the same
    name that the main process does not see (node-local disk), and resuming would fail."""
    missing = [r for r in range(world_size) if not (tmp / f"{RNG_STATE_NAME}_{r}.pkl").is_file()]
    if missing:
        raise FileNotFoundError(
            errno.ENOENT,
            f"the files of rank(s) {missing} ({RNG_STATE_NAME}_R.pkl) are not in the folder: "
            "they wrote elsewhere; the checkpoint folder must be shared by all ranks",
            str(tmp),
        )


def rotate(
    checkpoint_dir: Path, newest: Path, keep_last: int, protect: Iterable[Path], begun: float
) -> None:
    """Keep the newest max(keep_last, 2) whole checkpoints, `newest` and `protect`; delete
    sealed ones older than the oldest kept; delete leftovers untouched since `begun`.

    Damaged checkpoints do not count towards keep_last (the previous whole one survives).
    A `.tmp`/`.old` leftover with a file modified after this save began belongs to a save
    still in progress (another job on the same folder) and is left alone.
    """
    found = step_dirs(checkpoint_dir)
    whole = sorted(s for s, p in found.items() if verify_checkpoint(p) is None)
    kept = whole[-max(keep_last, MIN_KEEP) :]
    keep = {found[s].resolve() for s in kept} | {newest.resolve()}
    keep |= {Path(p).resolve() for p in protect}
    newer = [found[s].name for s in whole if s > step_of(newest)]
    if newer:
        logger.warning(
            "%s holds checkpoints newer than the one just saved (%s), probably from a run this"
            " one was resumed before; --resume auto would pick %s",
            checkpoint_dir,
            newest.name,
            newer[-1],
        )
    for step, path in sorted(found.items()):
        # `kept` is empty only if even the new checkpoint fails to verify: delete nothing.
        old = bool(kept) and step < kept[0]
        if old and path.resolve() not in keep and (path / COMPLETE).is_file():
            shutil.rmtree(path)
            logger.info("deleted old checkpoint %s", path)
    for entry in checkpoint_dir.iterdir():
        if LEFTOVER_DIR.fullmatch(entry.name) and _newest_mtime(entry) < begun:
            shutil.rmtree(entry, ignore_errors=True)


def _newest_mtime(root: Path) -> float:
    newest = root.stat().st_mtime
    for folder, _, names in os.walk(root):
        for name in names:
            with contextlib.suppress(FileNotFoundError):  # deleted by its writer meanwhile
                newest = max(newest, (Path(folder) / name).stat().st_mtime)
    return newest


def load_checkpoint(accelerator: Accelerator, path: Path) -> dict[str, Any]:
    """Restore model/optimizer/scheduler/RNG from a whole checkpoint; returns its trainer_state.

    Call on every rank. The main process verifies the folder (COMPLETE against its files);
    a damaged or unfinished folder is a ConfigError on every rank, a failed load a
    CheckpointError on every rank.
    """
    path = Path(path)
    reason = verify_checkpoint(path) if accelerator.is_main_process else None
    reasons = exchange_failures(accelerator, reason, main_only=True)
    if reasons:
        raise ConfigError(f"cannot load checkpoint {path}: {reasons[0]}")

    def load() -> dict[str, Any]:
        accelerator.load_state(str(path))
        return loads_state((path / TRAINER_STATE).read_text(encoding="utf-8"))

    return run_phase(accelerator, "loading (load_state)", path, load, what="loading checkpoint")
