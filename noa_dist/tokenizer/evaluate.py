"""Validation of a tokenizer over a whole split, reduced across ranks; per category, never pooled.

Per category c (features F_c, codebook of K_c codes, N windows of the split):
  recon_mse   mean squared reconstruction error in normalised units;
  explained_variance  1 - SSE / SST, SST around the split's own mean of each feature;
  commit      mean (z_e - q(z_e))^2 per latent dimension (the L_commit level on true windows);
  utilization fraction of the K_c codes used by at least one window (with n = N: at most
              N / K_c windows per code on average, so small splits cannot use big codebooks);
  perplexity  exp(H) of the code histogram; entropy_ratio = H / log K_c.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor

from noa_dist.features import CATEGORIES
from noa_dist.models.vqvae import FeatureVQVAE

EVAL_BATCH = 1024


@torch.no_grad()
def evaluate(
    model: FeatureVQVAE,
    x_NF: Tensor,
    *,
    sum_across_ranks: Callable[[Tensor], Tensor] = lambda t: t,
) -> dict[str, dict[str, float]]:
    """Metrics per category of the normalised features x (this rank's rows); every rank calls
    it (one all-reduce). The model is put in eval mode and back to its previous mode."""
    was_training = model.training
    model.eval()
    cfg = model.config
    dims, sizes = list(cfg.input_dims), list(cfg.codebook_sizes)
    n_cat = len(dims)
    sse, commit = torch.zeros(n_cat, dtype=torch.float64), torch.zeros(n_cat, dtype=torch.float64)
    sum_x = torch.zeros(sum(dims), dtype=torch.float64)
    sum_x2 = torch.zeros_like(sum_x)
    counts = [torch.zeros(k, dtype=torch.float64) for k in sizes]
    for batch in x_NF.split(EVAL_BATCH):
        out = model(batch)
        err = (out.recon_BF - batch).double().square()
        sse += torch.stack([e.sum() for e in err.split(dims, dim=1)])
        gap = (out.z_e_BD - out.z_q_BD).double().square()
        commit += torch.stack([g.sum() for g in gap.split(cfg.code_dim, dim=1)])
        sum_x += batch.double().sum(0)
        sum_x2 += batch.double().square().sum(0)
        for c, k in enumerate(sizes):
            counts[c] += torch.bincount(out.codes_BK[:, c], minlength=k).double()
    n = torch.tensor([float(x_NF.shape[0])], dtype=torch.float64)
    packed = sum_across_ranks(torch.cat([n, sse, commit, sum_x, sum_x2, *counts]))
    model.train(was_training)
    return _metrics(packed, dims, sizes, cfg.code_dim)


def _metrics(packed: Tensor, dims, sizes, code_dim: int) -> dict[str, dict[str, float]]:
    n_cat, n_feat = len(dims), sum(dims)
    n = packed[0].item()
    sse, commit = packed[1 : 1 + n_cat], packed[1 + n_cat : 1 + 2 * n_cat]
    offset = 1 + 2 * n_cat
    sum_x, sum_x2 = packed[offset : offset + n_feat], packed[offset + n_feat : offset + 2 * n_feat]
    sst = (sum_x2 - sum_x.square() / max(n, 1.0)).clamp(min=0)
    code_counts = packed[offset + 2 * n_feat :].split(sizes)
    result = {}
    for c, (name, sst_c, counts) in enumerate(
        zip(CATEGORIES, sst.split(dims), code_counts, strict=True)
    ):
        p = counts / counts.sum().clamp(min=1)
        entropy = -(p[p > 0] * p[p > 0].log()).sum().item()
        total_sst = sst_c.sum().item()
        result[name] = {
            "recon_mse": sse[c].item() / max(n * dims[c], 1.0),
            "explained_variance": 1 - sse[c].item() / total_sst if total_sst > 0 else math.nan,
            "commit": commit[c].item() / max(n * code_dim, 1.0),
            "codes_used": int((counts > 0).sum().item()),
            "codebook_size": sizes[c],
            "utilization": (counts > 0).double().mean().item(),
            "perplexity": math.exp(entropy),
            "entropy_ratio": entropy / math.log(sizes[c]) if sizes[c] > 1 else 0.0,
            "n": int(n),
        }
    return result


def format_metrics(metrics: dict[str, dict[str, float]]) -> list[str]:
    """One line per category."""
    width = max(map(len, metrics))
    return [
        f"    {name:<{width}}  recon {m['recon_mse']:.4f} (EV {m['explained_variance']:.3f})"
        f"  codes {m['codes_used']}/{m['codebook_size']} used ({100 * m['utilization']:.1f}%,"
        f" n={m['n']})  perplexity {m['perplexity']:.1f}  commit {m['commit']:.4f}"
        for name, m in metrics.items()
    ]


def flat_metrics(metrics: dict[str, dict[str, float]], prefix: str) -> dict[str, float]:
    """{'valid/temporal/utilization': ...} for W&B."""
    return {
        f"{prefix}/{name}/{key}": float(value)
        for name, m in metrics.items()
        for key, value in m.items()
        if key not in ("codebook_size", "n")
    }
