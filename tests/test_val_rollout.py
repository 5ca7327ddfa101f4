"""Validation's long rollout (--val-rollout-steps): noa-eval's numbers, reduced over ranks,
recorded per validation, stoppable and resumable like the rest of validation."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from dist_runs import FAULTS, STEPS
from test_stop_resume import assert_resumed_bitwise
from trainrun import launch, rank_results, train_flags

from noa_dist import run_status
from noa_dist.config import load_config
from noa_dist.errors import ConfigError
from noa_dist.evaluate import _pick_trajectories, rollout_set
from noa_dist.evaluation.cli import main as noa_eval
from noa_dist.evaluation.groups import Groups

ROLLOUT_KEYS = (
    "val/rollout_vrmse_at_horizon",
    "val/rollout_steps_to_vrmse_above_1",
    "val/rollout_persistence_vrmse_at_horizon",
    "val/rollout_persistence_steps_to_vrmse_above_1",
)


class _OneProcess:
    num_processes, process_index = 1, 0


def test_trajectories_are_taken_from_each_family_in_turn():
    member_NG = np.zeros((9, 4), dtype=bool)
    member_NG[:, 0] = True
    for i in range(9):
        member_NG[i, 1 + i % 3] = True  # the demo's order: families cycle
    groups = Groups(("all", "a", "b", "c"), member_NG, None)
    assert _pick_trajectories(groups, 4) == [0, 1, 2, 3]
    assert _pick_trajectories(groups, 20) == list(range(9))
    only_all = Groups(("all",), member_NG[:, :1], None)
    assert _pick_trajectories(only_all, 3) == [0, 4, 8]


def test_default_horizon_is_capped_by_the_stored_frames_and_a_longer_one_is_refused(
    tiny_dataset,
):
    cfg = load_config(["--dataset", str(tiny_dataset), "--timesteps", "4"])
    rollout = rollout_set(cfg, _OneProcess(), tiny_dataset)
    assert rollout.horizon == 8  # the tiny set stores 9 frames: min(32, 9 - 1)
    assert rollout.trajectories == [0, 1, 2, 3]  # the whole valid split (4 trajectories)
    off = load_config(["--dataset", str(tiny_dataset), "--val-rollout-steps", "0"])
    assert rollout_set(off, _OneProcess(), tiny_dataset) is None
    too_long = load_config(["--dataset", str(tiny_dataset), "--val-rollout-steps", "9"])
    with pytest.raises(ConfigError, match=r"--val-rollout-steps 9: .* stores 9 frames"):
        rollout_set(too_long, _OneProcess(), tiny_dataset)
    with pytest.raises(ConfigError, match="--val-rollout-steps: must be >= 0"):
        load_config(["--dataset", str(tiny_dataset), "--val-rollout-steps", "-1"])


@pytest.mark.slow
@pytest.mark.dist
def test_two_rank_validation_rollout_equals_noa_eval_of_the_same_checkpoint(ddp_faulted, tmp_path):
    """The 2-rank fault-matrix run (2 trajectories per rank): its last validation's rollout
    numbers are noa-eval's for the checkpoint saved right after it, on the same 4
    trajectories and horizon; every validation row of metrics.jsonl carries them."""
    run_dir = ddp_faulted.run_dir
    assert "Rollout: 4 trajectories x 8 steps" in ddp_faulted.stdout
    last = run_status.read_val_metrics(run_dir)
    assert last["step"] == STEPS
    checkpoint = run_dir / "checkpoints" / f"step-{STEPS:08d}"
    assert (
        noa_eval([str(checkpoint), "--split", "valid", "--out", str(tmp_path), "--frames", "0"])
        == 0
    )
    report = json.loads((tmp_path / "eval.json").read_text())
    assert report["settings"]["horizon"] == 8 and report["dataset"]["trajectories"] == 4
    group = report["groups"]["all"]
    expected = {
        "val/rollout_vrmse_at_horizon": group["per_step"]["model"]["vrmse"]["mean"][-1],
        "val/rollout_persistence_vrmse_at_horizon": group["per_step"]["persistence"]["vrmse"][
            "mean"
        ][-1],
        "val/rollout_steps_to_vrmse_above_1": group["rollout"]["steps_to_vrmse_above_1"]["model"][
            "mean"
        ],
        "val/rollout_persistence_steps_to_vrmse_above_1": group["rollout"][
            "steps_to_vrmse_above_1"
        ]["persistence"]["mean"],
    }
    for key, value in expected.items():
        assert last["metrics"][key] == pytest.approx(value, rel=1e-5, abs=1e-6), key
    val_rows = [r for r in run_status.read_metrics(run_dir) if r["kind"] == "val"]
    assert [r["step"] for r in val_rows] == [3, 6, 9]
    assert all(math.isfinite(r[key]) for r in val_rows for key in ROLLOUT_KEYS)
    assert val_rows[-1]["val/rollout_horizon"] == 8


@pytest.mark.slow
@pytest.mark.dist
def test_a_stop_during_the_long_rollout_saves_and_the_resume_validates_bitwise(
    tiny_dataset, tmp_path, ddp_straight
):
    """A signal reaching rank 1 as the first validation's rollout begins: every rank leaves
    at the same rollout batch, saves at step 6 and stops before any validation row is
    written; the resumed run redoes that validation, so weights, history and records equal
    the straight run's."""
    flags = train_flags(tiny_dataset, tmp_path / "runs", "--epochs", "2")
    env = {"NOA_TEST_STOP_IN_ROLLOUT": "1:1"}
    output = launch(2, flags, tmp_path / "stopped", env=env).stdout
    run_dir = tmp_path / "runs" / "run"
    marker = json.loads((run_dir / "STOPPED").read_text())
    assert marker["reason"] == "SIGUSR1" and marker["step"] == 6, output[-3000:]
    assert "Rollout:" not in output
    assert not [r for r in run_status.read_metrics(run_dir) if r["kind"] == "val"]
    resumed = launch(2, [*flags, "--resume", "auto"], tmp_path / "resumed").stdout
    assert resumed.count("Rollout: 4 trajectories x 8 steps") == 2, resumed[-3000:]
    assert_resumed_bitwise(rank_results(tmp_path / "resumed", 2), ddp_straight)
    rows = run_status.read_metrics(run_dir)
    assert [r["step"] for r in rows if r["kind"] == "train"] == list(range(1, 13))
    assert [r["step"] for r in rows if r["kind"] == "val"] == [6, 12]


def test_fault_matrix_constants_are_what_the_rollout_tests_assume():
    assert STEPS == 9 and sorted(FAULTS) == [2, 4, 6, 8]
