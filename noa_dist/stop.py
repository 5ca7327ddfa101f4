"""Stop requests: signals (and a dead launcher) become "save a checkpoint and stop".

A handler only sets a flag; the training loop reads it at the next optimizer step, agrees on
it with every rank in the step's one all-reduce (a signal may reach only some ranks), saves a
checkpoint, leaves a STOPPED marker in the run folder and exits 0. SLURM preemption and time
limits send SIGTERM or the signal of `--signal=USR1@T`; torch's elastic agent forwards the
signals it handles to every rank; Ctrl-C is SIGINT (a second Ctrl-C exits at once).
"""

from __future__ import annotations

import os
import signal
import sys
import threading
import time

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1, signal.SIGUSR2)
LAUNCHER_EXITED = 1000  # a stop code that is no signal number


class StopRequest:
    """Why this rank was asked to stop, as a small int code the step agrees on across ranks
    (a signal number, or LAUNCHER_EXITED); 0 while nothing asked."""

    def __init__(self) -> None:
        self.code = 0

    @property
    def requested(self) -> bool:
        return self.code != 0

    @property
    def reason(self) -> str | None:
        return describe(self.code) if self.code else None

    def request(self, code: int) -> None:
        if self.code == 0:
            self.code = code

    def install(self, signals: tuple[signal.Signals, ...] = STOP_SIGNALS) -> None:
        """Turn these signals into a stop request (the first one wins)."""
        for sig in signals:
            signal.signal(sig, self._handle)

    def _handle(self, signum: int, _frame) -> None:
        name = signal.Signals(signum).name
        if signum == signal.SIGINT and self.code == signal.SIGINT:
            # A second Ctrl-C: the user does not want to wait for the checkpoint.
            print("Second Ctrl-C: exiting without saving", file=sys.stderr, flush=True)
            os._exit(130)
        if self.code == 0 and int(os.environ.get("RANK", "0")) == 0:
            again = " (Ctrl-C again to exit at once)" if signum == signal.SIGINT else ""
            print(
                f"\n{name} received: saving a checkpoint at the next step, then stopping{again}",
                file=sys.stderr,
                flush=True,
            )
        self.request(signum)


_early = StopRequest()


def catch_early() -> None:
    """Turn stop signals into a request from the first line of a launched rank on. A
    preemption or time-limit signal during the seconds of imports and setup would otherwise
    kill the rank (the default action of SIGUSR1/SIGTERM) and fail the job."""
    _early.install()


def adopt_early(stop: StopRequest) -> None:
    """Hand a signal caught before `stop` existed over to it (the run saves and stops at its
    first step)."""
    if _early.requested:
        stop.request(_early.code)


def describe(code: int) -> str:
    """The stop reason of a code agreed across ranks: a signal's name, "launcher exited"."""
    if code == LAUNCHER_EXITED:
        return "launcher exited"
    try:
        return signal.Signals(code).name
    except ValueError:
        return f"stop code {code}"


def watch_parent(stop: StopRequest, grace_s: float = 300.0, poll_s: float = 1.0) -> None:
    """Stop when the process that launched this rank exits (call once, in every rank).

    torch's elastic agent starts each rank in its own session, so when the launcher is
    SIGKILLed (or its node's job step dies) the ranks would train on, and a requeued job would
    share the run folder with them. Here the rank asks to stop (all ranks of the node see it at
    once, so they still save together) and exits anyway `grace_s` later (a peer on another node
    may never reach the next step).
    """
    parent = os.getppid()

    def poll() -> None:
        while os.getppid() == parent:
            time.sleep(poll_s)
        stop.request(LAUNCHER_EXITED)
        time.sleep(grace_s)
        print(f"launcher {parent} exited {grace_s:.0f} s ago: exiting", file=sys.stderr, flush=True)
        os._exit(1)

    threading.Thread(target=poll, name="noa-parent-watch", daemon=True).start()


def launched_by_agent() -> bool:
    """True under torchrun / accelerate launch's elastic agent (it sets these for each rank)."""
    return "TORCHELASTIC_RUN_ID" in os.environ or "LOCAL_RANK" in os.environ
