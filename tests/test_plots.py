"""Figures: rollout frames, loss curves, VRMSE per step, atomic PNG saving."""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch

from noa_dist import metrics, plots

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _rollout(
    T: int = 12, C: int = 2, H: int = 16, W: int = 20
) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    truth_TCHW = torch.randn(T, C, H, W, generator=gen)
    pred_TCHW = truth_TCHW + 0.1 * torch.arange(1, T + 1).view(T, 1, 1, 1) * torch.randn(
        T, C, H, W, generator=gen
    )
    return truth_TCHW, pred_TCHW


def _images(fig) -> list:
    return [ax for ax in fig.axes if ax.images]


def test_default_steps_are_first_quarter_half_last_without_duplicates():
    assert plots.default_steps(16) == (1, 4, 8, 16)
    assert plots.default_steps(2) == (1, 2)
    assert plots.default_steps(1) == (1,)


def test_frame_vrmse_is_zero_for_truth_and_about_one_for_the_spatial_mean():
    """metrics.vrmse divides by the unbiased variance: the mean scores sqrt((N - 1) / N)."""
    truth_SHW = np.random.default_rng(0).standard_normal((1, 32, 32)).astype(np.float32)
    assert plots.frames_vrmse(truth_SHW, truth_SHW).tolist() == [0.0]
    mean_SHW = np.full_like(truth_SHW, truth_SHW.mean())
    assert plots.frames_vrmse(truth_SHW, mean_SHW)[0] == pytest.approx((1023 / 1024) ** 0.5)


def test_rollout_figure_titles_show_metrics_vrmse_of_each_frame():
    """One VRMSE: a 4x4 grid makes the biased and unbiased variances differ at 3 decimals."""
    truth_TCHW, pred_TCHW = _rollout(T=8, C=2, H=4, W=4)
    fig = plots.rollout_figure(truth_TCHW, pred_TCHW, steps=(1, 4, 8), channel=1)
    titles = [ax.get_title() for ax in _images(fig)[3:6]]  # the prediction row
    expected_T = metrics.vrmse(pred_TCHW[:, 1], truth_TCHW[:, 1])
    assert titles == [f"step {s}  VRMSE {float(expected_T[s - 1]):.3f}" for s in (1, 4, 8)]


def test_rollout_figure_has_truth_prediction_error_rows_at_requested_steps():
    truth_TCHW, pred_TCHW = _rollout()
    fig = plots.rollout_figure(truth_TCHW, pred_TCHW, channel=1, title="demo")
    panels = _images(fig)
    assert len(panels) == 3 * 4  # rows truth / prediction / error, columns 1, 3, 6, 12
    assert len(fig.axes) == 3 * 4 + 2  # one colorbar for truth/prediction, one for the error
    assert [ax.get_ylabel() for ax in panels[::4]] == [
        "truth",
        "prediction",
        "error (pred - truth)",
    ]
    titles = [ax.get_title() for ax in panels[4:8]]
    assert [int(re.match(r"step (\d+)", t).group(1)) for t in titles] == [1, 3, 6, 12]
    expected = metrics.vrmse(pred_TCHW[11, 1], truth_TCHW[11, 1])
    assert titles[-1].endswith(f"VRMSE {float(expected):.3f}")
    assert fig.get_suptitle() == "demo"


def test_rollout_figure_shares_colour_scale_of_truth_and_prediction_and_centres_error():
    truth_TCHW, pred_TCHW = _rollout()
    panels = _images(plots.rollout_figure(truth_TCHW, pred_TCHW, steps=(2, 5)))
    truth_clims = {ax.images[0].get_clim() for ax in panels[:4]}
    assert len(truth_clims) == 1  # truth and prediction rows: one scale
    err_lo, err_hi = panels[-1].images[0].get_clim()
    assert err_hi > 0
    assert err_lo == -err_hi


def test_rollout_figure_renders_a_diverged_prediction(tmp_path):
    truth_TCHW, pred_TCHW = _rollout(T=4)
    pred_TCHW[2:] = float("nan")
    fig = plots.rollout_figure(truth_TCHW, pred_TCHW)  # steps 1, 2, 4
    assert _images(fig)[5].get_title() == "step 4  VRMSE nan"
    assert plots.save_figure(fig, tmp_path / "nan.png").stat().st_size > 1000


def test_rollout_figure_rejects_mismatched_shapes_and_bad_steps():
    truth_TCHW, pred_TCHW = _rollout(T=4)
    with pytest.raises(ValueError, match=r"\(T, C, H, W\)"):
        plots.rollout_figure(truth_TCHW, pred_TCHW[:3])
    with pytest.raises(ValueError, match=r"within 1\.\.4"):
        plots.rollout_figure(truth_TCHW, pred_TCHW, steps=(0, 4))
    with pytest.raises(ValueError, match="channel=5"):
        plots.rollout_figure(truth_TCHW, pred_TCHW, channel=5)


