"""Config -> everything training needs: data, model, optimizer, scheduler, loss (nothing runs here).

Weights given with `--init-from` are loaded into the bare model *before* `accelerator.prepare`:
under ZeRO-1/2 the fp32 master copy is made in `prepare` and would overwrite weights loaded
later at the first step, and ZeRO-3 has partitioned the parameters by then.
"""

from __future__ import annotations

import atexit
import logging
import multiprocessing
import multiprocessing.util  # registers its own exit handler first
import signal
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from accelerate import Accelerator
from torch.utils.data import DataLoader, Dataset, Subset

from noa_dist import alignment, distributed, faults
from noa_dist.checkpoint import load_weights
from noa_dist.config import Config
from noa_dist.data.dataset import WellWindowDataset, delta_scale
from noa_dist.data.sampler import DistributedBatchSampler, ShardedEvalSampler
from noa_dist.data.schema import load_stats
from noa_dist.errors import ConfigError
from noa_dist.models.build import build_model
from noa_dist.schedule import build_scheduler
from noa_dist.step import LossFn, StepSettings

log = logging.getLogger("noa_dist")
WORKER_IGNORED_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1, signal.SIGUSR2)


@dataclass
class TrainData:
    train: Dataset
    val: Dataset
    layout_source: WellWindowDataset  # the train split's reader: channels, stats
    val_source: WellWindowDataset
    sampler: DistributedBatchSampler
    train_loader: DataLoader
    val_loader: DataLoader
    val_n_real: int  # this rank's unpadded validation samples
    steps_per_epoch: int

    def describe_val_sample(self, index: int) -> str:
        return self.val_source.describe_sample(index)


@dataclass
class Built:
    data: TrainData
    model: torch.nn.Module  # prepared (DDP / DeepSpeed engine)
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    loss_fn: LossFn  # with --debug-inject-nan applied, if given
    val_loss_fn: LossFn
    step_settings: StepSettings
    n_params: int
    total_steps: int
    tokenizer: object | None = None  # the frozen VQ-VAE (noa_dist.tokenizer.FrozenTokenizer)


def build(cfg: Config, accelerator: Accelerator, root: Path) -> Built:
    data = build_data(cfg, accelerator, root)
    total_steps = total_optimizer_steps(cfg, data.steps_per_epoch)
    tokenizer = alignment.load_frozen_tokenizer(cfg, data.layout_source)
    latent_dim = tokenizer.latent_dim if cfg.align.enable_latent_loss else None
    model = bare_model(cfg, data.layout_source, root, latent_dim)
    n_params = sum(p.numel() for p in model.parameters())
    optimizer, scheduler = build_optimizer(cfg, model, total_steps)
    distributed.configure_deepspeed(
        accelerator, micro_batch_size=cfg.data.batch_size, gradient_clipping=cfg.optim.max_grad_norm
    )
    model, optimizer, scheduler = accelerator.prepare(model, optimizer, scheduler)
    # the projector is called inside the loss: under ZeRO-3 its own forward hooks gather it
    projector = accelerator.unwrap_model(model).projector
    if tokenizer is not None:
        tokenizer.to(accelerator.device)  # frozen, fp32, outside prepare: no collectives
    val_loss_fn = alignment.build_loss_fn(cfg, tokenizer, projector)
    weights = alignment.loss_weights(cfg)
    loss_fn = val_loss_fn
    if cfg.debug.debug_inject_nan:
        injections = faults.parse_nan_injections(cfg.debug.debug_inject_nan)
        loss_fn = faults.with_nan_injection(loss_fn, injections, accelerator.process_index)
    settings = step_settings(cfg, weights)
    return Built(
        data,
        model,
        optimizer,
        scheduler,
        loss_fn,
        val_loss_fn,
        settings,
        n_params,
        total_steps,
        tokenizer,
    )


def step_settings(cfg: Config, loss_weights: dict[str, float]) -> StepSettings:
    return StepSettings(
        bptt_window=cfg.train.bptt_window,
        tbptt_mode=cfg.train.tbptt_mode,
        max_grad_norm=cfg.optim.max_grad_norm,
        loss_weights=loss_weights,
    )


def total_optimizer_steps(cfg: Config, steps_per_epoch: int) -> int:
    """The schedule's length: epochs x steps per epoch, capped by --max-steps."""
    steps = cfg.train.epochs * steps_per_epoch
    return min(steps, cfg.train.max_steps) if cfg.train.max_steps else steps


# ---------------------------------------------------------------- model


def build_optimizer(
    cfg: Config, model: torch.nn.Module, total_steps: int
) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LRScheduler]:
    """AdamW and its warm-up + decay schedule over `total_steps` optimizer steps.

    The fused AdamW: one kernel over all parameters, 30 ms instead of 99 ms per step for the
    demo model on one CPU thread (README, Performance). Like the convolutions, its results are
    bitwise reproducible at a given thread count."""
    optimizer = torch.optim.AdamW(
        model.parameters(), lr=cfg.optim.lr, weight_decay=cfg.optim.weight_decay, fused=True
    )
    scheduler = build_scheduler(
        optimizer,
        warmup_steps=cfg.optim.warmup_steps,
        total_steps=total_steps,
        schedule=cfg.optim.lr_schedule,
    )
    return optimizer, scheduler


def bare_model(
    cfg: Config, train_set: WellWindowDataset, root: Path, latent_dim: int | None
) -> torch.nn.Module:
    """The U-AFNO (+ L_latent projector), identical on every rank; --init-from weights if given."""
    torch.manual_seed(cfg.train.seed)
    model = build_model(
        cfg.model,
        in_channels=train_set.n_channels,
        cond_channels=train_set.n_cond_channels,
        latent_dim=latent_dim,
    )
    scale = delta_scale(train_set.layout, load_stats(root))
    model.delta_scale.copy_(torch.from_numpy(scale))
    if cfg.checkpoint.init_from:
        _load_init_weights(model, Path(cfg.checkpoint.init_from))
    return model


