"""Tracking failures never cost a checkpoint: SIGTERM to the job, a server out of reach.

Each scenario runs in a child process (`python tests/test_tracking_failures.py <scenario>
<dir>`) started in its own session, so the child's `os.killpg` signals the child alone and
never pytest. The child behaves like the trainer: its SIGTERM handler only sets a flag, it
keeps logging after the signal, finishes the run and exits 0.

What wandb 0.31 does (measured here; see noa_dist/tracking.py): wandb-core runs in its own
session, so a SIGTERM to the trainer's process group does not reach it; a SIGTERM to every
process of the job (what SLURM sends on time limit or preemption) kills it, whatever the
signal disposition it was spawned with, and only what it had written to the `.wandb` file
survives.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from wandb_read import find_offline_runs, read_run

from noa_dist import tracking

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]

_WANDB_ENV = ("WANDB_MODE", "WANDB_API_KEY", "WANDB_BASE_URL", "WANDB_RUN_ID", "WANDB_DIR")
_WARNING = "Warning: W&B logging failed ("


# ----------------------------------------------------------------- child-process scenarios


def _service_pids() -> list[int]:
    """The wandb-core processes this process started (from /proc: no psutil needed)."""
    pids = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            text = stat.read_text()
        except OSError:
            continue
        comm, rest = text[text.index("(") + 1 : text.rindex(")")], text[text.rindex(")") + 2 :]
        if comm == "wandb-core" and int(rest.split()[1]) == os.getpid():
            pids.append(int(stat.parent.name))
    return pids


def _alive(pid: int) -> bool:
    """Still running (an exited child that was not reaped yet is a zombie: not alive)."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return text[text.rindex(")") + 2] != "Z"


def _wait_for(condition, seconds: float = 10.0) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline and not condition():
        time.sleep(0.05)


def _train_through_sigterm(out: Path, *, signal_service: bool, spawn_ignoring: bool) -> dict:
    """Log steps 1-3, take SIGTERM like the trainer (a flag), log 4-6 and a figure, finish.

    `spawn_ignoring`: start the run (and so wandb-core) with the job's signals set to SIG_IGN,
    which a child inherits across fork+exec, then restore the handlers."""
    from accelerate import Accelerator

    from noa_dist import plots

    stop: list[int] = []
    signal.signal(signal.SIGTERM, lambda signum, _frame: stop.append(signum))
    acc = Accelerator(cpu=True, log_with=tracking.log_with("offline"))
    job_signals = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1, signal.SIGUSR2)
    previous = {sig: signal.signal(sig, signal.SIG_IGN) for sig in job_signals if spawn_ignoring}
    run_id = tracking.start_run(
        acc, project="noa-test", run_name="sigterm", run_dir=out / "run",
        config={"lr": 1e-3}, mode="offline",
    )  # fmt: skip
    for sig, handler in previous.items():
        signal.signal(sig, handler)
    for step in (1, 2, 3):
        tracking.log_metrics(acc, {"train/loss": 1.0 / step}, step=step)
    if signal_service:  # let wandb-core write steps 1-2 (step 3's row is still open)
        time.sleep(3 * tracking._FLUSH_SECONDS)
    services = _service_pids()
    os.killpg(os.getpgrp(), signal.SIGTERM)
    if signal_service:  # SLURM signals every process of the step, not one process group
        for pid in services:
            os.kill(pid, signal.SIGTERM)
    _wait_for(lambda: stop and not (signal_service and any(map(_alive, services))))
    alive_after_signal = [pid for pid in services if _alive(pid)]
    for step in (4, 5, 6):
        tracking.log_metrics(acc, {"train/loss": 1.0 / step}, step=step)
    tracking.log_figures(acc, {"val/vrmse": plots.vrmse_figure([0.1], [0.2])}, step=6)
    location = tracking.run_location(acc)
    tracking.finish(acc)
    return {
        "run_id": run_id,
        "signals": stop,
        "services": services,
        "alive_after_signal": alive_after_signal,
        "location": location,
    }


