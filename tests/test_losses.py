"""L_traj and the weighting of loss terms."""

from __future__ import annotations

import pytest
import torch

from noa_dist.losses import combine, loss_terms, trajectory_mse


def test_trajectory_mse_is_the_mean_over_every_element():
    torch.manual_seed(0)
    pred, target = torch.randn(2, 3, 1, 4, 4), torch.randn(2, 3, 1, 4, 4)
    torch.testing.assert_close(trajectory_mse(pred, target), ((pred - target) ** 2).mean())


def test_trajectory_mse_of_bf16_inputs_is_fp32():
    pred = torch.randn(1, 2, 1, 4, 4).bfloat16()
    assert trajectory_mse(pred, torch.zeros_like(pred)).dtype == torch.float32


def test_trajectory_mse_rejects_mismatched_shapes():
    with pytest.raises(ValueError, match=r"pred \(1, 2, 1, 4, 4\) and target \(1, 3, 1, 4, 4\)"):
        trajectory_mse(torch.zeros(1, 2, 1, 4, 4), torch.zeros(1, 3, 1, 4, 4))


def test_combine_weights_each_term():
    terms = {"traj": torch.tensor(2.0), "latent": torch.tensor(3.0)}
    assert combine(terms, {"traj": 1.0, "latent": 0.5, "commit": 9.0}) == 3.5


def test_zero_weight_keeps_the_parameter_in_the_graph():
    weight = torch.ones((), requires_grad=True)
    total = combine({"traj": torch.tensor(1.0), "latent": weight * 2}, {"traj": 1.0, "latent": 0.0})
    total.backward()
    assert weight.grad is not None and weight.grad == 0


def test_combine_rejects_unweighted_and_non_scalar_terms():
    with pytest.raises(ValueError, match=r"no weight for loss term\(s\) \['latent'\]"):
        combine({"traj": torch.tensor(1.0), "latent": torch.tensor(1.0)}, {"traj": 1.0})
    with pytest.raises(ValueError, match="not scalars"):
        combine({"traj": torch.ones(2)}, {"traj": 1.0})


def test_loss_terms_returns_graph_total_and_detached_terms():
    x = torch.ones((), requires_grad=True)
    result = loss_terms({"traj": x * 3}, {"traj": 2.0})
    assert result.total.requires_grad and not result.terms["traj"].requires_grad
    assert result.total == 6.0 and result.terms["traj"] == 3.0
