"""A stop-and-checkpoint request that any signal handler (or code) can raise.

The handler only sets a flag; the training loop reads it at the next optimizer
step, agrees on it with every rank (a signal may reach only some ranks), saves a
checkpoint and exits cleanly. SLURM preemption sends SIGTERM or the user signal
given with `--signal=USR1@T`.
"""

from __future__ import annotations

import signal


class StopRequest:
    def __init__(self) -> None:
        self.reason: str | None = None

    @property
    def requested(self) -> bool:
        return self.reason is not None

    def request(self, reason: str) -> None:
        if self.reason is None:
            self.reason = reason

    def install(
        self, signals: tuple[signal.Signals, ...] = (signal.SIGUSR1, signal.SIGTERM)
    ) -> None:
        """Turn these signals into a stop request (the first one wins)."""
        for sig in signals:
            signal.signal(sig, lambda signum, _frame: self.request(signal.Signals(signum).name))