def _scenario_unreachable_server(out: Path) -> dict:
    """Online resume at step 8 with no server: rewind fails, plain resume fails, all no-ops."""
    from accelerate import Accelerator

    from noa_dist import plots

    acc = Accelerator(cpu=True, log_with=tracking.log_with("online"))
    run_id = tracking.start_run(
        acc, project="noa-test", run_name="online", run_dir=out / "run", config={"lr": 1e-3},
        mode="online", resume_run_id="resumeme", resume_step=8,
    )  # fmt: skip
    tracking.log_metrics(acc, {"train/loss": 1.0}, step=9)
    tracking.log_figures(acc, {"val/vrmse": plots.vrmse_figure([0.1], [0.2])}, step=9)
    location = tracking.run_location(acc)
    tracking.finish(acc)
    return {"run_id": run_id, "location": location, "trackers": len(acc.trackers)}


SCENARIOS = {
    "sigterm_group": lambda out: _train_through_sigterm(
        out, signal_service=False, spawn_ignoring=False
    ),
    "sigterm_job": lambda out: _train_through_sigterm(
        out, signal_service=True, spawn_ignoring=False
    ),
    "sigterm_job_spawned_ignoring": lambda out: _train_through_sigterm(
        out, signal_service=True, spawn_ignoring=True
    ),
    "unreachable_server": _scenario_unreachable_server,
}


def _run_scenario(name: str, out: Path, **env: str) -> tuple[subprocess.CompletedProcess, dict]:
    out.mkdir(parents=True, exist_ok=True)
    child_env = {k: v for k, v in os.environ.items() if k not in _WANDB_ENV}
    child_env.update({"WANDB_MODE": "offline", "WANDB_SILENT": "true", "OMP_NUM_THREADS": "1"})
    child_env.update(env)
    proc = subprocess.run(
        [sys.executable, __file__, name, str(out)],
        env=child_env, capture_output=True, text=True, timeout=240, start_new_session=True,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-4000:]
    return proc, json.loads((out / "result.json").read_text())


def _warnings(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith(_WARNING)]


# ----------------------------------------------------------------------------- tests


def test_sigterm_to_the_process_group_spares_the_service_and_every_step_is_logged(tmp_path):
    proc, result = _run_scenario("sigterm_group", tmp_path)
    assert result["signals"] == [signal.SIGTERM]
    assert result["services"] and result["alive_after_signal"] == result["services"]
    assert _warnings(proc.stderr) == []
    (segment,) = find_offline_runs(tmp_path / "run")
    run = read_run(segment)
    assert run.run_id == result["run_id"] and run.finished
    assert run.series("train/loss")[0] == [1, 2, 3, 4, 5, 6]  # logged after the signal too
    assert result["location"] == str(segment)


@pytest.mark.parametrize("scenario", ["sigterm_job", "sigterm_job_spawned_ignoring"])
def test_sigterm_to_the_whole_job_kills_the_service_but_not_training(scenario, tmp_path):
    """Also with SIGTERM ignored when wandb-core was spawned: Go's signal.Notify re-enables it."""
    proc, result = _run_scenario(scenario, tmp_path)
    assert result["signals"] == [signal.SIGTERM]
    assert result["services"] and result["alive_after_signal"] == []  # no way to keep it
    (warning,) = _warnings(proc.stderr)
    assert "ConnectionResetError" in warning and warning.endswith("training continues without it")
    assert "Traceback" not in proc.stderr  # nor wandb's atexit hook on the dead socket
    (segment,) = find_offline_runs(tmp_path / "run")
    run = read_run(segment)
    assert not run.finished
    assert run.series("train/loss")[0] == [1, 2]  # flushed before the signal; 3 was still open
    assert result["location"] is None  # tracking is off for the rest of the run


def test_unreachable_server_turns_tracking_off_after_one_rewind_note_and_one_warning(tmp_path):
    proc, result = _run_scenario(
        "unreachable_server", tmp_path, WANDB_MODE="online", WANDB_API_KEY="k" * 40,
        WANDB_BASE_URL="http://127.0.0.1:9", WANDB_INIT_TIMEOUT="3",
    )  # fmt: skip
    notes = [line for line in proc.stderr.splitlines() if line.startswith("Note: W&B")]
    assert len(notes) == 1 and "could not rewind run resumeme to step 8" in notes[0]
    assert "failed to rewind run" in notes[0]  # wandb accepted resume_from and asked the server
    (warning,) = _warnings(proc.stderr)
    assert "CommError" in warning
    assert result == {"run_id": "resumeme", "location": None, "trackers": 0}


# ------------------------------------------------------------------ child-process entry


def _main(name: str, out: str) -> None:
    result = SCENARIOS[name](Path(out))
    Path(out, "result.json").write_text(json.dumps(result))


if __name__ == "__main__":
    _main(sys.argv[1], sys.argv[2])
