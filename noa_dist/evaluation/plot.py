"""The evaluation's figures: VRMSE per rollout step (model against the baselines, one panel
per group) and truth / prediction / error frames of a few trajectories.

Built as `matplotlib.figure.Figure` without pyplot, as noa_dist/plots.py (whose rollout figure
draws the frames), and written through its atomic `save_figure`.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from matplotlib.figure import Figure

from noa_dist.evaluation.measure import Frames
from noa_dist.evaluation.render import checkpoint_label
from noa_dist.plots import default_steps, draw_vrmse_per_step, rollout_figure, save_figure

MAX_FRAME_CHANNELS = 4  # frame figures per trajectory, for datasets with many fields


def vrmse_figure(report: dict) -> Figure:
    """VRMSE (mean over fields) against rollout step, log y axis; one panel per group."""
    groups = report["groups"]
    fig = Figure(figsize=(4.2 * len(groups) + 0.6, 4.0), layout="constrained")
    axes = np.atleast_1d(fig.subplots(1, len(groups), sharey=True, squeeze=False)[0])
    for ax, (name, group) in zip(axes, groups.items(), strict=True):
        draw_vrmse_per_step(
            ax, {m: group["per_step"][m]["vrmse"]["mean"] for m in report["methods"]}
        )
        ax.set_title(f"{name} ({group['trajectories']} trajectories)")
    axes[0].set_ylabel("VRMSE (mean over fields)")
    axes[0].legend(fontsize="small")
    d = report["dataset"]
    fig.suptitle(f"{checkpoint_label(report)}\n{d['name']} / {d['split']}", fontsize="medium")
    return fig


def write_vrmse_figure(report: dict, path: Path) -> Path:
    return save_figure(vrmse_figure(report), path)


def write_frame_figures(report: dict, frames: list[Frames], folder: Path) -> list[Path]:
    """One PNG per kept trajectory and channel (the first MAX_FRAME_CHANNELS):
    frames_<group>_<trajectory>_<channel>.png."""
    channels = report["dataset"]["channels"]
    written = []
    for f in frames:
        steps = default_steps(f.truth_TCHW.shape[0])
        for c, channel in enumerate(channels[:MAX_FRAME_CHANNELS]):
            title = (
                f"{f.group} · trajectory {f.trajectory} · channel {channel} · "
                f"{report['dataset']['split']}\n{checkpoint_label(report)}"
            )
            fig = rollout_figure(f.truth_TCHW, f.pred_TCHW, steps, channel=c, title=title)
            path = folder / f"frames_{f.group}_{f.trajectory:04d}_{channel}.png"
            written.append(save_figure(fig, path))
    return written
