"""L_traj and the weighting of loss terms."""

from __future__ import annotations

import pytest
import torch

from noa_dist.losses import (
    combine,
    commitment_loss,
    latent_alignment_loss,
    sampled_steps,
    trajectory_mse,
    variance_normalized_mse,
)


def test_trajectory_mse_is_the_mean_over_every_element():
    torch.manual_seed(0)
    pred, target = torch.randn(2, 3, 1, 4, 4), torch.randn(2, 3, 1, 4, 4)
    torch.testing.assert_close(trajectory_mse(pred, target), ((pred - target) ** 2).mean())


def test_trajectory_mse_of_bf16_inputs_is_fp32():
    pred = torch.randn(1, 2, 1, 4, 4).bfloat16()
    assert trajectory_mse(pred, torch.zeros_like(pred)).dtype == torch.float32


def test_vrmse_loss_weighs_a_small_amplitude_sample_like_a_large_one():
    """Per sample/step/field error over the target's variance: scaling one sample's field by
    1/10 (Allen-Cahn's early amplitude in the demo) leaves its share of the loss unchanged,
    where plain MSE would shrink it 100x."""
    torch.manual_seed(0)
    target = torch.randn(2, 3, 2, 8, 8)
    pred = target + 0.3 * torch.randn_like(target)
    loss = variance_normalized_mse(pred, target)
    by_hand = ((pred - target) ** 2).mean((-2, -1)) / (target.var((-2, -1)) + 1e-4)
    torch.testing.assert_close(loss, by_hand.mean())
    shrink = torch.tensor([1.0, 0.1])[:, None, None, None, None]  # (the 1e-4 floor: ~0.4%)
    torch.testing.assert_close(
        variance_normalized_mse(pred * shrink, target * shrink), loss, rtol=1e-2, atol=0
    )
    constant = torch.zeros(1, 1, 1, 8, 8)  # a constant field: finite loss and gradient
    pred0 = constant.clone().requires_grad_()
    variance_normalized_mse(pred0 + 1e-3, constant).backward()
    assert torch.isfinite(pred0.grad).all()


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


def test_commitment_and_latent_losses_send_gradient_to_the_prediction_side_only():
    z_e = torch.randn(4, 8, requires_grad=True)
    z_q = torch.randn(4, 8, requires_grad=True)
    commitment_loss(z_e, z_q).backward()
    assert z_e.grad is not None and z_q.grad is None
    projected, target = torch.randn(4, 8, requires_grad=True), torch.randn(4, 8, requires_grad=True)
    loss = latent_alignment_loss(projected, target)
    loss.backward()
    torch.testing.assert_close(loss, ((projected - target) ** 2).mean())
    assert projected.grad is not None and target.grad is None


def test_sampled_steps_are_first_middle_last_evenly_spaced_or_all():
    assert sampled_steps(32, 3) == [0, 16, 31] or sampled_steps(32, 3) == [0, 15, 31]
    assert sampled_steps(9, 3) == [0, 4, 8]
    assert sampled_steps(9, 5) == [0, 2, 4, 6, 8]
    assert sampled_steps(4, -1) == sampled_steps(4, 8) == [0, 1, 2, 3]
    assert sampled_steps(1, 3) == [0]
