"""Validation: full rollouts on the valid split, sharded across ranks and reduced once.

Each rank sees an equal number of batches (the eval sampler pads; padded samples are left
out of every sum), so model calls that gather parameters (ZeRO-3) never deadlock. The loss
terms come from the training loss function, on the training loss's window length. Sums stay
on the device until the single all-reduce at the end.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from accelerate import Accelerator

from noa_dist import distributed
from noa_dist.errors import DataError
from noa_dist.losses import combine
from noa_dist.metrics import persistence_prediction, vrmse
from noa_dist.rollout import iter_windows, window_loss_weight
from noa_dist.step import LossFn
from noa_dist.tokenizer.evaluate import code_usage


class StoppedDuringValidation(Exception):
    """Every rank agreed to stop (a signal) before validation was over; `code` is the agreed
    stop code. Validation is redone after the resume."""

    def __init__(self, code: int) -> None:
        super().__init__(code)
        self.code = code


@dataclass
class ValResult:
    terms: dict[str, float]  # every unweighted loss term and "total", mean over samples
    vrmse_per_step: list[float]  # mean over samples and channels, per rollout step
    persistence_vrmse_per_step: list[float]
    n_samples: int
    nonfinite_samples: int = 0  # samples whose rollout went NaN/Inf (model diverged)
    example: tuple[torch.Tensor, torch.Tensor] | None = field(default=None, repr=False)
    # per tokenizer codebook, over the predicted windows (empty without a tokenizer)
    token_utilization: list[float] = field(default_factory=list)  # fraction of codes used
    token_perplexity: list[float] = field(default_factory=list)  # exp(entropy of code use)

    @property
    def loss(self) -> float:
        return self.terms["total"]

    @property
    def vrmse(self) -> float:
        """VRMSE averaged over the rollout's steps: the one number a sweep ranks runs by."""
        return sum(self.vrmse_per_step) / len(self.vrmse_per_step)

    @property
    def one_step_ratio(self) -> float:
        """Model one-step VRMSE / persistence one-step VRMSE (< 1 beats persistence)."""
        return self.vrmse_per_step[0] / max(self.persistence_vrmse_per_step[0], 1e-12)


@torch.no_grad()
def evaluate(
    accelerator: Accelerator,
    model: torch.nn.Module,
    loader,
    n_real: int,
    loss_fn: LossFn,
    weights: dict[str, float],
    describe_sample: Callable[[int], str] = str,
    window: int | None = None,
    tokenizer=None,
    stop_code: Callable[[], int] | None = None,
) -> ValResult:
    """Roll out every validation window; `n_real` = this rank's unpadded sample count.

    With `stop_code` (this rank's pending stop request, 0 for none) the ranks agree before each
    batch whether any was asked to stop, and raise StoppedDuringValidation together: a
    preemption's grace period is shorter than a long validation.

    The loss terms are computed on consecutive `window`-step pieces of the rollout (the
    training loss's windows: a tokenizer is trained on windows of that length) and averaged
    over all steps (each piece starts from the previous piece's last predicted state, so the
    rollout is the same as uncut).

    With a tokenizer, the codes of the predicted windows give each codebook's utilization
    and perplexity (how many behaviours the model's rollouts visit).

    Raises DataError on every rank when validation inputs or targets hold NaN/Inf: no metric
    means anything then (naming the samples with `describe_sample(dataset index)`).
    """
    was_training = model.training
    model.eval()
    names = list(weights)
    sums, seen, example = None, 0, None
    bad_count, bad_indices = torch.zeros((), device=accelerator.device), []
    histogram = CodeHistogram(tokenizer, accelerator.device)
    for batch in loader:
        if stop_code is not None and (
            code := distributed.max_across_ranks(accelerator, stop_code())[0]
        ):
            model.train(was_training)
            raise StoppedDuringValidation(code)  # every rank, at the same batch
        batch = distributed.batch_to_device(accelerator, batch)
        n = max(0, min(batch["u0"].shape[0], n_real - seen))  # padding rows come last
        seen += batch["u0"].shape[0]
        if n:  # a rank with only padding still runs the forward (ZeRO-3 gathers in it)
            batch = {k: v[:n] for k, v in batch.items()}
        batch_sums, pred = _batch_sums(model, batch, loss_fn, weights, names, window, histogram, n)
        contribution = batch_sums * n if n else torch.zeros_like(batch_sums)  # 0 * NaN is NaN
        sums = contribution if sums is None else sums + contribution
        bad_B = ~_finite_per_sample(batch) & (n > 0)
        bad_count += bad_B.sum()
        bad_indices.append(batch["index"].to(bad_B.device)[bad_B])
        if example is None and accelerator.is_main_process and n:
            example = (batch["target"][0].cpu(), pred[0].cpu())
    model.train(was_training)
    counts = torch.stack([torch.tensor(float(min(seen, n_real)), device=sums.device), bad_count])
    totals = distributed.sum_across_ranks(accelerator, torch.cat([sums, counts])).tolist()
    # ^ sync point: once per validation
    if totals[-1] > 0:
        _raise_bad_data(accelerator, torch.cat(bad_indices).tolist(), describe_sample)
    result = _result(totals[:-1], names, example)
    result.token_utilization, result.token_perplexity = histogram.reduce(accelerator)
    return result


