"""`noa-sweep FILE --run-index i`: run row i of a sweep offline, as a resumable run.

The row is rendered into the sweep's own `command` as the agent would, plus the flags that
give it a folder of its own (`--output_dir=<runs dir> --run_name=<sweep>-<i> --resume=auto`),
so running the same index again (a requeued array task) continues that run, and a finished
row is left alone. W&B gets what an agent run gets: the swept values, flat, in the run's
config (through WANDB_SWEEP_PARAM_PATH, as the agent passes them) and the runs grouped by
the sweep's name (WANDB_RUN_GROUP); WANDB_MODE is offline unless set.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import yaml

from noa_dist import run_status
from noa_dist.config import load_config
from noa_dist.errors import ConfigError
from noa_dist.sweep.expand import Row
from noa_dist.sweep.render import render_args, render_command, unset_envvars
from noa_dist.sweep.spec import Sweep

PARAMS_FILE = "sweep_params.yaml"
ARGS_JSON_FILE = "sweep_args.json"
_FORWARDED = (signal.SIGTERM, signal.SIGUSR1, signal.SIGUSR2)  # SIGINT reaches the child itself


def safe_name(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "-", text).strip("-") or "sweep"


def default_runs_dir(sweep: Sweep) -> Path:
    return Path("runs") / "sweeps" / safe_name(sweep.name)


def run_args(sweep: Sweep, row: Row, index: int, runs_dir: Path) -> Row:
    """The row plus the flags that make it a resumable run of its own."""
    given = {name.replace("-", "_") for name in row}
    if "run_name" in given:
        raise ConfigError(
            f"{sweep.path}: parameters.run_name: noa-sweep names each row's run itself "
            f"({safe_name(sweep.name)}-<index>); remove it"
        )
    extra: Row = {"run_name": f"{safe_name(sweep.name)}-{index:03d}"}
    if "output_dir" not in given:
        extra["output_dir"] = str(runs_dir)
    if "resume" not in given:
        extra["resume"] = "auto"
    return {**row, **extra}


def trainer_argv(argv: list[str], program: str | None, row: Row) -> list[str]:
    """What the trainer parses: everything after the program, else the row's `${args}`."""
    if program is not None and program in argv:
        return argv[argv.index(program) + 1 :]
    return render_args(row)


def check_program(sweep: Sweep) -> None:
    used = sweep.program is not None and "${program}" in sweep.command
    if used and not Path(sweep.program).is_file():
        raise ConfigError(
            f"{sweep.path}: program {sweep.program} not found from {Path.cwd()}; run from the "
            "folder `wandb agent` would run in (the repository root) or make it absolute"
        )


def run_row(sweep: Sweep, index: int, row: Row, runs_dir: Path | None = None) -> int:
    """Run row `index`; returns an exit code (0: finished, stopped on request, or done before)."""
    missing = unset_envvars(sweep.command, os.environ)
    if missing:
        raise ConfigError(
            f"{sweep.path}: command uses ${{envvar:{missing[0]}}} but {missing[0]} is not set"
            + (f" (nor {', '.join(missing[1:])})" if missing[1:] else "")
        )
    check_program(sweep)
    args = run_args(sweep, row, index, runs_dir or default_runs_dir(sweep))
    probe = render_command(sweep.command, args, program=sweep.program)
    cfg = load_config(trainer_argv(probe, sweep.program, args))
    run_dir = Path(cfg.checkpoint.output_dir) / cfg.checkpoint.run_name
    marker = run_status.read(run_dir)
    if marker is not None and marker["marker"] == run_status.FINISHED:
        print(
            f"row {index}: {run_dir} already finished at step {marker.get('step')}; nothing to do"
        )
        return 0
    run_dir.mkdir(parents=True, exist_ok=True)
    argv = render_command(
        sweep.command,
        args,
        program=sweep.program,
        interpreter=sys.executable,
        args_json_file=str(_write_json(run_dir / ARGS_JSON_FILE, args)),
    )
    env = row_env(sweep, _write_params(run_dir / PARAMS_FILE, row))
    print(f"row {index}: {shlex.join(argv)}", flush=True)
    code = _run(argv, env)
    marker = run_status.read(run_dir)
    if marker is None:
        print(f"row {index}: no FINISHED/STOPPED marker in {run_dir} (exit code {code})")
        return code or 1
    print(f"row {index}: {marker['marker']} ({marker.get('reason')}) at step {marker.get('step')}")
    return 0


def row_env(sweep: Sweep, params_file: Path) -> dict[str, str]:
    env = dict(os.environ)
    env.setdefault("WANDB_MODE", "offline")
    env.setdefault("WANDB_RUN_GROUP", sweep.name)
    env["WANDB_SWEEP_PARAM_PATH"] = str(params_file.resolve())
    for stale in ("WANDB_SWEEP_ID", "WANDB_RUN_ID"):  # each row is its own run, in no sweep
        env.pop(stale, None)
    return env


def _write_params(path: Path, row: Row) -> Path:
    """The swept values in the file format the agent writes (wandb's config-<run>.yaml)."""
    body = yaml.safe_dump({name: {"value": value} for name, value in row.items()}, sort_keys=False)
    path.write_text(f"wandb_version: 1\n\n{body}", encoding="utf-8")
    return path


def _write_json(path: Path, args: dict[str, Any]) -> Path:
    path.write_text(json.dumps(args), encoding="utf-8")
    return path


def _run(argv: list[str], env: dict[str, str]) -> int:
    """Run the row's command; SIGTERM/SIGUSR1/2 sent to noa-sweep alone reach it too."""
    proc = subprocess.Popen(argv, env=env)
    previous = {sig: signal.signal(sig, lambda s, _f: proc.send_signal(s)) for sig in _FORWARDED}
    previous[signal.SIGINT] = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        return proc.wait()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
