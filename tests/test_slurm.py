"""slurm/train.sbatch submitted unchanged to a real two-node SLURM cluster on this machine
(slurm/testing/cluster.sh: munge, slurmctld, slurmd n1 + n2).

Runs when root (CI); elsewhere the tests skip and say why. Every job trains the same tiny
config, so every interrupted job must end with parameters bitwise equal to the uninterrupted
reference job's.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import time
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import psutil
import pytest
import yaml
from safetensors.torch import load_file
from trainrun import REPO, TINY_MODEL, assert_same_params, make_tiny_dataset

from noa_dist.checkpoint import latest_checkpoint

pytestmark = [pytest.mark.slurm, pytest.mark.slow]

CLUSTER = REPO / "slurm" / "testing" / "cluster.sh"
SBATCH = REPO / "slurm" / "train.sbatch"
DONE = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL"}
STEP_LINE = re.compile(r"^\s+\[(\d+)/(\d+)\] loss=", re.M)


@dataclass
class Cluster:
    env: dict[str, str]
    dataset: Path

    def run(self, *cmd: str, cwd: Path | None = None) -> str:
        out = subprocess.run(cmd, env=self.env, cwd=cwd, capture_output=True, text=True, timeout=60)
        assert out.returncode == 0, f"{' '.join(cmd)}: {out.stderr}"
        return out.stdout


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    if os.geteuid() != 0:
        pytest.skip("the local SLURM cluster needs root (slurm/testing/cluster.sh start)")
    if shutil.which("slurmctld") is None:
        subprocess.run([str(CLUSTER), "install"], check=True, timeout=1200)
    state = tmp_path_factory.mktemp("slurm-cluster")
    env = {**os.environ, "NOA_SLURM_DIR": str(state)}
    subprocess.run([str(CLUSTER), "start"], env=env, check=True, timeout=180)
    dataset = make_tiny_dataset(tmp_path_factory.mktemp("slurm-data") / "tiny")
    try:
        yield Cluster({**env, "SLURM_CONF": str(state / "slurm.conf")}, dataset)
    finally:
        subprocess.run([str(CLUSTER), "stop"], env=env, timeout=120)


def train_args(cluster: Cluster, epochs: int = 6) -> list[str]:
    """36 steps on one node x 2 processes (6 per epoch), a checkpoint every 4, offline W&B,
    the default DataLoader worker."""
    return [
        "--dataset", str(cluster.dataset), "--timesteps", "4", "--bptt-window", "2",
        "--batch-size", "2", "--warmup-steps", "2", "--lr", "1e-3", "--log-every", "1",
        "--epochs", str(epochs), "--save-every", "4", "--wandb-mode", "offline", *TINY_MODEL,
    ]  # fmt: skip


def submit(
    cluster: Cluster, cwd: Path, name: str, *opts: str, procs: int = 2, epochs=6, env=None
) -> str:
    cwd.mkdir(parents=True, exist_ok=True)
    env = {**cluster.env, "NOA_PROCS_PER_NODE": str(procs), **(env or {})}
    cmd = ["sbatch", "--parsable", f"--job-name={name}", "--cpus-per-task=1", "--time=10", *opts]
    out = subprocess.run(
        [*cmd, str(SBATCH), *train_args(cluster, epochs)],
        env=env, cwd=cwd, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    return out.stdout.strip().split(";")[0]


def job(cluster: Cluster, job_id: str) -> dict[str, str]:
    text = cluster.run("scontrol", "show", "job", "-o", job_id)
    return dict(tok.split("=", 1) for tok in text.split() if "=" in tok)


def log_of(cwd: Path, name: str, job_id: str) -> str:
    path = cwd / f"slurm-{name}-{job_id}.out"
    return path.read_text(errors="replace") if path.exists() else ""


def wait(what: str, predicate, timeout: float, log=lambda: ""):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        value = predicate()
        if value:
            return value
        time.sleep(0.2)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}\n{log()[-4000:]}")


def steps_of_restart(log: str, restart: int) -> int:
    """Step lines printed since the job's (re)start number `restart` began (0 before)."""
    parts = re.split(r"train\.sbatch: job \S+ restart (\d+) on", log)
    # parts: [before, restart, text, restart, text, ...]
    runs = dict(zip(parts[1::2], parts[2::2], strict=True))
    return len(STEP_LINE.findall(runs.get(str(restart), "")))


_requeued_at: dict[tuple[str, str], float] = {}


