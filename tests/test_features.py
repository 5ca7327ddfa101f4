"""Trajectory features: names, known values, edge cases (no NaN), batch independence."""

from __future__ import annotations

import math

import pytest
import torch

from noa_dist import features as F
from noa_dist.features import (
    CATEGORIES,
    FeatureConfig,
    feature_specs,
    frame_feature_names,
    trajectory_features,
)


def window(B=2, T=3, C=2, H=16, W=16, seed=0, requires_grad=False):
    g = torch.Generator().manual_seed(seed)
    states = torch.randn(B, T, C, H, W, generator=g).requires_grad_(requires_grad)
    return states, torch.randn(B, C, H, W, generator=g)


def frame_value(u_HW: torch.Tensor, name: str) -> float:
    out = F.frame_features(u_HW[None, None])[0, 0]
    return out[frame_feature_names().index(name)].item()


@pytest.mark.parametrize("T", [1, 2, 5, 32])
@pytest.mark.parametrize("C", [1, 3])
def test_feature_specs_name_every_column_of_the_vector_in_order(T, C):
    states, u0 = window(B=1, T=T, C=C)
    specs = feature_specs(C, T)
    out = trajectory_features(states, u0)
    assert out.vector_BF.shape == (1, len(specs))
    assert out.temporal_BTF.shape == (1, T, C * len(frame_feature_names()))
    assert len({s.name for s in specs}) == len(specs)
    assert [s.category for s in specs] == sorted((s.category for s in specs), key=CATEGORIES.index)
    assert {s.channel for s in specs} == set(range(C))
    assert all(s.differentiable == (s.category != "initial") for s in specs)
    steps = {s.name.rsplit(".step", 1)[1] for s in specs if s.category == "temporal"}
    assert steps == {str(k + 1) for k in F.temporal_steps(T)}
    assert len(steps) == min(T, FeatureConfig().temporal_positions)


def test_columns_hold_the_feature_they_are_named_after():
    states, u0 = window(B=2, T=4, C=2)
    specs = feature_specs(2, 4)
    vector = trajectory_features(states, u0).vector_BF
    col = {s.name: i for i, s in enumerate(specs)}
    frames = F.frame_features(states.reshape(8, 2, 16, 16)).reshape(2, 4, 2, -1)
    k = frame_feature_names().index("kurtosis")
    assert torch.equal(vector[:, col["temporal.c1.kurtosis.step4"]], frames[:, 3, 1, k])
    assert torch.allclose(vector[:, col["summary.c0.kurtosis.mean"]], frames[:, :, 0, k].mean(1))
    initial = F.frame_features(u0)
    assert torch.equal(vector[:, col["initial.c1.kurtosis"]], initial[:, 1, k])


def test_moments_and_energies_of_a_sine_match_their_closed_forms():
    n, k = 32, 3
    i = torch.arange(n, dtype=torch.float32)
    a = 2 * math.pi * k / n
    u = torch.sin(a * i)[:, None].expand(n, n)  # varies along axis h only
    assert abs(frame_value(u, "mean")) < 1e-6
    assert frame_value(u, "std") == pytest.approx(math.sqrt(0.5), rel=1e-5)
    assert frame_value(u, "kurtosis") == pytest.approx(1.5, rel=1e-4)
    grad = 2 * math.sin(a / 2) ** 2
    assert frame_value(u, "log_grad_energy") == pytest.approx(math.log(grad), abs=1e-4)
    lap = 8 * math.sin(a / 2) ** 4
    assert frame_value(u, "log_lap_energy") == pytest.approx(math.log(lap), abs=1e-4)
    assert frame_value(u, "spectral_centroid") == pytest.approx(k, rel=1e-4)
    assert frame_value(u, "anisotropy") == pytest.approx(1.0, abs=1e-5)
    assert frame_value(u.T.contiguous(), "anisotropy") == pytest.approx(-1.0, abs=1e-5)


def test_rfft_columns_count_twice_so_equal_modes_on_both_axes_are_isotropic():
    n, k = 32, 5
    i = torch.arange(n, dtype=torch.float32)
    wave = torch.sin(2 * math.pi * k * i / n)
    u = wave[:, None] + wave[None, :]  # the same mode along h (both signs stored) and w (rfft)
    assert frame_value(u, "anisotropy") == pytest.approx(0.0, abs=1e-5)
    fractions = [frame_value(u, f"band{b}_fraction") for b in range(FeatureConfig().n_bands)]
    assert sum(fractions) == pytest.approx(1.0, abs=1e-5)
    assert max(fractions) == pytest.approx(1.0, abs=1e-5)  # integer |k| = 5 sits in one band


def test_bands_use_integer_wavenumbers_with_dc_apart():
    n = 64
    i = torch.arange(n, dtype=torch.float32)
    low = torch.sin(2 * math.pi * i / n)[:, None]  # |k| = 1: the first band
    high = torch.sin(2 * math.pi * 20 * i / n)[:, None]
    for u, band in ((low.expand(n, n) + 7.0, 0), (high.expand(n, n), 3)):
        fractions = [frame_value(u, f"band{b}_fraction") for b in range(4)]
        assert fractions[band] == pytest.approx(1.0, abs=1e-5), fractions  # the +7 DC is apart


