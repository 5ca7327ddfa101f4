"""Markers and metrics in the run folder that scripts read instead of the exit code or W&B.

Through `accelerate launch` the exit code is not reliable: torch's elastic agent exits 1
after it forwarded a signal, whatever the ranks returned. So a run leaves one marker:
`STOPPED` (a requested stop: signal, `--stop-at-step`, a dead launcher; the run can be
resumed with `--resume auto`) or `FINISHED` (the run reached its end), each a JSON object
with the reason, the step and the checkpoint. A crash leaves neither. A (re)start clears both.
`val_metrics.json` holds the last validation's metrics (the keys logged to W&B), its step and
the run's config; it is rewritten after every validation (`noa-sweep --summary` reads it).
`metrics.jsonl` is the run's record, appended by the main process: one JSON object per line
with `kind` ("train" at each log point, "val" after each validation, "skip" per skipped step)
and the optimizer `step`, plus the metrics logged to W&B under that step; a (re)start at step
S first drops the rows beyond S (a resumed run repeats those steps). `noa-plot` reads it.

    if [ -f runs/exp1/STOPPED ]; then scontrol requeue "$SLURM_JOB_ID"; fi
"""

from __future__ import annotations

import json
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from noa_dist.atomic import atomic_write_text

STOPPED = "STOPPED"
FINISHED = "FINISHED"
VAL_METRICS = "val_metrics.json"
METRICS_LOG = "metrics.jsonl"


def clear(run_dir: Path) -> None:
    for name in (STOPPED, FINISHED):
        (Path(run_dir) / name).unlink(missing_ok=True)


def mark(run_dir: Path, name: str, **fields: Any) -> Path:
    """Write marker `name` (STOPPED or FINISHED) atomically with `fields` and a timestamp."""
    record = {**fields, "at": datetime.now(timezone.utc).isoformat(timespec="seconds")}
    return atomic_write_text(Path(run_dir) / name, json.dumps(record, default=str) + "\n")


def read(run_dir: Path) -> dict[str, Any] | None:
    """The marker's content with its name under "marker", or None when there is none."""
    for name in (STOPPED, FINISHED):
        path = Path(run_dir) / name
        if path.is_file():
            return {"marker": name, **json.loads(path.read_text(encoding="utf-8"))}
    return None


def write_val_metrics(
    run_dir: Path, metrics: dict[str, float], *, step: int, config: dict[str, Any]
) -> Path:
    """Replace the last validation's metrics, atomically (a reader never sees half a file)."""
    record = {"step": step, "metrics": {k: float(v) for k, v in metrics.items()}, "config": config}
    return atomic_write_text(Path(run_dir) / VAL_METRICS, json.dumps(record, default=str) + "\n")


def read_val_metrics(run_dir: Path) -> dict[str, Any] | None:
    path = Path(run_dir) / VAL_METRICS
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None


def append_metrics(run_dir: Path, kind: str, step: int, metrics: dict[str, Any]) -> None:
    """Append one row {"kind", "step", **metrics} to metrics.jsonl (main process only)."""
    row = json.dumps({"kind": kind, "step": step, **metrics}, default=float)
    with open(Path(run_dir) / METRICS_LOG, "a", encoding="utf-8") as f:
        f.write(row + "\n")


def truncate_metrics(run_dir: Path, step: int) -> None:
    """Keep the rows up to `step` (where a (re)start continues) and drop a torn last line."""
    path = Path(run_dir) / METRICS_LOG
    if not path.is_file():
        return
    rows = read_metrics(run_dir)
    kept = [row for row in rows if row["step"] <= step]
    text = "".join(json.dumps(row) + "\n" for row in kept)
    if text != path.read_text(encoding="utf-8"):
        atomic_write_text(path, text)


def read_metrics(run_dir: Path) -> list[dict[str, Any]]:
    """The rows of metrics.jsonl (a line cut short by a crash is left out); [] without one."""
    path = Path(run_dir) / METRICS_LOG
    if not path.is_file():
        return []
    rows = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(row, dict) and isinstance(row.get("step"), int):
            rows.append(row)
    return rows
