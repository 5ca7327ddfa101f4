"""DeepSpeed ZeRO-2/3 on two CPU processes (gloo): skip-together, resume, agreement with DDP.

Per stage, four real launches are shared by the tests: a straight run whose step 3 gets a
NaN gradient on rank 1, the same run with a NaN loss at step 3 instead (skipped before
backward: the reference for "as if the step never happened"), and a run stopped at step 4
then resumed with --resume auto.
"""

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
pytestmark = [pytest.mark.dist, pytest.mark.slow, pytest.mark.deepspeed, pytest.mark.timeout(1200)]

GRAD_NAN = ["--debug-inject-nan", "1:3:grad"]


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return make_tiny_dataset(tmp_path_factory.mktemp("data") / "tiny")


def run(dataset, out, stage: int | None, *extra: str) -> list[dict]:
    launch(
        2,
        train_flags(dataset, out / "runs", "--epochs", "1", *extra),
        out,
        extra_launch=zero_launch(stage) if stage else [],
    )
    return rank_results(out, 2)


@pytest.fixture(scope="module", params=[2, 3], ids=["zero2", "zero3"])
def zero(request, dataset, tmp_path_factory):
    stage = request.param
    out = tmp_path_factory.mktemp(f"zero{stage}")
    runs = {"stage": stage}
    runs["grad_nan"] = run(dataset, out / "grad", stage, *GRAD_NAN)
    runs["loss_nan"] = run(dataset, out / "loss", stage, "--debug-inject-nan", "1:3:loss")
    resume_flags = ["--run-name", "resumed", *GRAD_NAN]
    runs["first"] = run(dataset, out / "first", stage, *resume_flags, "--stop-at-step", "4")
    runs["resumed"] = run(dataset, out / "first", stage, *resume_flags, "--resume", "auto")
    return runs


@pytest.fixture(scope="module")
def ddp_grad_nan(dataset, tmp_path_factory):
    return run(dataset, tmp_path_factory.mktemp("ddp"), None, *GRAD_NAN)


def test_zero_nan_gradient_on_one_rank_skips_the_step_on_all_ranks(zero):
    for r in zero["grad_nan"]:
        assert r["state"]["history"]["skipped"] == [3]
        assert r["state"]["applied_steps"] == 5 and r["state"]["global_step"] == 6
    if zero["stage"] == 2:  # ZeRO-2 keeps full parameters on every rank
        assert_same_params(zero["grad_nan"][0]["params"], zero["grad_nan"][1]["params"])


def test_zero_overflow_skip_leaves_the_same_parameters_as_skipping_before_backward(zero):
    assert zero["loss_nan"][0]["state"]["history"]["skipped"] == [3]
    assert_same_params(zero["grad_nan"][0]["params"], zero["loss_nan"][0]["params"])


def test_zero_stop_and_resume_is_bitwise_identical_to_a_straight_run(zero):
    assert zero["first"][0]["stopped_by"] == "stop-at-step"
    resumed, straight = zero["resumed"][0], zero["grad_nan"][0]
    assert resumed["state"]["global_step"] == 6
    assert_same_params(straight["params"], resumed["params"])
    assert resumed["state"]["history"]["train_loss"] == straight["state"]["history"]["train_loss"]
    assert resumed["state"]["history"]["skipped"] == [3]


def test_ddp_and_zero_reach_the_same_parameters(zero, ddp_grad_nan):
    diff = max_abs_diff(ddp_grad_nan[0]["params"], zero["grad_nan"][0]["params"])
    print(f"DDP vs ZeRO-{zero['stage']}: max abs parameter difference {diff:.3e}")
    assert diff < 1e-5


def test_all_windows_mode_steps_once_per_batch_under_zero2_like_ddp(dataset, tmp_path):
    """Several backward passes per batch: DeepSpeed must not step its engine after each window."""
    flags = ["--tbptt-mode", "all-windows"]  # T=4, W=2: two windows per batch
    ddp = run(dataset, tmp_path / "ddp", None, *flags)
    zero2 = run(dataset, tmp_path / "zero2", 2, *flags)
    assert zero2[0]["state"]["applied_steps"] == ddp[0]["state"]["applied_steps"] == 6
    diff = max_abs_diff(ddp[0]["params"], zero2[0]["params"])
    print(f"all-windows DDP vs ZeRO-2: max abs parameter difference {diff:.3e}")
    assert diff < 1e-5
