"""Trajectory features: a pure, differentiable fp32 function of a window, with named outputs.

Shape legend: B samples, T steps of the window, C channels (fields), H, W grid, N = B*T frames,
F features. Every statistic is per sample, per channel and per frame: nothing is averaged
across channels and nothing depends on the other samples of the batch (no batch statistics),
so a sample's features are the same alone, in a batch and on any rank (bitwise on CPU).

Per frame and channel (`frame_feature_names`), on a periodic grid, in grid units:
  mean, std, skewness, kurtosis (Pearson: E[d^4]/var^2, 3 for a Gaussian);
  log_grad_energy = log(mean |grad u|^2 + eps), forward periodic differences;
  log_lap_energy  = log(mean (lap u)^2 + eps), 5-point periodic Laplacian;
  radial spectrum of u - mean from rfft2 (norm="forward"; columns 1..W/2-1 counted twice, they
  stand for their conjugates), integer wavenumbers k = fftfreq * N per axis, |k| = norm:
    band<i>_fraction   energy in log-spaced band i of |k| in [1, |k|max] / energy off DC
                       (DC is apart: it is mean^2, already a feature);
    spectral_centroid  sum |k| P / sum P (off DC);
    spectral_slope     least-squares slope of log(E(k) / sum P) vs log k over the integer
                       shells k = 1..min(H, W)//2 (E(k): power with round(|k|) = k);
    anisotropy         (S_h - S_w) / (S_h + S_w), S_h = sum k_h^2 P, S_w = sum k_w^2 P: a
                       monotone, bounded form of the ratio S_h / S_w (h: axis -2, the Well's x).
Categories (the order of `TrajectoryFeatures.vector_BF` and `feature_specs`):
  TEMPORAL  the per-frame vector at fixed steps of the window: `temporal_positions` evenly
            spaced steps including the first and the last (all steps if the window is shorter).
            The full series is `temporal_BTF`; the tokenizer sees only these steps, so its
            input size is fixed by the window length.
  SUMMARY   per frame feature its mean over the T steps and (T > 1) its std over them; plus
            dynamics of the std series s and the energy series E = mean u^2 over the T + 1
            frames input, state 1..T at times 0, dt, ..., T*dt: growth rate (slope of log x
            per unit time), log(final / initial), lag-1 autocorrelation (T >= 2), and
            frame_corr, the mean spatial correlation of consecutive frames.
  INITIAL   the per-frame vector of the window's input state. The input state is detached:
            it is a constant in every feature (INITIAL, and frame 0 of the dynamics).
Only features flagged `differentiable` (TEMPORAL, SUMMARY) carry gradient to the states.
"""

from __future__ import annotations

import functools
import math
from dataclasses import asdict, dataclass

import torch
from torch import Tensor

TEMPORAL, SUMMARY, INITIAL = "temporal", "summary", "initial"
CATEGORIES = (TEMPORAL, SUMMARY, INITIAL)
MOMENT_FEATURES = ("mean", "std", "skewness", "kurtosis", "log_grad_energy", "log_lap_energy")
SPECTRAL_FEATURES = ("spectral_centroid", "spectral_slope", "anisotropy")
DYNAMICS_FEATURES = (
    "std_growth_rate",
    "std_log_final_over_initial",
    "energy_growth_rate",
    "energy_log_final_over_initial",
)
LAG1_FEATURES = ("std_lag1_autocorr", "energy_lag1_autocorr")  # need T >= 2
FRAME_CORR = "frame_corr"


@dataclass(frozen=True)
class FeatureConfig:
    """What the extractor computes; part of a tokenizer's spec (a change refuses old ones)."""

    n_bands: int = 4
    temporal_positions: int = 3
    eps: float = 1e-8

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class FeatureSpec:
    """One output of the extractor: `name` is unique, e.g. 'summary.c0.std.mean'."""

    name: str
    category: str
    channel: int
    differentiable: bool


@dataclass(frozen=True)
class TrajectoryFeatures:
    temporal_BTF: Tensor  # every step, channel-major: [B, T, C * n_frame_features]
    summary_BF: Tensor
    initial_BF: Tensor
    vector_BF: Tensor  # [B, len(feature_specs(...))]: TEMPORAL steps, SUMMARY, INITIAL


