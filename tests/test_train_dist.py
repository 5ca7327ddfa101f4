"""Two-process training over gloo on CPU (accelerate launch --multi_gpu --num_processes 2),
with the shipped default of one DataLoader worker per rank."""

from __future__ import annotations

import pytest
from dist_runs import FAULTS, STEPS, same_floats
from trainrun import (
    assert_same_params,
    kill_tree,
    launch,
    rank_results,
    run_until,
    train_flags,
)

pytestmark = [pytest.mark.dist, pytest.mark.slow, pytest.mark.timeout(900)]

STEPS_PER_EPOCH = 6  # 24 training windows / (batch 2 x 2 ranks)


def test_two_ranks_see_disjoint_data_and_end_with_identical_parameters(ddp_straight):
    r0, r1 = ddp_straight
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


def test_faults_in_window_k_micro_step_k_and_gradients_skip_as_if_the_step_never_happened(
    ddp_faulted, ddp_reference
):
    stdout, ranks = ddp_faulted.stdout, ddp_faulted.ranks
    for faulted, reference in zip(ranks, ddp_reference.ranks, strict=True):
        assert faulted["state"]["history"]["skipped"] == list(FAULTS)
        assert faulted["state"]["applied_steps"] == reference["state"]["applied_steps"] == 5
        assert_same_params(faulted["params"], reference["params"])  # bitwise
        for key in ("train_loss", "val_loss"):
            assert same_floats(faulted["state"]["history"][key], reference["state"]["history"][key])
    assert_same_params(ranks[0]["params"], ranks[1]["params"])
    assert (
        "step 2, skipping update on all ranks: non-finite loss on rank 1 micro-step 1, window 2 of 2: traj=nan"
        in stdout
    )
    assert (
        "step 4, skipping update on all ranks: non-finite loss on rank 1 micro-step 1, window 1 of 2"
        in stdout
    )
    assert (
        "step 6, skipping update on all ranks: non-finite gradients after the all-reduce" in stdout
    )
    assert (
        "step 8, skipping update on all ranks: non-finite loss on rank 1 micro-step 2, window 2 of 2"
        in stdout
    )


def test_one_gradient_allreduce_one_collective_and_one_host_read_per_step(ddp_faulted):
    """DDP's no_sync covers the forward and backward of every window but the step's last."""
    for rank in ddp_faulted.ranks:
        counts = rank["counts"]
        assert len(counts) == STEPS
        applied = [c for step, c in enumerate(counts, start=1) if step not in FAULTS]
        print(f"rank {rank['rank']} per-step counts (applied steps): {applied[0]}")
        assert all(c.get("gradient_allreduces") == 1 for c in counts)  # tiny model: one bucket
        assert all(
            c == {"gradient_allreduces": 1, "collectives": 1, "host_reads": 1} for c in applied
        )


def test_stop_and_resume_auto_is_bitwise_identical_to_a_ddp_straight(
    tiny_dataset, tmp_path, ddp_straight
):
    flags = train_flags(tiny_dataset, tmp_path / "runs", "--epochs", "2")
    first = launch(2, [*flags, "--stop-at-step", str(STEPS_PER_EPOCH + 2)], tmp_path / "first")
    assert "Stopped (stop-at-step)" in first.stdout
    second = launch(2, [*flags, "--resume", "auto"], tmp_path / "second")
    assert "Will skip first 2 batches of epoch 2" in second.stdout
    resumed = rank_results(tmp_path / "second", 2)
    for ref, res in zip(ddp_straight, resumed, strict=True):
        assert_same_params(ref["params"], res["params"])
        assert res["state"]["history"]["train_loss"] == ref["state"]["history"]["train_loss"]
        assert res["state"]["history"]["val_loss"] == ref["state"]["history"]["val_loss"]
    assert len(resumed[0]["seen"]) == (STEPS_PER_EPOCH - 2) * 2, (
        "resume reads only the remaining batches"
    )


def test_sigkill_mid_checkpoint_resumes_from_previous_complete_one_bitwise(
    tiny_dataset, tmp_path, ddp_straight
):
    flags = train_flags(tiny_dataset, tmp_path / "runs", "--epochs", "2", "--save-every", "2")
    run_until(
        [*flags, "--debug-hang-in-save", "4"],
        tmp_path / "killed",
        "hanging inside the checkpoint save of step 4",
        kill_tree,
    )
    ckpts = tmp_path / "runs" / "run" / "checkpoints"
    assert (ckpts / ".step-00000004.tmp").is_dir(), "the killed save left its temp folder"
    assert not (ckpts / "step-00000004").exists()
    resumed = launch(2, [*flags, "--resume", "auto"], tmp_path / "second")
    assert "Resuming from checkpoint" in resumed.stdout and "step-00000002" in resumed.stdout
    for ref, res in zip(ddp_straight, rank_results(tmp_path / "second", 2), strict=True):
        assert_same_params(ref["params"], res["params"])
        assert res["state"]["history"]["train_loss"] == ref["state"]["history"]["train_loss"]
