"""`noa-plot RUN_DIR` and the run's records (metrics.jsonl): what is drawn is what was
recorded, resumes leave no duplicate rows, bad input is one error line."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
from trainrun import REPO, env_for_test, launch, train_flags

from noa_dist import plot_run, run_status

TRAIN = REPO / "noa_dist" / "train.py"


def _records() -> list[dict]:
    rows = []
    for step in range(1, 11):
        if step == 4:
            rows.append({"kind": "skip", "step": 4, "reason": "traj"})
        loss = float("nan") if step == 4 else 1.0 / step
        rows.append(
            {
                "kind": "train",
                "step": step,
                "epoch": (step - 1) // 5,
                "train/loss": loss,
                "train/traj": loss,
                "train/commit": loss / 2,
                "train/lr": 1e-3 * step,
                "train/grad_norm": 2.0 / step,
                "train/skipped_steps": float(step >= 4),
            }  # fmt: skip
        )
        if step % 5 == 0:
            rows.append(
                {
                    "kind": "val",
                    "step": step,
                    "val/loss": 0.5 / step,
                    "val/traj": 0.4 / step,
                    "val/commit": 0.1 / step,
                    "val/vrmse": 0.3,
                    "val/rollout_horizon": 8.0,
                    "val/rollout_vrmse_at_horizon": 0.9,
                    "val/rollout_steps_to_vrmse_above_1": 6.5,
                    "val/rollout_persistence_vrmse_at_horizon": 1.1,
                    "val/rollout_persistence_steps_to_vrmse_above_1": 5.0,
                }  # fmt: skip
            )
    return rows


def _lines(ax) -> dict:
    return {line.get_label(): line for line in ax.get_lines()}


def _check_figure_against_records(fig, records: list[dict]) -> None:
    """Every drawn series is the records' values at their optimizer steps."""
    total, terms, lr, grad, vrmse, _ = fig.axes[:6]
    assert total.get_yscale() == "log" and grad.get_yscale() == "log"
    for ax, label, kind, key in (
        (total, "train total", "train", "train/loss"),
        (total, "val total", "val", "val/loss"),
        (terms, "train traj", "train", "train/traj"),
        (terms, "val traj", "val", "val/traj"),
        (lr, None, "train", "train/lr"),
        (grad, "grad norm (mean over the log interval)", "train", "train/grad_norm"),
    ):
        line = _lines(ax)[label] if label else ax.get_lines()[0]
        rows = [r for r in records if r["kind"] == kind]
        assert list(line.get_xdata()) == [r["step"] for r in rows], (label, key)
        np.testing.assert_array_equal(line.get_ydata(), [r[key] for r in rows])
    skips = [r["step"] for r in records if r["kind"] == "skip"]
    marks = [ln for ln in grad.get_lines() if ln.get_label() != _lines(grad).get("x")]
    vertical = [ln.get_xdata()[0] for ln in marks if len(set(ln.get_xdata())) == 1]
    assert vertical == skips
    val_rows = [r for r in records if r["kind"] == "val"]
    if "val/rollout_vrmse_at_horizon" in val_rows[-1]:
        line = _lines(vrmse)["long rollout, at its horizon"]
        assert list(line.get_ydata()) == [r["val/rollout_vrmse_at_horizon"] for r in val_rows]
    for ax in fig.axes[3:6]:
        assert ax.get_xlabel() == "optimizer step"


def test_curves_figure_draws_the_records_on_one_step_axis():
    records = _records()
    fig = plot_run.curves_figure(records, title="demo")
    _check_figure_against_records(fig, records)
    assert set(_lines(fig.axes[1])) == {"train traj", "val traj", "train commit", "val commit"}
    assert fig.get_suptitle() == "demo: 10 steps, 2 validation(s)"
    assert _lines(fig.axes[3])["skipped step (1 in all)"].get_xdata()[0] == 4


