"""Evaluation metrics as The Well defines them, the baseline forecasts, rollout time windows.

VRMSE (the_well/benchmark/metrics/spatial.py) = sqrt(MSE / (Var_space(target) + eps)) per
field and step, with the unbiased (N - 1) spatial variance and eps = 1e-7 added to the
variance. 1.0 is the score of predicting the spatial mean; persistence (u_t = u_0) is the
baseline an autoregressive model has to beat. Relative L2 is The Well's NRMSE; the binned
spectral MSE/NMSE is its `binned_spectral_mse` (benchmark/metrics/spectral.py); the radial
energy spectrum (per integer wavenumber shell) is what the figures draw.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

SPATIAL_DIMS = (-2, -1)  # our layout is [..., C, H, W]; The Well's is [..., H, W, C]


def vrmse(pred: Tensor, target: Tensor, eps: float = 1e-7) -> Tensor:
    """Variance-scaled RMSE over space, [..., C, H, W] -> [..., C] (e.g. [B, T, C]), in fp32."""
    return torch.sqrt(vrmse_squared(pred, target, eps))


def vrmse_squared(pred: Tensor, target: Tensor, eps: float = 1e-7) -> Tensor:
    """MSE over space / (the target's variance + eps), [..., C, H, W] -> [..., C], fp32: VRMSE
    without the square root (a loss: finite gradient where pred == target)."""
    if pred.shape != target.shape:
        raise ValueError(f"vrmse: pred {tuple(pred.shape)} and target {tuple(target.shape)} differ")
    pred, target = pred.float(), target.float()
    mse = (pred - target).pow(2).mean(dim=SPATIAL_DIMS)
    return mse / (target.var(dim=SPATIAL_DIMS, correction=1) + eps)


def relative_l2(pred: Tensor, target: Tensor, eps: float = 1e-7) -> Tensor:
    """||pred - target|| / ||target|| over space, [..., C, H, W] -> [..., C], in fp32: The Well's
    NRMSE, sqrt(MSE / (mean(target^2) + eps)); it does not reward a field for having a mean."""
    pred, target = pred.float(), target.float()
    mse = (pred - target).pow(2).mean(dim=SPATIAL_DIMS)
    return torch.sqrt(mse / (target.pow(2).mean(dim=SPATIAL_DIMS) + eps))


SPECTRAL_BINS = 3  # The Well's low / medium / high wavenumber bins


def spectral_bin_edges(spatial_shape: tuple[int, ...]) -> Tensor:
    """The Well's default bin edges: 0, then logspace(log10(2pi/N), log10(pi sqrt(d)), 4)[1:].

    float32 and computed as The Well does: the lowest wavenumber 2pi/N lies on the first inner
    edge, so bin membership depends on the rounding, which must be the same."""
    edges = torch.logspace(
        np.log10(2 * np.pi / max(spatial_shape)),
        np.log10(np.pi * np.sqrt(len(spatial_shape)) + 1e-6),
        SPECTRAL_BINS + 1,
    )
    edges[0] = 0.0
    return edges


def _wavenumber_bins(spatial_shape: tuple[int, ...], device: torch.device) -> Tensor:
    """[prod(shape), SPECTRAL_BINS] one-hot bin of each flattened isotropic wavenumber 2pi*|f|
    (wavenumbers beyond the last edge belong to no bin, as in The Well)."""
    index = torch.bucketize(
        _wavenumber_magnitude(spatial_shape).flatten(),
        spectral_bin_edges(spatial_shape),
        right=True,
    )
    return F.one_hot(index - 1, SPECTRAL_BINS + 1)[:, :SPECTRAL_BINS].to(device)


def _wavenumber_magnitude(spatial_shape: tuple[int, ...]) -> Tensor:
    """Isotropic wavenumber 2pi*|f| (radians per grid cell) of each FFT mode, shape `spatial_shape`."""
    squared = torch.zeros(spatial_shape)
    for axis, n in enumerate(spatial_shape):
        k = (2 * np.pi * torch.fft.fftfreq(n)).reshape((n,) + (1,) * (len(spatial_shape) - 1))
        squared = squared + torch.moveaxis(k, 0, axis) ** 2
    return squared.sqrt()


def radial_energy_spectrum(x: Tensor) -> Tensor:
    """Energy per integer wavenumber shell, [..., H, W] -> [..., K], in fp64.

    Shell k holds the modes whose wavenumber, in cycles per domain (of the longer side), rounds
    to k; K covers every mode, so by Parseval the shells add up to mean(x^2). The wavenumbers
    are those of `binned_spectral_error` (The Well's bins are ranges of the same |k|)."""
    shape = tuple(x.shape[-2:])
    shell = (_wavenumber_magnitude(shape) * max(shape) / (2 * np.pi)).round().long().flatten()
    power = torch.fft.fft2(x.double(), dim=SPATIAL_DIMS).abs().square().flatten(-2)
    energy = torch.zeros(*power.shape[:-1], int(shell.max()) + 1, dtype=power.dtype)
    energy = energy.to(power.device).index_add_(-1, shell.to(power.device), power)
    return energy / math.prod(shape) ** 2


def binned_spectral_error(pred: Tensor, target: Tensor, eps: float = 1e-7) -> tuple[Tensor, Tensor]:
    """(MSE, NMSE) of the error in each wavenumber bin, [..., C, H, W] -> [..., C, 3] each.

    By Parseval the bins' MSEs add up to the MSE (less the modes beyond the last edge); NMSE
    divides by the target's energy in the bin. `target` may broadcast against `pred` (several
    forecasts of one truth: its spectrum is taken once). At least fp32."""
    dtype = torch.promote_types(torch.promote_types(pred.dtype, target.dtype), torch.float32)
    shape = tuple(pred.shape[-2:])
    bins_KB = _wavenumber_bins(shape, pred.device).to(dtype)
    scale = math.prod(shape) ** 2

    def binned_energy(x: Tensor) -> Tensor:
        power = torch.fft.fftn(x.to(dtype), dim=SPATIAL_DIMS).abs().square()
        return power.flatten(-2) @ bins_KB / scale

    mse = binned_energy(pred.to(dtype) - target.to(dtype))
    return mse, mse / (binned_energy(target) + eps)


def rollout_time_windows(n_steps: int, n_intervals: int = 5) -> list[tuple[int, int]]:
    """The Well's rollout windows [start, stop) of 0-based steps: unique edges of
    [0] + int(exp(linspace(0, log T, min(T, 5)))) (T=30: 0, 1, 2, 5, 12, 30).

    The last edge is T itself: int(exp(log T)) rounds down to T - 1 for many T (5, 7, 8, ...),
    which in The Well's trainer leaves the last step out of every window."""
    if n_steps < 1:
        raise ValueError(f"rollout_time_windows: n_steps={n_steps}, expected >= 1")
    points = np.linspace(0, np.log(n_steps), min(n_steps, n_intervals))
    edges = sorted({0, *(int(np.exp(p)) for p in points[:-1]), n_steps})
    return list(zip(edges[:-1], edges[1:], strict=True))


def linear_extrapolation(u0_BCHW: Tensor, u1_BCHW: Tensor, step: int) -> Tensor:
    """u0 + step * (u1 - u0): the forecast of step `step` (1-based) from the first two states.
    It is given u1, so it forecasts only from step 2 on."""
    return u0_BCHW + step * (u1_BCHW - u0_BCHW)


def spatial_mean_forecast(u0_BCHW: Tensor) -> Tensor:
    """Each channel's spatial mean of u0, everywhere and at every step (VRMSE about 1 while the
    mean is conserved: the level VRMSE is scaled to)."""
    return u0_BCHW.mean(dim=SPATIAL_DIMS, keepdim=True).expand_as(u0_BCHW)


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
