"""Run a benchmark's measuring part on N processes and collect rank 0's JSON.

One process runs as a plain subprocess; several run under `accelerate launch --multi_gpu`
(DDP over gloo on a CPU-only machine: `--cpu --num_processes 2` would start one process) or
under a launch config (`launch/zero2.yaml`). Each worker builds its Accelerator with the
trainer's `distributed.build_accelerator` and leaves with `distributed.exit_process`.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import traceback
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import NoReturn

from accelerate import Accelerator

from noa_dist import distributed
from noa_dist.bench.common import set_threads
from noa_dist.config import Config

REPO_ROOT = Path(__file__).resolve().parents[2]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def command(
    bench: str, processes: int, worker_argv: Sequence[str], config_file: Path | None = None
) -> list[str]:
    worker = ["-m", "noa_dist.bench.cli", bench, "--worker", *worker_argv]
    if processes == 1 and config_file is None:
        return [sys.executable, *worker]
    launcher = [sys.executable, "-m", "accelerate.commands.launch"]
    launcher += ["--config_file", str(config_file)] if config_file else ["--multi_gpu"]
    launcher += [f"--num_processes={processes}", f"--main_process_port={_free_port()}"]
    return [*launcher, *worker]


def run_workers(
    bench: str,
    processes: int,
    threads: int,
    worker_argv: Sequence[str],
    *,
    timeout: float = 1800,
    config_file: Path | None = None,
) -> dict:
    """Launch `noa-bench BENCH --worker` on `processes` processes; rank 0's result."""
    with tempfile.TemporaryDirectory(prefix="noa-bench-") as tmp:
        out = Path(tmp) / "result.json"
        argv = [*worker_argv, f"--out={out}", f"--threads={threads}"]
        env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS=str(threads))
        proc = subprocess.Popen(
            command(bench, processes, argv, config_file),
            cwd=REPO_ROOT,
            env=env,
            text=True,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        try:
            output, _ = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            output, _ = proc.communicate()
            raise RuntimeError(f"{bench}: timed out after {timeout}s:\n{output[-3000:]}") from None
        if proc.returncode != 0 or not out.is_file():
            raise RuntimeError(
                f"{bench} on {processes} process(es) failed ({proc.returncode}):\n{output[-4000:]}"
            )
        return json.loads(out.read_text())


def worker(
    cfg: Config, out: Path, threads: int | None, measure: Callable[[Accelerator], dict]
) -> NoReturn:
    """The launched side: threads, the trainer's Accelerator, `measure`, rank 0 writes."""
    set_threads(threads)
    code = 0
    try:
        accelerator = distributed.build_accelerator(
            gradient_accumulation_steps=cfg.optim.gradient_accumulation_steps,
            mixed_precision=cfg.train.mixed_precision or "no",
            log_with=None,
        )
        distributed.check_world(accelerator)
        result = measure(accelerator)
        if accelerator.is_main_process:
            out.write_text(json.dumps(result))
        distributed.shutdown(accelerator)
    except Exception:  # the parent shows this output when the launch fails
        traceback.print_exc()
        code = 1
    distributed.exit_process(code)
