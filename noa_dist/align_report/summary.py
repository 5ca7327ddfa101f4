"""The report's numbers from the reduced sums: pure functions, one codebook at a time.

Definitions (n = windows of the split, J windows per trajectory, K_c codes in codebook c):
  utilization      codes used / K_c, with n shown: at most min(1, n / K_c) is reachable;
  perplexity       exp(H) of the code histogram, H in nats; entropy_ratio = H / log K_c;
  agreement        fraction of windows whose predicted code equals the true window's code;
  chance           the agreement two independent draws from the two histograms would have;
  cosine           per window, between z_e(pred) and z_e(truth), and between the projector's
                   latent of the window's bottleneck and z_e(truth) (the L_latent pair);
  cv               per trajectory, std / mean of |z_e| over its J windows, averaged.
Codebooks are never pooled (the prototype counted K^L joint codes as "available").
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from noa_dist.align_report.measure import COSINE_BINS, Reduced
from noa_dist.features import CATEGORIES

USAGE_KEYS = ("codes_used", "utilization", "perplexity", "entropy", "entropy_ratio")
RECON_KEYS = ("recon_mse", "explained_variance", "commit")


def mean_std(total: float, total_sq: float, n: float) -> tuple[float, float]:
    """(mean, population std) of n values from their sum and sum of squares."""
    if n <= 0:
        return math.nan, math.nan
    mean = total / n
    return mean, math.sqrt(max(total_sq / n - mean * mean, 0.0))


def agreement(agree_K: Tensor, n: float) -> list[float]:
    """Per codebook: windows whose predicted code equals the true one / n."""
    return [float(a) / n if n > 0 else math.nan for a in agree_K.tolist()]


def chance_agreement(counts_a: Tensor, counts_b: Tensor) -> float:
    """sum_k p_a(k) p_b(k): the agreement of independent draws from the two histograms."""
    pa = counts_a.double() / counts_a.sum().clamp(min=1)
    pb = counts_b.double() / counts_b.sum().clamp(min=1)
    return float((pa * pb).sum())


def max_utilization(n: float, codebook_size: int) -> float:
    """The largest utilization n windows can show: each uses one code per codebook."""
    return min(1.0, n / codebook_size)


def histogram_edges(bins: int = COSINE_BINS) -> list[float]:
    return torch.linspace(-1.0, 1.0, bins + 1).tolist()


def codebooks(r: Reduced, n: float) -> list[dict]:
    """One entry per codebook (= tokenizer category): usage of truth and prediction, agreement."""
    agree = agreement(r.sums["agree"], n)
    rows = []
    for c, name in enumerate(CATEGORIES):
        size = r.truth[name]["codebook_size"]
        rows.append({
            "name": name,
            "codebook_size": size,
            "n": int(n),
            "max_utilization": max_utilization(n, size),
            "truth": {k: r.truth[name][k] for k in USAGE_KEYS},
            "pred": {k: r.pred[name][k] for k in USAGE_KEYS},
            "agreement": agree[c],
            "chance_agreement": chance_agreement(r.pred_counts[c], r.truth_counts[c]),
        })  # fmt: skip
    return rows


def reconstruction(r: Reduced) -> dict:
    """Per category, in normalised feature units, for the true and the predicted windows."""
    return {
        side: {name: {k: m[name][k] for k in RECON_KEYS} for name in CATEGORIES}
        for side, m in (("truth", r.truth), ("pred", r.pred))
    }


def cosines(r: Reduced, n: float, *, projector: bool) -> dict:
    s = r.sums

    def pair(prefix: str, mse_key: str) -> dict:
        mean, std = mean_std(float(s[prefix]), float(s[f"{prefix}_sq"]), n)
        mse = float(s[mse_key]) / n if n > 0 else math.nan
        return {"available": True, "cosine_mean": mean, "cosine_std": std, "mse": mse,
                "histogram": s[f"{prefix}_hist"].tolist()}  # fmt: skip

    latent = (
        pair("cos_latent", "latent_mse")
        if projector
        else {"available": False, "reason": "not trained with --enable-latent-loss"}
    )
    return {
        "latent_pair": latent,
        "pred_vs_truth": pair("cos_zz", "mse_zz"),
        "histogram_edges": histogram_edges(),
    }


def temporal(r: Reduced, trajectories: float, windows: int) -> dict:
    """Latent norm over the windows of a trajectory, prediction against truth."""
    s, out = r.sums, {"windows_per_trajectory": windows}
    for side, key in (("pred", "pred"), ("truth", "true")):
        per_window = [
            mean_std(float(a), float(b), trajectories)
            for a, b in zip(s[f"norm_{key}"], s[f"norm_{key}_sq"], strict=True)
        ]
        mean, std = mean_std(
            float(s[f"norm_{key}"].sum()), float(s[f"norm_{key}_sq"].sum()), trajectories * windows
        )
        cv = float(s[f"cv_{key}"]) / trajectories if trajectories > 0 else math.nan
        out[side] = {"norm_mean": mean, "norm_std": std, "cv": cv,
                     "norm_per_window": [m for m, _ in per_window],
                     "norm_std_per_window": [sd for _, sd in per_window]}  # fmt: skip
    out["cv_difference"] = out["pred"]["cv"] - out["truth"]["cv"]
    return out
