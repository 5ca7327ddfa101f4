"""UAFNO: shapes, channel progression, persistence at init, conditioning, rollout, gradients,
roll equivariance on the coarse lattice, and input checks."""

from __future__ import annotations

import pytest
import torch

from noa_dist.models.uafno import UAFNO, ConvNormAct, level_widths, periodic_upsample2x


def _step(model: UAFNO, u_BCHW, cond_BCHW=None) -> torch.Tensor:
    return model(u_BCHW, cond_BCHW).state


def _small(**kwargs) -> UAFNO:
    torch.manual_seed(0)
    config = dict(in_channels=2, base_channels=8, afno_blocks=1, afno_num_blocks=4)
    return UAFNO(**{**config, **kwargs})


def _randomize_head(model: UAFNO) -> UAFNO:
    """The zero-init head hides everything upstream; give it weights as after some training."""
    with torch.no_grad():
        model.head.weight.normal_(0.0, 0.5)
        model.head.bias.normal_(0.0, 0.5)
    return model


def test_output_shape_matches_input_on_64_and_32_grids():
    model = _small()
    for size in (64, 32):
        u_BCHW = torch.randn(2, 2, size, size)
        out = model(u_BCHW)
        assert out.state.shape == (2, 2, size, size) and out.state.dtype == torch.float32


def test_default_bottleneck_is_256_channels_on_8x8_for_64x64_input():
    model = UAFNO(in_channels=1, cond_channels=4)
    assert level_widths(32, 3, 8) == [64, 128, 256]  # stem 32 -> doubled per level
    features = model(torch.randn(1, 1, 64, 64), torch.randn(1, 4, 64, 64)).bottleneck
    assert features.shape == (1, 256, 8, 8)


def test_channel_growth_stops_at_cap():
    assert level_widths(16, 5, 4) == [32, 64, 64, 64, 64]


def test_zero_initialised_head_makes_untrained_model_persistence():
    model = _small(cond_channels=1)
    u_BCHW = torch.randn(1, 2, 16, 16)
    assert torch.equal(_step(model, u_BCHW, torch.randn(1, 1, 16, 16)), u_BCHW)


def test_conditioning_fields_change_the_prediction():
    model = _randomize_head(_small(cond_channels=1))
    u_BCHW = torch.randn(1, 2, 16, 16)
    out = _step(model, u_BCHW, torch.zeros(1, 1, 16, 16))
    assert (_step(model, u_BCHW, torch.randn(1, 1, 16, 16)) - out).abs().max() > 1e-2
    # a spatially uniform field too (an InstanceNorm right after the stem would erase it)
    assert (_step(model, u_BCHW, torch.ones(1, 1, 16, 16)) - out).abs().max() > 1e-2


def test_increment_depends_on_state_level_and_amplitude():
    """The prototype's stem conv -> InstanceNorm made net(a*u + b) == net(u): no physics."""
    model = _randomize_head(_small())
    u_BCHW = torch.randn(1, 2, 16, 16)
    with torch.no_grad():
        delta = _step(model, u_BCHW) - u_BCHW
        delta_affine = _step(model, 2 * u_BCHW + 1) - (2 * u_BCHW + 1)
    assert (delta_affine - delta).abs().max() > 1e-1


def test_bottleneck_is_the_one_the_state_was_decoded_from():
    """One forward gives both: the decoder's input and the next state, no second encoder pass."""
    model = _randomize_head(_small())
    u_BCHW = torch.randn(1, 2, 16, 16)
    captured = []
    model.afno.register_forward_hook(lambda _m, _i, out: captured.append(out))
    out = model(u_BCHW)
    assert len(captured) == 1
    torch.testing.assert_close(out.bottleneck, captured[0].permute(0, 3, 1, 2))


def test_bf16_weights_keep_the_state_in_fp32():
    """Under DeepSpeed bf16 the weights are bf16 and nothing autocasts: the network computes
    in bf16, but the increment is added to an fp32 state (a bf16 state loses ~3 digits a step)."""
    model = _randomize_head(_small())
    with torch.no_grad():
        model.head.weight.mul_(1e-3)
        model.head.bias.mul_(1e-3)
    model = model.to(torch.bfloat16)
    u_BCHW = torch.randn(1, 2, 16, 16) + 1000  # where bf16's spacing is 4 or 8
    out = model(u_BCHW)
    assert out.state.dtype == torch.float32 and out.bottleneck.dtype == torch.bfloat16
    delta = (out.state - u_BCHW).abs()
    assert 0 < delta.max() < 1  # a bf16 state would move by a multiple of 4


