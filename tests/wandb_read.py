"""Read offline W&B runs back in tests, through wandb's own `wandb leet inspect --json`.

`wandb leet inspect RUN.wandb --json` (wandb >= 0.31; run with WANDB_MODE=offline) prints one
JSON object per record, `{"num": n, "type": T, T: {...}}`, with T one of header, run,
environment, stats, files, telemetry, config, summary, history, exit, ... The shapes used:

    run      {"run_id", "display_name", "project", "config": {"update": {...}}, "branch_point"?}
    history  {"item": {"_step": n, "_runtime", "_timestamp", key: value}, "step": {"num": n}}
             nested values are flattened with "." (an image is "key._type", "key.path", ...)
    exit     {"exit_code": n}

With `--summary --json` it prints one object for the whole file: state ("finished",
"running" for a file without an exit record, ...), exit_code, run_id, name, project, step,
and config and summary as nested dicts with wandb's internal keys removed.
A torn end (a crash) ends the records with a note on stderr; a corrupt chunk is skipped with
a note on stderr (raised here); a file that is not a W&B log makes it exit 1.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from noa_dist.errors import DataError


@dataclass
class OfflineRun:
    """One offline run segment. A resumed run has one segment (directory) per process start."""

    run_id: str
    path: Path
    """The `.wandb` file."""
    name: str = ""
    project: str = ""
    config: dict[str, Any] = field(default_factory=dict)
    history: list[dict[str, Any]] = field(default_factory=list)
    """One dict per committed step; `_step` is the step passed to `accelerator.log`."""
    summary: dict[str, Any] = field(default_factory=dict)
    finished: bool = False
    """True if the run wrote its exit record (False: crashed, killed or still running)."""
    branch_point: dict[str, Any] | None = None
    """`{"run", "metric", "value"}` of a segment started with resume_from / fork_from."""

    def series(self, key: str) -> tuple[list[int], list[Any]]:
        """(steps, values) of `key` over the rows that logged it."""
        rows = [row for row in self.history if key in row]
        return [row["_step"] for row in rows], [row[key] for row in rows]


def find_offline_runs(wandb_dir: Path | str) -> list[Path]:
    """Offline run directories under `wandb_dir` (the `dir` given to W&B or its `wandb/`
    subfolder), oldest first, so the segments of a resumed run come out in order."""
    root = Path(wandb_dir)
    if not root.is_dir():
        raise DataError(f"{root}: not a directory (expected a W&B dir holding offline-run-*)")
    runs = [
        p for p in (*root.glob("offline-run-*"), *root.glob("wandb/offline-run-*")) if p.is_dir()
    ]
    return sorted(runs, key=_segment_order)


def _segment_order(run_dir: Path) -> tuple[str, int, str]:
    """offline-run-<YYYYmmdd_HHMMSS>-<id>[-<n>]: wandb appends -1, -2 ... within one second."""
    match = re.fullmatch(r"offline-run-(\d{8}_\d{6})-(.+?)(?:-(\d+))?", run_dir.name)
    if match is None:
        return (run_dir.name, 0, "")
    stamp, run_id, copy = match.groups()
    return (stamp, int(copy or 0), run_id)


def read_run(run: Path | str) -> OfflineRun:
    """An offline run directory or its `.wandb` file, as wandb itself reads it."""
    path = _wandb_file(Path(run))
    records = [json.loads(line) for line in _inspect(path).splitlines() if line.strip()]
    state = json.loads(_inspect(path, "--summary"))
    result = OfflineRun(
        run_id=state.get("run_id") or path.stem.removeprefix("run-"),
        path=path,
        name=state.get("name", ""),
        project=state.get("project", ""),
        config=state.get("config") or {},
        summary=state.get("summary") or {},
        finished=any(r["type"] == "exit" for r in records),
    )
    for record in records:
        if record["type"] == "history":
            item = record["history"].get("item", {})
            row = _group_media(item)
            row.setdefault("_step", record["history"].get("step", {}).get("num", 0))
            result.history.append(row)
        elif record["type"] == "run":
            result.branch_point = record["run"].get("branch_point")
    return result


def _wandb_file(run: Path) -> Path:
    if run.is_file():
        return run
    candidates = sorted(run.glob("run-*.wandb"))
    if len(candidates) != 1:
        raise DataError(f"{run}: expected exactly one run-<id>.wandb file, found {len(candidates)}")
    return candidates[0]


def _inspect(path: Path, *flags: str) -> str:
    """stdout of `wandb leet inspect PATH --json [flags]`; failures and corruption raise."""
    cmd = [sys.executable, "-m", "wandb", "leet", "inspect", str(path), "--json", *flags]
    env = {**os.environ, "WANDB_MODE": "offline"}
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
    notes = [line for line in proc.stderr.splitlines() if line.strip()]
    if proc.returncode != 0:
        raise DataError(f"{path}: wandb leet inspect failed: {notes[-1] if notes else '?'}")
    corrupt = [line for line in notes if "corrupt" in line]
    if corrupt:
        raise DataError(f"{path}: {corrupt[0]}")
    return proc.stdout


def _group_media(item: dict[str, Any]) -> dict[str, Any]:
    """Undo the "." flattening for media values ("key._type", "key.path" -> row["key"])."""
    media = {key[: -len("._type")] for key in item if key.endswith("._type")}
    row: dict[str, Any] = {}
    for key, value in item.items():
        owner = next((m for m in media if key.startswith(m + ".")), None)
        if owner is None:
            row[key] = value
        else:
            row.setdefault(owner, {})[key[len(owner) + 1 :]] = value
    return row
