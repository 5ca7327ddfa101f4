"""U-AFNO: a U-Net encoder/decoder around an AFNO bottleneck, stepping u(t) -> u(t + dt).

Layout after the prototype NOA (dgabriele/spinlock `u_afno.py`; Bonneville et al. 2024):
stem conv; per level two residual blocks (channels doubling, capped at base * cap), skip taken,
then a strided-conv downsample; `afno_blocks` AFNO blocks on the coarse grid; per level a
bilinear upsample, concatenation with the skip and two residual blocks; a 1x1 head.
At defaults (base 32, 3 levels) the channels go stem 32 -> levels 64, 128, 256 and a 64x64
input gives a [B, 256, 8, 8] bottleneck.

All convolutions pad circularly and the upsampling wraps around, because the data are
periodic: the whole network is then equivariant to rolls by multiples of 2**encoder_levels
(the strided convolutions break other shifts).

InstanceNorm sits only inside residual branches; the trunk (stem, skips, downsamples,
1x1 projections) is unnormalised. The prototype normalised right after the stem, which
makes the predicted increment blind to the state's mean and amplitude (net(a*u + b) ==
net(u) for a > 0) and erases spatially uniform conditioning fields entirely.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from noa_dist.models.afno import AFNOBlock


class StepOutput(NamedTuple):
    """One forward pass: the next state and the bottleneck features it was decoded from.

    `state` is fp32 whatever the weights' dtype (the autoregressive state must not round to
    bf16 at every step); `bottleneck` is in the compute dtype, for latent losses that need the
    features of this very forward (a second encoder pass would bypass DDP/ZeRO-3 hooks).
    """

    state: Tensor  # [B, C, H, W] fp32
    bottleneck: Tensor  # [B, bottleneck_channels, H / 2**levels, W / 2**levels]


def circular_conv3x3(
    in_channels: int, out_channels: int, stride: int = 1, bias: bool = True
) -> nn.Conv2d:
    """3x3 convolution with periodic padding."""
    return nn.Conv2d(
        in_channels, out_channels, 3, stride=stride, padding=1, padding_mode="circular", bias=bias
    )


class ConvNormAct(nn.Module):
    """Circular 3x3 conv (no bias: the norm removes it) -> InstanceNorm(affine) -> scale and
    shift by the conditioning fields -> GELU.

    InstanceNorm removes each channel's spatial mean, so a spatially uniform conditioning field
    (a velocity, a diffusivity) mixed in before it never reaches the activations: the branch
    could not make the increment depend on it (advection needs velocity x gradient). The fields
    re-enter after the norm as a per-location scale and shift (FiLM, PDEArena's scale-shift
    norm), zero-initialised: at start the layer is a plain conv-norm-act.
    """

    def __init__(self, in_channels: int, out_channels: int, cond_channels: int = 0) -> None:
        super().__init__()
        self.conv = circular_conv3x3(in_channels, out_channels, bias=False)
        self.norm = nn.InstanceNorm2d(out_channels, affine=True)
        self.act = nn.GELU()
        self.film = nn.Conv2d(cond_channels, 2 * out_channels, 1) if cond_channels else None
        if self.film is not None:
            nn.init.zeros_(self.film.weight)
            nn.init.zeros_(self.film.bias)

    def forward(self, x_BCHW: Tensor, cond_BCHW: Tensor | None = None) -> Tensor:
        h_BCHW = self.norm(self.conv(x_BCHW))
        if self.film is not None:
            scale_BCHW, shift_BCHW = self.film(cond_BCHW).chunk(2, dim=1)
            h_BCHW = h_BCHW * (1 + scale_BCHW) + shift_BCHW
        return self.act(h_BCHW)


class ResidualBlock(nn.Module):
    """Two ConvNormAct layers plus a skip (1x1 projection when the channel count changes)."""

    def __init__(self, in_channels: int, out_channels: int, cond_channels: int = 0) -> None:
        super().__init__()
        self.body = nn.ModuleList(
            [
                ConvNormAct(in_channels, out_channels, cond_channels),
                ConvNormAct(out_channels, out_channels, cond_channels),
            ]
        )
        self.skip = (
            nn.Identity()
            if in_channels == out_channels
            else nn.Conv2d(in_channels, out_channels, 1, bias=False)
        )

    def forward(self, x_BCHW: Tensor, cond_BCHW: Tensor | None = None) -> Tensor:
        h_BCHW = x_BCHW
        for layer in self.body:
            h_BCHW = layer(h_BCHW, cond_BCHW)
        return self.skip(x_BCHW) + h_BCHW


class LatentProjector(nn.Module):
    """Bottleneck features -> the tokenizer's latent space, for L_latent.

    Global average pool -> Linear -> LayerNorm -> GELU -> Linear. LayerNorm, not BatchNorm:
    a sample's projection must not depend on the rest of its (per-GPU, often tiny) batch.
    """

    def __init__(self, channels: int, latent_dim: int) -> None:
        super().__init__()
        self.mlp = nn.Sequential(
            nn.Linear(channels, channels),
            nn.LayerNorm(channels),
            nn.GELU(),
            nn.Linear(channels, latent_dim),
        )

    def forward(self, h_BCHW: Tensor) -> Tensor:
        return self.mlp(h_BCHW.float().mean(dim=(-2, -1)).to(self.mlp[0].weight.dtype)).float()


def periodic_upsample2x(x_BCHW: Tensor) -> Tensor:
    """Bilinear x2 upsampling that wraps around the edges instead of clamping them."""
    padded = F.pad(x_BCHW, (1, 1, 1, 1), mode="circular")
    up = F.interpolate(padded, scale_factor=2, mode="bilinear", align_corners=False)
    return up[..., 2:-2, 2:-2]


def level_widths(base_channels: int, levels: int, cap_factor: int) -> list[int]:
    """Channels of each encoder level: doubling from the stem's base, capped at base * cap."""
    widths, channels = [], base_channels
    for _ in range(levels):
        channels = min(channels * 2, base_channels * cap_factor)
        widths.append(channels)
    return widths


