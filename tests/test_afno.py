"""AFNO2D and AFNOBlock: shapes, gradients, roll equivariance, mode truncation, bf16."""

from __future__ import annotations

import pytest
import torch

from noa_dist.models.afno import AFNO2D, AFNOBlock, kept_mode_mask


def _activate(filter_: AFNO2D, scale: float = 0.5) -> AFNO2D:
    """Larger weights than the 0.02 init, so soft-shrink does not zero the spectral path."""
    torch.manual_seed(1)
    with torch.no_grad():
        for param in filter_.parameters():
            param.copy_(scale * torch.randn_like(param))
    return filter_


def _field(batch: int = 2, height: int = 16, width: int = 12, channels: int = 16) -> torch.Tensor:
    torch.manual_seed(0)
    return torch.randn(batch, height, width, channels)


def test_filter_and_block_keep_shape_and_dtype():
    x_BHWC = _field()
    assert AFNO2D(16, num_blocks=4)(x_BHWC).shape == x_BHWC.shape
    assert AFNOBlock(16, num_blocks=4, modes=3)(x_BHWC).shape == x_BHWC.shape


def test_channels_not_divisible_by_num_blocks_is_rejected():
    with pytest.raises(ValueError, match="channels=12 must be divisible by num_blocks=8"):
        AFNO2D(12, num_blocks=8)


@pytest.mark.parametrize("nonlinearity", ["phase", "componentwise"])
def test_gradient_reaches_every_block_parameter(nonlinearity):
    block = AFNOBlock(16, num_blocks=4, modes=4, nonlinearity=nonlinearity)
    _activate(block.filter)
    block(_field()).square().mean().backward()
    for name, param in block.named_parameters():
        assert param.grad is not None and param.grad.abs().sum() > 0, name


@pytest.mark.parametrize("shift", [(1, 0), (3, 5), (-7, 2)])
def test_filter_output_rolls_with_its_input(shift):
    filter_ = _activate(AFNO2D(16, num_blocks=4, modes=4))
    x_BHWC = _field()
    out_BHWC = filter_(x_BHWC)
    assert (out_BHWC - x_BHWC).abs().max() > 0.1, "spectral path inactive: test would be vacuous"
    rolled_out = filter_(torch.roll(x_BHWC, shift, dims=(1, 2)))
    torch.testing.assert_close(
        rolled_out, torch.roll(out_BHWC, shift, dims=(1, 2)), atol=1e-5, rtol=0
    )


def test_block_output_rolls_with_its_input():
    block = AFNOBlock(16, num_blocks=4, modes=4)
    _activate(block.filter)
    x_BHWC = _field()
    rolled_out = block(torch.roll(x_BHWC, (2, -3), dims=(1, 2)))
    torch.testing.assert_close(
        rolled_out, torch.roll(block(x_BHWC), (2, -3), dims=(1, 2)), atol=1e-5, rtol=0
    )


def test_original_componentwise_nonlinearity_is_not_roll_equivariant():
    """Why "phase" is the default: ReLU/soft-shrink on re/im and per-mode biases break rolls."""
    filter_ = _activate(AFNO2D(16, num_blocks=4, modes=4, nonlinearity="componentwise"))
    x_BHWC = _field()
    rolled_out = filter_(torch.roll(x_BHWC, (3, 5), dims=(1, 2)))
    assert (rolled_out - torch.roll(filter_(x_BHWC), (3, 5), dims=(1, 2))).abs().max() > 1e-2


@pytest.mark.parametrize(
    ("height", "width", "modes", "rows", "cols"),
    [(16, 16, 3, 7, 4), (15, 12, 4, 9, 5), (8, 8, 4, 8, 5), (32, 20, 0, 1, 1)],
)
def test_kept_modes_are_symmetric_in_ky_with_expected_count(height, width, modes, rows, cols):
    mask_HF = kept_mode_mask(height, width, modes)
    assert mask_HF.shape == (height, width // 2 + 1)
    negative_rows = (-torch.arange(height)) % height
    assert torch.equal(mask_HF, mask_HF[negative_rows]), "row +k_y must equal row -k_y"
    assert mask_HF.sum() == rows * cols
    assert mask_HF.any(dim=1).sum() == rows and mask_HF.any(dim=0).sum() == cols


def test_modes_at_least_grid_keep_every_mode():
    assert kept_mode_mask(8, 8, 8).all() and kept_mode_mask(8, 8, 100).all()
    full = _activate(AFNO2D(16, num_blocks=4, modes=None))
    wide = AFNO2D(16, num_blocks=4, modes=64)
    wide.load_state_dict(full.state_dict())
    x_BHWC = _field()
    torch.testing.assert_close(wide(x_BHWC), full(x_BHWC))


def test_modes_above_truncation_pass_through_untouched():
    """A pure k_y = 6 wave has no kept mode at modes=4: the filter is then the identity."""
    filter_ = _activate(AFNO2D(16, num_blocks=4, modes=4))
    y = torch.arange(16.0)[:, None, None]
    x_BHWC = torch.cos(2 * torch.pi * 6 * y / 16).expand(16, 12, 16).unsqueeze(0).contiguous()
    torch.testing.assert_close(filter_(x_BHWC), x_BHWC, atol=1e-5, rtol=0)
    x_low = torch.cos(2 * torch.pi * 3 * y / 16).expand(16, 12, 16).unsqueeze(0)
    assert (filter_(x_low) - x_low).abs().max() > 0.1


def test_mask_follows_the_grid_between_calls():
    filter_ = AFNO2D(16, num_blocks=4, modes=2)
    filter_(_field(height=16, width=12))
    assert filter_.mode_mask.shape == (16, 7)
    filter_(_field(height=8, width=8))
    assert filter_.mode_mask.shape == (8, 5)
    assert "mode_mask" not in filter_.state_dict()


def test_bf16_input_is_computed_in_fp32_and_returned_in_bf16():
    filter_ = _activate(AFNO2D(16, num_blocks=4, modes=4))
    x_bf16 = _field().bfloat16()
    out = filter_(x_bf16)
    assert out.dtype == torch.bfloat16
    reference = filter_(x_bf16.float())  # same bf16-representable input, fp32 throughout
    torch.testing.assert_close(out.float(), reference, atol=0.05, rtol=0.02)


def test_block_under_cpu_bf16_autocast_keeps_fp32_residual_stream():
    block = AFNOBlock(16, num_blocks=4, modes=4)
    _activate(block.filter)
    x_BHWC = _field()
    with torch.autocast(device_type="cpu", dtype=torch.bfloat16):
        out = block(x_BHWC)
    assert out.dtype == torch.float32  # residual adds promote; the linears ran in bf16
    torch.testing.assert_close(out, block(x_BHWC), atol=0.1, rtol=0.05)
