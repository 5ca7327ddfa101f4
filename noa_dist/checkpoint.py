"""Atomic, numbered checkpoints that a crash can never leave half-usable.

Accelerate's own `total_limit` rotation deletes the oldest checkpoint before the new one is
written, so a crash mid-save can leave nothing loadable. Here every save goes to a hidden
`.step-XXXXXXXX.tmp` folder; the main process fsyncs it, writes a `COMPLETE` marker last,
renames it to `step-XXXXXXXX` and only then deletes checkpoints beyond `keep_last`. A folder
counts as a checkpoint only with its marker, and "latest" means the highest step, never mtime.

Every public function that takes an `accelerator` must be called on every rank: DeepSpeed's
save and ZeRO-3's weight gather are collectives. Only the main process touches the folder
layout. Model weights are stored under canonical (unwrapped) keys: `save_state` saves the
modules accelerate registered before wrapping them in DDP / torch.compile, and the exports
below unwrap explicitly.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import shutil
from collections.abc import Iterable
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import torch
from accelerate import Accelerator
from accelerate.utils import DistributedType
from safetensors.torch import load_file, save_file

from noa_dist.errors import ConfigError

logger = logging.getLogger(__name__)

COMPLETE = "COMPLETE"
TRAINER_STATE = "trainer_state.json"
WEIGHTS = "model.safetensors"
META = "meta.json"
MIN_KEEP = 2
_STEP_DIR = re.compile(r"step-(\d{8,})")
_LEFTOVER_DIR = re.compile(r"\.step-\d{8,}\.(tmp|old)")
_FLOAT_TAG = "__float__"  # non-finite floats are stored as {"__float__": "nan" | "inf" | "-inf"}


# ---------------------------------------------------------------- trainer state as strict JSON


def dumps_state(state: Any) -> str:
    """Strict JSON (no bare NaN/Infinity) that `loads_state` turns back into the same values."""
    return json.dumps(_to_json(state, "state"), indent=2, allow_nan=False)


def loads_state(text: str) -> Any:
    return json.loads(text, object_hook=_from_json)


def _to_json(obj: Any, where: str) -> Any:
    if obj is None or isinstance(obj, (bool, int, str)):
        return obj
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else {_FLOAT_TAG: str(obj)}
    if isinstance(obj, np.generic) or (isinstance(obj, torch.Tensor) and obj.dim() == 0):
        return _to_json(obj.item(), where)  # sync point for a device tensor
    if isinstance(obj, Path):
        return str(obj)
    if isinstance(obj, (list, tuple)):
        return [_to_json(item, f"{where}[{i}]") for i, item in enumerate(obj)]
    if isinstance(obj, dict):
        bad_keys = [key for key in obj if not isinstance(key, str)]
        if bad_keys:
            raise TypeError(f"{where}: key {bad_keys[0]!r} is not a str; JSON keys must be str")
        return {key: _to_json(value, f"{where}[{key!r}]") for key, value in obj.items()}
    raise TypeError(f"{where}: {type(obj).__name__} cannot be stored in a checkpoint's JSON")


def _from_json(obj: dict[str, Any]) -> Any:
    if obj.keys() == {_FLOAT_TAG}:
        return float(obj[_FLOAT_TAG])
    return obj


# ---------------------------------------------------------------- durable files and folders


def _fsync_path(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_tree(root: Path) -> None:
    """Flush every file and folder under root (files written by any rank) to disk."""
    for folder, _, files in os.walk(root):
        for name in files:
            _fsync_path(Path(folder) / name)
        _fsync_path(Path(folder))


def _write_synced(path: Path, text: str) -> None:
    with open(path, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())


def _seal(tmp: Path, marker: dict[str, Any]) -> None:
    """Make tmp durable, then write the COMPLETE marker as the very last file."""
    _fsync_tree(tmp)
    marker = {**marker, "saved_at": datetime.now(timezone.utc).isoformat(timespec="seconds")}
    _write_synced(tmp / COMPLETE, json.dumps(marker) + "\n")
    _fsync_path(tmp)


def _commit(tmp: Path, final: Path) -> None:
    """Rename a sealed tmp folder to final; an existing final is moved aside, then removed."""
    old = final.with_name(f".{final.name}.old")
    if final.exists():
        # Only the instant between these two renames has neither name; the tmp is sealed.
        shutil.rmtree(old, ignore_errors=True)
        os.rename(final, old)
    os.rename(tmp, final)
    _fsync_path(final.parent)
    shutil.rmtree(old, ignore_errors=True)


def _incomplete_reason(folder: Path, json_name: str) -> str | None:
    """Why folder is not a finished save (None if it is): marker and JSON file must be there."""
    if not (folder / COMPLETE).is_file():
        return f"no {COMPLETE} marker: the save was interrupted"
    try:
        loads_state((folder / json_name).read_text(encoding="utf-8"))
    except FileNotFoundError:
        return f"has a {COMPLETE} marker but no {json_name}"
    except (OSError, ValueError) as err:
        return f"{json_name} is not readable JSON ({err})"
    return None


# ---------------------------------------------------------------- canonical weights


def _canonical_state_dict(accelerator: Accelerator, model: torch.nn.Module) -> dict:
    """The state dict under the bare module's keys (no `module.` / `_orig_mod.` prefix)."""
    if accelerator.distributed_type in (DistributedType.DEEPSPEED, DistributedType.FSDP):
        return accelerator.get_state_dict(model)  # collective: gathers ZeRO-3/FSDP shards
    return accelerator.unwrap_model(model, keep_torch_compile=False).state_dict()