def frame_feature_names(config: FeatureConfig = FeatureConfig()) -> tuple[str, ...]:
    bands = tuple(f"band{i}_fraction" for i in range(config.n_bands))
    return (*MOMENT_FEATURES, *bands, *SPECTRAL_FEATURES)


def temporal_steps(window_length: int, config: FeatureConfig = FeatureConfig()) -> list[int]:
    """0-based steps of the window whose frame features form the TEMPORAL category."""
    n = min(config.temporal_positions, window_length)
    if n <= 1:
        return [window_length - 1]
    return sorted({round(i * (window_length - 1) / (n - 1)) for i in range(n)})


def summary_feature_names(window_length: int, config: FeatureConfig = FeatureConfig()):
    names = [f"{f}.mean" for f in frame_feature_names(config)]
    if window_length > 1:
        names += [f"{f}.std" for f in frame_feature_names(config)]
    names += list(DYNAMICS_FEATURES)
    if window_length > 1:
        names += list(LAG1_FEATURES)
    return [*names, FRAME_CORR]


def feature_specs(
    n_channels: int, window_length: int, config: FeatureConfig = FeatureConfig()
) -> list[FeatureSpec]:
    """The names, categories and channels of `trajectory_features(...).vector_BF`, in order."""
    if n_channels < 1 or window_length < 1:
        raise ValueError(f"feature_specs: n_channels {n_channels}, window {window_length}")
    frame = frame_feature_names(config)
    specs = [
        FeatureSpec(f"{TEMPORAL}.c{c}.{f}.step{step + 1}", TEMPORAL, c, True)
        for step in temporal_steps(window_length, config)
        for c in range(n_channels)
        for f in frame
    ]
    specs += [
        FeatureSpec(f"{SUMMARY}.c{c}.{f}", SUMMARY, c, True)
        for c in range(n_channels)
        for f in summary_feature_names(window_length, config)
    ]
    specs += [
        FeatureSpec(f"{INITIAL}.c{c}.{f}", INITIAL, c, False)
        for c in range(n_channels)
        for f in frame
    ]
    return specs


def trajectory_features(
    states_BTCHW: Tensor,
    input_BCHW: Tensor,
    *,
    dt: float | None = None,
    config: FeatureConfig = FeatureConfig(),
) -> TrajectoryFeatures:
    """Features of one window per sample (see the module doc); fp32 whatever the input dtype.

    `states_BTCHW`: the T states of the window (predicted or true); `input_BCHW`: the state the
    window starts from; `dt`: physical time between frames (default 1: per step).
    """
    if (
        states_BTCHW.ndim != 5
        or input_BCHW.shape != states_BTCHW.shape[:1] + states_BTCHW.shape[2:]
    ):
        raise ValueError(
            f"trajectory_features: states {tuple(states_BTCHW.shape)} must be [B, T, C, H, W] "
            f"and input {tuple(input_BCHW.shape)} [B, C, H, W]"
        )
    B, T, C, H, W = states_BTCHW.shape
    states = states_BTCHW.float()
    frames_BTCF, aux_BTC = _frame_features(states.reshape(B * T, C, H, W), config)
    frames_BTCF = frames_BTCF.reshape(B, T, C, -1)
    energy_BTC = aux_BTC.reshape(B, T, C)
    u0 = input_BCHW.detach().float()  # the window's start: a constant for every feature
    with torch.no_grad():
        initial_BCF, energy0_BC = _frame_features(u0, config)
    temporal_BTF = frames_BTCF.reshape(B, T, -1)
    summary_BCF = _summary(
        frames_BTCF,
        initial_BCF,
        energy_BTC,
        energy0_BC,
        states,
        u0,
        1.0 if dt is None else dt,
        config,
    )
    summary_BF = summary_BCF.reshape(B, -1)
    initial_BF = initial_BCF.reshape(B, -1)
    picked_BF = temporal_BTF[:, temporal_steps(T, config)].reshape(B, -1)
    vector_BF = torch.cat([picked_BF, summary_BF, initial_BF], dim=1)
    return TrajectoryFeatures(temporal_BTF, summary_BF, initial_BF, vector_BF)


