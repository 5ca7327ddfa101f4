"""noa-export and noa-diagnose (the CLIs, in subprocesses) on a real ZeRO-3 step checkpoint.

ZeRO-3 writes one `zero_pp_rank_<r>_mp_rank_00_model_states.pt` per rank instead of ZeRO-1/2's
`mp_rank_00_model_states.pt`; both CLIs failed on it before. One 2-rank launch (~1 min) is
shared by the tests of this module.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
import torch
from test_export import step_checkpoint
from trainrun import (
    REPO,
    env_for_test,
    launch,
    make_tiny_dataset,
    rank_results,
    train_flags,
    zero_launch,
)

from noa_dist.checkpoint import checkpoint_kind, verify_checkpoint
from noa_dist.export import load_exported

pytestmark = [pytest.mark.slow, pytest.mark.dist, pytest.mark.deepspeed, pytest.mark.timeout(900)]


@pytest.fixture(scope="module")
def zero3_run(tmp_path_factory) -> Path:
    """One epoch of the tiny model on 2 ranks under ZeRO-3 (tests/dist/train_worker.py, which
    also saves each rank's final parameters); returns the launch folder."""
    pytest.importorskip("deepspeed")
    base = tmp_path_factory.mktemp("zero3")
    dataset = make_tiny_dataset(base / "data")
    launch(
        2, train_flags(dataset, base / "out", "--epochs", "1"), base, extra_launch=zero_launch(3)
    )
    return base


def run_cli(args: list[str], tmp_path: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        args, cwd=REPO, env=env_for_test(tmp_path), capture_output=True, text=True, timeout=300
    )


def test_noa_export_of_a_zero3_step_checkpoint_gives_the_run_final_weights(zero3_run, tmp_path):
    ckpt = step_checkpoint(zero3_run / "out" / "run")
    shards = sorted(p.name for p in ckpt.glob("pytorch_model/*model_states.pt"))
    assert shards == [f"zero_pp_rank_{r}_mp_rank_00_model_states.pt" for r in range(2)]
    assert checkpoint_kind(ckpt) == "zero" and verify_checkpoint(ckpt) is None

    proc = run_cli(["noa-export", str(ckpt), str(tmp_path / "zero3.pt")], tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    exported = torch.load(tmp_path / "zero3.pt", weights_only=True)["model"]
    final = rank_results(zero3_run, 2)[0]["params"]  # gathered after the last step
    assert exported.keys() == final.keys()
    assert all(torch.equal(exported[k], final[k]) for k in final)
    model, _ = load_exported(tmp_path / "zero3.pt")
    assert all(torch.equal(model.state_dict()[k], final[k]) for k in final)


def test_noa_diagnose_reads_a_zero3_step_checkpoint(zero3_run, tmp_path):
    ckpt = step_checkpoint(zero3_run / "out" / "run")
    proc = run_cli(["noa-diagnose", "--checkpoint", str(ckpt), "--json"], tmp_path)
    assert proc.returncode in (0, 1), proc.stdout[-3000:] + proc.stderr[-3000:]
    assert json.loads(proc.stdout)["format"] == "zero"