def _load_init_weights(model: torch.nn.Module, path: Path) -> None:
    """The operator's weights from any checkpoint format; the L_latent projector too when both
    sides have one (a fresh projector, loudly, when only this run has one)."""
    state_dict, _ = load_weights(path)
    own = model.state_dict()
    has_projector = any(k.startswith("projector.") for k in state_dict)
    if model.projector is None:
        state_dict = {k: v for k, v in state_dict.items() if not k.startswith("projector.")}
    elif not has_projector:
        log.warning(
            "⚠⚠ WARNING: the checkpoint has no projector weights!\n"
            "    Projector will restart from random initialization.\n"
            "    L_latent training will be inconsistent with the checkpoint's training."
        )
        state_dict = {**{k: v for k, v in own.items() if k.startswith("projector.")}, **state_dict}
    try:
        model.load_state_dict(state_dict)
    except RuntimeError as err:
        raise ConfigError(
            f"--init-from {path}: the weights do not fit this model ({err}); "
            "use the model flags the weights were trained with"
        ) from None
    log.info(f"Initialised model weights from {path} (optimizer and schedule start fresh)")


# ---------------------------------------------------------------- data


def build_data(cfg: Config, accelerator: Accelerator, root: Path) -> TrainData:
    d = cfg.data
    train_set = WellWindowDataset(root, "train", d.timesteps, window_stride=d.window_stride)
    val_set = WellWindowDataset(root, "valid", d.timesteps, window_stride=d.window_stride)
    train = spread_subset(train_set, d.n_samples, "--n-samples")
    val = spread_subset(val_set, d.val_samples, "--val-samples")
    sampler = DistributedBatchSampler(
        len(train),
        d.batch_size,
        num_replicas=accelerator.num_processes,
        rank=accelerator.process_index,
        seed=cfg.train.seed,
        shuffle=True,
        drop_last=True,
    )
    accum = cfg.optim.gradient_accumulation_steps
    steps_per_epoch = len(sampler) // accum
    if steps_per_epoch == 0:
        raise ConfigError(
            f"{len(train)} training windows are fewer than one optimizer step needs: "
            f"--batch-size {d.batch_size} x {accelerator.num_processes} processes x "
            f"--gradient-accumulation-steps {accum}; lower them or add data"
        )
    val_sampler = ShardedEvalSampler(
        len(val), num_replicas=accelerator.num_processes, rank=accelerator.process_index
    )
    return TrainData(
        train=train,
        val=val,
        layout_source=train_set,
        val_source=val_set,
        sampler=sampler,
        train_loader=_loader(train, cfg, batch_sampler=sampler, num_workers=d.num_workers),
        val_loader=_loader(
            val,
            cfg,
            sampler=val_sampler,
            batch_size=d.batch_size,
            num_workers=min(d.num_workers, 1),
        ),
        val_n_real=val_sampler.n_real,
        steps_per_epoch=steps_per_epoch,
    )


def spread_subset(dataset: WellWindowDataset, n: int | None, flag: str) -> Dataset:
    """N windows spread evenly over the split (the first N would all come from its first
    trajectories); the whole split when N is unset."""
    if n is None or n == len(dataset):
        return dataset
    if n > len(dataset):
        raise ConfigError(
            f"{flag} {n}: the split has only {len(dataset)} windows ({dataset.info.root})"
        )
    return Subset(dataset, np.linspace(0, len(dataset) - 1, n).round().astype(int).tolist())


def ignore_stop_signals_in_worker(_worker_id: int) -> None:
    """DataLoader workers ignore the job's stop signals: SLURM and torch's elastic agent signal
    every process of the job, and a worker killed by SIGTERM would crash the rank instead of
    letting it save. The rank ends its workers itself (`_kill_workers_at_exit`); a worker whose
    rank died exits by itself (torch's worker watchdog)."""
    for sig in WORKER_IGNORED_SIGNALS:
        signal.signal(sig, signal.SIG_IGN)


def _kill_workers_at_exit() -> None:
    """At interpreter exit multiprocessing SIGTERMs its daemon children and joins them: with
    SIGTERM ignored the join would never return. This runs first (atexit is LIFO) and SIGKILLs
    them; DataLoader workers hold nothing but read-only file handles. torch's SIGCHLD handler
    would raise on the first death and leave the others alive: it is reset first."""
    signal.signal(signal.SIGCHLD, signal.SIG_DFL)
    daemons = [child for child in multiprocessing.active_children() if child.daemon]
    for child in daemons:
        child.kill()
    for child in daemons:
        child.join(timeout=10)


atexit.register(_kill_workers_at_exit)  # after multiprocessing's own handler: runs before it


def _loader(
    dataset: Dataset,
    cfg: Config,
    *,
    num_workers: int,
    batch_sampler=None,
    sampler=None,
    batch_size: int | None = None,
) -> DataLoader:
    # Its own generator: iter() draws the workers' base seed from it, not from the global RNG
    # (which would then differ between a resumed and a straight run).
    generator = torch.Generator().manual_seed(cfg.train.seed)
    return DataLoader(
        dataset,
        batch_sampler=batch_sampler,
        sampler=sampler,
        batch_size=batch_size if batch_sampler is None else 1,
        num_workers=num_workers,
        pin_memory=torch.cuda.is_available(),
        persistent_workers=num_workers > 0,
        worker_init_fn=ignore_stop_signals_in_worker if num_workers > 0 else None,
        generator=generator,
    )