def test_head_gets_gradient_at_init_and_every_parameter_after():
    model = _small(cond_channels=1)
    u_BCHW, cond_BCHW = torch.randn(1, 2, 16, 16), torch.randn(1, 1, 16, 16)
    _step(model, u_BCHW, cond_BCHW).square().mean().backward()
    assert model.head.weight.grad.abs().sum() > 0  # so the first update can leave persistence
    model.zero_grad()
    _randomize_head(model)
    _step(model, u_BCHW, cond_BCHW).square().mean().backward()
    for name, param in model.named_parameters():
        assert param.grad is not None and param.grad.abs().sum() > 0, name


def test_output_rolls_with_input_for_shifts_on_the_coarse_lattice():
    model = _randomize_head(_small(cond_channels=1)).eval()
    u_BCHW, cond_BCHW = torch.randn(1, 2, 32, 32), torch.randn(1, 1, 32, 32)
    shift, dims = (8, -16), (2, 3)  # multiples of 2**encoder_levels
    with torch.no_grad():
        out = _step(model, u_BCHW, cond_BCHW)
        rolled = _step(model, torch.roll(u_BCHW, shift, dims), torch.roll(cond_BCHW, shift, dims))
    torch.testing.assert_close(rolled, torch.roll(out, shift, dims), atol=1e-4, rtol=1e-5)


def test_periodic_upsampling_wraps_around_the_edges():
    x_BCHW = torch.randn(1, 3, 4, 6)
    up = periodic_upsample2x(x_BCHW)
    assert up.shape == (1, 3, 8, 12)
    torch.testing.assert_close(
        periodic_upsample2x(torch.roll(x_BCHW, (1, 2), (2, 3))), torch.roll(up, (2, 4), (2, 3))
    )


def test_grid_not_divisible_by_two_to_the_levels_is_rejected():
    with pytest.raises(ValueError, match="divisible by 8; got 36x32"):
        _small()(torch.randn(1, 2, 36, 32))


def test_missing_or_misshaped_conditioning_is_rejected():
    model = _small(cond_channels=3)
    u_BCHW = torch.randn(1, 2, 32, 32)
    with pytest.raises(ValueError, match=r"cond_BCHW must have shape \(1, 3, 32, 32\), got None"):
        model(u_BCHW)
    with pytest.raises(ValueError, match="cond_channels=0"):
        _small()(u_BCHW, torch.randn(1, 3, 32, 32))


def test_wrong_state_channels_are_rejected():
    with pytest.raises(ValueError, match=r"expected u of shape \[B, 2, H, W\]"):
        _small()(torch.randn(1, 3, 32, 32))


def test_predict_delta_needs_matching_output_channels():
    with pytest.raises(ValueError, match="out_channels == in_channels"):
        UAFNO(in_channels=2, out_channels=1)
    assert UAFNO(in_channels=2, out_channels=1, predict_delta=False, base_channels=8).param_count()


def test_uniform_conditioning_reaches_the_normalised_branches():
    """A spatially uniform conditioning field (a velocity, a diffusivity) mixed in before an
    InstanceNorm is erased by it; it re-enters after the norm (scale and shift), so the
    branch's activations depend on it. Zero-initialised: at start it has no effect."""
    torch.manual_seed(0)
    layer = ConvNormAct(3, 4, cond_channels=2)
    x_BCHW = torch.randn(1, 3, 8, 8)
    slow, fast = torch.full((1, 2, 8, 8), 0.1), torch.full((1, 2, 8, 8), 2.0)
    torch.testing.assert_close(layer(x_BCHW, slow), layer(x_BCHW, fast))  # zero-init
    with torch.no_grad():
        layer.film.weight.normal_(0.0, 0.5)
    gap = (layer(x_BCHW, slow) - layer(x_BCHW, fast)).abs().max()
    assert gap > 0.1
    # the scale term multiplies the state's features: the effect depends on x, not a constant
    delta = layer(x_BCHW, slow) - layer(x_BCHW, fast)
    assert delta.std() > 0.01
