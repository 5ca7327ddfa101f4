"""noa-align-report: the metric functions on hand-checkable inputs (per codebook, never pooled),
the seed's thresholds, and the real CLI on a tiny aligned checkpoint on 1 and 2 processes."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import tomllib
import torch
from dist_runs import ALIGN_FLAGS
from trainrun import REPO, env_for_test, launch, train_flags

from noa_dist.align_report import summary, verdict
from noa_dist.align_report.cli import build_parser
from noa_dist.align_report.inputs import load_inputs
from noa_dist.align_report.measure import (
    AlignSums,
    WindowCodes,
    coefficient_of_variation,
)
from noa_dist.errors import ConfigError
from noa_dist.export import export_checkpoint
from noa_dist.models.vqvae import VQVAEConfig, VQVAEOutput
from noa_dist.tokenizer.evaluate import CategorySums, code_usage

# ---------------------------------------------------------------- metric functions


def test_code_usage_is_per_codebook_with_perplexity_and_entropy_of_its_own_histogram():
    even_half = code_usage(torch.tensor([5.0, 5.0, 0.0, 0.0]))
    assert even_half["codes_used"] == 2 and even_half["utilization"] == 0.5
    assert even_half["perplexity"] == pytest.approx(2.0)
    assert even_half["entropy"] == pytest.approx(math.log(2))
    assert even_half["entropy_ratio"] == pytest.approx(0.5)  # log 2 / log 4
    one_code = code_usage(torch.tensor([7.0, 0.0]))
    assert (one_code["utilization"], one_code["perplexity"], one_code["entropy"]) == (0.5, 1.0, 0.0)


def vq_output(codes_BK, z_BD, recon_BF) -> VQVAEOutput:
    z = torch.tensor(z_BD, dtype=torch.float32)
    return VQVAEOutput(
        torch.tensor(recon_BF, dtype=torch.float32), z, z, torch.tensor(codes_BK), torch.zeros(())
    )


def hand_sums(projector: bool = False) -> AlignSums:
    """Three categories of 1 feature, codebooks of 4, 2 and 2 codes, 1-dim codes; 2 windows of
    2 trajectories. Truth codes differ from the prediction in codebook 0 of trajectory 1 only."""
    cfg = VQVAEConfig(input_dims=(1, 1, 1), codebook_sizes=(4, 2, 2), code_dim=1)
    sums = AlignSums(CategorySums(cfg), CategorySums(cfg), 3, windows=2, projector=projector)
    x = torch.zeros(2, 3)
    records = []
    for j in range(2):
        true = vq_output([[0, 0, 1], [1, 0, 1]], [[1, 0, 0], [0, 1, 0]], [[0, 0, 0], [1, 1, 1]])
        z_pred = [[2, 0, 0], [0, 0, 3 + j]]  # traj 0: same direction; traj 1: orthogonal
        pred = vq_output([[0, 0, 1], [2, 0, 1]], z_pred, [[0, 0, 0], [0, 0, 0]])
        records.append(WindowCodes(x, true, x, pred, None))
    sums.add_batch(records)
    return sums


def test_agreement_and_code_counts_are_per_codebook_never_pooled():
    r = hand_sums().unpack(hand_sums().packed())
    n = float(r.sums["trajectories"]) * 2
    assert n == 4
    assert summary.agreement(r.sums["agree"], n) == [0.5, 1.0, 1.0]
    assert [c.tolist() for c in r.truth_counts] == [[2, 2, 0, 0], [4, 0], [0, 4]]
    assert [c.tolist() for c in r.pred_counts] == [[2, 0, 2, 0], [4, 0], [0, 4]]
    assert summary.chance_agreement(r.pred_counts[0], r.truth_counts[0]) == pytest.approx(0.25)
    assert r.pred["temporal"]["utilization"] == 0.5  # 2 of 4 codes, not 3 of 4 x 2 x 2 joint
    assert r.truth["initial"]["utilization"] == 0.5 and r.truth["initial"]["perplexity"] == 1.0
    # reconstruction per category: truth recon errs by 1 on trajectory 1's features only
    assert r.truth["summary"]["recon_mse"] == pytest.approx(0.5)
    assert r.pred["summary"]["recon_mse"] == 0.0


def test_cosines_and_temporal_statistics_from_the_reduced_sums():
    r = hand_sums().unpack(hand_sums().packed())
    cos = summary.cosines(r, 4.0, projector=False)
    assert cos["latent_pair"] == {
        "available": False,
        "reason": "not trained with --enable-latent-loss",
    }
    zz = cos["pred_vs_truth"]
    assert zz["cosine_mean"] == pytest.approx(0.5) and zz["cosine_std"] == pytest.approx(0.5)
    assert sum(zz["histogram"]) == 4 and zz["histogram"][-1] == 2 and zz["histogram"][10] == 2
    t = summary.temporal(r, 2.0, 2)
    assert t["truth"]["cv"] == 0.0  # |z_e| = 1 in both windows of both trajectories
    # pred norms: trajectory 0 [2, 2] (CV 0), trajectory 1 [3, 4] (CV 0.5 / 3.5)
    assert t["pred"]["cv"] == pytest.approx((0 + 0.5 / 3.5) / 2)
    assert t["pred"]["norm_per_window"] == pytest.approx([2.5, 3.0])
    assert t["cv_difference"] == pytest.approx(t["pred"]["cv"])


def test_coefficient_of_variation_and_mean_std_by_hand():
    cv = coefficient_of_variation(torch.tensor([[1.0, 3.0], [2.0, 2.0]], dtype=torch.float64))
    assert cv.tolist() == [0.5, 0.0]
    assert summary.mean_std(6.0, 20.0, 2) == (3.0, 1.0)  # values 2 and 4
    assert summary.max_utilization(10, 64) == pytest.approx(10 / 64)


def test_a_nonfinite_trajectory_is_left_out_of_every_sum_and_counted():
    cfg = VQVAEConfig(input_dims=(1, 1, 1), codebook_sizes=(2, 2, 2), code_dim=1)
    sums = AlignSums(CategorySums(cfg), CategorySums(cfg), 3, windows=1, projector=False)
    x = torch.tensor([[0.0, 0.0, 0.0], [math.nan, 0.0, 0.0]])
    out = vq_output([[0, 0, 0], [1, 1, 1]], [[1, 0, 0], [1, 0, 0]], [[0, 0, 0], [0, 0, 0]])
    sums.add_batch([WindowCodes(x, out, x, out, None)])
    r = sums.unpack(sums.packed())
    assert float(r.sums["trajectories"]) == 1 and float(r.sums["excluded_nonfinite"]) == 1
    assert [c.tolist() for c in r.truth_counts] == [[1, 0]] * 3


def row(n: int, size: int, used: float) -> dict:
    return {"n": n, "codebook_size": size, "max_utilization": min(1, n / size),
            "pred": {"utilization": used}, "truth": {"utilization": used}}  # fmt: skip


def test_codebook_verdict_needs_enough_windows_and_more_than_half_of_the_codes():
    assert verdict.codebook_verdict(row(10, 64, 10 / 64))["status"] == "n/a"
    assert (
        "10 windows cannot judge 64 codes" in verdict.codebook_verdict(row(10, 64, 0.1))["reason"]
    )
    assert verdict.codebook_verdict(row(192, 64, 0.51))["status"] == "good"
    assert verdict.codebook_verdict(row(192, 64, 0.5))["status"] == "poor"


def test_section_verdicts_follow_the_seed_thresholds():
    recon = {side: {c: {"recon_mse": m} for c, m in zip(("temporal", "summary", "initial"), mses, strict=True)}
             for side, mses in (("pred", (0.1, 0.49, 0.2)), ("truth", (0.1, 0.1, 0.1)))}  # fmt: skip
    assert verdict.reconstruction_verdict(recon)["status"] == "good"
    recon["pred"]["summary"]["recon_mse"] = 0.5
    assert verdict.reconstruction_verdict(recon)["status"] == "poor"
    pair = lambda c: {"latent_pair": {"available": True, "cosine_mean": c}}  # noqa: E731
    assert [verdict.alignment_verdict(pair(c))["status"] for c in (0.9, 0.623, 0.5)] == [
        "strong", "moderate", "weak"]  # fmt: skip
    cv = lambda p, t, j=4: {"windows_per_trajectory": j, "pred": {"cv": p}, "truth": {"cv": t},  # noqa: E731
                            "cv_difference": p - t}  # fmt: skip
    assert verdict.temporal_verdict(cv(0.35, 0.30))["status"] == "good"  # relative to the truth
    assert verdict.temporal_verdict(cv(0.05, 0.30))["status"] == "poor"  # too flat
    assert verdict.temporal_verdict(cv(0.0, 0.0, j=1))["status"] == "n/a"


def test_overall_verdict_good_poor_and_without_l_latent():
    v = lambda s: {"status": s}  # noqa: E731
    seed = {"reconstruction": v("good"), "token_diversity": v("good"),
            "alignment": v("moderate"), "temporal": v("good")}  # fmt: skip
    assert verdict.overall_verdict(seed)["title"] == "GOOD - L_latent provides meaningful alignment"
    poor = verdict.overall_verdict({**seed, "temporal": v("poor")})
    assert poor["status"] == "poor" and "Temporal Consistency" in poor["title"]
    no_latent = verdict.overall_verdict({**seed, "alignment": v("n/a")})
    assert no_latent["status"] == "good" and "--enable-latent-loss" in no_latent["title"]
    assert verdict.overall_verdict({k: v("n/a") for k in seed})["status"] == "inconclusive"


def test_the_console_script_is_declared():
    scripts = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["scripts"]
    assert scripts["noa-align-report"] == "noa_dist.align_report:main"


# ---------------------------------------------------------------- the real CLI


@pytest.fixture(scope="module")
def aligned_run(tiny_dataset, tiny_tokenizer, tmp_path_factory) -> Path:
    """One epoch of the tiny model with L_commit and L_latent against the tiny tokenizer."""
    out = tmp_path_factory.mktemp("align_report")
    flags = train_flags(tiny_dataset, out, "--epochs", "1", "--vqvae-path", str(tiny_tokenizer),
                        *ALIGN_FLAGS)  # fmt: skip
    proc = subprocess.run(
        [sys.executable, str(REPO / "noa_dist" / "train.py"), *flags],
        cwd=REPO, env=env_for_test(out), capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return out / "run"


def report_cli(args: list[str], out: Path, **kw) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "noa_dist.align_report", *args],
        cwd=REPO, env=env_for_test(out), capture_output=True, text=True, timeout=300, **kw,
    )  # fmt: skip


@pytest.fixture(scope="module")
def one_process(aligned_run, tmp_path_factory) -> tuple[dict, Path, str]:
    out = tmp_path_factory.mktemp("report1")
    res = report_cli(["--checkpoint", str(aligned_run / "best"), "--json", str(out / "r.json"),
                      "--figure", str(out / "r.png")], out)  # fmt: skip
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    return json.loads((out / "r.json").read_text()), out, res.stdout


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_report_on_one_process_covers_the_whole_split_with_a_verdict_per_section(one_process):
    report, out, text = one_process
    s = report["settings"]
    assert (s["trajectories"], s["windows_per_trajectory"], s["world_size"]) == (8, 2, 1)
    rows = report["token_diversity"]["codebooks"]
    assert [r["n"] for r in rows] == [16, 16, 16] and [r["codebook_size"] for r in rows] == [8] * 3
    assert all(r["verdict"]["status"] == "n/a" for r in rows)  # 16 windows < 3 x 8 codes
    assert report["alignment"]["latent_pair"]["available"]
    assert sum(report["alignment"]["latent_pair"]["histogram"]) == 16
    for key in verdict.SECTIONS:
        assert report[key]["verdict"]["label"] in text
    for title in ("1. VQ Reconstruction Quality", "2. Token Diversity", "3. Alignment Correlation",
                  "4. Temporal Consistency", "Overall Summary", "➜ Final Verdict: "):  # fmt: skip
        assert title in text
    assert (out / "r.png").stat().st_size > 10_000


def numbers(obj, path=""):
    """{path: number} of every int/float leaf of a JSON object."""
    if isinstance(obj, dict):
        return {k: v for key, val in obj.items() for k, v in numbers(val, f"{path}/{key}").items()}
    if isinstance(obj, list):
        return {k: v for i, val in enumerate(obj) for k, v in numbers(val, f"{path}[{i}]").items()}
    return {path: obj} if isinstance(obj, int | float) and not isinstance(obj, bool) else {}


@pytest.mark.dist
@pytest.mark.slow
@pytest.mark.timeout(600)
def test_two_processes_report_the_same_numbers_as_one(one_process, aligned_run, tmp_path):
    single, _, _ = one_process
    args = ["--checkpoint", str(aligned_run / "best"), "--json", str(tmp_path / "r.json"),
            "--figure", str(tmp_path / "r.png")]  # fmt: skip
    script = REPO / "noa_dist" / "align_report" / "__main__.py"
    run = launch(2, args, tmp_path, script=script)
    assert run.stdout.count("Final Verdict") == 1, "only rank 0 prints"
    double = json.loads((tmp_path / "r.json").read_text())
    assert double["settings"]["world_size"] == 2
    a, b = numbers(single), numbers(double)
    assert a.keys() == b.keys()
    for key in a:
        if key == "/settings/world_size":
            continue
        if isinstance(a[key], int):  # counts (codes used, windows, histogram bins) exactly
            assert a[key] == b[key], key
        else:  # float sums in another order (and other batches: fp32 convolutions)
            assert a[key] == pytest.approx(b[key], rel=1e-5, abs=1e-7), key
    assert (tmp_path / "r.png").is_file()
    assert double["verdict"] == single["verdict"]


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_checkpoint_without_projector_reports_latent_sections_as_not_trained(aligned_run, tmp_path):
    path = export_checkpoint(aligned_run / "best", tmp_path / "no_projector.pt")
    payload = torch.load(path, weights_only=True)
    payload["model"] = {k: v for k, v in payload["model"].items() if not k.startswith("projector.")}
    payload["config"]["align"]["enable_latent_loss"] = False
    torch.save(payload, path)
    res = report_cli(["--checkpoint", str(path), "--n-samples", "2", "--json", "-"], tmp_path)
    assert res.returncode == 0, res.stderr[-3000:]
    report = json.loads(res.stdout)
    assert report["alignment"]["verdict"]["reason"] == "not trained with --enable-latent-loss"
    assert report["verdict"]["sections"]["alignment"] == "n/a"
    assert report["settings"]["trajectories"] == 2


@pytest.mark.slow
def test_bad_input_is_one_config_error_naming_the_flag(aligned_run, tiny_tokenizer, tmp_path):
    def problem(*argv: str) -> str:
        with pytest.raises(ConfigError) as err:
            load_inputs(build_parser().parse_args(["--checkpoint", *argv]))
        return str(err.value)

    assert "no such file or folder" in problem(str(tmp_path / "missing"))
    best = str(aligned_run / "best")
    assert "--timesteps 3: not a multiple of the tokenizer's window of 2" in problem(
        best, "--timesteps", "3"
    )
    assert "--n-samples 0" in problem(best, "--n-samples", "0")
    res = report_cli(["--checkpoint", str(tmp_path / "missing")], tmp_path)
    assert (
        res.returncode == 2
        and res.stderr.startswith("error: ")
        and len(res.stderr.splitlines()) == 1
    )
