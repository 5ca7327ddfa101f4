"""noa-bench smoke tests: each benchmark runs on a tiny config and writes JSON with its fields.

No timing is asserted: the figures belong to `noa-bench` runs, not to tests."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from noa_dist.bench import flops, memory

sys.path.insert(0, str(Path(__file__).parent))
from trainrun import REPO, TINY_MODEL, make_tiny_dataset  # noqa: E402

QUICK = ["--repeats", "2", "--threads", "1"]


@pytest.fixture(scope="module")
def tiny_flags(tmp_path_factory) -> list[str]:
    root = make_tiny_dataset(tmp_path_factory.mktemp("bench") / "data")
    return [
        *["--dataset", str(root), "--timesteps", "4", "--bptt-window", "2"],
        *["--tbptt-mode", "all-windows", "--batch-size", "2", "--log-every", "2", *TINY_MODEL],
    ]


def _bench(name: str, tmp_path: Path, *argv: str) -> dict:
    """`noa-bench NAME` in its own process, as users run it: `data` runs the trainer in its
    process, which takes over the noa_dist logger and the stop signals."""
    out = tmp_path / f"{name}.json"
    cmd = [sys.executable, "-m", "noa_dist.bench.cli", name, "--json", str(out), *argv]
    done = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=800)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    report = json.loads(out.read_text())
    assert report["bench"] == name and report["machine"]["cores"] >= 1
    return report


def _is_summary(s: dict) -> bool:
    return {"median", "min", "max", "spread", "n"} <= set(s) and s["median"] > 0


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_step_bench_compares_trainer_and_bare_loop_on_one_process(tmp_path, tiny_flags):
    report = _bench("step", tmp_path, *QUICK, "--steps", "2", "--processes", "1", *tiny_flags)
    (row,) = report["rows"]
    assert row["processes"] == 1
    assert all(
        _is_summary(row[k]) for k in ("trainer_samples_per_s", "bare_samples_per_s", "ratio")
    )


@pytest.mark.slow
@pytest.mark.dist
@pytest.mark.timeout(600)
def test_sync_and_scale_benches_run_on_two_processes(tmp_path, tiny_flags):
    sync = _bench("sync", tmp_path, *QUICK, "--steps", "2", "--processes", "2", *tiny_flags)
    assert sync["rows"][0]["processes"] == 2 and _is_summary(sync["rows"][0]["share"])
    scale = _bench("scale", tmp_path, *QUICK, "--steps", "2", "--launches", "1", *tiny_flags)
    assert set(scale["samples_per_s"]) == {"1", "2"}
    assert _is_summary(scale["weak_scaling_efficiency"])


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_data_bench_reports_reader_modes_and_a_real_runs_data_wait(tmp_path, tiny_flags):
    report = _bench(
        "data",
        tmp_path,
        *QUICK,
        "--samples",
        "8",
        "--workers",
        "0,1",
        "--train-steps",
        "4",
        *tiny_flags,
    )
    modes = [r["mode"] for r in report["reader"]]
    assert modes[0].startswith("raw h5py") and len(modes) == 4
    assert 0 <= report["training_run"]["data_wait_frac"]["median"] <= 1


@pytest.mark.slow
@pytest.mark.dist
@pytest.mark.deepspeed
@pytest.mark.timeout(900)
def test_memory_bench_reports_activations_and_zero_state_next_to_the_formula(tmp_path, tiny_flags):
    report = _bench(
        "memory",
        tmp_path,
        "--rollouts",
        "4,8",
        "--window",
        "2",
        "--stages",
        "ddp,zero2",
        "--steps",
        "2",
        *tiny_flags,
    )
    acts = {(r["T"], r["mode"]): r for r in report["activations"]}
    assert acts[8, "all-windows"]["saved_bytes"] == acts[4, "all-windows"]["saved_bytes"] > 0
    assert {(r["mode"], r["rank"]) for r in report["model_state"]} == {
        ("ddp", 0),
        ("ddp", 1),
        ("zero2", 0),
        ("zero2", 1),
    }
    for row in report["model_state"]:
        assert row["vs_formula"] > 0 and row["formula"]["total"] > 0


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_flops_bench_counts_ffts_and_reports_an_mfu(tmp_path, tiny_flags):
    report = _bench("flops", tmp_path, *QUICK, "--steps", "1", "--matmul-size", "128", *tiny_flags)
    assert report["flops_per_sample"] > 0 and _is_summary(report["mfu"])
    assert any("fft" in op for op in report["flops_by_op"])


def test_fft_formulas_count_n_log_n_per_transform():
    x = torch.randn(3, 8, 16)
    counter = torch.utils.flop_counter.FlopCounterMode(
        display=False, custom_mapping=flops.flop_mapping()
    )
    with counter:
        torch.fft.rfft2(x)
    assert counter.get_total_flops() >= 3 * int(2.5 * 128 * 7)  # N = 8 x 16 points, 3 batches


def test_complex_matmuls_count_four_real_ones():
    a, b = torch.randn(4, 5, dtype=torch.cfloat), torch.randn(5, 6, dtype=torch.cfloat)
    counter = torch.utils.flop_counter.FlopCounterMode(
        display=False, custom_mapping=flops.flop_mapping()
    )
    with counter:
        torch.mm(a, b)
    assert counter.get_total_flops() == 4 * 2 * 4 * 5 * 6


def test_zero_formula_matches_the_paper_for_mixed_precision():
    psi = 1_000
    assert memory.formula_bytes("zero1", psi, 4, bf16=True)["total"] == (2 + 2 + 12 / 4) * psi
    assert memory.formula_bytes("zero3", psi, 4, bf16=True)["total"] == 16 * psi / 4
    assert memory.formula_bytes("ddp", psi, 4, bf16=False)["total"] == 16 * psi


def test_views_of_one_flat_buffer_count_once():
    flat = torch.zeros(100)  # 400 bytes, like DeepSpeed's flat parameter group
    counter = memory.StorageCounter()
    assert counter.count([flat[:60], flat[60:]]) == 400
    assert counter.count([flat, None]) == 0, "already counted as another category"
