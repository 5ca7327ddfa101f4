"""The training loop: epochs of truncated-BPTT steps, validation, checkpoints, logging.

Distribution details live in `distributed.py`, the step logic in `step.py`; this
module orders them. Everything that decides whether to step, skip or stop is
agreed by all ranks; printing, W&B and files happen on the main process.
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from accelerate import Accelerator
from torch.utils.data import DataLoader, Dataset, Subset

from noa_dist import checkpoint, distributed, plots, report, tracking
from noa_dist.checkpoint import load_weights
from noa_dist.config import Config, parse_nan_injection
from noa_dist.data.dataset import WellWindowDataset, delta_scale
from noa_dist.data.sampler import DistributedBatchSampler, ShardedEvalSampler
from noa_dist.data.schema import load_stats
from noa_dist.errors import ConfigError, NoaError
from noa_dist.evaluate import ValResult, evaluate
from noa_dist.models.build import build_model
from noa_dist.schedule import build_scheduler
from noa_dist.state import TrainState
from noa_dist.step import Update, apply_update, describe_skip, forward_backward
from noa_dist.stop import StopRequest


class TrainingAborted(NoaError):
    """Too many consecutive skipped steps: the run cannot make progress."""


@dataclass
class Outcome:
    state: TrainState
    val: ValResult | None
    stopped_by: str | None  # signal name / "stop-at-step" / None when training completed
    checkpoint_dir: Path


def _loader(
    dataset, *, batch_sampler=None, sampler=None, batch_size=None, num_workers: int
) -> DataLoader:
    return DataLoader(
        dataset,
        batch_sampler=batch_sampler,
        sampler=sampler,
        batch_size=batch_size if batch_sampler is None else 1,
        num_workers=num_workers,
        pin_memory=torch.cuda.is_available(),
        persistent_workers=num_workers > 0,
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


class Trainer:
    def __init__(
        self,
        cfg: Config,
        accelerator: Accelerator,
        dataset_root: Path,
        run_dir: Path,
        stop: StopRequest | None = None,
    ) -> None:
        self.cfg, self.accelerator, self.run_dir = cfg, accelerator, run_dir
        self.stop = stop or StopRequest()
        self.injection = (
            parse_nan_injection(cfg.debug.debug_inject_nan) if cfg.debug.debug_inject_nan else None
        )
        self.checkpoint_dir = Path(cfg.checkpoint.checkpoint_dir or run_dir / "checkpoints")
        self.state = TrainState(run_dir=str(run_dir))
        self.dataset_root = dataset_root
        self._build_data(dataset_root)
        self._build_model()
        if cfg.debug.debug_hang_in_save is not None:
            accelerator.register_save_state_pre_hook(self._debug_hang_in_save)

    # ----------------------------------------------------------------- building
    def _build_data(self, root: Path) -> None:
        cfg, acc = self.cfg.data, self.accelerator
        self.train_set = WellWindowDataset(
            root, "train", cfg.timesteps, window_stride=cfg.window_stride
        )
        self.val_set = WellWindowDataset(
            root, "valid", cfg.timesteps, window_stride=cfg.window_stride
        )
        self.train_data = spread_subset(self.train_set, cfg.n_samples, "--n-samples")
        self.val_data = spread_subset(self.val_set, cfg.val_samples, "--val-samples")
        self.sampler = DistributedBatchSampler(
            len(self.train_data),
            cfg.batch_size,
            num_replicas=acc.num_processes,
            rank=acc.process_index,
            seed=self.cfg.train.seed,
            shuffle=True,
            drop_last=True,
        )
        accum = self.cfg.optim.gradient_accumulation_steps
        self.steps_per_epoch = len(self.sampler) // accum
        if self.steps_per_epoch == 0:
            raise ConfigError(
                f"{len(self.train_data)} training windows are fewer than one optimizer step needs: "
                f"--batch-size {cfg.batch_size} x {acc.num_processes} processes x "
                f"--gradient-accumulation-steps {accum}; lower them or add data"
            )
        self.train_loader = _loader(
            self.train_data, batch_sampler=self.sampler, num_workers=cfg.num_workers
        )
        val_sampler = ShardedEvalSampler(
            len(self.val_data), num_replicas=acc.num_processes, rank=acc.process_index
        )
        self.val_n_real = val_sampler.n_real
        self.val_loader = _loader(
            self.val_data,
            sampler=val_sampler,
            batch_size=cfg.batch_size,
            num_workers=min(cfg.num_workers, 1),
        )

    def total_steps(self) -> int:
        steps = self.cfg.train.epochs * self.steps_per_epoch
        return min(steps, self.cfg.train.max_steps) if self.cfg.train.max_steps else steps

    def _build_model(self) -> None:
        m, o = self.cfg.model, self.cfg.optim
        torch.manual_seed(self.cfg.train.seed)  # identical initial weights on every rank
        model = build_model(
            m, in_channels=self.train_set.n_channels, cond_channels=self.train_set.n_cond_channels
        )
        scale = delta_scale(self.train_set.layout, load_stats(self.dataset_root))
        model.delta_scale.copy_(torch.from_numpy(scale))
        self.n_params = sum(p.numel() for p in model.parameters())
        optimizer = torch.optim.AdamW(model.parameters(), lr=o.lr, weight_decay=o.weight_decay)
        distributed.configure_deepspeed(
            self.accelerator,
            micro_batch_size=self.cfg.data.batch_size,
            gradient_clipping=o.max_grad_norm,
        )
        scheduler = build_scheduler(
            optimizer,
            warmup_steps=o.warmup_steps,
            total_steps=self.total_steps(),
            schedule=o.lr_schedule,
        )
        self.model, self.optimizer, self.scheduler = self.accelerator.prepare(
            model, optimizer, scheduler
        )

    # ----------------------------------------------------------------- resume
    def restore(self, path: Path) -> None:
        """Everything: weights, optimizer, scheduler, RNG, sampler position, history."""
        saved = checkpoint.load_checkpoint(self.accelerator, path)
        self.state = TrainState.from_dict(saved["state"])
        self.state.run_dir = str(self.run_dir)
        self.sampler.load_state_dict(saved["sampler"])
        report.resume_summary(
            self.accelerator,
            path,
            self.state,
            self.steps_per_epoch * self.cfg.optim.gradient_accumulation_steps,
        )

    def init_weights_from(self, path: Path) -> None:
        """Weights only (fine-tuning) from a step checkpoint (DDP or ZeRO), best/ or an export."""
        state_dict, _ = load_weights(path)
        self.accelerator.unwrap_model(self.model).load_state_dict(state_dict)
        self.accelerator.print(
            f"Initialised model weights from {path} (optimizer and schedule start fresh)"
        )

    def _debug_hang_in_save(self, _models, _weights, output_dir: str) -> None:
        """--debug-hang-in-save STEP: stall inside that save so a test can kill it mid-write."""
        if self.state.global_step == self.cfg.debug.debug_hang_in_save:
            print(
                f"debug: hanging inside the checkpoint save of step {self.state.global_step} "
                f"({output_dir}) until killed",
                flush=True,
            )
            while True:
                time.sleep(3600)

    def _trainer_state(self) -> dict:
        return {
            "state": self.state.to_dict(),
            "sampler": self.sampler.state_dict(self.state.batch_in_epoch),
            "config": self.cfg.to_dict(),
            "args": sys.argv[1:],
        }

    def save(self) -> Path:
        return checkpoint.save_checkpoint(
            self.accelerator,
            self.checkpoint_dir,
            self.state.global_step,
            self._trainer_state(),
            keep_last=self.cfg.checkpoint.keep_last,
        )

    # ----------------------------------------------------------------- loop
    def fit(self) -> Outcome:
        val, stopped_by = None, None
        while self.state.epoch < self.cfg.train.epochs and stopped_by is None:
            report.epoch_header(self.accelerator, self.state.epoch, self.cfg.train.epochs)
            epoch_start = time.perf_counter()
            stopped_by, train_loss = self._train_epoch()
            if stopped_by in (None, "max-steps"):
                val = self._end_epoch(train_loss, time.perf_counter() - epoch_start)
                stopped_by = stopped_by or self._early_stop()
        if stopped_by not in (None, "max-steps", "early-stop"):
            path = self.save()
            report.stopped(self.accelerator, stopped_by, self.state, path)
        self._save_curves()
        return Outcome(self.state, val, stopped_by, self.checkpoint_dir)

    def _train_epoch(self) -> tuple[str | None, float]:
        acc, st = self.accelerator, self.state
        accum = self.cfg.optim.gradient_accumulation_steps
        micro_per_epoch = self.steps_per_epoch * accum
        self.sampler.set_epoch(st.epoch)
        self.sampler.set_start_batch(st.batch_in_epoch)
        meter = report.StepMeter(acc, self.cfg.data.batch_size * accum * acc.num_processes)
        batches = iter(self.train_loader)
        progress = report.progress_bar(acc, total=micro_per_epoch, initial=st.batch_in_epoch)
        loss_finite = True
        while st.batch_in_epoch < micro_per_epoch:
            with meter.waiting_for_data():
                batch = distributed.batch_to_device(acc, next(batches))
            with acc.accumulate(self.model):
                micro = forward_backward(
                    acc,
                    self.model,
                    batch,
                    bptt_window=self.cfg.train.bptt_window,
                    tbptt_mode=self.cfg.train.tbptt_mode,
                    step_number=st.global_step + 1,
                    injection=self.injection,
                )
            loss_finite &= micro.finite
            meter.add_loss(micro.loss if micro.finite else None)
            st.batch_in_epoch += 1
            progress.update(1)
            if not acc.sync_gradients:
                continue
            update = apply_update(
                acc,
                self.model,
                self.optimizer,
                self.scheduler,
                max_grad_norm=self.cfg.optim.max_grad_norm,
                loss_finite=loss_finite,
                stop_requested=self.stop.requested,
            )
            loss_finite = True
            stop = self._after_update(update, micro.loss, meter, micro_per_epoch)
            if stop:
                progress.close()
                return stop, meter.epoch_mean()
        progress.close()
        return None, meter.epoch_mean()

    def _after_update(
        self, update: Update, loss: torch.Tensor, meter: report.StepMeter, micro_per_epoch: int
    ) -> str | None:
        st, cfg = self.state, self.cfg
        st.global_step += 1
        if update.applied:
            st.applied_steps += 1
            st.consecutive_skips = 0
        else:
            self._record_skip(update, loss)
        meter.add_update(update)
        if st.global_step % cfg.train.log_every == 0:
            self._log_train(meter, micro_per_epoch)
        if st.consecutive_skips >= cfg.train.max_consecutive_skips:
            self._abort_after_skips()
        if cfg.checkpoint.save_every and st.global_step % cfg.checkpoint.save_every == 0:
            self.save()
        if update.stop:
            return self.stop.reason or "signal on another rank"
        if cfg.train.max_steps and st.global_step >= cfg.train.max_steps:
            return "max-steps"
        if cfg.train.stop_at_step and st.global_step >= cfg.train.stop_at_step:
            return "stop-at-step"
        return None

    def _record_skip(self, update: Update, loss: torch.Tensor) -> None:
        st = self.state
        st.skipped_steps += 1
        st.consecutive_skips += 1
        st.history["skipped"].append(st.global_step)
        why = describe_skip(self.accelerator, self.model, update, loss)  # collective, rare path
        distributed.discard_gradients(self.model, self.optimizer)
        self.accelerator.print(
            f"Warning: NaN/Inf at step {st.global_step}, skipping update on all ranks: {why}"
        )

    def _abort_after_skips(self) -> None:
        path = self.save()  # the weights are those of the last applied step
        n = self.state.consecutive_skips
        raise TrainingAborted(
            f"{n} consecutive steps skipped (step {self.state.global_step}): the loss or gradients stay "
            f"non-finite, so training cannot progress. The last good state is saved at {path}. "
            + report.skip_advice(self.cfg)
        )

    def _log_train(self, meter: report.StepMeter, micro_per_epoch: int) -> None:
        metrics = meter.flush(
            lr=self.scheduler.get_last_lr()[0], skipped=self.state.skipped_steps
        )  # sync point
        st = self.state
        st.history["step"].append(st.global_step)
        st.history["train_loss"].append(metrics["train/loss"])
        report.step_line(self.accelerator, st.batch_in_epoch, micro_per_epoch, metrics)
        tracking.log_metrics(self.accelerator, metrics, step=st.global_step)

    def _end_epoch(self, train_loss: float, seconds: float) -> ValResult:
        val = evaluate(self.accelerator, self.model, self.val_loader, self.val_n_real)
        st = self.state
        improved = val.loss < st.best_val_loss
        if improved:
            st.best_val_loss, st.epochs_without_improvement = val.loss, 0
            checkpoint.save_model_weights(
                self.accelerator,
                self.model,
                self.run_dir / "best",
                {
                    "config": self.cfg.to_dict(),
                    "epoch": st.epoch,
                    "global_step": st.global_step,
                    "val_loss": val.loss,
                },
            )
        else:
            st.epochs_without_improvement += 1
        st.history["epoch"].append(st.epoch)
        st.history["val_loss"].append(val.loss)
        report.epoch_summary(self.accelerator, train_loss, val, seconds, improved)
        self._log_validation(val)
        st.epoch, st.batch_in_epoch = st.epoch + 1, 0
        self.save()
        return val

    def _log_validation(self, val: ValResult) -> None:
        metrics = {
            "val/loss": val.loss,
            "val/vrmse_step_1": val.vrmse_per_step[0],
            "val/persistence_vrmse_step_1": val.persistence_vrmse_per_step[0],
            "val/vrmse_ratio_step_1": val.one_step_ratio,
            "epoch": self.state.epoch,
        }
        for k, (m, p) in enumerate(
            zip(val.vrmse_per_step, val.persistence_vrmse_per_step, strict=True), start=1
        ):
            metrics[f"val/vrmse_step_{k}"], metrics[f"val/persistence_vrmse_step_{k}"] = m, p
        tracking.log_metrics(self.accelerator, metrics, step=self.state.global_step)
        if self.accelerator.is_main_process and val.example is not None:
            truth, pred = val.example
            figures = {
                "val/rollout": plots.rollout_figure(
                    truth, pred, title=f"epoch {self.state.epoch + 1}"
                ),
                "val/vrmse_per_step": plots.vrmse_figure(
                    val.vrmse_per_step, val.persistence_vrmse_per_step
                ),
            }
            for name, fig in figures.items():
                plots.save_figure(
                    fig,
                    self.run_dir
                    / "figures"
                    / f"{name.split('/')[1]}_epoch{self.state.epoch + 1:03d}.png",
                )
            tracking.log_figures(self.accelerator, figures, step=self.state.global_step)

    def _early_stop(self) -> str | None:
        patience = self.cfg.train.early_stop_patience
        if patience and self.state.epochs_without_improvement >= patience:
            self.accelerator.print(
                f"Early stopping: no validation improvement for {patience} epoch(s)"
            )
            return "early-stop"
        return None

    def _save_curves(self) -> None:
        h = self.state.history
        if self.accelerator.is_main_process and h["train_loss"]:
            fig = plots.loss_curves_figure({"train": h["train_loss"], "val": h["val_loss"]})
            plots.save_figure(fig, self.run_dir / "figures" / "loss_curves.png")
