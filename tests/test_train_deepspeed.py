"""DeepSpeed ZeRO-2/3 on two CPU processes (gloo), with the shipped default DataLoader worker.

Per stage, four launches shared by the tests: the fault matrix of tests/dist_runs.py (a NaN
in window 2 of 2, on micro-step 1 of 2, a NaN gradient on one rank, NaN loss and gradient at
once), the reference run that skips the same steps before any backward, and the fault matrix
stopped mid-epoch then resumed with --resume auto. Plus --init-from under DDP and ZeRO-2/3.
"""

from __future__ import annotations

import pytest
import torch
from dist_runs import FAULTS, STEPS, fault_run, same_floats
from trainrun import (
    assert_same_params,
    launch,
    max_abs_diff,
    rank_results,
    train_flags,
    zero_launch,
)

from noa_dist.checkpoint import load_model_weights

pytest.importorskip("deepspeed")
pytestmark = [pytest.mark.dist, pytest.mark.slow, pytest.mark.deepspeed, pytest.mark.timeout(1800)]


@pytest.fixture(scope="module", params=[2, 3], ids=["zero2", "zero3"])
def zero(request, tiny_dataset, tmp_path_factory):
    stage = request.param
    out = tmp_path_factory.mktemp(f"zero{stage}")
    resume = ["--run-name", "resumed"]
    first = fault_run(tiny_dataset, out / "pair", stage, extra=[*resume, "--stop-at-step", "5"])
    return {
        "stage": stage,
        "faulted": fault_run(tiny_dataset, out / "faulted", stage),
        "reference": fault_run(tiny_dataset, out / "reference", stage, reference=True),
        "first": first,
        "resumed": fault_run(
            tiny_dataset, out / "pair", stage, extra=[*resume, "--resume", "auto"]
        ),
    }


def test_zero_skips_every_fault_kind_on_all_ranks_as_if_the_step_never_happened(zero):
    faulted, reference = zero["faulted"], zero["reference"]
    for rank in faulted.ranks:
        assert rank["state"]["history"]["skipped"] == list(FAULTS)
        assert rank["state"]["applied_steps"] == STEPS - len(FAULTS)
    diff = max_abs_diff(faulted.ranks[0]["params"], reference.ranks[0]["params"])
    print(
        f"ZeRO-{zero['stage']} faulted vs reference skips: max abs parameter difference {diff:.3e}"
    )
    assert diff == 0.0  # the same engine, the same math: ZeRO's overflow path left nothing behind
    assert same_floats(
        faulted.ranks[0]["state"]["history"]["train_loss"],
        reference.ranks[0]["state"]["history"]["train_loss"],
    )
    if zero["stage"] == 2:  # ZeRO-2 keeps full parameters on every rank
        assert_same_params(faulted.ranks[0]["params"], faulted.ranks[1]["params"])
    assert "non-finite loss on rank 1 micro-step 1, window 2 of 2: traj=nan" in faulted.stdout
    assert "step 6, skipping update on all ranks: non-finite gradients" in faulted.stdout


def test_zero_and_ddp_reach_the_same_parameters_through_the_same_faults(zero, ddp_faulted):
    diff = max_abs_diff(ddp_faulted.ranks[0]["params"], zero["faulted"].ranks[0]["params"])
    print(f"DDP vs ZeRO-{zero['stage']} (fault matrix): max abs parameter difference {diff:.3e}")
    assert diff < 1e-5


def test_zero_step_makes_one_collective_and_one_host_read_of_ours(zero):
    for rank in zero["faulted"].ranks:
        applied = [c for step, c in enumerate(rank["counts"], start=1) if step not in FAULTS]
        assert all(c == {"collectives": 1, "host_reads": 1} for c in applied), applied[0]


def test_zero_stop_mid_epoch_and_resume_is_bitwise_identical_to_a_straight_run(zero):
    assert zero["first"].ranks[0]["stopped_by"] == "stop-at-step"
    assert zero["first"].ranks[0]["state"]["global_step"] == 5  # mid-epoch 2 (steps 4-6)
    resumed, straight = zero["resumed"].ranks[0], zero["faulted"].ranks[0]
    assert resumed["state"]["global_step"] == STEPS
    assert_same_params(straight["params"], resumed["params"])
    assert resumed["state"]["history"]["skipped"] == list(FAULTS)
    assert same_floats(
        resumed["state"]["history"]["train_loss"], straight["state"]["history"]["train_loss"]
    )


@pytest.mark.parametrize("stage", [None, 2, 3], ids=["ddp", "zero2", "zero3"])
def test_init_from_loads_the_weights_before_prepare_so_they_survive_the_first_step(
    stage, ddp_faulted, tiny_dataset, tmp_path
):
    """ZeRO-1/2 copy the weights into their fp32 master in prepare: loading after it was undone
    by the first step (and ZeRO-3 had partitioned the parameters already)."""
    best = ddp_faulted.run_dir / "best"
    flags = ["--init-from", str(best), "--lr", "1e-12", "--warmup-steps", "0", "--max-steps", "1"]
    launch(
        2,
        train_flags(tiny_dataset, tmp_path / "runs", "--epochs", "1", *flags),
        tmp_path,
        extra_launch=zero_launch(stage) if stage else [],
    )
    loaded, _ = load_model_weights(best)
    final = rank_results(tmp_path, 2)[0]
    assert final["state"]["applied_steps"] == 1
    diff = max((final["params"][k] - v.float()).abs().max().item() for k, v in loaded.items())
    print(f"--init-from under {stage or 'DDP'}: max abs difference after one step {diff:.3e}")
    assert diff < 1e-10
    assert any(v.abs().sum() > 0 for k, v in loaded.items() if k.startswith("head")), "trained head"
    torch.testing.assert_close(final["params"]["head.weight"], loaded["head.weight"].float())
