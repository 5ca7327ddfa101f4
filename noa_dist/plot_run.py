"""`noa-plot RUN_DIR`: a run's training curves from its own records, no W&B needed.

    noa-plot runs/demo                    # -> runs/demo/figures/loss_curves.png
    noa-plot runs/demo --out curves.png

Reads RUN_DIR/metrics.jsonl (noa_dist/run_status.py: one row per log point, validation and
skipped step, each with its optimizer step) and draws, against the optimizer step: the total
loss and each loss term, train (lines) and validation (markers); the learning rate; the
gradient norm with the skipped steps marked; validation VRMSE (over the validation windows and
at the long rollout's horizon, beside persistence) and the rollout's steps to VRMSE > 1. The
trainer writes the same figure at the end of every run. Exit code 0, or 2 for bad input (one
`error:` line).
"""

from __future__ import annotations

import argparse
import math
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from noa_dist import run_status
from noa_dist.atomic import describe_error
from noa_dist.errors import NoaError, OneLineErrorParser
from noa_dist.plots import save_figure

# train/* keys that are not loss terms (report.StepMeter.flush)
NOT_TERMS = {"loss", "lr", "grad_norm", "skipped_steps", "samples_per_s", "s_per_step"}
NOT_TERMS |= {"data_wait_frac", "mem_mb"}


def loss_terms(records: list[dict]) -> list[str]:
    """The loss terms logged by name in the train rows (`traj`, `commit`, ...)."""
    names = dict.fromkeys(
        key.split("/", 1)[1]
        for row in records
        if row["kind"] == "train"
        for key in row
        if key.startswith("train/")
    )
    return [n for n in names if n not in NOT_TERMS]


def series(records: list[dict], kind: str, key: str) -> tuple[np.ndarray, np.ndarray]:
    """(steps, values) of `key` over the rows of `kind` that have it (NaN where not finite)."""
    rows = [row for row in records if row["kind"] == kind and key in row]
    values = [row[key] if isinstance(row[key], int | float) else math.nan for row in rows]
    return np.array([row["step"] for row in rows], dtype=float), np.array(values, dtype=float)


def skipped_steps(records: list[dict]) -> list[int]:
    return [row["step"] for row in records if row["kind"] == "skip"]


def curves_figure(records: list[dict], title: str = "") -> Figure:
    """Six panels against the optimizer step (see the module docstring)."""
    fig = Figure(figsize=(15.0, 8.0), layout="constrained")
    axes = fig.subplots(2, 3, sharex=True)
    _lines(axes[0, 0], records, [("loss", "total")], "loss (total)")
    terms = loss_terms(records)
    _lines(axes[0, 1], records, [(t, t) for t in terms], "loss terms (unweighted)")
    _plot(axes[0, 2], *series(records, "train", "train/lr"), "learning rate", log=False)
    _grad_norm(axes[1, 0], records)
    _vrmse(axes[1, 1], records)
    _rollout_steps(axes[1, 2], records)
    for ax in axes[1]:
        ax.set_xlabel("optimizer step")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    n_val = sum(row["kind"] == "val" for row in records)
    last = max(row["step"] for row in records)
    heading = f"{title}: " if title else ""
    fig.suptitle(f"{heading}{last} steps, {n_val} validation(s)", fontsize="medium")
    return fig


def _lines(ax: Axes, records: list[dict], names: Sequence[tuple[str, str]], title: str) -> None:
    """Per (key, label): train as a line, validation as markers of the same colour."""
    for i, (key, label) in enumerate(names):
        colour = f"C{i}"
        ax.plot(*series(records, "train", f"train/{key}"), color=colour, label=f"train {label}")
        steps, values = series(records, "val", f"val/{key}")
        ax.plot(steps, values, "o--", color=colour, markersize=5, label=f"val {label}")
    _finish(ax, title, log=True, ylabel="loss")


def _plot(ax: Axes, steps, values, title: str, log: bool, **style) -> None:
    ax.plot(steps, values, **style)
    _finish(ax, title, log=log, ylabel=title)


