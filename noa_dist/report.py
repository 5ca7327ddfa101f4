"""What rank 0 prints: the seed's step lines, epoch summaries, resume summary, final summary.

Per-step numbers are accumulated on the device (`StepMeter`) and read on log steps
only, so printing costs one host sync per `--log-every` steps.
"""

from __future__ import annotations

import contextlib
import resource
import sys
import time
from pathlib import Path

import torch
from accelerate import Accelerator
from tqdm.auto import tqdm

from noa_dist import distributed
from noa_dist.config import Config


def progress_bar(accelerator: Accelerator, *, total: int, initial: int):
    """A bar on the main process when attached to a terminal (logs get the step lines instead)."""
    enabled = accelerator.is_main_process and sys.stderr.isatty()
    return tqdm(
        total=total,
        initial=initial,
        disable=not enabled,
        leave=False,
        unit="batch",
        dynamic_ncols=True,
    )


def peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return (
        resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    )  # Linux: KiB -> MiB (process peak RSS)


class StepMeter:
    """Losses, gradient norms and timings since the last log step, kept on the device."""

    def __init__(self, accelerator: Accelerator, samples_per_step: int) -> None:
        self.accelerator, self.samples_per_step = accelerator, samples_per_step
        device = accelerator.device
        self._loss = torch.zeros(2, device=device)  # sum, count since last flush
        self._epoch_loss = torch.zeros(2, device=device)
        self._grad_norm = torch.zeros(2, device=device)
        self._steps, self._data_s, self._t0 = 0, 0.0, time.perf_counter()

    @contextlib.contextmanager
    def waiting_for_data(self):
        start = time.perf_counter()
        yield
        self._data_s += time.perf_counter() - start

    def add_loss(self, loss: torch.Tensor | None) -> None:
        if loss is not None:
            pair = torch.stack([loss.float(), torch.ones((), device=loss.device)])
            self._loss += pair
            self._epoch_loss += pair

    def add_update(self, update) -> None:
        self._steps += 1
        if update.applied:
            self._grad_norm += torch.stack(
                [
                    update.grad_norm.float().to(self._grad_norm.device),
                    torch.ones((), device=self._grad_norm.device),
                ]
            )

    def flush(self, *, lr: float, skipped: int) -> dict[str, float]:
        """Mean over ranks and steps since the last flush. # sync point (one all-reduce)"""
        totals = distributed.sum_across_ranks(
            self.accelerator, torch.cat([self._loss, self._grad_norm])
        ).tolist()
        elapsed = max(time.perf_counter() - self._t0, 1e-9)
        loss = totals[0] / totals[1] if totals[1] else float("nan")
        metrics = {
            "train/loss": loss,
            "train/traj": loss,
            "train/lr": lr,
            "train/grad_norm": totals[2] / totals[3] if totals[3] else float("nan"),
            "train/skipped_steps": float(skipped),
            "train/samples_per_s": self._steps * self.samples_per_step / elapsed,
            "train/s_per_step": elapsed / max(self._steps, 1),
            "train/data_wait_frac": self._data_s / elapsed,
            "train/mem_mb": peak_memory_mb(self.accelerator.device),
        }
        self._loss.zero_()
        self._grad_norm.zero_()
        self._steps, self._data_s, self._t0 = 0, 0.0, time.perf_counter()
        return metrics

    def epoch_mean(self) -> float:
        totals = distributed.sum_across_ranks(
            self.accelerator, self._epoch_loss
        ).tolist()  # sync point
        return totals[0] / totals[1] if totals[1] else float("nan")


def step_line(accelerator: Accelerator, batch: int, total: int, m: dict[str, float]) -> None:
    accelerator.print(
        f"  [{batch}/{total}] loss={m['train/loss']:.6g} traj={m['train/traj']:.6g} "
        f"lr={m['train/lr']:.2e} grad_norm={m['train/grad_norm']:.3g} "
        f"{m['train/s_per_step']:.2f}s/b {m['train/samples_per_s']:.1f} samples/s"
    )