def start_if_requeued(cluster: Cluster, job_id: str) -> dict[str, str]:
    """A requeued job waits ~2 minutes (Reason=BeginTime) before it may start again: start it
    sooner, but not at once (slurmd refuses a launch in the same seconds as the revoked
    credential of the run before: "Job credential revoked", and the job fails). Returns the
    job's info."""
    info = job(cluster, job_id)
    if info["JobState"] == "PENDING" and info.get("Reason") == "BeginTime":
        first_seen = _requeued_at.setdefault((job_id, info["Restarts"]), time.monotonic())
        if time.monotonic() - first_seen > 5:
            cluster.run("scontrol", "update", f"JobId={job_id}", "StartTime=now")
    return info


def wait_done(cluster: Cluster, job_id: str, log, timeout: float = 300) -> dict[str, str]:
    """The job's info once it ended for good (a requeued job is started again at once)."""
    return wait(
        f"job {job_id} to end",
        lambda: (info := start_if_requeued(cluster, job_id))["JobState"] in DONE and info,
        timeout,
        log,
    )


def final_params(run_dir: Path) -> dict:
    latest = latest_checkpoint(run_dir / "checkpoints")
    assert latest is not None, f"no complete checkpoint in {run_dir}"
    return load_file(latest / "model.safetensors")


def wandb_ids(run_dir: Path) -> set[str]:
    return {p.name.rsplit("-", 1)[-1] for p in (run_dir / "wandb").glob("offline-run-*")}


@pytest.fixture(scope="module")
def reference(cluster, tmp_path_factory):
    """The uninterrupted job: one node, two processes. A twin job runs beside it on the other
    node of the same host (two jobs must not share a rendezvous port) and must end equal."""
    cwd = tmp_path_factory.mktemp("slurm-ref")
    started = time.monotonic()
    job_id = submit(cluster, cwd, "ref")
    twin_id = submit(cluster, cwd, "twin")
    info = wait_done(cluster, job_id, lambda: log_of(cwd, "ref", job_id))
    twin = wait_done(cluster, twin_id, lambda: log_of(cwd, "twin", twin_id))
    wall = time.monotonic() - started
    print(f"\nreference job and its twin (1 node x 2 processes each, side by side): {wall:.0f} s")
    return cwd, job_id, info, log_of(cwd, "ref", job_id), twin


def test_one_node_two_processes_completes_with_checkpoints_and_wandb(reference):
    cwd, job_id, info, log, _ = reference
    assert info["JobState"] == "COMPLETED", log[-3000:]
    assert "noa-dist: 2 process(es)" in log and "Training finished: 36 steps" in log
    run_dir = cwd / "runs" / "ref"
    assert (run_dir / "FINISHED").is_file() and "train.sbatch: run finished" in log
    assert latest_checkpoint(run_dir / "checkpoints").name == "step-00000036"
    assert len(wandb_ids(run_dir)) == 1
    assert list((run_dir / "wandb").glob("offline-run-*/run-*.wandb"))
    assert info["Restarts"] == "0"


def run_span(info: dict[str, str]) -> tuple[datetime, datetime]:
    return datetime.fromisoformat(info["StartTime"]), datetime.fromisoformat(info["EndTime"])


def test_two_one_node_jobs_on_one_host_run_side_by_side(reference):
    cwd, job_id, info, _, twin = reference
    twin_log = log_of(cwd, "twin", twin["JobId"])
    assert twin["JobState"] == "COMPLETED", twin_log[-3000:]
    (start, end), (twin_start, twin_end) = run_span(info), run_span(twin)
    assert start < twin_end and twin_start < end, "the two jobs ran one after another"
    ports = {re.search(r"rendezvous \S+:(\d+) \(static\)", text).group(1)
             for text in (reference[3], twin_log)}  # fmt: skip
    assert len(ports) == 2
    assert_same_params(final_params(cwd / "runs" / "twin"), final_params(cwd / "runs" / "ref"))


def test_two_nodes_one_process_each_rendezvous_through_the_first(cluster, tmp_path):
    started = time.monotonic()
    job_id = submit(cluster, tmp_path, "two", "--nodes=2", procs=1, epochs=1)
    log = lambda: log_of(tmp_path, "two", job_id)  # noqa: E731
    info = wait_done(cluster, job_id, log)
    print(f"\ntwo-node job: {time.monotonic() - started:.0f} s")
    text = log()
    assert info["JobState"] == "COMPLETED", text[-3000:]
    host = re.search(r"rendezvous (\S+):(\d+)", text).group(1)
    assert host == "n1"  # the first node of the allocation
    for rank, node in ((0, "n1"), (1, "n2")):
        assert f"node {node}: machine rank {rank} of 2, rendezvous through n1:" in text
    assert "noa-dist: 2 process(es)" in text and "Training finished" in text


