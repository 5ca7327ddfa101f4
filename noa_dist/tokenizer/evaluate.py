"""Validation of a tokenizer over a whole split, reduced across ranks; per category, never pooled.

Per category c (features F_c, codebook of K_c codes, N windows of the split):
  recon_mse   mean squared reconstruction error in normalised units;
  explained_variance  1 - SSE / SST, SST around the split's own mean of each feature;
  commit      mean (z_e - q(z_e))^2 per latent dimension (the L_commit level on true windows);
  utilization fraction of the K_c codes used by at least one window (with n = N: at most
              N / K_c windows per code on average, so small splits cannot use big codebooks);
  perplexity  exp(H) of the code histogram; entropy H in nats, entropy_ratio = H / log K_c.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor

from noa_dist.features import CATEGORIES
from noa_dist.models.vqvae import FeatureVQVAE, VQVAEConfig, VQVAEOutput

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
    sums = CategorySums(model.config)
    for batch in x_NF.split(EVAL_BATCH):
        sums.add(batch, model(batch))
    packed = sum_across_ranks(sums.packed())
    model.train(was_training)
    return sums.metrics(packed)


class CategorySums:
    """What `evaluate` sums over a split, batch by batch: callers that measure more (the
    alignment report) pack these with their own sums into one all-reduce."""

    def __init__(self, cfg: VQVAEConfig) -> None:
        self.dims, self.sizes, self.code_dim = (
            list(cfg.input_dims),
            list(cfg.codebook_sizes),
            cfg.code_dim,
        )
        n_cat = len(self.dims)
        self.n = torch.zeros(1, dtype=torch.float64)
        self.sse = torch.zeros(n_cat, dtype=torch.float64)
        self.commit = torch.zeros(n_cat, dtype=torch.float64)
        self.sum_x = torch.zeros(sum(self.dims), dtype=torch.float64)
        self.sum_x2 = torch.zeros_like(self.sum_x)
        self.counts = [torch.zeros(k, dtype=torch.float64) for k in self.sizes]

    def add(self, x_BF: Tensor, out: VQVAEOutput) -> None:
        """One batch of normalised features and the eval-mode forward of the model on them."""
        x_BF = x_BF.detach().double().cpu()
        err = (out.recon_BF.detach().double().cpu() - x_BF).square()
        self.sse += torch.stack([e.sum() for e in err.split(self.dims, dim=1)])
        gap = (out.z_e_BD - out.z_q_BD).detach().double().cpu().square()
        self.commit += torch.stack([g.sum() for g in gap.split(self.code_dim, dim=1)])
        self.sum_x += x_BF.sum(0)
        self.sum_x2 += x_BF.square().sum(0)
        codes = out.codes_BK.cpu()
        for c, k in enumerate(self.sizes):
            self.counts[c] += torch.bincount(codes[:, c], minlength=k).double()
        self.n += x_BF.shape[0]

    def packed(self) -> Tensor:
        """float64 [size]: every sum, in the order `metrics` reads them."""
        return torch.cat([self.n, self.sse, self.commit, self.sum_x, self.sum_x2, *self.counts])

    @property
    def size(self) -> int:
        return 1 + 2 * len(self.dims) + 2 * sum(self.dims) + sum(self.sizes)

    def metrics(self, packed: Tensor) -> dict[str, dict[str, float]]:
        """Per category, from `packed()` summed over ranks."""
        return _metrics(packed, self.dims, self.sizes, self.code_dim)

    def code_counts(self, packed: Tensor) -> list[Tensor]:
        """Each codebook's histogram [K_c] (how often each code was chosen) in `packed`."""
        return list(packed[self.size - sum(self.sizes) :].split(self.sizes))


def code_usage(counts_K: Tensor) -> dict[str, float]:
    """How one codebook of K codes is used, from how often each code was chosen (never pool
    codebooks: K1 x K2 joint codes are not a codebook). entropy in nats; entropy_ratio =
    entropy / log K (1: uniform use); perplexity = exp(entropy), the effective code count."""
    counts_K = counts_K.double()
    k = counts_K.numel()
    p = counts_K / counts_K.sum().clamp(min=1)
    entropy = -(p[p > 0] * p[p > 0].log()).sum().item()
    return {
        "codes_used": int((counts_K > 0).sum().item()),
        "codebook_size": k,
        "utilization": (counts_K > 0).double().mean().item(),
        "perplexity": math.exp(entropy),
        "entropy": entropy,
        "entropy_ratio": entropy / math.log(k) if k > 1 else 0.0,
    }


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
        total_sst = sst_c.sum().item()
        result[name] = {
            "recon_mse": sse[c].item() / max(n * dims[c], 1.0),
            "explained_variance": 1 - sse[c].item() / total_sst if total_sst > 0 else math.nan,
            "commit": commit[c].item() / max(n * code_dim, 1.0),
            **code_usage(counts),
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