def _batch_sums(model, batch, loss_fn: LossFn, weights, names, window, histogram, n_real: int):
    """Batch means [terms..., total, nonfinite fraction, vrmse_1..T, persistence_1..T], rollout."""
    u0, target = batch["u0"], batch["target"]
    cond = batch["cond"] if batch["cond"].shape[1] > 0 else None
    n_steps = target.shape[1]
    values, preds = None, []
    for piece in iter_windows(lambda u: model(u, cond), u0, n_steps, window, "all-windows"):
        terms = loss_fn(piece, batch)
        total = combine({k: terms[k] for k in names}, weights)
        row = torch.stack([*(terms[k].float() for k in names), total.float()])
        row = row * window_loss_weight(piece, n_steps, "all-windows")
        values = row if values is None else values + row
        preds.append(piece.pred_BTCHW)
        if n_real:
            histogram.add(piece)
    pred = torch.cat(preds, dim=1)
    nonfinite = (~torch.isfinite(pred).flatten(1).all(dim=1)).float().mean()
    model_vrmse = vrmse(pred, target).mean(dim=(0, 2))  # [T]
    base_vrmse = vrmse(persistence_prediction(u0, n_steps), target).mean(dim=(0, 2))
    return torch.cat([values, nonfinite.reshape(1), model_vrmse, base_vrmse]), pred


def _finite_per_sample(batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """[B] bool: the sample's inputs and targets are all finite."""
    parts = [batch[k].flatten(1) for k in ("u0", "target", "cond") if batch[k].numel()]
    return torch.stack([torch.isfinite(p).all(dim=1) for p in parts]).all(dim=0)


def _result(totals: list[float], names: list[str], example) -> ValResult:
    *sums, count = totals
    count = max(count, 1.0)
    means = [v / count for v in sums]
    n_terms = len(names) + 1
    steps = (len(means) - n_terms - 1) // 2
    return ValResult(
        terms=dict(zip([*names, "total"], means[:n_terms], strict=True)),
        vrmse_per_step=means[n_terms + 1 : n_terms + 1 + steps],
        persistence_vrmse_per_step=means[n_terms + 1 + steps :],
        n_samples=int(count),
        nonfinite_samples=round(means[n_terms] * count),
        example=example,
    )


def _raise_bad_data(accelerator: Accelerator, local: list[int], describe: Callable) -> None:
    """Every rank raises the same DataError naming the bad samples (rare path)."""
    indices = sorted(i for rank in distributed.gather_reports(accelerator, local) for i in rank)
    shown = "; ".join(describe(int(i)) for i in indices[:5])
    more = f" (+{len(indices) - 5} more)" if len(indices) > 5 else ""
    raise DataError(
        f"the validation split holds NaN/Inf in {len(indices)} sample(s): {shown}{more}; "
        "no validation metric can be computed. Find and fix them with `noa-data check ROOT`"
    )


class CodeHistogram:
    """How often each code of each tokenizer codebook is chosen for predicted windows."""

    def __init__(self, tokenizer, device: torch.device) -> None:
        self.tokenizer = tokenizer
        sizes = tokenizer.codebook_sizes if tokenizer is not None else []
        self.counts = [torch.zeros(k, device=device) for k in sizes]

    def add(self, piece) -> None:
        if self.tokenizer is None or piece.stop - piece.start != self.tokenizer.window_length:
            return
        _, codes_BK = self.tokenizer.quantize(
            self.tokenizer.encode_window(piece.pred_BTCHW, piece.input_BCHW)
        )
        for k, counts in enumerate(self.counts):
            counts += torch.bincount(codes_BK[:, k], minlength=counts.numel()).to(counts.dtype)

    def reduce(self, accelerator: Accelerator) -> tuple[list[float], list[float]]:
        """(utilization, perplexity) per codebook over all ranks. # sync point (rare: validation)"""
        if not self.counts:
            return [], []
        flat = distributed.sum_across_ranks(accelerator, torch.cat(self.counts)).cpu()
        usage = [code_usage(c) for c in torch.split(flat, [c.numel() for c in self.counts])]
        return [u["utilization"] for u in usage], [u["perplexity"] for u in usage]