def frame_features(u_NCHW: Tensor, config: FeatureConfig = FeatureConfig()) -> Tensor:
    """[N, C, len(frame_feature_names(config))] per-frame features (see the module doc)."""
    return _frame_features(u_NCHW.float(), config)[0]


# ---------------------------------------------------------------- per frame


def _frame_features(u: Tensor, config: FeatureConfig) -> tuple[Tensor, Tensor]:
    """(features [N, C, F], energy mean u^2 [N, C]) of fp32 frames u [N, C, H, W]."""
    eps, space = config.eps, (-2, -1)
    mean = u.mean(dim=space)
    d = u - mean[..., None, None]
    var = d.square().mean(dim=space)
    skewness = d.pow(3).mean(dim=space) / (var + eps).pow(1.5)
    kurtosis = d.pow(4).mean(dim=space) / (var + eps).square()
    grad_h, grad_w = u.roll(-1, -2) - u, u.roll(-1, -1) - u
    grad_energy = (grad_h.square() + grad_w.square()).mean(dim=space)
    lap = u.roll(1, -2) + u.roll(-1, -2) + u.roll(1, -1) + u.roll(-1, -1) - 4 * u
    moments = [
        mean,
        (var + eps).sqrt(),
        skewness,
        kurtosis,
        (grad_energy + eps).log(),
        (lap.square().mean(dim=space) + eps).log(),
    ]
    features = torch.stack([*moments, *_spectral(d, config)], dim=-1)
    return features, mean.square() + var


