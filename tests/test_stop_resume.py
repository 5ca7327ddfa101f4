"""Stops and kills as a cluster delivers them, with the default DataLoader worker, each
followed by `--resume auto` and compared bitwise with the straight run (tests/dist_runs.py).

Signals go to processes found by pid (torch elastic starts each rank in its own session: a
signal to the launcher's process group alone would not reach them).
"""

from __future__ import annotations

import json
import os
import random
import re
import signal
import time

import pytest
from dist_runs import same_floats
from trainrun import (
    assert_same_params,
    job_processes,
    kill_tree,
    launch,
    rank_process,
    rank_results,
    run_until,
    train_flags,
)

from noa_dist.checkpoint import latest_checkpoint

pytestmark = [pytest.mark.dist, pytest.mark.slow, pytest.mark.timeout(1800)]

KILLS = int(os.environ.get("NOA_TEST_KILLS", "3"))  # 10 for the stress figure in the notes


def sigterm_launcher(proc):
    os.kill(proc.pid, signal.SIGTERM)


def sigterm_every_process(proc):
    """What SLURM does at a time limit: every process of the job step, workers included."""
    for p in job_processes(proc):
        os.kill(p.pid, signal.SIGTERM)


def sigusr1_rank1(proc):
    os.kill(rank_process(proc, 1).pid, signal.SIGUSR1)


def sigkill_launcher(proc):
    """The launcher dies (SIGKILL, OOM killer, its node's job step): each rank's parent watch
    turns it into a stop, so no rank trains on next to a requeued job."""
    os.kill(proc.pid, signal.SIGKILL)


def ctrl_c(proc):
    """A terminal's Ctrl-C: SIGINT to the foreground process group (the launcher's)."""
    os.killpg(proc.pid, signal.SIGINT)


SIGNALS = {
    "launcher-SIGTERM": (sigterm_launcher, "SIGTERM", 1),
    "job-SIGTERM": (sigterm_every_process, "SIGTERM", 1),
    "rank1-SIGUSR1": (sigusr1_rank1, "SIGUSR1", 0),
    "ctrl-c": (ctrl_c, "SIGINT", 1),
    "launcher-SIGKILL": (sigkill_launcher, "launcher exited", -signal.SIGKILL),
}


def assert_resumed_bitwise(resumed: list[dict], straight: list[dict]) -> None:
    for ref, res in zip(straight, resumed, strict=True):
        assert res["state"]["global_step"] == ref["state"]["global_step"] == 12
        assert_same_params(ref["params"], res["params"])
        for key in ("train_loss", "val_loss"):
            assert same_floats(res["state"]["history"][key], ref["state"]["history"][key]), key


def our_tracebacks(output: str) -> list[str]:
    """Tracebacks other than the elastic agent's own SignalException (documented: torch's
    agent prints it and exits 1 after it forwarded a signal, whatever the ranks do)."""
    blocks = output.split("Traceback (most recent call last):")[1:]
    return [b for b in blocks if "SignalException" not in b.split("\n\n")[0]]


@pytest.mark.parametrize("how", list(SIGNALS))
def test_a_stop_signal_saves_every_rank_at_one_step_and_resumes_bitwise(
    how, tiny_dataset, tmp_path, ddp_straight
):
    send, signal_name, launcher_code = SIGNALS[how]
    flags = train_flags(tiny_dataset, tmp_path / "runs", "--epochs", "2")
    output, code = run_until(flags, tmp_path / "stopped", r"\[3/12\]", send)
    assert code == launcher_code, output[-3000:]
    assert not our_tracebacks(output), our_tracebacks(output)[0][-3000:]
    marker = json.loads((tmp_path / "runs" / "run" / "STOPPED").read_text())
    stopped = rank_results(tmp_path / "stopped", 2)
    assert marker["reason"] == signal_name
    assert [r["state"]["global_step"] for r in stopped] == [marker["step"]] * 2
    assert 3 <= marker["step"] < 12 and marker["checkpoint"].endswith(f"step-{marker['step']:08d}")
    assert all(r["stopped_by"] == signal_name for r in stopped)
    launch(2, [*flags, "--resume", "auto"], tmp_path / "resumed")
    assert not (tmp_path / "runs" / "run" / "STOPPED").exists()
    assert json.loads((tmp_path / "runs" / "run" / "FINISHED").read_text())["step"] == 12
    assert_resumed_bitwise(rank_results(tmp_path / "resumed", 2), ddp_straight)


