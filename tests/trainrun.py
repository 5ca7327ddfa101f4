"""Helpers for tests that run the real trainer: a tiny dataset, tiny model flags, launchers."""

from __future__ import annotations

import contextlib
import os
import re
import socket
import subprocess
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
WORKER = REPO / "tests" / "dist" / "train_worker.py"

# Small enough for a CPU test, large enough to have several steps per epoch on 2 ranks.
TINY_MODEL = [
    "--base-channels",
    "8",
    "--encoder-levels",
    "2",
    "--afno-blocks",
    "1",
    "--afno-num-blocks",
    "4",
    "--modes",
    "4",
]


def make_tiny_dataset(root: Path) -> Path:
    from noa_dist.data.generate import generate_dataset

    return generate_dataset(
        root,
        n_trajectories=20,
        grid=16,
        timesteps=8,
        trajectories_per_shard=6,
        split_fractions=(0.6, 0.2, 0.2),
        workers=1,
        progress=False,
    )


def train_flags(dataset: Path, out: Path, *extra: str) -> list[str]:
    return [
        "--dataset",
        str(dataset),
        "--timesteps",
        "4",
        "--bptt-window",
        "2",
        "--batch-size",
        "2",
        "--warmup-steps",
        "2",
        "--lr",
        "1e-3",
        "--log-every",
        "1",
        "--output-dir",
        str(out),
        "--run-name",
        "run",
        "--wandb-mode",
        "disabled",
        "--threads-per-process",  # one per process, as the runs compared bitwise across
        "1",  # launch styles (accelerate launch vs plain python) must use the same count
        *TINY_MODEL,
        *extra,
    ]


def job_processes(proc: subprocess.Popen) -> list:
    """The launcher and every process below it, by pid (torch elastic starts each rank in its
    own session, so a kill of the launcher's process group would leave the ranks running)."""
    import psutil

    try:
        return [psutil.Process(proc.pid), *psutil.Process(proc.pid).children(recursive=True)]
    except psutil.NoSuchProcess:
        return []


def rank_process(proc: subprocess.Popen, rank: int):
    """The psutil.Process of training rank `rank` of a launch (found by its RANK variable)."""
    import psutil

    for p in job_processes(proc)[1:]:
        with contextlib.suppress(psutil.Error):
            env = p.environ()
            if env.get("RANK") == str(rank) and "NOA_TEST_OUT" in env and "LOCAL_RANK" in env:
                cmdline = " ".join(p.cmdline())
                if "train_worker.py" in cmdline or "train.py" in cmdline:
                    return p
    raise AssertionError(f"no process of rank {rank} under launcher {proc.pid}")


def kill_tree(proc: subprocess.Popen) -> None:
    """SIGKILL the launcher and every process it started, by pid."""
    import psutil

    family = job_processes(proc)
    for p in family:
        with contextlib.suppress(psutil.NoSuchProcess):
            p.kill()
    psutil.wait_procs(family, timeout=30)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def env_for_test(out: Path, **extra: str) -> dict[str, str]:
    env = dict(
        os.environ,
        **extra,
        NOA_TEST_OUT=str(out),
        OMP_NUM_THREADS="1",
        WANDB_MODE="disabled",
        PYTHONUNBUFFERED="1",
        DS_ACCELERATOR="cpu",
        PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]).rstrip(
            os.pathsep
        ),
    )  # PYTHONPATH: launched ranks import this checkout's noa_dist, whatever is installed
    env.pop("WORLD_SIZE", None)
    return env


def launch_command(
    n_procs: int, script: Path, args: list[str], extra_launch: list[str] = ()
) -> list[str]:
    cmd = [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--num_machines",
        "1",
        "--mixed_precision",
        "no",
        "--dynamo_backend",
        "no",
    ]
    if "--use_deepspeed" in extra_launch:
        cmd += ["--num_processes", str(n_procs), "--main_process_port", str(free_port())]
    elif n_procs > 1:
        cmd += [
            "--multi_gpu",
            "--num_processes",
            str(n_procs),
            "--main_process_port",
            str(free_port()),
        ]
    else:
        cmd += ["--num_processes", "1"]
    return [*cmd, *extra_launch, str(script), *args]


def launch(
    n_procs: int,
    args: list[str],
    out: Path,
    *,
    timeout: float = 600,
    script: Path = WORKER,
    extra_launch: list[str] = (),
    env: dict[str, str] | None = None,
) -> subprocess.CompletedProcess:
    """Run the worker under accelerate launch; fail with its output if it fails or hangs.

    `env`: extra variables, e.g. NOA_TEST_SKIP_STEPS (see tests/dist/train_worker.py).
    """
    out.mkdir(parents=True, exist_ok=True)
    cmd = launch_command(n_procs, script, args, extra_launch)
    proc = subprocess.Popen(
        cmd,
        cwd=REPO,
        env=env_for_test(out, **(env or {})),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    try:
        stdout, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        kill_tree(proc)
        stdout, _ = proc.communicate()
        raise AssertionError(
            f"launch timed out after {timeout}s (a deadlock?):\n{stdout[-4000:]}"
        ) from None
    if proc.returncode != 0:
        raise AssertionError(f"launch failed ({proc.returncode}):\n{stdout[-6000:]}")
    return subprocess.CompletedProcess(cmd, proc.returncode, stdout, "")


def zero_launch(stage: int) -> list[str]:
    """accelerate launch flags for DeepSpeed ZeRO on CPU. Clipping, buckets and ZeRO-3's 16-bit
    gather are left to the trainer (as with launch/zero*.yaml); it also adds gloo and DS_ACCELERATOR."""
    return ["--use_deepspeed", "--zero_stage", str(stage)]


def max_abs_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k].float() - b[k].float()).abs().max()) for k in a)


def run_until(flags, out, marker: str, action, *, timeout: float = 600) -> tuple[str, int]:
    """Launch 2 ranks, call `action(proc)` when `marker` (a regex) first appears in the output,
    then wait for the job to end; returns (output, launcher exit code)."""
    out.mkdir(parents=True, exist_ok=True)
    proc = subprocess.Popen(
        launch_command(2, WORKER, flags),
        cwd=REPO,
        env=env_for_test(out),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    lines, fired, deadline = [], False, time.monotonic() + timeout
    try:
        for line in proc.stdout:
            lines.append(line)
            if not fired and re.search(marker, line):
                action(proc)
                fired = True
            if time.monotonic() > deadline:
                raise AssertionError("job did not end:\n" + "".join(lines[-60:]))
        proc.wait(timeout=60)
    finally:
        kill_tree(proc)
    text = "".join(lines)
    assert fired, f"never saw {marker!r}:\n{text[-4000:]}"
    return text, proc.returncode


def rank_results(out: Path, world_size: int) -> list[dict]:
    results = [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(world_size)]
    for r, res in enumerate(results):
        assert res["world_size"] == world_size, f"rank {r} saw world size {res['world_size']}"
        assert res["rank"] == r
    return results


def assert_same_params(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), (
            f"{name} differs (max abs diff {(a[name] - b[name]).abs().max()})"
        )
