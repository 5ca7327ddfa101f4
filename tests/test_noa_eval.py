"""noa-eval: metrics against The Well's own code, time windows, baselines, the per-trajectory
bookkeeping on hand-made rollouts, and the real CLI on 1 and 2 processes and on The Well's
dummy data."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import tomllib
import torch
from the_well.benchmark.metrics import NRMSE, VRMSE, binned_spectral_mse
from the_well.data.datasets import WellMetadata
from trainrun import REPO, env_for_test, launch

from noa_dist.config import Config, ModelConfig
from noa_dist.evaluation.cli import main
from noa_dist.evaluation.groups import Groups
from noa_dist.evaluation.measure import LINEAR, METHODS, METRICS, measure
from noa_dist.metrics import (
    binned_spectral_error,
    linear_extrapolation,
    relative_l2,
    rollout_time_windows,
    spatial_mean_forecast,
    vrmse,
)
from noa_dist.models.build import build_model
from noa_dist.models.uafno import StepOutput


def _meta(height: int, width: int) -> WellMetadata:
    return WellMetadata(
        dataset_name="random",
        n_spatial_dims=2,
        spatial_resolution=(height, width),
        scalar_names=[],
        constant_scalar_names=[],
        field_names={0: ["a", "b"]},
        constant_field_names={},
        boundary_condition_types=["PERIODIC"],
        n_files=1,
        n_trajectories_per_file=[1],
        n_steps_per_trajectory=[4],
    )


def _channels_last(x: torch.Tensor) -> torch.Tensor:
    return x.movedim(-3, -1)  # ours [..., C, H, W], The Well's [..., H, W, C]


@pytest.mark.parametrize("shape", [(32, 32), (16, 24), (8, 6)])
def test_vrmse_relative_l2_and_binned_spectral_errors_equal_the_wells(shape):
    torch.manual_seed(0)
    target = 3 * torch.randn(3, 4, 2, *shape) + 1
    pred = target + 0.3 * torch.randn_like(target) + 0.1 * torch.randn(3, 4, 2, 1, 1)
    x, y, meta = _channels_last(pred), _channels_last(target), _meta(*shape)
    torch.testing.assert_close(vrmse(pred, target), VRMSE()(x, y, meta), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(relative_l2(pred, target), NRMSE()(x, y, meta), rtol=1e-6, atol=1e-6)
    theirs = binned_spectral_mse()(x, y, meta)
    mse, nmse = binned_spectral_error(pred, target)
    for i in range(3):
        torch.testing.assert_close(
            mse[..., i], theirs[f"spectral_error_mse_per_bin_{i}"], rtol=1e-6, atol=1e-6
        )
        torch.testing.assert_close(
            nmse[..., i], theirs[f"spectral_error_nmse_per_bin_{i}"], rtol=1e-6, atol=1e-6
        )
    # Parseval: the bins split the MSE (no mode lies beyond the last edge on these grids)
    torch.testing.assert_close(mse.sum(-1), (pred - target).pow(2).mean(dim=(-2, -1)))


def test_binned_spectral_error_takes_the_truths_spectrum_once_for_several_forecasts():
    torch.manual_seed(1)
    truth, forecasts = torch.randn(2, 1, 3, 16, 16), torch.randn(2, 4, 3, 16, 16)
    mse, nmse = binned_spectral_error(forecasts, truth)
    mse_one, nmse_one = binned_spectral_error(forecasts[:, 2], truth[:, 0])
    torch.testing.assert_close(mse[:, 2], mse_one)
    torch.testing.assert_close(nmse[:, 2], nmse_one)


def test_time_windows_are_the_wells_unique_edges_ending_at_the_horizon():
    assert rollout_time_windows(30) == [(0, 1), (1, 2), (2, 5), (5, 12), (12, 30)]
    assert rollout_time_windows(1) == [(0, 1)]
    assert rollout_time_windows(3) == [(0, 1), (1, 3)]  # 0, 1, 1, 3: the repeated 1 is dropped
    # The Well: 0, 1, 1, 2, 3, int(exp(log 5)) = 4 in floating point, leaving step 5 out
    assert rollout_time_windows(5) == [(0, 1), (1, 2), (2, 3), (3, 5)]
    for n in range(1, 300):
        edges = [w[0] for w in rollout_time_windows(n)] + [n]
        assert edges[0] == 0 and all(a < b for a, b in zip(edges, edges[1:], strict=False))


def test_baseline_forecasts_by_hand():
    u0 = torch.arange(8.0).reshape(1, 2, 2, 2)
    u1 = u0 + 1
    torch.testing.assert_close(linear_extrapolation(u0, u1, 1), u1)
    torch.testing.assert_close(linear_extrapolation(u0, u1, 4), u0 + 4)
    mean = spatial_mean_forecast(u0)
    assert mean.shape == u0.shape
    torch.testing.assert_close(mean[0, :, 0, 0], torch.tensor([1.5, 5.5]))
    # the spatial mean scores sqrt(biased / unbiased variance) = sqrt(3/4) on 4 points
    assert vrmse(mean, u0).flatten().tolist() == pytest.approx([np.sqrt(3 / 4)] * 2, rel=1e-5)


class ScriptedModel(torch.nn.Module):
    """Returns the truth of each step, except: trajectory 0 is far off from step 3 on,
    trajectory 1 is NaN from step 4 on."""

    def __init__(self, target_BTCHW: torch.Tensor) -> None:
        super().__init__()
        self.target, self.step = target_BTCHW, 0

    def forward(self, u, cond=None):
        state = self.target[:, self.step].clone()
        self.step += 1
        if self.step >= 3:
            state[0] += 100.0
        if self.step >= 4:
            state[1] = float("nan")
        return StepOutput(state, state)


def test_first_nonfinite_step_and_steps_to_vrmse_above_1_on_a_scripted_rollout():
    torch.manual_seed(2)
    n_steps, target = 5, torch.randn(3, 5, 1, 8, 8)
    batch = {
        "u0": torch.randn(3, 1, 8, 8),
        "target": target,
        "cond": torch.zeros(3, 0, 8, 8),
        "index": torch.tensor([0, 1, 0]),
    }  # fmt: skip  (row 2 is padding)
    groups = Groups(("all",), np.ones((2, 1), bool), None)
    norm = (np.zeros(1, np.float32), np.ones(1, np.float32))
    sums = measure(ScriptedModel(target), [batch], 2, groups, norm, n_steps, "cpu")
    rows = sums.samples
    assert rows[:, 0].tolist() == [0, 1]
    assert rows[:, 1].tolist() == [0, 4]  # first non-finite step (0: never)
    model = METHODS.index("model")
    assert rows[:, 2 + model].tolist() == [2, 3]  # steps before VRMSE > 1 (NaN counts)
    k = METRICS.index("vrmse")
    counts = sums.counts[k, 0, model, :, 0].tolist()
    assert counts == [2, 2, 2, 1, 1]  # the padding row never counts; NaN steps are left out
    assert sums.values[k, 0, model, :2, 0].tolist() == [0, 0]  # exact for two steps
    assert sums.counts[k, 0, LINEAR, 0, 0] == 0  # linear extrapolation was given step 1
    assert sums.counts[k, 0, LINEAR, 1, 0] == 2


def test_the_console_script_is_declared():
    scripts = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["scripts"]
    assert scripts["noa-eval"] == "noa_dist.evaluation:main"


# ---------------------------------------------------------------- the real CLI


def save_checkpoint(path: Path, in_channels: int, cond_channels: int) -> Path:
    """A noa-export file of a freshly initialised tiny model whose head is not zero (so that
    it is not exactly persistence)."""
    torch.manual_seed(0)
    cfg = Config(model=ModelConfig(base_channels=8, encoder_levels=2, modes=4, afno_blocks=1,
                                   afno_num_blocks=4))  # fmt: skip
    model = build_model(cfg.model, in_channels=in_channels, cond_channels=cond_channels)
    torch.nn.init.normal_(model.head.weight, std=0.02)
    torch.save({"model": model.state_dict(), "config": cfg.to_dict()}, path)
    return path


@pytest.fixture(scope="module")
def demo(tmp_path_factory) -> tuple[Path, Path]:
    from noa_dist.data.generate import generate_dataset

    folder = tmp_path_factory.mktemp("eval_demo")
    root = generate_dataset(folder / "demo", n_trajectories=14, grid=16, timesteps=6,
                            split_fractions=(0.5, 0.0, 0.5), workers=1, progress=False)  # fmt: skip
    return root, save_checkpoint(folder / "fresh.pt", in_channels=1, cond_channels=4)


def numbers(obj, path=""):
    """{path: number or None} of every numeric leaf of a JSON object."""
    if isinstance(obj, dict):
        return {k: v for key, val in obj.items() for k, v in numbers(val, f"{path}/{key}").items()}
    if isinstance(obj, list):
        return {k: v for i, val in enumerate(obj) for k, v in numbers(val, f"{path}[{i}]").items()}
    return {path: obj} if obj is None or isinstance(obj, int | float) else {}


@pytest.fixture(scope="module")
def one_process(demo, tmp_path_factory) -> tuple[dict, Path]:
    root, ckpt = demo
    out = tmp_path_factory.mktemp("eval1")
    res = subprocess.run(
        [sys.executable, "-m", "noa_dist.evaluation", str(ckpt), "--dataset", str(root),
         "--batch-size", "1", "--out", str(out)],
        cwd=REPO, env=env_for_test(out), capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    return json.loads((out / "eval.json").read_text()), out


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_one_process_reports_every_family_with_baselines_physics_and_figures(one_process):
    report, out = one_process
    groups = report["groups"]
    assert list(groups) == ["all", "advection_diffusion", "allen_cahn", "navier_stokes"]
    assert groups["all"]["trajectories"] == report["dataset"]["trajectories"] == 7
    assert sum(groups[g]["trajectories"] for g in list(groups)[1:]) == 7
    assert report["settings"]["horizon"] == 6
    assert report["settings"]["time_windows"] == [[0, 1], [1, 2], [2, 3], [3, 6]]
    for group in groups.values():
        assert list(group["per_step"]) == list(METHODS)
        assert group["per_step"]["linear_extrapolation"]["vrmse"]["mean"][0] is None
        assert all(v is not None for v in group["per_step"]["model"]["vrmse"]["mean"])
    assert groups["allen_cahn"]["physics"]["bounds"]["fraction_outside_true_all_steps"] == 0
    assert "drift_pred" in groups["navier_stokes"]["physics"]["mean_vorticity"]
    assert "physics" not in groups["all"]
    assert [r["trajectory"] for r in report["samples"]] == list(range(7))
    md = (out / "eval.md").read_text()
    assert "## allen_cahn" in md and "| persistence |" in md and "Allen-Cahn bounds" in md
    pngs = sorted(p.name for p in out.glob("*.png"))
    assert "vrmse.png" in pngs and len(pngs) == 4  # one frame figure per family
    assert all((out / p).stat().st_size > 10_000 for p in pngs)


@pytest.mark.dist
@pytest.mark.slow
@pytest.mark.timeout(300)
def test_two_processes_report_the_same_numbers_as_one(one_process, demo, tmp_path):
    single, _ = one_process
    root, ckpt = demo
    # batch size 1: every forward sees the same input on 1 and 2 processes (a batch of other
    # trajectories changes fp32 convolutions in the 6th decimal); 7 trajectories: rank 1 pads
    args = [str(ckpt), "--dataset", str(root), "--batch-size", "1", "--out", str(tmp_path)]
    run = launch(2, args, tmp_path, script=REPO / "noa_dist" / "evaluation" / "__main__.py")
    assert run.stdout.count("# noa-eval:") == 1, "only rank 0 prints"
    double = json.loads((tmp_path / "eval.json").read_text())
    assert double["settings"]["world_size"] == 2
    a, b = numbers(single), numbers(double)
    assert a.keys() == b.keys()
    for key in a:
        if key == "/settings/world_size":
            continue
        if a[key] is None or isinstance(a[key], int):
            assert a[key] == b[key], key
        else:  # float64 sums in another order
            assert a[key] == pytest.approx(b[key], rel=1e-9, abs=1e-12), key


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_the_wells_dummy_dataset_is_one_group_without_physics(dummy_root, tmp_path, capsys):
    ckpt = save_checkpoint(tmp_path / "dummy.pt", in_channels=2, cond_channels=1)
    out = tmp_path / "out"
    assert main([str(ckpt), "--dataset", str(dummy_root), "--horizon", "5", "--out", str(out),
                 "--frames", "1"]) == 0  # fmt: skip
    report = json.loads((out / "eval.json").read_text())
    assert list(report["groups"]) == ["all"] and "physics" not in report["groups"]["all"]
    assert report["dataset"]["channels"] == ["field_x", "field_y"]
    assert report["settings"]["time_windows"] == [[0, 1], [1, 2], [2, 3], [3, 5]]
    fields = report["groups"]["all"]["per_step"]["model"]["vrmse"]["fields"]
    assert set(fields) == {"field_x", "field_y"} and len(fields["field_x"]) == 5
    assert len(list(out.glob("frames_all_*.png"))) == 2  # one trajectory, two channels
    assert "| field (model) |" in capsys.readouterr().out


def test_bad_input_is_one_error_line_naming_the_flag(dummy_root, tmp_path, capsys):
    ckpt = save_checkpoint(tmp_path / "dummy.pt", in_channels=2, cond_channels=1)
    assert main([str(ckpt), "--dataset", str(dummy_root), "--horizon", "10"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: --horizon 10: ") and "at most 9 steps" in err
    assert len(err.splitlines()) == 1
    assert main([str(tmp_path / "missing.pt"), "--dataset", str(dummy_root)]) == 2
    assert "no such file or folder" in capsys.readouterr().err
