"""The tokenizer's training loop: epochs over cached, normalised features; validation each epoch.

Every rank holds the same number of training rows and runs the same number of training
forwards (each one all-reduces the codebook statistics), in an order drawn from
(seed, epoch, rank). Per-batch losses stay on the device; they are read once per epoch.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
from accelerate import Accelerator

from noa_dist import distributed
from noa_dist.errors import ConfigError
from noa_dist.models.vqvae import FeatureVQVAE, reconstruction_loss
from noa_dist.tokenizer.evaluate import evaluate, format_metrics

log = logging.getLogger("noa_dist")


@dataclass(frozen=True)
class LoopSettings:
    epochs: int
    batch_size: int
    seed: int


def batches_per_epoch(n_rows: int, batch_size: int) -> int:
    if n_rows < batch_size:
        raise ConfigError(
            f"--batch-size {batch_size}: each process holds only {n_rows} training windows; "
            "use a smaller --batch-size, fewer processes or more data (--window-stride 1)"
        )
    return n_rows // batch_size  # the last partial batch is dropped: equal counts on every rank


def train_epoch(
    accelerator: Accelerator,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    x_NF: torch.Tensor,
    *,
    batch_size: int,
    generator: torch.Generator,
) -> dict[str, float]:
    """One pass over this rank's rows in a random order; mean losses over all ranks."""
    model.train()
    order = torch.randperm(x_NF.shape[0], generator=generator)
    n_batches = batches_per_epoch(x_NF.shape[0], batch_size)
    sums = torch.zeros(3, device=accelerator.device)  # recon, commit, batches
    for b in range(n_batches):
        x = x_NF[order[b * batch_size : (b + 1) * batch_size]].to(accelerator.device)
        out = model(x)
        recon = reconstruction_loss(out.recon_BF, x)
        loss = recon + out.commit_loss
        optimizer.zero_grad(set_to_none=True)
        accelerator.backward(loss)
        optimizer.step()
        sums += torch.stack([recon.detach(), out.commit_loss.detach(), torch.ones(())])
    sums = distributed.sum_across_ranks(accelerator, sums)
    recon, commit, count = sums.tolist()  # sync point (once per epoch)
    return {"loss": (recon + commit) / count, "recon": recon / count, "commit": commit / count}


def fit(
    accelerator: Accelerator,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    train_x: torch.Tensor,
    valid_x: torch.Tensor,
    settings: LoopSettings,
    on_epoch: Callable[[int, dict], None],
) -> list[dict]:
    """Train for settings.epochs; validate after each epoch; `on_epoch(epoch, record)` logs."""
    bare: FeatureVQVAE = accelerator.unwrap_model(model)
    reduce = lambda t: distributed.sum_across_ranks(accelerator, t.to(accelerator.device)).cpu()  # noqa: E731
    history = []
    for epoch in range(1, settings.epochs + 1):
        start = time.perf_counter()
        generator = torch.Generator().manual_seed(
            settings.seed * 1_000_003 + epoch * 1009 + accelerator.process_index
        )
        train = train_epoch(
            accelerator,
            model,
            optimizer,
            train_x,
            batch_size=settings.batch_size,
            generator=generator,
        )
        valid = evaluate(bare, valid_x, sum_across_ranks=reduce)
        record = {
            "epoch": epoch,
            "train": train,
            "valid": valid,
            "seconds": time.perf_counter() - start,
        }
        history.append(record)
        log.info(
            f"Epoch {epoch}/{settings.epochs}  train loss {train['loss']:.4f} (recon "
            f"{train['recon']:.4f}, commit {train['commit']:.4f})  [{record['seconds']:.1f}s]\n"
            + "\n".join(["  valid:", *format_metrics(valid)])
        )
        on_epoch(epoch, record)
    return history


def check_codebooks_agree(accelerator: Accelerator, model: FeatureVQVAE) -> None:
    """Refuse to save codebooks that differ between ranks (they are all-reduced EMA statistics:
    any difference is a bug). Two collectives per codebook plus one."""
    if accelerator.num_processes == 1:
        return
    worst = 0.0
    for codebook in model.codebooks():
        reference = codebook.detach().clone()
        torch.distributed.broadcast(reference, src=0)
        worst = max(worst, (reference - codebook).abs().max().item())
    (differs,) = distributed.max_across_ranks(accelerator, int(worst > 0))
    if differs:
        raise RuntimeError(
            "internal error: the codebooks differ between ranks after training "
            "(vector-quantize-pytorch was built without sync_codebook?)"
        )
    log.info(f"  codebooks identical on all {accelerator.num_processes} ranks")
