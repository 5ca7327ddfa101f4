"""Launches shared by several test modules (session-scoped: each runs once per session).

The fault matrix puts faults where they hurt, one kind per optimizer step, in a run with
gradient accumulation 2 and two TBPTT windows per micro-step; the reference run skips the
same steps before any forward or backward (tests/dist/train_worker.py NOA_TEST_SKIP_STEPS).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import pytest
from trainrun import launch, make_tiny_dataset, rank_results, train_flags, zero_launch

FAULTS = {
    2: "1:2:micro=1:window=2",  # NaN loss in window 2 of 2 (after window 1 ran backward)
    4: "1:4:micro=1",  # NaN loss on micro-step 1 of 2 (micro-step 2 then runs backward)
    6: "0:6:grad:micro=2:window=1",  # NaN gradient, finite loss, on one rank
    8: "1:8:micro=2:window=2,0:8:grad:micro=1",  # NaN loss on one rank, NaN gradient on the other
}
FAULT_FLAGS = ["--debug-inject-nan", ",".join(FAULTS.values())]
ACCUM_FLAGS = ["--gradient-accumulation-steps", "2", "--tbptt-mode", "all-windows", "--epochs", "3"]
STEPS = 9  # 3 epochs x (24 windows / (batch 2 x 2 ranks x accumulation 2))


def same_floats(a: list[float], b: list[float]) -> bool:
    """Equal lists where NaN equals NaN (the loss logged for a skipped step is NaN)."""
    return len(a) == len(b) and all(
        x == y or (math.isnan(x) and math.isnan(y)) for x, y in zip(a, b, strict=True)
    )


@dataclass
class Run:
    stdout: str
    ranks: list[dict]  # per rank: params, state, seen, counts (tests/dist/train_worker.py)
    run_dir: Path


def fault_run(dataset, out, stage: int | None, *, reference: bool = False, extra=()) -> Run:
    """The fault matrix (or its reference) on 2 ranks under DDP (stage None) or ZeRO-`stage`."""
    flags = [*ACCUM_FLAGS, *([] if reference else FAULT_FLAGS), *extra]
    env = {"NOA_TEST_SKIP_STEPS": ",".join(map(str, FAULTS))} if reference else {}
    env["NOA_TEST_COUNT"] = "1"
    run = launch(
        2,
        train_flags(dataset, out / "runs", *flags),
        out,
        env=env,
        extra_launch=zero_launch(stage) if stage else [],
    )
    name = extra[extra.index("--run-name") + 1] if "--run-name" in extra else "run"
    return Run(run.stdout, rank_results(out, 2), out / "runs" / name)


@pytest.fixture(scope="session")
def tiny_dataset(tmp_path_factory):
    return make_tiny_dataset(tmp_path_factory.mktemp("data") / "tiny")


@pytest.fixture(scope="session")
def ddp_faulted(tiny_dataset, tmp_path_factory):
    return fault_run(tiny_dataset, tmp_path_factory.mktemp("ddp_faulted"), None)


@pytest.fixture(scope="session")
def ddp_reference(tiny_dataset, tmp_path_factory):
    return fault_run(tiny_dataset, tmp_path_factory.mktemp("ddp_reference"), None, reference=True)


@pytest.fixture(scope="session")
def ddp_straight(tiny_dataset, tmp_path_factory):
    """Two epochs (12 steps) without interruption: the reference for every resume test."""
    out = tmp_path_factory.mktemp("straight")
    launch(2, train_flags(tiny_dataset, out / "runs", "--epochs", "2"), out)
    return rank_results(out, 2)


@pytest.fixture(scope="session")
def tiny_tokenizer(tiny_dataset, tmp_path_factory):
    """A tokenizer for the tiny dataset's 2-step loss windows, trained by the real CLI."""
    import subprocess
    import sys

    from trainrun import REPO, env_for_test

    out = tmp_path_factory.mktemp("tokenizer") / "tok"
    cmd = [
        sys.executable,
        "-m",
        "noa_dist.tokenizer",
        "--dataset",
        str(tiny_dataset),
        "--out",
        str(out),
        "--window",
        "2",
        "--epochs",
        "3",
        "--batch-size",
        "4",
        "--codebook-size",
        "8",
        "--wandb-mode",
        "disabled",
    ]
    res = subprocess.run(
        cmd, cwd=REPO, env=env_for_test(out.parent), capture_output=True, text=True, timeout=300
    )
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    return out


ALIGN_FLAGS = ["--lambda-commit", "0.5", "--enable-latent-loss", "--lambda-latent", "0.3"]