@functools.lru_cache(maxsize=16)
def _spectral_grid(h: int, w: int, n_bands: int, device: torch.device) -> dict[str, Tensor]:
    """Constants of the rfft2 grid: mode weights, |k|, k_h^2, k_w^2, band and shell indices."""
    k_h = torch.fft.fftfreq(h, d=1 / h, dtype=torch.float64)
    k_w = torch.fft.rfftfreq(w, d=1 / w, dtype=torch.float64)
    kh2, kw2 = torch.meshgrid(k_h.square(), k_w.square(), indexing="ij")
    kmag = (kh2 + kw2).sqrt()
    columns = torch.arange(k_w.numel())
    twice = (columns > 0) & (2 * columns != w)  # these columns stand for their conjugates too
    weight = torch.where(twice, 2.0, 1.0).expand(h, -1)
    edges = torch.logspace(0, math.log10(kmag.max().item()), n_bands + 1, dtype=torch.float64)
    band = torch.bucketize(kmag, edges[1:-1], right=True) + 1  # 1..n_bands off DC
    band = torch.where(kmag < 0.5, 0, band)  # bucket 0: DC
    n_shells = max(min(h, w) // 2, 1)
    shell = kmag.round().long().clamp(max=n_shells + 1)  # 0: DC, n_shells + 1: beyond
    log_k = torch.arange(1, n_shells + 1, dtype=torch.float64).log()
    grid = {
        "weight": weight,
        "kmag": kmag,
        "kh2": kh2,
        "kw2": kw2,
        "log_k_centered": log_k - log_k.mean(),
    }
    out = {k: v.reshape(-1).to(device, torch.float32) for k, v in grid.items()}
    out["log_k_centered"] = grid["log_k_centered"].to(device, torch.float32)
    out["band"] = band.reshape(-1).to(device)
    out["shell"] = shell.reshape(-1).to(device)
    return out


def _spectral(d: Tensor, config: FeatureConfig) -> list[Tensor]:
    """Band fractions, centroid, slope and anisotropy of zero-mean frames d [N, C, H, W]."""
    N, C, H, W = d.shape
    g = _spectral_grid(H, W, config.n_bands, d.device)
    eps = config.eps
    X = torch.fft.rfft2(d, norm="forward")
    P = ((X.real.square() + X.imag.square()).reshape(N * C, -1)) * g["weight"]
    bins = P.new_zeros(N * C, config.n_bands + 1).index_add(1, g["band"], P)
    off_dc = bins[:, 1:].sum(dim=1)
    fractions = bins[:, 1:] / (off_dc + eps)[:, None]
    centroid = (P * g["kmag"]).sum(dim=1) / (off_dc + eps)
    log_k = g["log_k_centered"]
    shells = P.new_zeros(N * C, log_k.numel() + 2).index_add(1, g["shell"], P)[:, 1:-1]
    log_e = (shells / (off_dc + eps)[:, None] + eps).log()
    slope = ((log_e - log_e.mean(dim=1, keepdim=True)) * log_k).sum(dim=1) / (
        log_k.square().sum() + eps
    )
    s_h, s_w = (P * g["kh2"]).sum(dim=1), (P * g["kw2"]).sum(dim=1)
    anisotropy = (s_h - s_w) / (s_h + s_w + eps)
    per_frame = [*fractions.unbind(dim=1), centroid, slope, anisotropy]
    return [x.reshape(N, C) for x in per_frame]


# ---------------------------------------------------------------- over the window


def _summary(
    frames_BTCF: Tensor,
    initial_BCF: Tensor,
    energy_BTC: Tensor,
    energy0_BC: Tensor,
    states_BTCHW: Tensor,
    u0_BCHW: Tensor,
    dt: float,
    config: FeatureConfig,
) -> Tensor:
    """[B, C, len(summary_feature_names(T))]: SUMMARY features in their documented order."""
    T, eps = frames_BTCF.shape[1], config.eps
    parts = [frames_BTCF.mean(dim=1)]
    if T > 1:
        parts.append((frames_BTCF.var(dim=1, unbiased=False) + eps).sqrt())
    std_index = MOMENT_FEATURES.index("std")
    std_BSC = torch.cat([initial_BCF[:, None, :, std_index], frames_BTCF[..., std_index]], dim=1)
    energy_BSC = torch.cat([energy0_BC[:, None], energy_BTC], dim=1)  # S = T + 1 frames
    times = torch.arange(T + 1, dtype=torch.float32, device=frames_BTCF.device) * dt
    dynamics = []
    for series in (std_BSC, energy_BSC):
        log_x = (series + eps).log()
        dynamics += [_slope(log_x, times, eps), log_x[:, -1] - log_x[:, 0]]
    lag1 = [_lag1_autocorr(s, eps) for s in (std_BSC, energy_BSC)] if T > 1 else []
    frames = torch.cat([u0_BCHW[:, None], states_BTCHW], dim=1)
    columns = [*dynamics, *lag1, _mean_consecutive_corr(frames, eps)]
    parts.append(torch.stack(columns, dim=-1))
    return torch.cat(parts, dim=-1)


def _slope(y_BSC: Tensor, t_S: Tensor, eps: float) -> Tensor:
    """Least-squares slope of y against t over axis 1: [B, C]."""
    t = (t_S - t_S.mean())[None, :, None]
    return ((y_BSC - y_BSC.mean(dim=1, keepdim=True)) * t).sum(dim=1) / (t.square().sum() + eps)


def _lag1_autocorr(x_BSC: Tensor, eps: float) -> Tensor:
    """sum_t (x_t - m)(x_t+1 - m) / sum_t (x_t - m)^2 over axis 1; 0 for a constant series."""
    d = x_BSC - x_BSC.mean(dim=1, keepdim=True)
    scale = eps * (1 + x_BSC.square().sum(dim=1))  # relative: a near-constant series gives ~0
    return (d[:, 1:] * d[:, :-1]).sum(dim=1) / (d.square().sum(dim=1) + scale)


def _mean_consecutive_corr(frames_BSCHW: Tensor, eps: float) -> Tensor:
    """Mean over consecutive frame pairs of their spatial correlation coefficient: [B, C]."""
    d = frames_BSCHW - frames_BSCHW.mean(dim=(-2, -1), keepdim=True)
    var = d.square().mean(dim=(-2, -1))
    cov = (d[:, 1:] * d[:, :-1]).mean(dim=(-2, -1))
    return (cov / ((var[:, 1:] + eps) * (var[:, :-1] + eps)).sqrt()).mean(dim=1)