def test_records_keep_rows_up_to_the_resumed_step_and_drop_a_torn_line(tmp_path):
    for step in range(1, 11):
        run_status.append_metrics(tmp_path, "train", step, {"train/loss": 1.0 / step})
    with open(tmp_path / run_status.METRICS_LOG, "a") as f:
        f.write('{"kind": "train", "st')  # a crash in the middle of a write
    assert [r["step"] for r in run_status.read_metrics(tmp_path)] == list(range(1, 11))
    run_status.truncate_metrics(tmp_path, 6)
    run_status.append_metrics(tmp_path, "train", 7, {"train/loss": 0.5})
    rows = run_status.read_metrics(tmp_path)
    assert [r["step"] for r in rows] == list(range(1, 8)) and rows[-1]["train/loss"] == 0.5
    text = (tmp_path / run_status.METRICS_LOG).read_text()
    assert all(json.loads(line) for line in text.splitlines())  # no torn line left


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda p: p / "missing", "not a directory; expected a run folder"),
        (lambda p: p, "no metrics.jsonl in it; expected a run folder"),
        (lambda p: [(p / "metrics.jsonl").write_text(""), p][1], "no training rows yet"),
    ],
)
def test_bad_run_dir_is_one_error_line_with_exit_code_2(tmp_path, capsys, make, message):
    run_dir = make(tmp_path)
    assert plot_run.main([str(run_dir)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(f"error: {run_dir}") and message in err


def test_the_console_script_reports_a_non_run_folder_without_traceback(tmp_path):
    res = subprocess.run(
        ["noa-plot", str(tmp_path)], capture_output=True, text=True, env=env_for_test(tmp_path)
    )
    assert res.returncode == 2 and "Traceback" not in res.stderr
    assert res.stderr == (
        f"error: {tmp_path}: no metrics.jsonl in it; expected a run folder (runs/<name>/) "
        "written by noa_dist/train.py, which appends one row per log point there\n"
    )


@pytest.mark.slow
def test_a_resumed_run_records_each_step_once_and_noa_plot_draws_those_records(
    tiny_dataset, tmp_path
):
    """A real run stopped at step 7 (checkpoint 7) whose records then gain a row of step 9 (a
    crash after logging it); the resume drops it and carries on: each optimizer step once, a
    validation row at each epoch end, the injected skip, and noa-plot's figure is them."""
    flags = train_flags(
        tiny_dataset, tmp_path / "runs", "--epochs", "2", "--debug-inject-nan", "0:3"
    )
    launch(1, [*flags, "--stop-at-step", "7"], tmp_path / "first", script=TRAIN)
    run_dir = tmp_path / "runs" / "run"
    run_status.append_metrics(run_dir, "train", 9, {"train/loss": 123.0})
    launch(1, [*flags, "--resume", "auto"], tmp_path / "second", script=TRAIN)
    records = run_status.read_metrics(run_dir)
    steps_per_epoch = 12  # 12 train trajectories x 2 windows of 4 steps, batch 2, one process
    assert json.loads((run_dir / "FINISHED").read_text())["step"] == 2 * steps_per_epoch
    train_steps = [r["step"] for r in records if r["kind"] == "train"]
    assert train_steps == list(range(1, 2 * steps_per_epoch + 1))
    assert 123.0 not in [r["train/loss"] for r in records if r["kind"] == "train"]
    assert [r["step"] for r in records if r["kind"] == "skip"] == [3]
    val_rows = [r for r in records if r["kind"] == "val"]
    assert [r["step"] for r in val_rows] == [steps_per_epoch, 2 * steps_per_epoch]
    assert [r["epoch"] for r in val_rows] == [0, 1]
    res = subprocess.run(
        [sys.executable, "-m", "noa_dist.plot_run", str(run_dir), "--out", str(tmp_path / "c.png")],
        capture_output=True, text=True, env=env_for_test(tmp_path), cwd=REPO,
    )  # fmt: skip
    assert res.returncode == 0, res.stderr
    assert (tmp_path / "c.png").stat().st_size > 20_000
    _check_figure_against_records(plot_run.curves_figure(records), records)
    assert (run_dir / "figures" / "loss_curves.png").stat().st_size > 20_000  # the trainer's