def _grad_norm(ax: Axes, records: list[dict]) -> None:
    ax.plot(
        *series(records, "train", "train/grad_norm"), label="grad norm (mean over the log interval)"
    )
    skipped = skipped_steps(records)
    for i, step in enumerate(skipped):
        label = f"skipped step ({len(skipped)} in all)" if i == 0 else None
        ax.axvline(step, color="red", alpha=0.5, linewidth=1.0, label=label)
    _finish(ax, "gradient norm (before clipping)", log=True, ylabel="global L2 norm")


def _vrmse(ax: Axes, records: list[dict]) -> None:
    for key, label, style in (
        ("val/vrmse", "validation windows, mean over steps", "o-"),
        ("val/rollout_vrmse_at_horizon", "long rollout, at its horizon", "s-"),
        ("val/rollout_persistence_vrmse_at_horizon", "persistence, at the horizon", "s:"),
    ):
        steps, values = series(records, "val", key)
        if steps.size:
            ax.plot(steps, values, style, markersize=4, label=label)
    _finish(ax, "validation VRMSE (mean over fields)", log=True, ylabel="VRMSE")


def _rollout_steps(ax: Axes, records: list[dict]) -> None:
    horizon = series(records, "val", "val/rollout_horizon")[1]
    for key, label, style in (
        ("val/rollout_steps_to_vrmse_above_1", "model", "o-"),
        ("val/rollout_persistence_steps_to_vrmse_above_1", "persistence", "s:"),
    ):
        steps, values = series(records, "val", key)
        if steps.size:
            ax.plot(steps, values, style, markersize=4, label=label)
    title = "long rollout: steps before VRMSE > 1"
    if horizon.size:
        title += f" (of {int(horizon[-1])})"
        ax.set_ylim(0, horizon[-1] + 0.5)
    _finish(ax, title, log=False, ylabel="steps (mean over trajectories)")
    ax.yaxis.set_major_locator(MaxNLocator(integer=True))


def _finish(ax: Axes, title: str, log: bool, ylabel: str = "") -> None:
    ys = [y for line in ax.get_lines() for y in np.asarray(line.get_ydata(), dtype=float)]
    finite = [y for y in ys if math.isfinite(y)]
    if log and any(y > 0 for y in finite):
        ax.set_yscale("log")
    ax.set_title(title, fontsize="medium")
    ax.set_ylabel(ylabel)
    ax.grid(True, which="both", alpha=0.3)
    if not finite:
        ax.text(0.5, 0.5, "not recorded", ha="center", va="center", transform=ax.transAxes)
    elif ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize="x-small")


def read_run(run_dir: Path) -> list[dict]:
    """The run's rows; NoaError naming the path when it is not a run folder with records."""
    if not run_dir.is_dir():
        raise NoaError(
            f"{run_dir}: not a directory; expected a run folder (runs/<name>/) of noa_dist/train.py"
        )
    records = run_status.read_metrics(run_dir)
    path = run_dir / run_status.METRICS_LOG
    if not path.is_file():
        raise NoaError(
            f"{run_dir}: no {run_status.METRICS_LOG} in it; expected a run folder (runs/<name>/) "
            "written by noa_dist/train.py, which appends one row per log point there"
        )
    if not any(row["kind"] == "train" for row in records):
        raise NoaError(f"{path}: no training rows yet (the first is written at step --log-every)")
    return records


def build_parser() -> argparse.ArgumentParser:
    p = OneLineErrorParser(
        prog="noa-plot",
        description="A run's loss curves (total and each term, train and validation), learning "
        "rate, gradient norm and skipped steps, and validation VRMSE, from RUN_DIR/metrics.jsonl.",
    )
    p.add_argument("run_dir", metavar="RUN_DIR", help="the run folder, e.g. runs/demo")
    p.add_argument("--out", help="PNG to write (default: RUN_DIR/figures/loss_curves.png)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    run_dir = Path(args.run_dir).expanduser()
    out = Path(args.out) if args.out else run_dir / "figures" / "loss_curves.png"
    try:
        records = read_run(run_dir)
        try:
            save_figure(curves_figure(records, title=run_dir.resolve().name), out)
        except OSError as err:
            raise NoaError(f"--out {out}: cannot write it ({describe_error(err, out)})") from None
    except NoaError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    counts = {k: sum(row["kind"] == k for row in records) for k in ("train", "val", "skip")}
    print(
        f"wrote {out} ({counts['train']} log points, {counts['val']} validation(s), "
        f"{counts['skip']} skipped step(s))"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