# USR1 to the batch shell only; USR1 to every process of the job; SIGTERM to every process and
# a requeue by SLURM itself, as a preemption with PreemptMode=REQUEUE does (`scontrol requeue`).
PREEMPTIONS = [
    ("scancel", "--signal=USR1", "--batch"),
    ("scancel", "--signal=USR1", "--full"),
    ("scontrol", "requeue"),
]


def test_preemption_signals_save_requeue_and_resume_bitwise(cluster, reference, tmp_path):
    """Each preemption stops the job at a step boundary with a checkpoint; the job is requeued
    once (by itself, or by SLURM) and resumes."""
    started = time.monotonic()
    job_id = submit(cluster, tmp_path, "pre")
    log = lambda: log_of(tmp_path, "pre", job_id)  # noqa: E731
    for restarts, preempt in enumerate(PREEMPTIONS, start=1):
        wait(
            f"training after restart {restarts - 1}",
            lambda r=restarts - 1: (
                start_if_requeued(cluster, job_id) and steps_of_restart(log(), r) >= 2
            ),
            180,
            log,
        )
        cluster.run(*preempt, job_id)
    info = wait_done(cluster, job_id, log)
    print(f"\npreempted job (3 preemptions): {time.monotonic() - started:.0f} s")
    text = log()
    assert info["JobState"] == "COMPLETED" and info["Restarts"] == "3", text[-3000:]
    assert text.count("Stopped (SIG") == 3  # the trainer saved each time
    # the batch shell requeued the job itself twice; SLURM's requeue kills the shell it requeues
    assert text.count("train.sbatch: requeueing job") == 2
    assert "SIGTERM received" in text  # the requeue's signal
    assert "restart 3 on" in text  # one log, appended by every restart
    assert text.count("Resuming from checkpoint") == 3
    run_dir = tmp_path / "runs" / "pre"
    assert len(wandb_ids(run_dir)) == 1, "a requeued job must continue the same W&B run"
    assert_same_params(final_params(run_dir), final_params(reference[0] / "runs" / "ref"))


def test_time_limit_saves_requeues_and_finishes_bitwise(cluster, tmp_path):
    """A one-minute limit with the signal 58 s before it (SLURM sends it up to a minute late)
    on a run of ~2 minutes: the job is signalled, saves, requeues and resumes until its 120
    steps are done, equal to the same run without a limit."""
    started = time.monotonic()
    job_id = submit(
        cluster,
        tmp_path,
        "limit",
        "--time=1",
        "--signal=USR1@58",
        epochs=20,
        env={"NOA_MAX_REQUEUES": "100"},
    )  # restarts vary with the load
    ref_id = submit(cluster, tmp_path / "ref", "long", epochs=20)
    log = lambda: log_of(tmp_path, "limit", job_id)  # noqa: E731
    info = wait_done(cluster, job_id, log, timeout=900)
    print(f"\ntime-limited job: {time.monotonic() - started:.0f} s, {info['Restarts']} restart(s)")
    text = log()
    assert info["JobState"] == "COMPLETED" and int(info["Restarts"]) >= 1, text[-3000:]
    assert "SIGUSR1 received" in text
    assert (tmp_path / "runs" / "limit" / "FINISHED").is_file()
    # Its reference runs beside it: the two one-node jobs share the host (and its ports).
    ref_log = lambda: log_of(tmp_path / "ref", "long", ref_id)  # noqa: E731
    assert wait_done(cluster, ref_id, ref_log)["JobState"] == "COMPLETED", ref_log()[-3000:]
    ref = final_params(tmp_path / "ref" / "runs" / "long")
    assert_same_params(final_params(tmp_path / "runs" / "limit"), ref)


def test_the_requeue_limit_stops_a_requeue_loop(cluster, tmp_path):
    """NOA_MAX_REQUEUES=0: a stopped job saves but is not requeued (and says why)."""
    job_id = submit(cluster, tmp_path, "cap", env={"NOA_MAX_REQUEUES": "0"})
    log = lambda: log_of(tmp_path, "cap", job_id)  # noqa: E731
    wait("training", lambda: steps_of_restart(log(), 0) >= 2, 180, log)
    cluster.run("scancel", "--signal=USR1", job_id)
    info = wait_done(cluster, job_id, log)
    assert info["JobState"] == "FAILED" and info["Restarts"] == "0", log()[-3000:]
    assert "not requeued: 0 restarts reached (NOA_MAX_REQUEUES)" in log()
    assert (tmp_path / "runs" / "cap" / "STOPPED").is_file()


