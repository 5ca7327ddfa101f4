"""Figures for W&B and for files: rollout frames, loss curves, VRMSE per rollout step.

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
from matplotlib.figure import Figure

from noa_dist.metrics import vrmse

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
) -> Figure:
    """Truth / prediction / error rows at the chosen 1-based rollout `steps` of one channel.

    Truth and prediction share one colour scale (the truth's range, so a diverging
    prediction saturates instead of washing out the truth); the error row uses a symmetric
    diverging scale. Each prediction panel is titled with its frame VRMSE (`frames_vrmse`).
    """
    truth_TCHW, pred_TCHW = _as_numpy(truth_TCHW), _as_numpy(pred_TCHW)
    _check_rollout(truth_TCHW, pred_TCHW, channel)
    steps = default_steps(truth_TCHW.shape[0]) if steps is None else tuple(steps)
    _check_steps(steps, truth_TCHW.shape[0])
    truth_SHW = truth_TCHW[[s - 1 for s in steps], channel]
    pred_SHW = pred_TCHW[[s - 1 for s in steps], channel]
    error_SHW = pred_SHW - truth_SHW
    vrmse_S = frames_vrmse(truth_SHW, pred_SHW)
    fig = Figure(
        figsize=(_PANEL_INCHES * len(steps) + 1.2, _PANEL_INCHES * 3 + 0.5), layout="constrained"
    )
    axes = fig.subplots(3, len(steps), squeeze=False, sharex=True, sharey=True)
    lo, hi = _finite_range(truth_SHW)
    err = max(_finite_range(np.abs(error_SHW))[1], _EPS)
    rows = (
        ("truth", truth_SHW, {"cmap": "viridis", "vmin": lo, "vmax": hi}),
        ("prediction", pred_SHW, {"cmap": "viridis", "vmin": lo, "vmax": hi}),
        ("error (pred - truth)", error_SHW, {"cmap": "RdBu_r", "vmin": -err, "vmax": err}),
    )
    for r, (label, frames_SHW, style) in enumerate(rows):
        for c, frame_HW in enumerate(frames_SHW):
            image = axes[r, c].imshow(frame_HW, origin="lower", interpolation="nearest", **style)
        fig.colorbar(image, ax=axes[r, :], shrink=0.9, pad=0.02)
        axes[r, 0].set_ylabel(label)
    for c, step in enumerate(steps):
        axes[0, c].set_title(f"step {step}")
        axes[1, c].set_title(f"step {step}  VRMSE {vrmse_S[c]:.3f}")
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


def loss_curves_figure(
    history: Mapping[str, Sequence[float]],
    steps: Mapping[str, Sequence[int]] | None = None,
    title: str = "loss",
) -> Figure:
    """One line per series (e.g. "train/loss", "val/loss") on a log y-axis.

    `steps[name]` gives each series' x positions (training step); without it a series is
    plotted against 1..n, which is right only when all series were logged equally often.
    """
    fig = Figure(figsize=(6.4, 4.0), layout="constrained")
    ax = fig.subplots()
    any_positive = False
    for name, values in history.items():
        y = _as_numpy(values).reshape(-1)
        x = (
            np.arange(1, y.size + 1)
            if steps is None or name not in steps
            else _as_numpy(steps[name])
        )
        ax.plot(x, y, label=name, marker="o" if y.size < 30 else None, markersize=3)
        any_positive |= bool(np.any(y[np.isfinite(y)] > 0))
    if any_positive:
        ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_title(title)
    ax.grid(True, which="both", alpha=0.3)
    if history:
        ax.legend()
    return fig


def vrmse_figure(
    vrmse_per_step: Sequence[float],
    persistence_per_step: Sequence[float],
    title: str = "VRMSE per rollout step",
) -> Figure:
    """Model VRMSE vs the persistence baseline (u(t+k) = u(t)) against rollout step k."""
    model, persistence = _as_numpy(vrmse_per_step).ravel(), _as_numpy(persistence_per_step).ravel()
    fig = Figure(figsize=(6.4, 4.0), layout="constrained")
    ax = fig.subplots()
    ax.plot(np.arange(1, model.size + 1), model, marker="o", markersize=3, label="model")
    ax.plot(
        np.arange(1, persistence.size + 1),
        persistence,
        marker="s",
        markersize=3,
        linestyle="--",
        label="persistence",
    )
    ax.axhline(1.0, color="grey", linewidth=0.8, linestyle=":", label="spatial mean (1.0)")
    ax.set_xlabel("rollout step k")
    ax.set_ylabel("VRMSE")
    ax.set_ylim(bottom=0)
    ax.set_title(title)
    ax.grid(True, alpha=0.3)
    ax.legend()
    return fig


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
