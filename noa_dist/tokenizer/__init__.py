"""The VQ-VAE tokenizer of trajectory features: training (`noa-train-vqvae`) and the frozen
artifact the NOA trainer loads.

    from noa_dist.tokenizer import load_tokenizer, FrozenTokenizer
    tok = load_tokenizer(path, n_channels=C)            # refuses a feature mismatch
    z_e = tok.encode_window(states_BTCHW, input_BCHW)   # [B, tok.latent_dim]
    z_q, codes = tok.quantize(z_e)                      # [B, latent_dim], [B, n_codebooks]
"""

from noa_dist.tokenizer.artifact import load_tokenizer, write_artifact
from noa_dist.tokenizer.frozen import FrozenTokenizer

__all__ = ["FrozenTokenizer", "load_tokenizer", "write_artifact"]
