"""The measurement: roll each trajectory of this rank's shard forward, cut it into tokenizer
windows, tokenize the predicted and the true windows, and add everything up.

Shape legend: B trajectories, J windows per trajectory, K codebooks, D latent dim, F features.
Only sums are kept (float64, on the CPU): code histograms, agreement counts, cosine sums and
histograms, latent norms per window index. `reduce` packs them into one tensor for one
all-reduce, so the result does not depend on how the split was sharded (up to the float
summation order). A trajectory whose prediction (or truth) goes non-finite is left out of every
sum and counted.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor

from noa_dist.alignment import sampled_bottleneck, true_window
from noa_dist.losses import latent_alignment_loss
from noa_dist.models.vqvae import VQVAEOutput
from noa_dist.rollout import iter_windows
from noa_dist.tokenizer import FrozenTokenizer
from noa_dist.tokenizer.evaluate import CategorySums

COSINE_BINS = 20  # histogram of cosine similarities over [-1, 1]


@dataclass
class WindowCodes:
    """One window of a batch, tokenized: truth and prediction (and the projector's latent)."""

    x_true_BF: Tensor
    true: VQVAEOutput
    x_pred_BF: Tensor
    pred: VQVAEOutput
    projected_BD: Tensor | None


def _zeros(n: int) -> Tensor:
    return torch.zeros(n, dtype=torch.float64)


@dataclass
class AlignSums:
    """Everything the report needs, as sums over this rank's trajectories (and windows)."""

    truth: CategorySums
    pred: CategorySums
    n_codebooks: int
    windows: int  # J
    projector: bool
    scalars: dict[str, Tensor] = field(default_factory=dict)

    def __post_init__(self) -> None:
        j, k = self.windows, self.n_codebooks
        names = {"trajectories": 1, "excluded_nonfinite": 1, "agree": k,
                 "cos_zz": 1, "cos_zz_sq": 1, "cos_zz_hist": COSINE_BINS, "mse_zz": 1,
                 "norm_pred": j, "norm_pred_sq": j, "norm_true": j, "norm_true_sq": j,
                 "cv_pred": 1, "cv_true": 1}  # fmt: skip
        if self.projector:
            names |= {"cos_latent": 1, "cos_latent_sq": 1, "cos_latent_hist": COSINE_BINS,
                      "latent_mse": 1}  # fmt: skip
        self.scalars = {name: _zeros(n) for name, n in names.items()}

    def add_batch(self, records: list[WindowCodes]) -> None:
        """The J windows of one batch of trajectories."""
        finite_B = torch.stack([_finite_rows(r) for r in records]).all(dim=0).cpu()
        s = self.scalars
        s["excluded_nonfinite"] += (~finite_B).sum()
        s["trajectories"] += finite_B.sum()
        keep = finite_B.nonzero().squeeze(1)
        if keep.numel() == 0:
            return
        norms_pred, norms_true = [], []
        for r in records:
            true, pred = _rows(r.true, keep), _rows(r.pred, keep)
            self.truth.add(r.x_true_BF[keep], true)
            self.pred.add(r.x_pred_BF[keep], pred)
            z_true, z_pred = true.z_e_BD.double().cpu(), pred.z_e_BD.double().cpu()
            s["agree"] += (pred.codes_BK == true.codes_BK).sum(dim=0).double().cpu()
            _add_cosines(s, "cos_zz", z_pred, z_true)
            s["mse_zz"] += latent_alignment_loss(z_pred, z_true).double() * keep.numel()
            if self.projector:
                projected = r.projected_BD[keep].double().cpu()
                _add_cosines(s, "cos_latent", projected, z_true)
                s["latent_mse"] += latent_alignment_loss(projected, z_true).double() * keep.numel()
            norms_pred.append(z_pred.norm(dim=1))
            norms_true.append(z_true.norm(dim=1))
        for name, norms in (("pred", norms_pred), ("true", norms_true)):
            norms_BJ = torch.stack(norms, dim=1)
            s[f"norm_{name}"] += norms_BJ.sum(dim=0)
            s[f"norm_{name}_sq"] += norms_BJ.square().sum(dim=0)
            s[f"cv_{name}"] += coefficient_of_variation(norms_BJ).sum()

    def packed(self) -> Tensor:
        return torch.cat([self.truth.packed(), self.pred.packed(), *self.scalars.values()])

    def unpack(self, flat: Tensor) -> Reduced:
        """The `packed()` tensor summed over ranks, read back."""
        sizes = [self.truth.size, self.pred.size, *(t.numel() for t in self.scalars.values())]
        truth, pred, *rest = flat.split(sizes)
        return Reduced(
            truth=self.truth.metrics(truth),
            pred=self.pred.metrics(pred),
            truth_counts=self.truth.code_counts(truth),
            pred_counts=self.pred.code_counts(pred),
            sums=dict(zip(self.scalars, rest, strict=True)),
        )


@dataclass(frozen=True)
class Reduced:
    """The sums over all ranks: tokenizer metrics per category (= per codebook), the code
    histograms, and the report's own sums (AlignSums.scalars names)."""

    truth: dict[str, dict[str, float]]
    pred: dict[str, dict[str, float]]
    truth_counts: list[Tensor]
    pred_counts: list[Tensor]
    sums: dict[str, Tensor]


def coefficient_of_variation(norms_BJ: Tensor) -> Tensor:
    """[B]: std / mean of each trajectory's latent norms over its J windows (population std;
    0 for one window)."""
    mean = norms_BJ.mean(dim=1)
    std = norms_BJ.std(dim=1, correction=0)
    return std / mean.clamp(min=1e-12)


def _finite_rows(r: WindowCodes) -> Tensor:
    parts = [r.x_true_BF, r.x_pred_BF, r.true.z_e_BD, r.pred.z_e_BD]
    parts += [] if r.projected_BD is None else [r.projected_BD]
    return torch.stack([torch.isfinite(p).all(dim=1) for p in parts]).all(dim=0)


def _rows(out: VQVAEOutput, keep: Tensor) -> VQVAEOutput:
    return VQVAEOutput(*(t[keep.to(t.device)] if t.ndim else t for t in out))


def _add_cosines(s: dict[str, Tensor], name: str, a_BD: Tensor, b_BD: Tensor) -> None:
    cos = F.cosine_similarity(a_BD, b_BD, dim=1).clamp(-1.0, 1.0)
    s[name] += cos.sum()
    s[f"{name}_sq"] += cos.square().sum()
    s[f"{name}_hist"] += torch.histc(cos, bins=COSINE_BINS, min=-1.0, max=1.0)


@torch.no_grad()
def measure(
    model: torch.nn.Module,
    tokenizer: FrozenTokenizer,
    loader,
    n_real: int,
    *,
    timesteps: int,
    latent_sample_steps: int,
    device: torch.device,
) -> AlignSums:
    """Sums over this rank's `n_real` trajectories (the padded batches' extra rows are cut)."""
    length = tokenizer.window_length
    sums = AlignSums(
        CategorySums(tokenizer.model.config),
        CategorySums(tokenizer.model.config),
        n_codebooks=len(tokenizer.codebook_sizes),
        windows=timesteps // length,
        projector=model.projector is not None,
    )
    seen = 0
    for batch in loader:
        n = max(0, min(batch["u0"].shape[0], n_real - seen))  # padding rows come last
        seen += batch["u0"].shape[0]
        if n == 0:  # nothing here talks to other ranks: a padding-only batch is skipped
            continue
        batch = {k: v[:n].to(device) for k, v in batch.items()}
        sums.add_batch(_tokenized_windows(model, tokenizer, batch, timesteps, latent_sample_steps))
    return sums


def _tokenized_windows(model, tokenizer, batch, timesteps: int, k: int) -> list[WindowCodes]:
    """The rollout of the whole batch (as validation runs it), window by window."""
    cond = batch["cond"] if batch["cond"].shape[1] > 0 else None
    step = lambda u: model(u, cond)  # noqa: E731
    records = []
    for piece in iter_windows(step, batch["u0"], timesteps, tokenizer.window_length, "all-windows"):
        x_true = tokenizer.normalized_features(*true_window(piece, batch))
        x_pred = tokenizer.normalized_features(piece.pred_BTCHW, piece.input_BCHW)
        projected = (
            None if model.projector is None else model.projector(sampled_bottleneck(piece, k))
        )
        records.append(
            WindowCodes(x_true, tokenizer.model(x_true), x_pred, tokenizer.model(x_pred), projected)
        )
    return records


def reduce(sums: AlignSums, sum_across_ranks: Callable[[Tensor], Tensor]) -> Reduced:
    """`sums.unpack` of the sums over all ranks: one all-reduce. # sync point"""
    return sums.unpack(sum_across_ranks(sums.packed()))
