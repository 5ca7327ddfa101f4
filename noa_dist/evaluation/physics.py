"""Physics checks of the demo families, on denormalised states, as per-step sums.

bounds (Allen-Cahn): the phase field u stays within [-1, 1] (the two stable phases); we count
the values outside (a non-finite value counts as outside) and keep each trajectory's largest
excess max(|u| - 1, 0). mean_vorticity (Navier-Stokes): the forcing and the noise have zero
mean, so the spatial mean of the vorticity only decays by the linear drag; we sum the drift
|<w_t> - <w_0>| of prediction and truth. The truth's numbers are given beside the model's.
"""

from __future__ import annotations

import torch
from torch import Tensor

from noa_dist.metrics import SPATIAL_DIMS

BOUNDS = (-1.0, 1.0)
SUMS = {
    "bounds": ("outside_pred", "outside_true", "points"),
    "mean_vorticity": ("drift_pred", "drift_true", "samples"),
}


class PhysicsSums:
    """Per-step sums [T] of each check that runs, over the members of its family's group."""

    def __init__(self, checks: dict[str, int], channel: int | None, n_steps: int, device) -> None:
        self.checks, self.channel = checks, channel
        self.sums = {
            f"{check}/{name}": torch.zeros(n_steps, dtype=torch.float64, device=device)
            for check in checks
            for name in SUMS[check]
        }

    def add(self, step: int, pred: Tensor, truth: Tensor, u0: Tensor, member_BG: Tensor) -> Tensor:
        """Add step `step` (0-based) of [B, C, H, W] states; returns the [B] bounds excess."""
        excess_B = torch.zeros(pred.shape[0], dtype=torch.float64, device=pred.device)
        if "bounds" in self.checks:
            in_group_B = member_BG[:, self.checks["bounds"]]
            p, t = pred[:, self.channel], truth[:, self.channel]
            self.sums["bounds/outside_pred"][step] += in_group_B @ _outside(p)
            self.sums["bounds/outside_true"][step] += in_group_B @ _outside(t)
            self.sums["bounds/points"][step] += in_group_B.sum() * p[0].numel()
            excess_B = torch.where(in_group_B > 0, _excess(p), 0.0)  # 0 * inf is NaN
        if "mean_vorticity" in self.checks:
            in_group_B = member_BG[:, self.checks["mean_vorticity"]]
            w0_B = u0[:, self.channel].double().mean(dim=SPATIAL_DIMS)
            drift_pred = (pred[:, self.channel].double().mean(dim=SPATIAL_DIMS) - w0_B).abs()
            drift_true = (truth[:, self.channel].double().mean(dim=SPATIAL_DIMS) - w0_B).abs()
            finite_B = torch.isfinite(drift_pred)
            self.sums["mean_vorticity/drift_pred"][step] += in_group_B @ drift_pred.nan_to_num(0.0)
            self.sums["mean_vorticity/drift_true"][step] += in_group_B @ drift_true
            self.sums["mean_vorticity/samples"][step] += in_group_B @ finite_B.double()
        return excess_B


def _outside(u_BHW: Tensor) -> Tensor:
    """[B] number of values outside BOUNDS (non-finite ones included)."""
    inside = (u_BHW >= BOUNDS[0]) & (u_BHW <= BOUNDS[1])
    return (~inside).flatten(1).sum(dim=1).double()


def _excess(u_BHW: Tensor) -> Tensor:
    """[B] largest distance of a value beyond BOUNDS (inf if a value is not finite)."""
    above = (u_BHW - BOUNDS[1]).clamp(min=0)
    below = (BOUNDS[0] - u_BHW).clamp(min=0)
    excess = torch.maximum(above, below).nan_to_num(nan=float("inf"))
    return excess.flatten(1).amax(dim=1).double()
