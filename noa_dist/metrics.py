"""Evaluation metrics: VRMSE as The Well defines it, the persistence baseline, on-device sums.

VRMSE (the_well/benchmark/metrics/spatial.py) = sqrt(MSE / (Var_space(target) + eps)) per
field and step, with the unbiased (N - 1) spatial variance and eps = 1e-7 added to the
variance. 1.0 is the score of predicting the spatial mean; persistence (u_t = u_0) is the
baseline an autoregressive model has to beat.
"""

from __future__ import annotations

import torch
from torch import Tensor

SPATIAL_DIMS = (-2, -1)  # our layout is [..., C, H, W]; The Well's is [..., H, W, C]


def vrmse(pred: Tensor, target: Tensor, eps: float = 1e-7) -> Tensor:
    """Variance-scaled RMSE over space, [..., C, H, W] -> [..., C] (e.g. [B, T, C]), in fp32."""
    if pred.shape != target.shape:
        raise ValueError(f"vrmse: pred {tuple(pred.shape)} and target {tuple(target.shape)} differ")
    pred, target = pred.float(), target.float()
    mse = (pred - target).pow(2).mean(dim=SPATIAL_DIMS)
    variance = target.var(dim=SPATIAL_DIMS, correction=1)
    return torch.sqrt(mse / (variance + eps))


def persistence_prediction(u0_BCHW: Tensor, n_steps: int) -> Tensor:
    """The "nothing changes" forecast: u0 repeated, [B, n_steps, C, H, W] (a view, no copy)."""
    return u0_BCHW.unsqueeze(1).expand(-1, n_steps, -1, -1, -1)


class MetricAccumulator:
    """Sums a per-sample [B, T, C] metric over samples, on device, without host syncs.

    `state()` gives (sums [T, C], count []) for the trainer to all-reduce (SUM) across ranks;
    `mean()` divides them. Preallocated so every rank holds the same shapes even with no data.
    """

    def __init__(self, n_steps: int, n_channels: int, device: torch.device | str = "cpu") -> None:
        self.sums_TC = torch.zeros(n_steps, n_channels, dtype=torch.float64, device=device)
        self.count = torch.zeros((), dtype=torch.float64, device=device)

    def update(self, values_BTC: Tensor) -> None:
        """Add one batch of per-sample values, [B, T, C]."""
        if values_BTC.shape[1:] != self.sums_TC.shape:
            raise ValueError(
                f"MetricAccumulator: expected [B, {', '.join(map(str, self.sums_TC.shape))}], "
                f"got {tuple(values_BTC.shape)}"
            )
        self.sums_TC += values_BTC.detach().to(torch.float64).sum(dim=0)
        self.count += values_BTC.shape[0]

    def state(self) -> tuple[Tensor, Tensor]:
        """(sums [T, C], count []), both float64 tensors on the accumulator's device."""
        return self.sums_TC, self.count

    def mean(self) -> Tensor:
        """Mean per step and channel, [T, C] (NaN before any update)."""
        return self.sums_TC / self.count

    def reset(self) -> None:
        self.sums_TC.zero_()
        self.count.zero_()
