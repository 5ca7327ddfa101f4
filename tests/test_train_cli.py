"""The real training command end to end, single process: output, W&B run, errors, aborts."""

from __future__ import annotations

import math
import subprocess
import sys

import pytest
import torch
from trainrun import (
    REPO,
    WORKER,
    env_for_test,
    launch,
    make_tiny_dataset,
    rank_results,
    train_flags,
)
from wandb_read import find_offline_runs, read_run

TRAIN = REPO / "noa_dist" / "train.py"
pytestmark = pytest.mark.timeout(600)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return make_tiny_dataset(tmp_path_factory.mktemp("data") / "tiny")


def train_cli(
    args: list[str], tmp_path, *, env_extra: dict[str, str] | None = None
) -> subprocess.CompletedProcess:
    env = env_for_test(tmp_path) | (env_extra or {})
    return subprocess.run(
        [sys.executable, str(TRAIN), *args],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=500,
    )


@pytest.mark.slow
def test_training_command_logs_a_readable_offline_wandb_run_with_decreasing_loss(dataset, tmp_path):
    out = tmp_path / "runs"
    flags = train_flags(
        dataset, out, "--epochs", "3", "--lr", "3e-3", "--tbptt-mode", "all-windows"
    )
    flags[flags.index("--wandb-mode") + 1] = "offline"
    run = launch(1, [*flags], tmp_path, script=TRAIN)
    assert "Training finished: 36 steps" in run.stdout and "vs persistence" in run.stdout
    run_dir = out / "run"
    segments = find_offline_runs(run_dir / "wandb")
    assert len(segments) == 1
    steps, losses = read_run(segments[0]).series("train/loss")
    assert len(losses) == 36 and all(math.isfinite(v) for v in losses)
    first, last = sum(losses[:8]) / 8, sum(losses[-8:]) / 8
    assert last < 0.8 * first, (
        f"loss did not decrease: first 8 steps {first:.4f}, last 8 {last:.4f}"
    )
    assert read_run(segments[0]).config["optim"]["lr"] == 3e-3
    figures = run_dir / "figures"
    for name in ("loss_curves.png", "vrmse_per_step_epoch003.png", "spectra_epoch003.png"):
        assert (figures / name).stat().st_size > 1000
    rollouts = sorted(p.name for p in figures.glob("rollout_epoch003_*.png"))
    assert rollouts == [  # one per family of the long rollout's trajectories (--frames)
        "rollout_epoch003_advection_diffusion_0000.png",
        "rollout_epoch003_allen_cahn_0001.png",
        "rollout_epoch003_navier_stokes_0002.png",
    ]
    exported = torch.load(run_dir / "best_model.pt", weights_only=True)
    assert "delta_scale" in exported["model"]


def test_invalid_configuration_is_reported_all_at_once_without_traceback(dataset, tmp_path):
    res = train_cli(
        [
            "--dataset",
            str(dataset),
            "--timesteps",
            "0",
            "--lr",
            "-1",
            "--tbptt-mode",
            "sideways",
            "--bptt-window",
            "3",
        ],
        tmp_path,
    )
    assert res.returncode == 2
    assert "Traceback" not in res.stderr
    for expected in (
        "--timesteps: must be >= 1",
        "--lr: must be > 0",
        "--tbptt-mode: expected one of",
    ):
        assert expected in res.stderr


def test_config_that_does_not_fit_the_data_names_the_flag_and_the_stored_length(dataset, tmp_path):
    res = train_cli(
        [
            "--dataset",
            str(dataset),
            "--timesteps",
            "20",
            "--bptt-window",
            "4",
            "--encoder-levels",
            "5",
            "--wandb-mode",
            "disabled",
        ],
        tmp_path,
    )
    assert res.returncode == 2 and "Traceback" not in res.stderr
    assert "--timesteps 20 needs 21 frames" in res.stderr and "stores 9" in res.stderr
    assert "not divisible by 2**encoder_levels = 32" in res.stderr


def test_long_rollout_without_window_warns_with_the_flag_to_add(dataset, tmp_path):
    from noa_dist.rollout import bptt_warning

    assert "--bptt-window 32" in bptt_warning(256, None)


def test_consecutive_skips_stop_training_with_a_diagnosis_and_a_checkpoint(dataset, tmp_path):
    out = tmp_path / "runs"
    flags = train_flags(
        dataset,
        out,
        "--epochs",
        "1",
        "--debug-inject-nan",
        "0:2:grad",
        "--max-consecutive-skips",
        "1",
    )
    res = train_cli(flags, tmp_path)
    assert res.returncode == 1  # the run failed (2 is for bad input)
    assert "1 consecutive steps skipped (step 2)" in res.stderr
    assert "last good state is saved at" in res.stderr
    assert (out / "run" / "checkpoints" / "step-00000002" / "COMPLETE").exists()


@pytest.mark.slow
def test_single_process_run_under_accelerate_launch_matches_plain_python(dataset, tmp_path):
    flags = train_flags(dataset, tmp_path / "a", "--epochs", "1")
    launch(1, flags, tmp_path / "launched")
    (launched,) = rank_results(tmp_path / "launched", 1)
    plain = subprocess.run(
        [sys.executable, str(WORKER), *train_flags(dataset, tmp_path / "b", "--epochs", "1")],
        cwd=REPO,
        env=env_for_test(tmp_path / "launched"),
        capture_output=True,
        text=True,
    )
    assert plain.returncode == 0, plain.stderr[-3000:]
    (direct,) = rank_results(tmp_path / "launched", 1)
    for name, value in launched["params"].items():
        assert torch.equal(value, direct["params"][name]), name


def test_init_from_an_export_loads_its_weights_and_starts_a_fresh_schedule(dataset, tmp_path):
    first = train_cli(train_flags(dataset, tmp_path / "a", "--epochs", "1"), tmp_path)
    assert first.returncode == 0, first.stderr[-3000:]
    exported = tmp_path / "a" / "run" / "best_model.pt"
    flags = train_flags(dataset, tmp_path / "b", "--epochs", "1", "--init-from", str(exported))
    second = train_cli(flags, tmp_path)
    assert second.returncode == 0, second.stderr[-3000:]
    assert f"Initialised model weights from {exported}" in second.stdout
    assert "Resuming" not in second.stdout
