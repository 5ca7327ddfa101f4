"""Adaptive Fourier Neural Operator (AFNO) spectral filter and block, channels-last [B, H, W, C].

Follows Guibas et al. 2021 (arXiv 2111.13587) and NVlabs/AFNO-transformer `afno2d.py`:
rfft2 in fp32, a block-diagonal complex 2-layer MLP shared by all kept modes, soft-shrink,
irfft2, and a residual inside the filter. Two deliberate differences:

* Mode truncation keeps a symmetric set, |k_y| <= modes and k_x <= modes. The original's
  `hard_thresholding_fraction` slices only the k_x axis; slicing `[:modes, :modes]`, as in the
  prototype, drops every negative k_y.
* Nonlinearity. A roll of the input by s multiplies mode k by the phase exp(-i k.s). The
  original acts on real and imaginary parts separately (ReLU, soft-shrink) and adds a complex
  bias to every kept mode, and neither commutes with a phase rotation: sum_k b exp(ikx) is
  a fixed spatial pattern, and ReLU(-x) != -ReLU(x). So the original block is not
  translation-equivariant, even without biases. The default `nonlinearity="phase"` acts on
  magnitudes only and keeps phases, z -> z * relu(|z| - tau) / |z| (complex soft-threshold),
  with a learnable tau >= 0 per hidden channel in layer 1 and tau = lambda in the final
  shrink. It has no additive spectral bias: one at k=0 would be equivariant, but the block's
  channel MLP already supplies constant offsets. The result is exactly equivariant to
  every roll, which is right for periodic, homogeneous PDEs. `nonlinearity="componentwise"`
  reproduces the original (biases b1, b2 and ReLU/soft-shrink on re/im) for comparison.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

Nonlinearity = Literal["phase", "componentwise"]
_INIT_SCALE = 0.02  # weight init scale of the original AFNO
_INIT_HIDDEN_TAU = 0.01  # initial layer-1 threshold of the "phase" MLP (= default lambda)


def kept_mode_mask(
    height: int, width: int, modes: int | None, device: torch.device | None = None
) -> Tensor:
    """Boolean [height, width // 2 + 1] mask of rfft2 modes with |k_y| <= modes and k_x <= modes.

    Rows follow `fftfreq` order (0, 1, ..., -2, -1), so +k_y and -k_y are kept together.
    `modes=None` keeps every mode.
    """
    if modes is None:
        return torch.ones(height, width // 2 + 1, dtype=torch.bool, device=device)
    k_y = (torch.fft.fftfreq(height, device=device) * height).round().abs()
    k_x = (torch.fft.rfftfreq(width, device=device) * width).round()
    return (k_y <= modes)[:, None] & (k_x <= modes)[None, :]


def complex_soft_threshold(z: Tensor, tau: Tensor | float) -> Tensor:
    """z * max(|z| - tau, 0) / |z|: shrinks magnitudes, keeps phases (so commutes with rolls)."""
    magnitude = z.abs()
    gain = F.relu(magnitude - tau) / magnitude.clamp_min(torch.finfo(magnitude.dtype).tiny)
    return z * gain


def _complex_weight(weight_2KIO: Tensor) -> Tensor:
    """Real [2, k, i, o] storage (as in the original) -> complex [k, i, o]."""
    return torch.complex(weight_2KIO[0], weight_2KIO[1])


def _block_matmul(x_NKI: Tensor, weight_KIO: Tensor) -> Tensor:
    """Block-diagonal complex matmul: each of the k channel blocks has its own i x o matrix."""
    return torch.einsum("...ki,kio->...ko", x_NKI, weight_KIO)


class AFNO2D(nn.Module):
    """AFNO spectral filter on [B, H, W, C]; returns x + irfft2(S(MLP(rfft2(x)))) in x's dtype.

    The spectral part runs in fp32 with autocast disabled (no bf16 FFT on cuFFT; the MLP
    weights are upcast too). The kept-mode mask is a non-persistent buffer rebuilt when the
    grid changes, so one filter serves any grid size and checkpoints stay grid-free.
    """

    def __init__(
        self,
        channels: int,
        num_blocks: int = 8,
        modes: int | None = None,
        hidden_size_factor: int = 1,
        sparsity_threshold: float = 0.01,
        nonlinearity: Nonlinearity = "phase",
    ) -> None:
        super().__init__()
        if channels % num_blocks != 0:
            raise ValueError(
                f"AFNO2D: channels={channels} must be divisible by num_blocks={num_blocks}"
            )
        if modes is not None and modes < 0:
            raise ValueError(f"AFNO2D: modes must be >= 0 or None, got {modes}")
        if nonlinearity not in ("phase", "componentwise"):
            raise ValueError(
                f"AFNO2D: nonlinearity must be 'phase' or 'componentwise', got {nonlinearity!r}"
            )
        self.channels, self.num_blocks, self.modes = channels, num_blocks, modes
        self.sparsity_threshold, self.nonlinearity = sparsity_threshold, nonlinearity
        block, hidden = channels // num_blocks, channels // num_blocks * hidden_size_factor
        self.w1 = nn.Parameter(_INIT_SCALE * torch.randn(2, num_blocks, block, hidden))
        self.w2 = nn.Parameter(_INIT_SCALE * torch.randn(2, num_blocks, hidden, block))
        if nonlinearity == "componentwise":
            self.b1 = nn.Parameter(_INIT_SCALE * torch.randn(2, num_blocks, hidden))
            self.b2 = nn.Parameter(_INIT_SCALE * torch.randn(2, num_blocks, block))
        else:  # tau = softplus(raw) >= 0, one per hidden channel
            raw = math.log(math.expm1(_INIT_HIDDEN_TAU))
            self.hidden_tau_raw = nn.Parameter(torch.full((num_blocks, hidden), raw))
        self.register_buffer("mode_mask", torch.ones(0, 0, dtype=torch.bool), persistent=False)

    def kept_modes(self, height: int, width: int) -> Tensor:
        """The [H, W // 2 + 1] kept-mode mask for this grid (cached in `mode_mask`)."""
        if self.mode_mask.shape != (height, width // 2 + 1):
            self.mode_mask = kept_mode_mask(height, width, self.modes, self.mode_mask.device)
        return self.mode_mask

    def forward(self, x_BHWC: Tensor) -> Tensor:
        B, H, W, C = x_BHWC.shape
        if self.channels != C:
            raise ValueError(f"AFNO2D: expected {self.channels} channels last, got {C}")
        mask_HF = self.kept_modes(H, W)
        with torch.autocast(device_type=x_BHWC.device.type, enabled=False):
            x_hat = torch.fft.rfft2(x_BHWC.float(), dim=(1, 2), norm="ortho")
            x_hat_BHFKD = x_hat.reshape(B, H, W // 2 + 1, self.num_blocks, -1)
            y_hat_BHFKD = self._spectral_mlp(x_hat_BHFKD) * mask_HF[:, :, None, None]
            y_hat_BHFC = y_hat_BHFKD.reshape(B, H, W // 2 + 1, C)
            y_BHWC = torch.fft.irfft2(y_hat_BHFC, s=(H, W), dim=(1, 2), norm="ortho")
        return y_BHWC.to(x_BHWC.dtype) + x_BHWC

    def _spectral_mlp(self, x_hat: Tensor) -> Tensor:
        """The complex MLP shared by all modes, applied to [..., k, d] complex coefficients."""
        w1, w2 = _complex_weight(self.w1.float()), _complex_weight(self.w2.float())
        if self.nonlinearity == "phase":
            tau_hidden = F.softplus(self.hidden_tau_raw.float())
            z = complex_soft_threshold(_block_matmul(x_hat, w1), tau_hidden)
            return complex_soft_threshold(_block_matmul(z, w2), self.sparsity_threshold)
        b1, b2 = _complex_weight(self.b1.float()), _complex_weight(self.b2.float())
        z = _block_matmul(x_hat, w1) + b1
        z = torch.complex(F.relu(z.real), F.relu(z.imag))
        y = torch.view_as_real(_block_matmul(z, w2) + b2)
        return torch.view_as_complex(F.softshrink(y, self.sparsity_threshold).contiguous())


class AFNOBlock(nn.Module):
    """Pre-norm AFNO block on [B, H, W, C]: h = x + filter(norm(x)); out = h + MLP(norm(h))."""

    def __init__(
        self,
        channels: int,
        num_blocks: int = 8,
        modes: int | None = None,
        mlp_ratio: float = 4.0,
        hidden_size_factor: int = 1,
        sparsity_threshold: float = 0.01,
        nonlinearity: Nonlinearity = "phase",
    ) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(channels)
        self.filter = AFNO2D(
            channels, num_blocks, modes, hidden_size_factor, sparsity_threshold, nonlinearity
        )
        self.norm2 = nn.LayerNorm(channels)
        hidden = int(channels * mlp_ratio)
        self.mlp = nn.Sequential(
            nn.Linear(channels, hidden), nn.GELU(), nn.Linear(hidden, channels)
        )

    def forward(self, x_BHWC: Tensor) -> Tensor:
        h_BHWC = x_BHWC + self.filter(self.norm1(x_BHWC))
        return h_BHWC + self.mlp(self.norm2(h_BHWC))
