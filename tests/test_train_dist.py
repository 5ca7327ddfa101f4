"""Two-process training over gloo on CPU (accelerate launch --multi_gpu --num_processes 2)."""

from __future__ import annotations

import pytest
import torch
from trainrun import (
    assert_same_params,
    launch,
    launch_and_kill_when,
    make_tiny_dataset,
    rank_results,
    train_flags,
)

pytestmark = [pytest.mark.dist, pytest.mark.slow, pytest.mark.timeout(900)]

STEPS_PER_EPOCH = 6  # 24 training windows / (batch 2 x 2 ranks)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return make_tiny_dataset(tmp_path_factory.mktemp("data") / "tiny")


@pytest.fixture(scope="module")
def straight_run(dataset, tmp_path_factory):
    """Two epochs without interruption: the reference for the resume tests."""
    out = tmp_path_factory.mktemp("straight")
    launch(2, train_flags(dataset, out / "runs", "--epochs", "2"), out)
    return rank_results(out, 2)


def test_two_ranks_see_disjoint_data_and_end_with_identical_parameters(straight_run):
    r0, r1 = straight_run
    per_epoch = STEPS_PER_EPOCH * 2  # samples per rank per epoch
    for epoch in range(2):
        seen0 = r0["seen"][epoch * per_epoch : (epoch + 1) * per_epoch]
        seen1 = r1["seen"][epoch * per_epoch : (epoch + 1) * per_epoch]
        assert len(seen0) == len(seen1) == per_epoch
        assert set(seen0).isdisjoint(seen1), f"epoch {epoch}: ranks trained on the same samples"
        assert len(set(seen0) | set(seen1)) == 24, "the epoch must cover every window exactly once"
    assert r0["seen"][:per_epoch] != r0["seen"][per_epoch:], "each epoch has its own order"
    assert r0["state"]["applied_steps"] == 2 * STEPS_PER_EPOCH
    assert_same_params(r0["params"], r1["params"])


@pytest.mark.parametrize("target", ["loss", "grad"])
def test_nan_on_one_rank_skips_that_step_on_all_ranks(dataset, tmp_path, target):
    out = tmp_path
    run = launch(
        2,
        train_flags(dataset, out / "runs", "--epochs", "1", "--debug-inject-nan", f"1:3:{target}"),
        out,
    )
    r0, r1 = rank_results(out, 2)
    for r in (r0, r1):
        assert r["state"]["history"]["skipped"] == [3]
        assert r["state"]["skipped_steps"] == 1
        assert r["state"]["global_step"] == STEPS_PER_EPOCH  # training went on to the end
        assert r["state"]["applied_steps"] == STEPS_PER_EPOCH - 1
        assert all(torch.isfinite(p).all() for p in r["params"].values())
    assert_same_params(r0["params"], r1["params"])
    assert "skipping update on all ranks" in run.stdout and "rank 1" in run.stdout


def test_stop_and_resume_auto_is_bitwise_identical_to_a_straight_run(
    dataset, tmp_path, straight_run
):
    flags = train_flags(dataset, tmp_path / "runs", "--epochs", "2")
    first = launch(2, [*flags, "--stop-at-step", str(STEPS_PER_EPOCH + 2)], tmp_path / "first")
    assert "Stopped (stop-at-step)" in first.stdout
    second = launch(2, [*flags, "--resume", "auto"], tmp_path / "second")
    assert "Will skip first 2 batches of epoch 2" in second.stdout
    resumed = rank_results(tmp_path / "second", 2)
    for ref, res in zip(straight_run, resumed, strict=True):
        assert_same_params(ref["params"], res["params"])
        assert res["state"]["history"]["train_loss"] == ref["state"]["history"]["train_loss"]
        assert res["state"]["history"]["val_loss"] == ref["state"]["history"]["val_loss"]
    assert len(resumed[0]["seen"]) == (STEPS_PER_EPOCH - 2) * 2, (
        "resume reads only the remaining batches"
    )


def test_sigkill_mid_checkpoint_resumes_from_previous_complete_one_bitwise(
    dataset, tmp_path, straight_run
):
    flags = train_flags(dataset, tmp_path / "runs", "--epochs", "2", "--save-every", "2")
    launch_and_kill_when(
        2,
        [*flags, "--debug-hang-in-save", "4"],
        tmp_path / "killed",
        marker="hanging inside the checkpoint save of step 4",
    )
    ckpts = tmp_path / "runs" / "run" / "checkpoints"
    assert (ckpts / ".step-00000004.tmp").is_dir(), "the killed save left its temp folder"
    assert not (ckpts / "step-00000004").exists()
    resumed = launch(2, [*flags, "--resume", "auto"], tmp_path / "second")
    assert "Resuming from checkpoint" in resumed.stdout and "step-00000002" in resumed.stdout
    for ref, res in zip(straight_run, rank_results(tmp_path / "second", 2), strict=True):
        assert_same_params(ref["params"], res["params"])
        assert res["state"]["history"]["train_loss"] == ref["state"]["history"]["train_loss"]
