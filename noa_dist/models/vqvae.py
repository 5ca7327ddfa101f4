"""`FeatureVQVAE`: per category an encoder and a vector quantizer, one decoder (torch only).

Shape legend: B samples, F normalised features (categories in order, contiguous), D latent
dim = sum of the code dims, K_c the codebook size of category c.

    x_BF -> split by category -> encoder_c (MLP) -> z_e_c -> VQ_c -> z_q_c
         concat z_q -> decoder (MLP) -> reconstruction of x_BF

The quantizers are vector-quantize-pytorch 1.32.0 `VectorQuantize` with every default that
changed between releases passed explicitly: EMA codebooks (`decay`), k-means init, dead-code
expiry (`threshold_ema_dead_code`, counted per global batch), the plain straight-through
estimator (no rotation trick), and the commitment weight on the encoder-side term
beta * ||z_e - sg(z_q)||^2 (the library's `commitment_weight`; the codebook side is the EMA).
In training mode each forward updates the codebooks and, with `sync_codebook=True`,
all-reduces their statistics: every rank must run the same number of training forwards.
`nearest_codes` never updates anything and issues no collective (what a frozen tokenizer uses).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from vector_quantize_pytorch import VectorQuantize


@dataclass(frozen=True)
class VQVAEConfig:
    """Architecture and quantizer settings; stored in a tokenizer's spec."""

    input_dims: tuple[int, ...]  # features per category, in category order
    codebook_sizes: tuple[int, ...]
    code_dim: int = 8
    hidden: int = 128
    decay: float = 0.99
    commitment_weight: float = 0.25
    dead_code_threshold: float = 1.0
    kmeans_iters: int = 10

    @property
    def latent_dim(self) -> int:
        return self.code_dim * len(self.input_dims)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, values: dict) -> VQVAEConfig:
        values = dict(values)
        values["input_dims"] = tuple(values["input_dims"])
        values["codebook_sizes"] = tuple(values["codebook_sizes"])
        return cls(**values)


class VQVAEOutput(NamedTuple):
    recon_BF: Tensor
    z_e_BD: Tensor
    z_q_BD: Tensor  # straight-through in training mode
    codes_BK: Tensor  # [B, n_codebooks] long
    commit_loss: Tensor  # sum over codebooks of beta * mse(z_e, sg(z_q)); 0 in eval mode


def mlp(n_in: int, hidden: int, n_out: int) -> nn.Sequential:
    """Linear-GELU-Linear-GELU-Linear; LayerNorm after the first layer (per sample, no batch
    statistics)."""
    return nn.Sequential(
        nn.Linear(n_in, hidden),
        nn.LayerNorm(hidden),
        nn.GELU(),
        nn.Linear(hidden, hidden),
        nn.GELU(),
        nn.Linear(hidden, n_out),
    )


class FeatureVQVAE(nn.Module):
    def __init__(self, config: VQVAEConfig, *, sync_codebook: bool):
        """`sync_codebook`: all-reduce codebook statistics (True under DDP). Passed explicitly:
        the library's default is "is a process group initialised" when it is built."""
        super().__init__()
        if len(config.input_dims) != len(config.codebook_sizes) or min(config.input_dims) < 1:
            raise ValueError(f"FeatureVQVAE: bad config {config}")
        self.config = config
        d = config.code_dim
        self.encoders = nn.ModuleList(mlp(n, config.hidden, d) for n in config.input_dims)
        self.quantizers = nn.ModuleList(
            VectorQuantize(
                dim=d,
                codebook_size=k,
                decay=config.decay,
                kmeans_init=True,
                kmeans_iters=config.kmeans_iters,
                threshold_ema_dead_code=config.dead_code_threshold,
                commitment_weight=config.commitment_weight,
                rotation_trick=False,
                straight_through=False,
                learnable_codebook=False,
                ema_update=True,
                sync_codebook=sync_codebook,
            )
            for k in config.codebook_sizes
        )
        self.decoder = mlp(config.latent_dim, config.hidden, sum(config.input_dims))

    def encode(self, x_BF: Tensor) -> Tensor:
        """z_e [B, D]: the category encoders applied to their slices of x."""
        parts = torch.split(x_BF, list(self.config.input_dims), dim=1)
        return torch.cat([enc(p) for enc, p in zip(self.encoders, parts, strict=True)], dim=1)

    def decode(self, z_BD: Tensor) -> Tensor:
        return self.decoder(z_BD)

    def forward(self, x_BF: Tensor) -> VQVAEOutput:
        z_e = self.encode(x_BF)
        if not self.training:
            z_q, codes = self.nearest_codes(z_e)
            return VQVAEOutput(self.decode(z_q), z_e, z_q, codes, z_e.new_zeros(()))
        quantized, codes, losses = [], [], []
        for vq, z in zip(self.quantizers, self._split_latent(z_e), strict=True):
            z_q, index, loss = vq(z)
            quantized.append(z_q)
            codes.append(index)
            losses.append(loss.reshape(()))
        z_q = torch.cat(quantized, dim=1)
        return VQVAEOutput(
            self.decode(z_q), z_e, z_q, torch.stack(codes, dim=1), torch.stack(losses).sum()
        )

    def codebooks(self) -> list[Tensor]:
        """Each quantizer's codebook [K_c, code_dim] (the live buffers)."""
        return [vq.codebook for vq in self.quantizers]

    @torch.no_grad()
    def nearest_codes(self, z_e_BD: Tensor) -> tuple[Tensor, Tensor]:
        """(z_q [B, D], codes [B, n_codebooks]): the nearest code of each category, fp32.

        No codebook update, no straight-through, no collective; z_q carries no gradient."""
        quantized, codes = [], []
        for codebook, z in zip(self.codebooks(), self._split_latent(z_e_BD), strict=True):
            z, codebook = z.float(), codebook.float()
            distance = (
                z.square().sum(1, keepdim=True) - 2 * z @ codebook.T + codebook.square().sum(1)
            )
            index = distance.argmin(dim=1)
            quantized.append(codebook[index])
            codes.append(index)
        return torch.cat(quantized, dim=1), torch.stack(codes, dim=1)

    def _split_latent(self, z_BD: Tensor) -> Sequence[Tensor]:
        return torch.split(z_BD, self.config.code_dim, dim=1)


def reconstruction_loss(recon_BF: Tensor, x_BF: Tensor) -> Tensor:
    return F.mse_loss(recon_BF, x_BF)