# ---------------------------------------------------------------- training checkpoints


def step_dir_name(global_step: int) -> str:
    return f"step-{global_step:08d}"


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

    Call on every rank. Afterwards only complete checkpoints beyond the newest
    `max(keep_last, 2)` are deleted; the new one and those in `protect` are always kept.
    Saving a step that already exists replaces it only once the new copy is sealed.
    """
    checkpoint_dir = Path(checkpoint_dir)
    final = checkpoint_dir / step_dir_name(global_step)
    tmp = checkpoint_dir / f".{final.name}.tmp"
    state_json = dumps_state(trainer_state)  # on every rank: a bad value fails all, none hangs
    if accelerator.is_main_process:
        checkpoint_dir.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)  # left by a save of this step that was killed
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp))  # every rank writes its part (RNG, ZeRO shards)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        _write_synced(tmp / TRAINER_STATE, state_json)
        _seal(tmp, {"global_step": global_step, "world_size": accelerator.num_processes})
        _commit(tmp, final)
        logger.info("saved checkpoint %s", final)
        _rotate(checkpoint_dir, final, keep_last, protect)
    accelerator.wait_for_everyone()
    return final


def _complete_step_dirs(checkpoint_dir: Path, *, log_ignored: bool) -> dict[int, Path]:
    found: dict[int, Path] = {}
    for entry in sorted(checkpoint_dir.iterdir()):
        if _LEFTOVER_DIR.fullmatch(entry.name):
            if log_ignored:
                logger.warning("ignoring %s: leftover of an unfinished save", entry)
            continue
        match = _STEP_DIR.fullmatch(entry.name)
        if match is None or not entry.is_dir():
            continue
        reason = _incomplete_reason(entry, TRAINER_STATE)
        if reason is None:
            found[int(match.group(1))] = entry
        elif log_ignored:
            logger.warning("ignoring %s: %s", entry, reason)
    return found


def _rotate(checkpoint_dir: Path, newest: Path, keep_last: int, protect: Iterable[Path]) -> None:
    complete = _complete_step_dirs(checkpoint_dir, log_ignored=False)
    by_step = sorted(complete)
    keep = {complete[s].resolve() for s in by_step[-max(keep_last, MIN_KEEP) :]}
    keep |= {newest.resolve()} | {Path(p).resolve() for p in protect}
    newest_step = int(_STEP_DIR.fullmatch(newest.name).group(1))
    newer = [complete[s].name for s in by_step if s > newest_step]
    if newer:
        logger.warning(
            "%s holds checkpoints newer than the one just saved (%s), probably from a run this"
            " one was resumed before; --resume auto would pick %s",
            checkpoint_dir,
            newest.name,
            newer[-1],
        )
    for step in by_step:
        if complete[step].resolve() not in keep:
            shutil.rmtree(complete[step])
            logger.info("deleted old checkpoint %s", complete[step])
    for entry in checkpoint_dir.iterdir():
        if _LEFTOVER_DIR.fullmatch(entry.name):
            shutil.rmtree(entry, ignore_errors=True)


def latest_checkpoint(checkpoint_dir: Path) -> Path | None:
    """The complete checkpoint with the highest step in checkpoint_dir, or None.

    Complete = a `step-XXXXXXXX` folder with a COMPLETE marker and a readable
    trainer_state.json. Others are skipped with a logged reason.
    """
    checkpoint_dir = Path(checkpoint_dir)
    if not checkpoint_dir.is_dir():
        return None
    complete = _complete_step_dirs(checkpoint_dir, log_ignored=True)
    return complete[max(complete)] if complete else None


def resolve_resume(resume: str | None, checkpoint_dir: Path) -> Path | None:
    """`--resume` to a checkpoint folder: "auto" = latest complete one (None: fresh start),
    None, "" or "none" = fresh start, else a path that must be a complete checkpoint."""
    if resume in (None, "", "none"):
        return None
    if resume == "auto":
        found = latest_checkpoint(checkpoint_dir)
        if found is None:
            logger.info(
                "--resume auto: no complete checkpoint in %s, starting fresh", checkpoint_dir
            )
        return found
    path = Path(resume).expanduser()
    if not path.is_dir():
        raise ConfigError(f"--resume {resume}: not a folder (expected a step-XXXXXXXX checkpoint)")
    if not (path / COMPLETE).exists() and any(_STEP_DIR.fullmatch(p.name) for p in path.iterdir()):
        raise ConfigError(
            f"--resume {resume}: this is a folder of checkpoints, not one checkpoint; pass one"
            " of its step-XXXXXXXX folders, or --resume auto for the latest complete one"
        )
    reason = _incomplete_reason(path, TRAINER_STATE)
    if reason is not None:
        raise ConfigError(
            f"--resume {resume}: {reason}; use --resume auto to pick the previous complete one"
        )
    return path


def load_checkpoint(accelerator: Accelerator, path: Path) -> dict[str, Any]:
    """Restore model/optimizer/scheduler/RNG from a complete checkpoint (every rank);
    returns its trainer_state."""
    path = Path(path)
    reason = _incomplete_reason(path, TRAINER_STATE)
    if reason is not None:
        raise ConfigError(f"cannot load checkpoint {path}: {reason}")
    accelerator.load_state(str(path))
    return loads_state((path / TRAINER_STATE).read_text(encoding="utf-8"))


# ---------------------------------------------------------------- weight exports (best/, final/)


def _safetensors_ready(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """CPU, contiguous, no two tensors sharing memory (safetensors refuses shared storage)."""
    out, seen = {}, set()
    for key, tensor in state.items():
        t = tensor.detach().to("cpu").contiguous()
        storage = t.untyped_storage().data_ptr()
        out[key] = t.clone() if storage in seen else t
        seen.add(storage)
    return out


def save_model_weights(
    accelerator: Accelerator, model: torch.nn.Module, out_dir: Path, metadata: dict[str, Any]
) -> Path:
    """Export canonical weights (`model.safetensors`) + `meta.json` atomically to out_dir.

    Call on every rank (gathering ZeRO-3 weights is a collective); the main process writes.
    An existing out_dir (e.g. `best/`) is replaced only once the new export is sealed.
    """
    out_dir = Path(out_dir)
    meta_json = dumps_state(metadata)  # before the collective: a bad value fails every rank
    state = _canonical_state_dict(accelerator, model)
    if accelerator.is_main_process:
        tmp = out_dir.with_name(f".{out_dir.name}.tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        save_file(_safetensors_ready(state), tmp / WEIGHTS, metadata={"format": "pt"})
        _write_synced(tmp / META, meta_json)
        _seal(tmp, {"export": out_dir.name})
        _commit(tmp, out_dir)
    accelerator.wait_for_everyone()
    return out_dir


def load_model_weights(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """(state_dict, metadata) of an export written by `save_model_weights`; no accelerate."""
    path = Path(path)
    if not path.is_dir():
        raise ConfigError(f"{path}: no such weights folder")
    reason = _incomplete_reason(path, META)
    if reason is not None:
        raise ConfigError(f"cannot load weights from {path}: {reason}")
    meta = loads_state((path / META).read_text(encoding="utf-8"))
    return load_file(path / WEIGHTS), meta
