"""DeepSpeed ZeRO-2/3 on two CPU processes (gloo): skip-together, resume, agreement with DDP."""

from __future__ import annotations

import pytest
from trainrun import (
    assert_same_params,
    launch,
    make_tiny_dataset,
    max_abs_diff,
    rank_results,
    train_flags,
    zero_launch,
)

pytest.importorskip("deepspeed")
pytestmark = [pytest.mark.dist, pytest.mark.slow, pytest.mark.deepspeed, pytest.mark.timeout(900)]


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return make_tiny_dataset(tmp_path_factory.mktemp("data") / "tiny")


def run(dataset, out, stage: int | None, *extra: str) -> list[dict]:
    launch(2, train_flags(dataset, out / "runs", "--epochs", "1", *extra), out,
           extra_launch=zero_launch(stage) if stage else [])
    return rank_results(out, 2)


@pytest.fixture(scope="module")
def ddp_reference(dataset, tmp_path_factory):
    return run(dataset, tmp_path_factory.mktemp("ddp"), None)


@pytest.mark.parametrize("stage", [2, 3])
def test_zero_nan_gradient_on_one_rank_skips_on_all_ranks_like_a_skipped_step(dataset, tmp_path, stage):
    grad_nan = run(dataset, tmp_path / "grad", stage, "--debug-inject-nan", "1:3:grad")
    for r in grad_nan:
        assert r["state"]["history"]["skipped"] == [3] and r["state"]["applied_steps"] == 5
    # The reference: the same run whose step 3 is skipped before backward (non-finite loss).
    loss_nan = run(dataset, tmp_path / "loss", stage, "--debug-inject-nan", "1:3:loss")
    assert loss_nan[0]["state"]["history"]["skipped"] == [3]
    assert_same_params(grad_nan[0]["params"], loss_nan[0]["params"])
    if stage == 2:  # ZeRO-2 keeps full parameters on every rank
        assert_same_params(grad_nan[0]["params"], grad_nan[1]["params"])


@pytest.mark.parametrize("stage", [2, 3])
def test_zero_stop_and_resume_matches_a_straight_run(dataset, tmp_path, stage):
    straight = run(dataset, tmp_path / "straight", stage)
    flags = ["--run-name", "resumed"]
    run(dataset, tmp_path / "first", stage, *flags, "--stop-at-step", "3")
    resumed = run(dataset, tmp_path / "first", stage, *flags, "--resume", "auto")
    assert resumed[0]["state"]["global_step"] == 6
    diff = max_abs_diff(straight[0]["params"], resumed[0]["params"])
    print(f"ZeRO-{stage} resume vs straight: max abs diff {diff:.3e}")
    assert diff == 0.0
    assert resumed[0]["state"]["history"]["train_loss"] == straight[0]["state"]["history"]["train_loss"]


def test_ddp_zero2_zero3_reach_the_same_parameters(dataset, tmp_path, ddp_reference):
    for stage in (2, 3):
        zero = run(dataset, tmp_path / f"zero{stage}", stage)
        diff = max_abs_diff(ddp_reference[0]["params"], zero[0]["params"])
        print(f"DDP vs ZeRO-{stage}: max abs diff {diff:.3e}")
        assert diff < 1e-5
