"""Which checkpoint to resume from: verified lookup, `--resume` resolution, rank agreement.

"Latest" is the highest step whose COMPLETE marker matches its files (manifest.py), never
the newest mtime. A damaged checkpoint is skipped with a logged reason, so a requeued job
falls back to the previous whole one instead of failing on the same file every time.
"""

from __future__ import annotations

import logging
from pathlib import Path

from accelerate import Accelerator

from noa_dist import distributed
from noa_dist.checkpoint import manifest
from noa_dist.checkpoint.agree import exchange_failures, rank_label
from noa_dist.checkpoint.layout import COMPLETE, LEFTOVER_DIR, META, TRAINER_STATE, step_of
from noa_dist.errors import ConfigError

logger = logging.getLogger(__name__)


def verify_checkpoint(path: Path) -> str | None:
    """None if path is a whole step checkpoint (sealed, every listed file intact, readable
    trainer_state.json), else the reason it is not. Plain file checks, any process."""
    return manifest.verify(Path(path), TRAINER_STATE)


def step_dirs(checkpoint_dir: Path, *, log_leftovers: bool = False) -> dict[int, Path]:
    """{step: folder} of every `step-XXXXXXXX` folder, whole or not."""
    found = {}
    for entry in sorted(checkpoint_dir.iterdir()):
        if LEFTOVER_DIR.fullmatch(entry.name) and log_leftovers:
            logger.warning("ignoring %s: leftover of an unfinished save", entry)
        step = step_of(entry)
        if step is not None and entry.is_dir():
            found[step] = entry
    return found


def latest_checkpoint(checkpoint_dir: Path) -> Path | None:
    """The whole checkpoint with the highest step in checkpoint_dir, or None.

    Folders above it that are unfinished or damaged are skipped, each with a logged reason.
    """
    checkpoint_dir = Path(checkpoint_dir)
    if not checkpoint_dir.is_dir():
        return None
    found = step_dirs(checkpoint_dir, log_leftovers=True)
    for step in sorted(found, reverse=True):
        reason = verify_checkpoint(found[step])
        if reason is None:
            return found[step]
        logger.warning("ignoring %s: %s", found[step], reason)
    return None


def resolve_resume(resume: str | None, checkpoint_dir: Path) -> Path | None:
    """`--resume` to a checkpoint folder: "auto" = latest whole one (None: fresh start),
    None, "" or "none" = fresh start, else a path that must be a whole step checkpoint.
    Plain file checks: see `agree_on_resume` for the call every rank makes."""
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
    if (path / META).is_file() and not (path / TRAINER_STATE).is_file():
        raise ConfigError(
            f"{path} is a weights export (best/, final/): to start a new run from these weights"
            f" use --init-from {path}; --resume takes a step-XXXXXXXX checkpoint"
        )
    if not (path / COMPLETE).exists() and any(step_of(p) is not None for p in path.iterdir()):
        raise ConfigError(
            f"--resume {resume}: this is a folder of checkpoints, not one checkpoint; pass one"
            " of its step-XXXXXXXX folders, or --resume auto for the latest complete one"
        )
    reason = verify_checkpoint(path)
    if reason is not None:
        raise ConfigError(
            f"--resume {resume}: {reason}; use --resume auto to pick the previous complete one"
        )
    return path


def agree_on_resume(
    accelerator: Accelerator, resume: str | None, checkpoint_dir: Path
) -> Path | None:
    """The checkpoint every rank resumes from (None: all start fresh). Call on every rank.

    The main process resolves `resume` and broadcasts the path with its COMPLETE marker's
    text as a fingerprint; every other rank checks that it sees the same marker there. On a
    node-local or stale NFS-cached folder rank 0 would otherwise resume at step N while rank
    1 started fresh, and the first collective would hang. If any rank disagrees, every rank
    raises the same ConfigError. On one process this is `resolve_resume`.
    """
    if accelerator.num_processes == 1:
        return resolve_resume(resume, checkpoint_dir)
    answer = None
    if accelerator.is_main_process:
        answer = _main_answer(resume, checkpoint_dir)
    kind, text, fingerprint = distributed.broadcast_from_main(accelerator, answer)
    if kind == "error":
        raise ConfigError(text)
    path = None if text is None else Path(text)
    problem = None
    if not accelerator.is_main_process:
        problem = _disagreement(accelerator, path, fingerprint, Path(checkpoint_dir), resume)
    problems = exchange_failures(accelerator, problem, main_only=False)
    if problems:
        raise ConfigError(
            "the checkpoint folder must be shared by all ranks: "
            + "; ".join(problems)
            + "; put --checkpoint-dir on a file system every node mounts"
        )
    return path


def _main_answer(resume: str | None, checkpoint_dir: Path) -> tuple[str, str | None, str | None]:
    """("ok", path or None, COMPLETE text or None) or ("error", message, None)."""
    try:
        path = resolve_resume(resume, checkpoint_dir)
        fingerprint = None if path is None else (path / COMPLETE).read_text(encoding="utf-8")
    except ConfigError as err:
        return "error", str(err), None
    except OSError as err:
        return "error", f"--resume {resume}: cannot read {checkpoint_dir} ({err})", None
    return "ok", None if path is None else str(path), fingerprint


def _disagreement(
    accelerator: Accelerator,
    path: Path | None,
    fingerprint: str | None,
    checkpoint_dir: Path,
    resume: str | None,
) -> str | None:
    """Why this rank cannot follow the main process's choice, or None."""
    me = rank_label(accelerator)
    if path is None:
        if resume != "auto" or not checkpoint_dir.is_dir():
            return None
        sealed = [p for p in step_dirs(checkpoint_dir).values() if (p / COMPLETE).is_file()]
        if sealed:
            return f"{me} sees {max(sealed, key=step_of)} but the main process found no checkpoint there"
        return None
    try:
        seen = (path / COMPLETE).read_text(encoding="utf-8")
    except OSError:
        return f"{me} does not see {path} (the main process resumes from it)"
    if seen != fingerprint:
        return f"{me} sees a different {COMPLETE} marker in {path} than the main process"
    return None
