"""`noa-sweep FILE --summary RUNS_DIR`: the sweep's runs against lambda_latent, table and plot.

Reads each run folder's `val_metrics.json` (the trainer rewrites it after every validation)
and its FINISHED/STOPPED marker, so it works on runs of `noa-sweep --run-index` and of
`wandb agent` alike, offline, without W&B.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

from matplotlib.figure import Figure

from noa_dist import run_status
from noa_dist.errors import ConfigError
from noa_dist.plots import save_figure

COLUMNS = (  # (header, W&B key)
    ("val VRMSE", "val/vrmse"),
    ("loss", "val/loss"),
    ("traj", "val/traj"),
    ("commit", "val/commit"),
    ("latent", "val/latent"),
    ("ratio@1", "val/vrmse_ratio_step_1"),
)


@dataclass(frozen=True)
class RunResult:
    name: str
    lambda_latent: float
    latent_loss: bool  # enable_latent_loss: without it lambda_latent does nothing
    metrics: dict[str, float]
    step: int
    status: str  # FINISHED, STOPPED, or "running?" (no marker: running or crashed)

    @property
    def vrmse(self) -> float:
        return self.metrics.get("val/vrmse", math.nan)


def collect(runs_dir: Path) -> list[RunResult]:
    """Every run folder in `runs_dir` (or `runs_dir` itself) that has validated once."""
    runs_dir = Path(runs_dir)
    if not runs_dir.is_dir():
        raise ConfigError(f"--summary {runs_dir}: no such folder")
    folders = [runs_dir, *sorted(p for p in runs_dir.iterdir() if p.is_dir())]
    results = [r for r in map(_read_run, folders) if r is not None]
    if not results:
        raise ConfigError(
            f"--summary {runs_dir}: no run folder with {run_status.VAL_METRICS} (has a run "
            "finished its first epoch?)"
        )
    return sorted(results, key=lambda r: (r.lambda_latent, r.name))


def _read_run(folder: Path) -> RunResult | None:
    record = run_status.read_val_metrics(folder)
    if record is None:
        return None
    align = record["config"]["align"]
    marker = run_status.read(folder)
    return RunResult(
        name=folder.name,
        lambda_latent=float(align["lambda_latent"]),
        latent_loss=bool(align["enable_latent_loss"]),
        metrics=record["metrics"],
        step=int(record["step"]),
        status=marker["marker"] if marker else "running?",
    )


def table(results: list[RunResult]) -> str:
    header = ["run", "lambda_latent", *(h for h, _ in COLUMNS), "steps", "status"]
    rows = [header]
    for r in results:
        lam = f"{r.lambda_latent:.4g}" + ("" if r.latent_loss else " (off)")
        values = [_cell(r.metrics.get(key)) for _, key in COLUMNS]
        rows.append([r.name, lam, *values, str(r.step), r.status])
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)) for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(line.rstrip() for line in lines)


def _cell(value: float | None) -> str:
    return "-" if value is None else f"{value:.4g}"


def plot(results: list[RunResult], path: Path, title: str) -> Path:
    """val VRMSE against lambda_latent on a log axis; runs without L_latent as a dashed line
    (their lambda_latent does nothing); unfinished runs as hollow markers."""
    fig = Figure(figsize=(6, 4))
    ax = fig.add_subplot()
    swept = [r for r in results if r.latent_loss and r.lambda_latent > 0]
    done = [r for r in swept if r.status == run_status.FINISHED]
    other = [r for r in swept if r.status != run_status.FINISHED]
    if done:
        ax.plot([r.lambda_latent for r in done], [r.vrmse for r in done], "o", label="finished")
    if other:
        ax.plot(
            [r.lambda_latent for r in other],
            [r.vrmse for r in other],
            "o",
            mfc="none",
            label="stopped / running",
        )
    for r in (r for r in results if not r.latent_loss):
        ax.axhline(r.vrmse, ls="--", color="grey", label=f"no L_latent ({r.name})")
    ax.set_xscale("log")
    ax.set_xlabel("lambda_latent")
    ax.set_ylabel("val VRMSE (mean over rollout steps)")
    ax.set_title(title)
    ax.grid(True, which="both", alpha=0.3)
    if swept or len(results) > len(swept):
        ax.legend(fontsize="small")
    fig.tight_layout()
    return save_figure(fig, path)
