"""Models: the AFNO spectral block and the U-AFNO operator (pure torch, no I/O)."""

from noa_dist.models.afno import AFNO2D, AFNOBlock, kept_mode_mask
from noa_dist.models.uafno import UAFNO

__all__ = ["AFNO2D", "AFNOBlock", "UAFNO", "kept_mode_mask"]
