"""VRMSE against The Well's own implementation, the persistence baseline, on-device sums."""

from __future__ import annotations

import math

import pytest
import torch
from the_well.benchmark.metrics.spatial import VRMSE
from the_well.data.datasets import WellMetadata

from noa_dist.metrics import MetricAccumulator, persistence_prediction, vrmse


def _well_metadata(height: int, width: int) -> WellMetadata:
    return WellMetadata(
        dataset_name="random",
        n_spatial_dims=2,
        spatial_resolution=(height, width),
        scalar_names=[],
        constant_scalar_names=[],
        field_names={0: ["a", "b", "c"]},
        constant_field_names={},
        boundary_condition_types=["PERIODIC"],
        n_files=1,
        n_trajectories_per_file=[1],
        n_steps_per_trajectory=[4],
    )


def test_vrmse_matches_the_well_on_random_fields():
    torch.manual_seed(0)
    pred_BTCHW, target_BTCHW = torch.randn(2, 4, 3, 16, 12), torch.randn(2, 4, 3, 16, 12)
    target_BTCHW[0, 1, 2] = 0.25  # a constant field: the variance is 0, only eps is left
    ours_BTC = vrmse(pred_BTCHW, target_BTCHW)
    theirs = VRMSE()(  # The Well is channels-last: [B, T, H, W, C]
        pred_BTCHW.permute(0, 1, 3, 4, 2),
        target_BTCHW.permute(0, 1, 3, 4, 2),
        _well_metadata(16, 12),
    )
    assert ours_BTC.shape == (2, 4, 3)
    torch.testing.assert_close(ours_BTC, theirs)


def test_predicting_the_spatial_mean_scores_about_one():
    """The Well divides by the unbiased variance, so the mean scores sqrt((N - 1) / N)."""
    torch.manual_seed(1)
    target = torch.randn(1, 1, 2, 8, 8)
    mean_prediction = target.mean(dim=(-2, -1), keepdim=True).expand_as(target)
    expected = torch.full((1, 1, 2), math.sqrt(63 / 64))
    torch.testing.assert_close(vrmse(mean_prediction, target), expected, rtol=1e-5, atol=1e-6)


def test_vrmse_rejects_mismatched_shapes():
    with pytest.raises(ValueError, match="differ"):
        vrmse(torch.zeros(1, 2, 1, 4, 4), torch.zeros(1, 3, 1, 4, 4))


def test_persistence_repeats_the_initial_state():
    u0_BCHW = torch.randn(2, 3, 4, 4)
    persistence_BTCHW = persistence_prediction(u0_BCHW, 5)
    assert persistence_BTCHW.shape == (2, 5, 3, 4, 4)
    assert torch.equal(persistence_BTCHW[:, 4], u0_BCHW)


def test_accumulator_mean_equals_mean_over_all_samples():
    torch.manual_seed(2)
    batches = [torch.rand(3, 4, 2), torch.rand(5, 4, 2)]
    accumulator = MetricAccumulator(n_steps=4, n_channels=2)
    for values_BTC in batches:
        accumulator.update(values_BTC)
    sums_TC, count = accumulator.state()
    assert isinstance(count, torch.Tensor) and count.item() == 8
    torch.testing.assert_close(accumulator.mean().float(), torch.cat(batches).mean(dim=0))
    assert sums_TC.shape == (4, 2)


def test_accumulator_state_exists_before_any_update_and_after_reset():
    accumulator = MetricAccumulator(n_steps=3, n_channels=1)
    accumulator.update(torch.ones(2, 3, 1))
    accumulator.reset()
    sums_TC, count = accumulator.state()
    assert sums_TC.shape == (3, 1) and sums_TC.abs().sum() == 0 and count == 0


def test_accumulator_rejects_values_of_another_shape():
    with pytest.raises(ValueError, match=r"expected \[B, 4, 2\], got \(3, 5, 2\)"):
        MetricAccumulator(n_steps=4, n_channels=2).update(torch.zeros(3, 5, 2))