def test_rollout_figure_with_input_adds_the_input_state_and_persistence_error_row():
    truth_TCHW, pred_TCHW = _rollout(T=8, C=2, H=4, W=4)
    input_CHW = truth_TCHW[0] - 0.3
    fig = plots.rollout_figure(truth_TCHW, pred_TCHW, (2, 8), channel=1, input_CHW=input_CHW)
    panels = _images(fig)
    assert len(panels) == 1 + 4 * 2  # the input, then 4 rows of 2 steps
    assert panels[0].get_title() == "input (step 0)"
    assert np.array_equal(panels[0].images[0].get_array(), input_CHW[1].numpy())
    persistence = panels[-2:]
    assert persistence[0].get_ylabel().startswith("persistence error")
    expected = metrics.vrmse(input_CHW[1].expand(8, 4, 4), truth_TCHW[:, 1])
    assert [ax.get_title() for ax in persistence] == [
        f"step {s}  VRMSE {float(expected[s - 1]):.3f}" for s in (2, 8)
    ]
    shown = persistence[1].images[0].get_array()
    assert np.allclose(shown, (input_CHW[1] - truth_TCHW[7, 1]).numpy())
    model_err, persist_err = panels[5].images[0].get_clim(), persistence[0].images[0].get_clim()
    assert model_err == persist_err  # one error scale: the two errors compare by colour


def test_vrmse_figure_has_log_y_whole_step_ticks_and_every_method():
    curves = {
        "model": [0.1, 0.2, 0.4, 0.7, 0.9],
        "persistence": [0.3, 0.6, 0.9, 1.1, 1.2],
        "linear_extrapolation": [None, 0.5, 1.0, 2.0, 3.0],
        "spatial_mean": [1.0] * 5,
    }
    fig = plots.vrmse_steps_figure(curves, title="epoch 3 · step 30 · valid")
    ax = fig.axes[0]
    assert ax.get_yscale() == "log"
    assert ax.get_xlabel() == "rollout step" and ax.get_title() == "epoch 3 · step 30 · valid"
    lines = {line.get_label(): line for line in ax.get_lines()}
    assert {"model", "persistence", "linear extrapolation", "spatial mean"} <= set(lines)
    assert list(lines["model"].get_xdata()) == [1, 2, 3, 4, 5]
    assert np.isnan(lines["linear extrapolation"].get_ydata()[0])
    ticks = [t for t in ax.get_xticks() if 1 <= t <= 5]
    assert ticks and all(float(t).is_integer() for t in ticks)
    old_style = plots.vrmse_figure(torch.tensor([0.1, 0.2, 0.4]), [0.3, 0.6, 0.9])
    assert [ln.get_label() for ln in old_style.axes[0].get_lines()][:2] == ["model", "persistence"]


def test_spectra_figure_draws_metrics_radial_spectrum_of_truth_and_prediction():
    truth_TCHW, pred_TCHW = _rollout(T=6, C=1, H=16, W=16)
    fig = plots.spectra_figure([("family · trajectory 3", truth_TCHW, pred_TCHW)], steps=(1, 6))
    ax = fig.axes[0]
    assert ax.get_xscale() == ax.get_yscale() == "log" and ax.get_title().startswith("family")
    lines = {line.get_label(): line for line in ax.get_lines()}
    assert set(lines) == {"truth step 1", "pred step 1", "truth step 6", "pred step 6"}
    expected = metrics.radial_energy_spectrum(pred_TCHW[5, 0])[1:9].numpy()  # k = 1..Nyquist
    assert list(lines["pred step 6"].get_xdata()) == list(range(1, 9))
    assert np.allclose(lines["pred step 6"].get_ydata(), expected)


def test_radial_spectrum_adds_up_to_the_mean_square_and_finds_a_sine_wavenumber():
    x = torch.randn(3, 16, 20, generator=torch.Generator().manual_seed(1))
    energy = metrics.radial_energy_spectrum(x)
    assert torch.allclose(energy.sum(-1), x.double().pow(2).mean(dim=(-2, -1)))
    grid = torch.arange(32, dtype=torch.float64)
    sine = torch.sin(2 * torch.pi * 5 * grid / 32).expand(32, 32)
    energy = metrics.radial_energy_spectrum(sine)
    assert int(energy.argmax()) == 5 and float(energy[5]) == pytest.approx(0.5)


def test_save_figure_writes_a_png_atomically_and_replaces_old_file(tmp_path):
    target = tmp_path / "figs" / "rollout.png"
    target.parent.mkdir()
    target.write_bytes(b"old")
    truth_TCHW, pred_TCHW = _rollout()
    plots.save_figure(plots.rollout_figure(truth_TCHW, pred_TCHW), target)
    data = target.read_bytes()
    assert data.startswith(PNG_SIGNATURE)
    assert len(data) > 20_000  # 12 image panels, not an empty canvas
    assert [p.name for p in target.parent.iterdir()] == ["rollout.png"]  # no temp left