def test_white_noise_has_a_spectral_slope_near_one():
    u = torch.randn(64, 64, generator=torch.Generator().manual_seed(1))
    assert frame_value(u, "spectral_slope") == pytest.approx(1.0, abs=0.15)  # modes per shell ~ k


def test_growth_rate_is_per_unit_physical_time():
    g, T = 0.3, 4
    pattern = torch.randn(1, 1, 16, 16, generator=torch.Generator().manual_seed(2))
    scale = torch.exp(g * torch.arange(1, T + 1, dtype=torch.float32))
    states = (scale[:, None, None, None] * pattern)[None]
    col = {s.name: i for i, s in enumerate(feature_specs(1, T))}
    for dt in (1.0, 0.25):
        vector = trajectory_features(states, pattern[0][None], dt=dt).vector_BF[0]
        assert vector[col["summary.c0.energy_growth_rate"]].item() == pytest.approx(
            2 * g / dt, rel=1e-4
        )
        assert vector[col["summary.c0.std_growth_rate"]].item() == pytest.approx(g / dt, rel=1e-4)
        assert vector[col["summary.c0.energy_log_final_over_initial"]].item() == pytest.approx(
            2 * g * T, rel=1e-4
        )
        assert vector[col["summary.c0.frame_corr"]].item() == pytest.approx(1.0, abs=1e-5)


@pytest.mark.parametrize(
    "case",
    [
        "zeros",
        "constant_in_space_and_time",
        "constant_in_space_varying_in_time",
        "one_sample_one_step",
    ],
)
def test_degenerate_windows_give_finite_features_and_gradients(case):
    B, T = (1, 1) if case == "one_sample_one_step" else (1, 3)
    if case == "zeros":
        states = torch.zeros(B, T, 2, 8, 8)
    elif case == "constant_in_space_and_time":
        states = torch.full((B, T, 2, 8, 8), 3.5)
    elif case == "constant_in_space_varying_in_time":
        states = (
            torch.arange(1, T + 1, dtype=torch.float32).reshape(1, T, 1, 1, 1).expand(B, T, 2, 8, 8)
        )
    else:
        states = torch.full((B, T, 2, 8, 8), -1.0)
    states = states.clone().requires_grad_(True)
    u0 = torch.zeros(B, 2, 8, 8)
    out = trajectory_features(states, u0)
    assert torch.isfinite(out.vector_BF).all(), out.vector_BF
    assert torch.isfinite(out.temporal_BTF).all()
    out.vector_BF.sum().backward()
    assert torch.isfinite(states.grad).all()


def test_a_sample_has_the_same_features_alone_and_in_a_batch_of_four():
    states, u0 = window(B=4, T=3, C=2, H=32, W=32)
    batch = trajectory_features(states, u0, dt=0.5).vector_BF
    for b in range(4):
        alone = trajectory_features(states[b : b + 1], u0[b : b + 1], dt=0.5).vector_BF
        assert torch.equal(alone, batch[b : b + 1])  # bitwise: no batch statistics anywhere


def test_channels_are_never_mixed():
    states, u0 = window(B=1, T=2, C=2)
    changed = states.clone()
    changed[:, :, 1] = 5 * changed[:, :, 1] ** 3
    specs = feature_specs(2, 2)
    a = trajectory_features(states, u0).vector_BF[0]
    b = trajectory_features(changed, u0).vector_BF[0]
    ch0 = torch.tensor([s.channel == 0 for s in specs])
    assert torch.equal(a[ch0], b[ch0])
    assert not torch.equal(a[~ch0], b[~ch0])


def test_gradient_reaches_the_states_but_not_the_input():
    states, u0 = window(B=2, T=2, C=1, requires_grad=True)
    u0.requires_grad_(True)
    out = trajectory_features(states, u0)
    assert not out.initial_BF.requires_grad
    specs = feature_specs(1, 2)
    differentiable = torch.tensor([s.differentiable for s in specs])
    out.vector_BF[:, differentiable].square().sum().backward()
    assert states.grad is not None and states.grad.abs().sum() > 0
    assert u0.grad is None


def test_bf16_inputs_are_upcast_to_fp32():
    states, u0 = window(B=1, T=2, C=1)
    states16, u016 = states.bfloat16(), u0.bfloat16()
    out = trajectory_features(states16, u016)
    assert out.vector_BF.dtype == torch.float32
    reference = trajectory_features(states16.float(), u016.float()).vector_BF
    assert torch.equal(out.vector_BF, reference)


def test_shape_errors_name_the_expected_layout():
    states, u0 = window(B=2, T=2, C=1)
    with pytest.raises(ValueError, match=r"\[B, T, C, H, W\]"):
        trajectory_features(states, u0[:1])
