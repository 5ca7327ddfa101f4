"""The report's figure: codebook use, agreement, cosine histograms, latent norm over windows.

Built as a `matplotlib.figure.Figure` without pyplot (as noa_dist/plots.py) and written as PNG
through the project's atomic write.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
from matplotlib.figure import Figure

from noa_dist.atomic import atomic_write_bytes

PRED, TRUTH = "tab:orange", "tab:blue"


def figure(report: dict) -> Figure:
    fig = Figure(figsize=(11, 7.5), layout="constrained")
    axes = fig.subplots(2, 2)
    rows = report["token_diversity"]["codebooks"]
    _utilization(axes[0, 0], rows)
    _agreement(axes[0, 1], rows)
    _cosines(axes[1, 0], report["alignment"])
    _norms(axes[1, 1], report["temporal"])
    fig.suptitle(f"{report['checkpoint']}: {report['verdict']['title']}", fontsize=9)
    return fig


def write_figure(report: dict, out: Path) -> Path:
    buffer = io.BytesIO()
    figure(report).savefig(buffer, format="png", dpi=110)
    out.parent.mkdir(parents=True, exist_ok=True)
    return atomic_write_bytes(out, buffer.getvalue())


def _utilization(ax, rows: list[dict]) -> None:
    x = np.arange(len(rows))
    ax.bar(x - 0.2, [r["pred"]["utilization"] for r in rows], 0.4, label="pred", color=PRED)
    ax.bar(x + 0.2, [r["truth"]["utilization"] for r in rows], 0.4, label="truth", color=TRUTH)
    ax.scatter(x, [r["max_utilization"] for r in rows], marker="_", s=600, color="k",
               label="reachable with n windows", zorder=3)  # fmt: skip
    ax.axhline(0.5, color="grey", ls="--", lw=0.8)
    ax.set_xticks(x, [f"{r['name']}\nK={r['codebook_size']}, n={r['n']}" for r in rows])
    ax.set_ylim(0, 1.25)
    ax.set_ylabel("codes used / codebook size")
    ax.set_title("Utilization per codebook (dashed: the seed's 50%)")
    ax.legend(fontsize=8, loc="upper center", ncol=3)


def _agreement(ax, rows: list[dict]) -> None:
    x = np.arange(len(rows))
    ax.bar(x, [r["agreement"] for r in rows], 0.5, color="tab:green", label="pred == truth")
    ax.scatter(x, [r["chance_agreement"] for r in rows], marker="_", s=600, color="k",
               label="chance", zorder=3)  # fmt: skip
    ax.set_xticks(x, [r["name"] for r in rows])
    ax.set_ylim(0, 1.25)
    ax.set_ylabel("fraction of windows")
    ax.set_title("Token agreement per codebook")
    ax.legend(fontsize=8, loc="upper center", ncol=2)


def _cosines(ax, alignment: dict) -> None:
    edges = np.asarray(alignment["histogram_edges"])
    centers, width = (edges[:-1] + edges[1:]) / 2, np.diff(edges)
    pairs = [("z_e(pred) vs z_e(truth)", alignment["pred_vs_truth"], "tab:purple")]
    if alignment["latent_pair"]["available"]:
        pairs.append(("projector vs z_e(truth)", alignment["latent_pair"], "tab:red"))
    for label, pair, color in pairs:
        counts = np.asarray(pair["histogram"])
        share = counts / max(counts.sum(), 1)
        ax.bar(centers, share, width, alpha=0.5, color=color,
               label=f"{label}: {pair['cosine_mean']:.2f}")  # fmt: skip
    ax.axvline(0.5, color="grey", ls="--", lw=0.8)
    ax.set_xlim(-1, 1)
    ax.set_xlabel("cosine similarity")
    ax.set_ylabel("fraction of windows")
    ax.set_title("Cosine similarity" + ("" if len(pairs) > 1 else " (no projector)"))
    ax.legend(fontsize=8)


def _norms(ax, temporal: dict) -> None:
    j = np.arange(1, temporal["windows_per_trajectory"] + 1)
    for side, color in (("pred", PRED), ("truth", TRUTH)):
        s = temporal[side]
        mean, std = np.asarray(s["norm_per_window"]), np.asarray(s["norm_std_per_window"])
        ax.plot(j, mean, marker="o", color=color, label=f"{side} (CV {s['cv']:.3f})")
        ax.fill_between(j, mean - std, mean + std, color=color, alpha=0.2)
    ax.set_xticks(j)
    ax.set_xlabel("window of the trajectory")
    ax.set_ylabel("|z_e| (mean ± std over trajectories)")
    ax.set_title("Latent norm over windows")
    ax.legend(fontsize=8)
