"""Failures every rank agrees on: one small collective per phase instead of a bare barrier.

A save has phases that run on every rank (accelerate's save_state: RNG files, ZeRO shards)
and phases only the main process runs (trainer_state.json, COMPLETE, rename, rotation).
With a bare `wait_for_everyone()` after a main-only phase, an exception on the main process
left the other ranks in that barrier until the process-group timeout (30 minutes), and an
error on one rank surfaced as a different error, or a hang, on the others. Here each phase
catches its error on the rank where it happens and the ranks exchange "error text or None"
(a broadcast from the main process after a main-only phase, an all-gather after an
every-rank phase), so every rank raises the same `CheckpointError` at the same point.
"""

from __future__ import annotations

import logging
import socket
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

from accelerate import Accelerator

from noa_dist import distributed
from noa_dist.atomic import describe_error
from noa_dist.errors import NoaError

logger = logging.getLogger(__name__)
T = TypeVar("T")


class CheckpointError(NoaError):
    """A checkpoint could not be saved or loaded; every rank raises the same message, which
    names the path, the phase, the failing rank(s) and the OS reason."""


def rank_label(accelerator: Accelerator) -> str:
    return f"rank {accelerator.process_index} (host {socket.gethostname()})"


def run_phase(
    accelerator: Accelerator,
    phase: str,
    path: Path,
    action: Callable[[], T],
    *,
    what: str = "saving checkpoint",
    main_only: bool = False,
) -> T | None:
    """Run `action` on every rank (or on the main process only), then agree on the outcome.

    Call on every rank. Returns the action's result where it ran (None elsewhere); if it
    raised on any rank, every rank raises `CheckpointError("<what> <path>: <phase> failed on
    rank R (host H): <reason>")` after the same single collective.
    """
    result, failure = None, None
    if accelerator.is_main_process or not main_only:
        try:
            result = action()
        except Exception as err:  # any error must reach the other ranks, not strand them
            failure = f"{rank_label(accelerator)}: {describe_error(err, path)}"
            if not isinstance(err, OSError):  # a bug rather than the disk: keep the traceback
                logger.exception("%s %s: %s failed", what, path, phase)
    failures = exchange_failures(accelerator, failure, main_only=main_only)
    if failures:
        raise CheckpointError(f"{what} {path}: {phase} failed on {'; '.join(failures)}")
    return result


def exchange_failures(
    accelerator: Accelerator, failure: str | None, *, main_only: bool
) -> list[str]:
    """Every rank's failure text (main_only: the main process's), the same list on every
    rank. One object collective; none on a single process."""
    if accelerator.num_processes == 1:
        reports = [failure]
    elif main_only:
        reports = [distributed.broadcast_from_main(accelerator, failure)]
    else:
        reports = distributed.gather_reports(accelerator, failure)
    return [report for report in reports if report]
