"""Figures for W&B and for files: rollout frames, VRMSE per rollout step, energy spectra.

The trainer draws them after each validation, noa-eval for its report; the training curves
of a run are noa_dist/plot_run.py's (`noa-plot`). Every number on them comes from
noa_dist/metrics.py (one VRMSE, one spectrum).

Figures are built as `matplotlib.figure.Figure` objects without pyplot, so no GUI backend
and no global figure registry is involved (PNG output uses Agg); this is safe in worker
processes and on headless nodes.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from noa_dist.metrics import radial_energy_spectrum, vrmse

_EPS = 1e-7  # smallest half-range of the error colour scale (an exact prediction is all 0)
_PANEL_INCHES = 2.3


def _as_numpy(x: Any) -> np.ndarray:
    """Tensor or array -> float32 numpy on the host (a device sync for CUDA tensors)."""
    if hasattr(x, "detach"):
        x = x.detach().float().cpu().numpy()
    return np.asarray(x, dtype=np.float32)


def frames_vrmse(truth_SHW: np.ndarray, pred_SHW: np.ndarray) -> np.ndarray:
    """VRMSE of each frame, [S, H, W] -> [S], by `metrics.vrmse` (The Well's definition), so
    the numbers on a figure are the numbers validation logs and evaluation reports."""
    return vrmse(torch.from_numpy(pred_SHW), torch.from_numpy(truth_SHW)).numpy()


def default_steps(num_steps: int) -> tuple[int, ...]:
    """1-based rollout steps to show: first, quarter, half, last (deduplicated)."""
    return tuple(sorted({max(1, s) for s in (1, num_steps // 4, num_steps // 2, num_steps)}))


def rollout_figure(
    truth_TCHW: Any,
    pred_TCHW: Any,
    steps: Sequence[int] | None = None,
    channel: int = 0,
    title: str = "",
    input_CHW: Any = None,
) -> Figure:
    """Truth / prediction / error rows at the chosen 1-based rollout `steps` of one channel.

    With `input_CHW` (the state the rollout started from) a first column shows it and a last
    row the persistence error (input - truth): the error the model has to beat. Truth, input
    and prediction share one colour scale (the truth's range, so a diverging prediction
    saturates instead of washing out the truth); the error rows share one symmetric diverging
    scale. Panels are titled with their frame VRMSE (`frames_vrmse`).
    """
    truth_TCHW, pred_TCHW = _as_numpy(truth_TCHW), _as_numpy(pred_TCHW)
    _check_rollout(truth_TCHW, pred_TCHW, channel)
    steps = default_steps(truth_TCHW.shape[0]) if steps is None else tuple(steps)
    _check_steps(steps, truth_TCHW.shape[0])
    truth_SHW = truth_TCHW[[s - 1 for s in steps], channel]
    pred_SHW = pred_TCHW[[s - 1 for s in steps], channel]
    rows = [("truth", truth_SHW, None), ("prediction", pred_SHW, frames_vrmse(truth_SHW, pred_SHW))]
    rows.append(("error (pred - truth)", pred_SHW - truth_SHW, None))
    input_HW = None if input_CHW is None else _as_numpy(input_CHW)[channel]
    if input_HW is not None:
        persistence_SHW = np.broadcast_to(input_HW, truth_SHW.shape)
        vrmse_S = frames_vrmse(truth_SHW, np.ascontiguousarray(persistence_SHW))
        rows.append(("persistence error\n(input - truth)", persistence_SHW - truth_SHW, vrmse_S))
    lead = 0 if input_HW is None else 1
    fig = Figure(
        figsize=(_PANEL_INCHES * (len(steps) + lead) + 1.2, _PANEL_INCHES * len(rows) + 0.6),
        layout="constrained",
    )
    axes = fig.subplots(len(rows), len(steps) + lead, squeeze=False, sharex=True, sharey=True)
    lo, hi = _finite_range(truth_SHW)
    err = max(max(_finite_range(np.abs(frames))[1] for _, frames, _ in rows[2:]), _EPS)
    for r, (label, frames_SHW, vrmse_S) in enumerate(rows):
        style = {"cmap": "viridis", "vmin": lo, "vmax": hi}
        if r >= 2:
            style = {"cmap": "RdBu_r", "vmin": -err, "vmax": err}
        for c, frame_HW in enumerate(frames_SHW):
            ax = axes[r, c + lead]
            image = ax.imshow(frame_HW, origin="lower", interpolation="nearest", **style)
            vrmse_text = "" if vrmse_S is None else f"  VRMSE {vrmse_S[c]:.3f}"
            ax.set_title(f"step {steps[c]}{vrmse_text}", fontsize="small")
        if r in (1, len(rows) - 1):  # one scale for the fields, one for the errors
            fig.colorbar(image, ax=axes[:2] if r == 1 else axes[2:], shrink=0.9, pad=0.02)
        axes[r, lead].set_ylabel(label)
    if input_HW is not None:
        axes[0, 0].imshow(input_HW, origin="lower", interpolation="nearest", vmin=lo, vmax=hi)
        axes[0, 0].set_title("input (step 0)", fontsize="small")
        for ax in axes[1:, 0]:
            ax.set_axis_off()
    for ax in axes.flat:
        ax.set_xticks([])
        ax.set_yticks([])
    fig.suptitle(title or f"rollout, channel {channel}")
    return fig


def _check_rollout(truth_TCHW: np.ndarray, pred_TCHW: np.ndarray, channel: int) -> None:
    if truth_TCHW.ndim != 4 or truth_TCHW.shape != pred_TCHW.shape:
        raise ValueError(
            f"rollout_figure: truth {truth_TCHW.shape} and prediction {pred_TCHW.shape} "
            "must both be (T, C, H, W) with equal shapes"
        )
    if not 0 <= channel < truth_TCHW.shape[1]:
        raise ValueError(f"rollout_figure: channel={channel}, data has {truth_TCHW.shape[1]}")


def _check_steps(steps: tuple[int, ...], num_steps: int) -> None:
    bad = [s for s in steps if not 1 <= s <= num_steps]
    if not steps or bad:
        raise ValueError(f"rollout_figure: steps {steps} must be non-empty within 1..{num_steps}")


def _finite_range(x: np.ndarray) -> tuple[float, float]:
    """(min, max) over finite values, widened when constant; (0, 1) if none are finite."""
    finite = x[np.isfinite(x)]
    if finite.size == 0:
        return 0.0, 1.0
    lo, hi = float(finite.min()), float(finite.max())
    return (lo, hi) if hi > lo else (lo - 0.5, hi + 0.5)


VRMSE_STYLES = {
    "model": {"marker": "o", "linewidth": 2.0},
    "persistence": {"marker": "s", "linestyle": "--"},
    "linear_extrapolation": {"marker": "^", "linestyle": "-."},
    "spatial_mean": {"marker": "x", "linestyle": ":"},
}


def draw_vrmse_per_step(ax: Axes, curves: Mapping[str, Sequence[float | None]]) -> None:
    """VRMSE against rollout step 1..T of each method (model, baselines) on a log y-axis,
    whole-step ticks, a grey line at 1.0 (the spatial mean's score). None/0/NaN are gaps."""
    for method, values in curves.items():
        y = np.array([np.nan if v is None else float(v) for v in values], dtype=float)
        y[~(y > 0)] = np.nan  # a log axis cannot show 0 (an exact forecast)
        style = VRMSE_STYLES.get(method, {"marker": "."})
        ax.plot(np.arange(1, y.size + 1), y, label=method.replace("_", " "), markersize=3, **style)
    ax.axhline(1.0, color="grey", linewidth=0.8)
    ax.set_yscale("log")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("rollout step")
    ax.grid(True, which="both", alpha=0.3)


def vrmse_steps_figure(curves: Mapping[str, Sequence[float | None]], title: str) -> Figure:
    """One panel of `draw_vrmse_per_step`: method -> VRMSE per rollout step."""
    fig = Figure(figsize=(6.4, 4.0), layout="constrained")
    ax = fig.subplots()
    draw_vrmse_per_step(ax, curves)
    ax.set_ylabel("VRMSE (mean over fields)")
    ax.set_title(title, fontsize="medium")
    ax.legend(fontsize="small")
    return fig


def vrmse_figure(
    vrmse_per_step: Sequence[float],
    persistence_per_step: Sequence[float],
    title: str = "VRMSE per rollout step",
) -> Figure:
    """Model VRMSE vs the persistence baseline (u(t+k) = u(t)) against rollout step k."""
    curves = {"model": _as_numpy(vrmse_per_step).ravel(), "persistence": persistence_per_step}
    return vrmse_steps_figure({k: _as_numpy(v).ravel().tolist() for k, v in curves.items()}, title)


def spectra_figure(
    rollouts: Sequence[tuple[str, Any, Any]],
    steps: Sequence[int],
    channel: int = 0,
    title: str = "",
) -> Figure:
    """Radial energy spectra of truth (solid) and prediction (dashed) at the 1-based `steps`,
    one log-log panel per (label, truth_TCHW, pred_TCHW), from k = 1 (the mean is left out)
    to the Nyquist wavenumber of the shorter side."""
    fig = Figure(figsize=(4.2 * len(rollouts) + 0.6, 4.0), layout="constrained")
    axes = fig.subplots(1, len(rollouts), squeeze=False)[0]
    colours = [f"C{i}" for i in range(len(steps))]
    for ax, (label, truth_TCHW, pred_TCHW) in zip(axes, rollouts, strict=True):
        for step, colour in zip(steps, colours, strict=True):
            for frames, style, name in ((truth_TCHW, "-", "truth"), (pred_TCHW, "--", "pred")):
                frame = torch.as_tensor(_as_numpy(frames)[step - 1, channel])
                nyquist = min(frame.shape) // 2  # shells beyond it are only partly filled
                energy_K = radial_energy_spectrum(frame).numpy()[: nyquist + 1]
                k = np.arange(1, energy_K.size)
                y = energy_K[1:].copy()
                y[~(y > 0)] = np.nan
                ax.plot(k, y, style, color=colour, label=f"{name} step {step}")
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("wavenumber k (cycles per domain)")
        ax.set_title(label, fontsize="medium")
        ax.grid(True, which="both", alpha=0.3)
    axes[0].set_ylabel("energy E(k)")
    axes[0].legend(fontsize="x-small", ncol=2)
    fig.suptitle(title or f"radial energy spectra, channel {channel}", fontsize="medium")
    return fig


def long_rollout_figures(r: Any, where: str) -> dict[str, Figure]:
    """W&B key -> figure for validation's long rollout (`evaluate.RolloutResult`): VRMSE per
    step of the model and the baselines, spectra and one frames figure (input, truth,
    prediction, both errors) per kept trajectory, of the first channel; `where` heads the
    titles (epoch, step, split)."""
    title = f"{where}: {r.trajectories} trajectories from their first state"
    figures = {"val/vrmse_per_step": vrmse_steps_figure(r.vrmse_per_step, title)}
    if not r.frames:
        return figures
    steps = default_steps(r.horizon)
    channel = r.channels[0]
    labels = [f"{f.group} · trajectory {f.trajectory}" for f in r.frames]
    figures["val/spectra"] = spectra_figure(
        [(label, f.truth_TCHW, f.pred_TCHW) for label, f in zip(labels, r.frames, strict=True)],
        steps,
        title=f"{where}: radial energy spectra of {channel}",
    )
    for label, f in zip(labels, r.frames, strict=True):
        figures[f"val/rollout/{f.group}_{f.trajectory:04d}"] = rollout_figure(
            f.truth_TCHW,
            f.pred_TCHW,
            steps,
            title=f"{where} · {label} · channel {channel}",
            input_CHW=r.inputs[f.trajectory],
        )
    return figures


def save_figure(fig: Figure, path: Path | str, dpi: int = 110) -> Path:
    """Write `fig` as PNG atomically (temp file in the same folder, then rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        fig.savefig(tmp, format="png", dpi=dpi)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path
