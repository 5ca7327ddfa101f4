"""Build the model a config describes (shared by training, export and diagnosis)."""

from __future__ import annotations

from noa_dist.config import ModelConfig
from noa_dist.models.uafno import UAFNO


def build_model(
    cfg: ModelConfig, *, in_channels: int, cond_channels: int, latent_dim: int | None = None
) -> UAFNO:
    """The U-AFNO; with `latent_dim`, also the L_latent projector onto a tokenizer's latent."""
    return UAFNO(
        in_channels=in_channels,
        cond_channels=cond_channels,
        base_channels=cfg.base_channels,
        encoder_levels=cfg.encoder_levels,
        modes=cfg.modes,
        afno_blocks=cfg.afno_blocks,
        afno_num_blocks=cfg.afno_num_blocks,
        latent_dim=latent_dim,
    )