def epoch_header(accelerator: Accelerator, epoch: int, epochs: int) -> None:
    accelerator.print(f"\nEpoch {epoch + 1}/{epochs}")


def epoch_summary(
    accelerator: Accelerator, train_loss: float, val, seconds: float, improved: bool
) -> None:
    accelerator.print(f"  Train: total={train_loss:.6f} traj={train_loss:.6f} [{seconds:.1f}s]")
    best = " (best)" if improved else ""
    accelerator.print(
        f"  Val:   total={val.loss:.6f} traj={val.loss:.6f} "
        f"vrmse@1={val.vrmse_per_step[0]:.4f} (persistence {val.persistence_vrmse_per_step[0]:.4f}) "
        f"vrmse@{len(val.vrmse_per_step)}={val.vrmse_per_step[-1]:.4f}{best}"
    )


def resume_summary(accelerator: Accelerator, path: Path, state, micro_per_epoch: int) -> None:
    p = accelerator.print
    p(f"Resuming from checkpoint: {path}")
    p("  ✓ Loaded model weights")
    p("  ✓ Loaded optimizer state")
    p("  ✓ Loaded scheduler state")
    p("  ✓ Restored RNG states and data order")
    p(f"  ✓ Resuming from epoch {state.epoch + 1}, step {state.global_step}")
    if 0 < state.batch_in_epoch < micro_per_epoch:
        p(
            f"    (Will skip first {state.batch_in_epoch} batches of epoch {state.epoch + 1} without reading them)"
        )
    if state.best_val_loss < float("inf"):
        p(f"  ✓ Best val loss so far: {state.best_val_loss:.6f}")
    else:
        p("  ✓ No validation history (first epoch incomplete)")
    if state.wandb_run_id:
        p(f"  ✓ Continuing W&B run {state.wandb_run_id}")


def skip_advice(cfg: Config) -> str:
    t, w = cfg.data.timesteps, cfg.train.bptt_window
    if w is None and t > 32:
        return f"Backpropagating through {t} steps explodes gradients: add --bptt-window 32."
    return (
        f"Try a lower --lr (now {cfg.optim.lr:g}), a smaller --bptt-window, "
        "or check the data with `noa-data check`."
    )


def stopped(accelerator: Accelerator, reason: str, state, path: Path) -> None:
    accelerator.print(
        f"\nStopped ({reason}) at step {state.global_step}, epoch {state.epoch + 1}; "
        f"checkpoint saved: {path}\nResume with: --resume auto (same --run-name) or --resume {path}"
    )


def final_summary(
    accelerator: Accelerator, outcome, run_dir: Path, wandb_location: str | None
) -> None:
    p = accelerator.print
    st = outcome.state
    p("\n" + "=" * 64)
    p(
        f"Training finished: {st.global_step} steps ({st.applied_steps} applied, {st.skipped_steps} skipped), "
        f"{st.epoch} epoch(s)"
    )
    if outcome.val is not None:
        v = outcome.val
        p(
            f"  Final one-step VRMSE {v.vrmse_per_step[0]:.4f} vs persistence {v.persistence_vrmse_per_step[0]:.4f} "
            f"(ratio {v.one_step_ratio:.3f}; < 1 beats persistence)"
        )
        p(
            f"  Rollout VRMSE at step {len(v.vrmse_per_step)}: {v.vrmse_per_step[-1]:.4f} "
            f"vs persistence {v.persistence_vrmse_per_step[-1]:.4f}"
        )
        p(f"  Best val loss: {st.best_val_loss:.6f}")
    p(f"  Run directory: {run_dir}")
    p(f"  Checkpoints:   {outcome.checkpoint_dir}")
    p(f"  Best model:    {run_dir / 'best'}")
    p(f"  Figures:       {run_dir / 'figures'}")
    p(f"  W&B run:       {wandb_location or 'disabled'}")
    p("=" * 64)