def test_sigkill_at_random_points_then_resume_auto_ends_bitwise_equal(
    tiny_dataset, tmp_path, ddp_straight
):
    """A chain of requeues, each SIGKILLed (every process, by pid) at a random point: the
    first inside a checkpoint save, the others mid-epoch or wherever they land; then a last
    run to the end. Prints the kill points (the notes quote a 10-kill run)."""
    rng = random.Random(int(os.environ.get("NOA_TEST_KILL_SEED", "7")))
    # a save after every step: resumes land right behind each kill, and random kills often
    # land inside a save
    flags = train_flags(tiny_dataset, tmp_path / "runs", "--epochs", "2", "--save-every", "1")
    checkpoints = tmp_path / "runs" / "run" / "checkpoints"
    label, marker, delay = (
        "inside the save of step 4",
        "hanging inside the checkpoint save of step 4",
        0.0,
    )
    for i in range(KILLS):
        extra = ["--debug-hang-in-save", "4"] if i == 0 else []

        def kill(proc, delay=delay):
            time.sleep(delay)
            kill_tree(proc)

        output, _ = run_until(
            [*flags, *extra, "--resume", "auto"], tmp_path / f"kill{i}", marker, kill
        )
        resumed_from = re.findall(r"Resuming from checkpoint: \S+(step-\d+)", output)
        print(f"kill {i + 1}: {label}; that launch resumed from {resumed_from or 'nothing'}")
        latest = latest_checkpoint(checkpoints)
        start = int(latest.name.split("-")[1]) if latest else 0
        if start >= 11:
            break  # the kill landed after the last steps: nothing left to interrupt
        # a step the next launch (resumed at `start`) will reach, plus a random delay
        step, delay = rng.randint(start + 1, min(start + 2, 11)), rng.uniform(0, 0.3)
        label, marker = f"after step {step} + {delay:.2f}s", rf"\[{step}/12\]"
    launch(2, [*flags, "--resume", "auto"], tmp_path / "final")
    assert_resumed_bitwise(rank_results(tmp_path / "final", 2), ddp_straight)


TRIALS = int(os.environ.get("NOA_TEST_KILL_TRIALS", "1"))  # 10 for the figure in the notes


@pytest.mark.parametrize("trial", range(TRIALS))
def test_one_sigkill_at_a_random_point_then_resume_auto_is_bitwise_equal(
    trial, tiny_dataset, tmp_path, ddp_straight
):
    """Independent trials: SIGKILL of every process (by pid) once, at a seeded random point:
    inside a checkpoint save (every third trial) or after a random step plus a random delay
    (mid-epoch or between epochs), then one `--resume auto` to the end."""
    rng = random.Random(1000 + trial)
    flags = train_flags(tiny_dataset, tmp_path / "runs", "--epochs", "2", "--save-every", "2")
    if trial % 3 == 0:
        save = rng.choice([2, 4, 8, 10])
        extra, marker, delay = (
            ["--debug-hang-in-save", str(save)],
            f"checkpoint save of step {save} ",
            0,
        )
        label = f"inside the save of step {save}"
    else:
        step, delay = rng.randint(1, 11), rng.uniform(0, 0.5)
        extra, marker, label = [], rf"\[{step}/12\]", f"after step {step} + {delay:.2f}s"

    def kill(proc):
        time.sleep(delay)
        kill_tree(proc)

    run_until([*flags, *extra], tmp_path / "killed", marker, kill)
    latest = latest_checkpoint(tmp_path / "runs" / "run" / "checkpoints")
    launch(2, [*flags, "--resume", "auto"], tmp_path / "resumed")
    print(f"trial {trial}: killed {label}; resumed from {latest.name if latest else 'nothing'}")
    assert_resumed_bitwise(rank_results(tmp_path / "resumed", 2), ddp_straight)


def test_a_stop_during_validation_saves_at_once_and_the_resume_validates_then_goes_on(
    tiny_dataset, tmp_path, ddp_straight
):
    """A signal reaching rank 1 as the first validation begins: every rank leaves validation
    at the same batch, saves at step 6 (the epoch's steps done) and stops; the resumed run
    starts with that validation, so history and weights equal the straight run's."""
    flags = train_flags(tiny_dataset, tmp_path / "runs", "--epochs", "2")
    env = {"NOA_TEST_STOP_IN_VALIDATION": "1:1"}
    output = launch(2, flags, tmp_path / "stopped", env=env).stdout
    marker = json.loads((tmp_path / "runs" / "run" / "STOPPED").read_text())
    assert marker["reason"] == "SIGUSR1" and marker["step"] == 6, output[-3000:]
    assert "Val:" not in output  # validation 1 was cut short
    stopped = rank_results(tmp_path / "stopped", 2)
    assert [r["state"]["batch_in_epoch"] for r in stopped] == [6, 6]
    assert [r["state"]["epoch"] for r in stopped] == [0, 0]
    resumed = launch(2, [*flags, "--resume", "auto"], tmp_path / "resumed").stdout
    assert resumed.count("Val:") == 2, resumed[-3000:]
    assert "Train: (no step of this epoch ran since the (re)start)" in resumed
    assert_resumed_bitwise(rank_results(tmp_path / "resumed", 2), ddp_straight)