def rank_process(run_name: str, rank: int) -> psutil.Process | None:
    """The training process of `rank` (not its DataLoader workers, not the launcher)."""
    for proc in psutil.process_iter(["cmdline"]):
        try:
            cmdline = proc.info["cmdline"] or []
            if "--run-name" not in cmdline or run_name not in cmdline:
                continue
            env = proc.environ()
            if env.get("RANK") == str(rank) and "RANK" not in proc.parent().environ():
                return proc
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    return None


def test_a_killed_rank_fails_the_job_fast_and_a_resubmission_resumes(cluster, reference, tmp_path):
    job_id = submit(cluster, tmp_path, "kill")
    log = lambda: log_of(tmp_path, "kill", job_id)  # noqa: E731
    run_dir = tmp_path / "runs" / "kill"
    wait("a checkpoint", lambda: latest_checkpoint(run_dir / "checkpoints"), 180, log)
    victim = wait("rank 1's process", lambda: rank_process("kill", 1), 30, log)
    killed_at = time.monotonic()
    victim.send_signal(signal.SIGKILL)
    info = wait_done(cluster, job_id, log, timeout=90)
    failed_in = time.monotonic() - killed_at
    print(f"\nkilled rank: job ended {failed_in:.1f} s after the SIGKILL")
    assert info["JobState"] == "FAILED" and info["Restarts"] == "0", log()[-3000:]
    assert failed_in < 60
    assert not (run_dir / "STOPPED").exists() and "not requeued" in log()

    resumed = latest_checkpoint(run_dir / "checkpoints")
    again = submit(cluster, tmp_path, "kill")  # the same --job-name: the same run folder
    info = wait_done(cluster, again, lambda: log_of(tmp_path, "kill", again))
    text = log_of(tmp_path, "kill", again)
    assert info["JobState"] == "COMPLETED", text[-3000:]
    assert f"Resuming from checkpoint: {resumed.relative_to(tmp_path)}" in text
    assert_same_params(final_params(run_dir), final_params(reference[0] / "runs" / "ref"))


def test_sweep_array_runs_two_lambda_latent_values_offline(
    cluster, tiny_dataset, tiny_tokenizer, tmp_path
):
    """slurm/sweep.sbatch as a two-task array: task i trains row i (noa-sweep --run-index)."""
    tiny = dict(zip(TINY_MODEL[::2], TINY_MODEL[1::2], strict=True))
    sweep = {
        "name": "lam",
        "method": "grid",
        "metric": {"name": "val/vrmse", "goal": "minimize"},
        "program": str(REPO / "noa_dist" / "train.py"),
        "command": ["accelerate", "launch", "--num_processes", "1", "--num_machines", "1",
                    "--mixed_precision", "no", "--dynamo_backend", "no", "${program}", "${args}"],
        "parameters": {
            "lambda_latent": {"values": [0.05, 0.5]},
            **{k: {"value": v} for k, v in {
                "dataset": str(tiny_dataset), "vqvae_path": str(tiny_tokenizer),
                "enable_latent_loss": True, "timesteps": 4, "bptt_window": 2, "batch_size": 2,
                "epochs": 1, "wandb_mode": "offline",
                **{flag[2:].replace("-", "_"): int(v) for flag, v in tiny.items()},
            }.items()},
        },
    }  # fmt: skip
    path = tmp_path / "lam.yaml"
    path.write_text(yaml.safe_dump(sweep))
    started = time.monotonic()
    out = subprocess.run(
        ["sbatch", "--parsable", "--array=0-1", "--cpus-per-task=1", "--time=10",
         str(REPO / "slurm" / "sweep.sbatch"), str(path)],
        env=cluster.env, cwd=tmp_path, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    array = out.stdout.strip().split(";")[0]
    for task in (0, 1):
        log = lambda t=task: log_of(tmp_path, "noa-sweep", f"{array}_{t}")  # noqa: E731
        info = wait_done(cluster, f"{array}_{task}", log)
        assert info["JobState"] == "COMPLETED", log()[-3000:]
        assert "wandb sync runs/sweeps/lam/lam-00" in log()
    print(f"\nsweep array (2 tasks): {time.monotonic() - started:.0f} s")
    summary = subprocess.run(
        ["noa-sweep", str(path), "--summary", str(tmp_path / "runs" / "sweeps" / "lam")],
        env=cluster.env, cwd=tmp_path, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert summary.returncode == 0, summary.stderr
    for row, lam in ((0, "0.05"), (1, "0.5")):
        run_dir = tmp_path / "runs" / "sweeps" / "lam" / f"lam-00{row}"
        assert (run_dir / "FINISHED").is_file()
        assert lam in summary.stdout
    assert (tmp_path / "runs" / "sweeps" / "lam" / "lam.png").is_file()