class ResidualStage(nn.Module):
    """Two residual blocks at one resolution, both seeing the conditioning fields."""

    def __init__(self, in_channels: int, out_channels: int, cond_channels: int) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(
            [
                ResidualBlock(in_channels, out_channels, cond_channels),
                ResidualBlock(out_channels, out_channels, cond_channels),
            ]
        )

    def forward(self, x_BCHW: Tensor, cond_BCHW: Tensor | None) -> Tensor:
        for block in self.blocks:
            x_BCHW = block(x_BCHW, cond_BCHW)
        return x_BCHW


class UAFNO(nn.Module):
    """Autoregressive U-AFNO operator on [B, C, H, W] fields.

    `cond_channels` constant fields (e.g. parameters broadcast in space) are concatenated to
    the state at every step and scale and shift every normalised layer (see ConvNormAct). With `predict_delta` the network predicts an increment,
    u_next = u + net(u), and its head is zero-initialised, so the untrained model is exactly
    persistence (u_next == u) and training starts from the strongest trivial baseline.
    H and W must be divisible by 2**encoder_levels.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int | None = None,
        cond_channels: int = 0,
        base_channels: int = 32,
        encoder_levels: int = 3,
        modes: int = 16,
        afno_blocks: int = 4,
        afno_num_blocks: int = 8,
        channel_cap_factor: int = 8,
        predict_delta: bool = True,
        latent_dim: int | None = None,
    ) -> None:
        super().__init__()
        out_channels = in_channels if out_channels is None else out_channels
        if predict_delta and out_channels != in_channels:
            raise ValueError(
                f"UAFNO: predict_delta needs out_channels == in_channels, "
                f"got {out_channels} != {in_channels}"
            )
        if encoder_levels < 1:
            raise ValueError(f"UAFNO: encoder_levels must be >= 1, got {encoder_levels}")
        self.in_channels, self.out_channels = in_channels, out_channels
        self.cond_channels = cond_channels
        self.encoder_levels, self.predict_delta = encoder_levels, predict_delta
        self.stem = circular_conv3x3(in_channels + cond_channels, base_channels)
        widths = level_widths(base_channels, encoder_levels, channel_cap_factor)
        self.encoder_stages = nn.ModuleList(
            ResidualStage(c_in, c_out, cond_channels)
            for c_in, c_out in zip([base_channels, *widths[:-1]], widths, strict=True)
        )
        self.downsamples = nn.ModuleList(circular_conv3x3(c, c, stride=2) for c in widths)
        self.bottleneck_channels = widths[-1]
        self.afno = nn.Sequential(
            *(AFNOBlock(widths[-1], afno_num_blocks, modes) for _ in range(afno_blocks))
        )
        # each decoder level: upsampled features from the level below + skip -> skip's width
        skip_widths = widths[::-1]
        below_widths = [widths[-1], *skip_widths[:-1]]
        self.decoder_stages = nn.ModuleList(
            ResidualStage(c_below + c_skip, c_skip, cond_channels)
            for c_below, c_skip in zip(below_widths, skip_widths, strict=True)
        )
        self.head = nn.Conv2d(widths[0], out_channels, 1)
        # L_latent's projector (`projector.*` in the state dict) when the run aligns latents
        self.projector = None if latent_dim is None else LatentProjector(widths[-1], latent_dim)
        # Typical size of one step's change per channel (std of frame differences over std of
        # the field, from the data's stats); the head predicts the increment in these units,
        # so small per-step changes are not drowned by the state's own scale. Saved with the weights.
        self.register_buffer("delta_scale", torch.ones(out_channels))
        if predict_delta:
            nn.init.zeros_(self.head.weight)
            nn.init.zeros_(self.head.bias)

    def forward(self, u_BCHW: Tensor, cond_BCHW: Tensor | None = None) -> StepOutput:
        """One step u(t) -> u(t + dt), [B, in_channels, H, W] -> [B, out_channels, H, W].

        The network runs in its weights' dtype (bf16 under DeepSpeed half precision, where
        nothing autocasts); the increment is added to the state in fp32.
        """
        compute_dtype = self.stem.weight.dtype
        bottleneck_BCHW, skips, cond_levels = self._encode(u_BCHW.to(compute_dtype), cond_BCHW)
        out_BCHW = self.head(self._decode(bottleneck_BCHW, skips, cond_levels)).float()
        if not self.predict_delta:
            return StepOutput(out_BCHW, bottleneck_BCHW)
        scale_C11 = self.delta_scale.float()[:, None, None]
        return StepOutput(u_BCHW.float() + out_BCHW * scale_C11, bottleneck_BCHW)

    def param_count(self) -> int:
        """Number of trainable parameters."""
        return sum(p.numel() for p in self.parameters() if p.requires_grad)

    def _encode(self, u_BCHW: Tensor, cond_BCHW: Tensor | None):
        """(bottleneck, skips, the conditioning at each level) of one forward."""
        x_BCHW = self._with_conditioning(u_BCHW, cond_BCHW)
        cond_levels = self._conditioning_pyramid(cond_BCHW, u_BCHW.dtype)
        x_BCHW, skips = self.stem(x_BCHW), []
        for stage, downsample, cond_level in zip(
            self.encoder_stages, self.downsamples, cond_levels, strict=True
        ):
            x_BCHW = stage(x_BCHW, cond_level)
            skips.append(x_BCHW)
            x_BCHW = downsample(x_BCHW)
        x_BHWC = self.afno(x_BCHW.permute(0, 2, 3, 1))
        return x_BHWC.permute(0, 3, 1, 2), skips, cond_levels

    def _decode(
        self, x_BCHW: Tensor, skips: list[Tensor], cond_levels: list[Tensor | None]
    ) -> Tensor:
        levels = zip(self.decoder_stages, reversed(skips), reversed(cond_levels), strict=True)
        for stage, skip_BCHW, cond_level in levels:
            x_BCHW = stage(torch.cat([periodic_upsample2x(x_BCHW), skip_BCHW], dim=1), cond_level)
        return x_BCHW

    def _conditioning_pyramid(self, cond_BCHW: Tensor | None, dtype) -> list[Tensor | None]:
        """The conditioning fields at each level's resolution (full, 1/2, 1/4, ...)."""
        if cond_BCHW is None:
            return [None] * self.encoder_levels
        cond_BCHW = cond_BCHW.to(dtype)
        return [
            cond_BCHW if level == 0 else F.avg_pool2d(cond_BCHW, 2**level)
            for level in range(self.encoder_levels)
        ]

    def _with_conditioning(self, u_BCHW: Tensor, cond_BCHW: Tensor | None) -> Tensor:
        """Check shapes and concatenate the constant fields to the state."""
        self._check_input(u_BCHW)
        if self.cond_channels == 0:
            if cond_BCHW is not None:
                raise ValueError("UAFNO: got cond_BCHW but the model has cond_channels=0")
            return u_BCHW
        expected = (u_BCHW.shape[0], self.cond_channels, *u_BCHW.shape[2:])
        if cond_BCHW is None or tuple(cond_BCHW.shape) != expected:
            got = None if cond_BCHW is None else tuple(cond_BCHW.shape)
            raise ValueError(f"UAFNO: cond_BCHW must have shape {expected}, got {got}")
        return torch.cat([u_BCHW, cond_BCHW.to(u_BCHW.dtype)], dim=1)

    def _check_input(self, u_BCHW: Tensor) -> None:
        if u_BCHW.ndim != 4 or u_BCHW.shape[1] != self.in_channels:
            raise ValueError(
                f"UAFNO: expected u of shape [B, {self.in_channels}, H, W], "
                f"got {tuple(u_BCHW.shape)}"
            )
        factor, (height, width) = 2**self.encoder_levels, u_BCHW.shape[2:]
        if height % factor or width % factor:
            raise ValueError(
                f"UAFNO: with encoder_levels={self.encoder_levels} the grid must be divisible "
                f"by {factor}; got {height}x{width}"
            )
