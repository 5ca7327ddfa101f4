"""What rank 0 prints: the seed's step lines, epoch summaries, resume summary, final summary.

Per-step numbers are accumulated on the device (`StepMeter`) and read on log steps
only, so printing costs one host sync per `--log-every` steps.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import resource
import sys
import time
from pathlib import Path

import torch
from accelerate import Accelerator
from tqdm.auto import tqdm

from noa_dist import distributed
from noa_dist.config import Config
from noa_dist.step import StepResult

log = logging.getLogger("noa_dist")


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
    """Loss terms, gradient norms and timings of applied steps, kept on the device.

    Read on log steps only (`flush`: one all-reduce, one host read); skipped steps count in
    the step rate but not in the means.
    """

    def __init__(self, accelerator: Accelerator, samples_per_step: int, names: list[str]) -> None:
        self.accelerator, self.samples_per_step = accelerator, samples_per_step
        self.names = [*names, "total"]
        device = accelerator.device
        self._sums = torch.zeros(len(self.names) + 2, device=device)  # terms, grad norm, count
        self._epoch = torch.zeros(len(self.names) + 1, device=device)  # terms, count
        self._steps, self._data_s, self._t0 = 0, 0.0, time.perf_counter()

    @contextlib.contextmanager
    def waiting_for_data(self):
        start = time.perf_counter()
        yield
        self._data_s += time.perf_counter() - start

    def add(self, result: StepResult) -> None:
        self._steps += 1
        if result.applied:
            one = torch.ones(1, device=self._sums.device)
            terms = torch.stack([result.terms[name].float() for name in self.names])
            norm = result.grad_norm.float().to(one.device).reshape(1)
            self._sums += torch.cat([terms, norm, one])
            self._epoch += torch.cat([terms, one])

    def flush(self, *, lr: float, skipped: int) -> dict[str, float]:
        """Means over ranks and applied steps since the last flush. # sync point (one all-reduce)"""
        totals = distributed.sum_across_ranks(self.accelerator, self._sums).tolist()
        *terms, norm, count = totals
        elapsed = max(time.perf_counter() - self._t0, 1e-9)
        means = _means(self.names, terms, count)
        metrics = {"train/loss": means.pop("total"), **{f"train/{k}": v for k, v in means.items()}}
        metrics.update(
            {
                "train/lr": lr,
                "train/grad_norm": norm / count if count else float("nan"),
                "train/skipped_steps": float(skipped),
                "train/samples_per_s": self._steps * self.samples_per_step / elapsed,
                "train/s_per_step": elapsed / max(self._steps, 1),
                "train/data_wait_frac": self._data_s / elapsed,
                "train/mem_mb": peak_memory_mb(self.accelerator.device),
            }
        )
        self._sums.zero_()
        self._steps, self._data_s, self._t0 = 0, 0.0, time.perf_counter()
        return metrics

    def epoch_means(self) -> dict[str, float]:
        """Every term's mean over the epoch's applied steps, all ranks. # sync point"""
        *terms, count = distributed.sum_across_ranks(self.accelerator, self._epoch).tolist()
        return _means(self.names, terms, count)


def _means(names: list[str], sums: list[float], count: float) -> dict[str, float]:
    return {
        name: (v / count if count else float("nan")) for name, v in zip(names, sums, strict=True)
    }


def format_terms(terms: dict[str, float]) -> str:
    """`total=... traj=... commit=...`: the seed's order, total first."""
    ordered = {"total": terms["total"], **{k: v for k, v in terms.items() if k != "total"}}
    return " ".join(f"{name}={value:.6g}" for name, value in ordered.items())


def step_line(step: int, total: int, names: list[str], m: dict[str, float]) -> None:
    """The seed's step line: `[201/225] loss=... traj=... commit=... lr=... 8.2s/b`."""
    terms = " ".join(f"{name}={m[f'train/{name}']:.6g}" for name in names)
    log.info(
        f"  [{step}/{total}] loss={m['train/loss']:.6g} {terms} "
        f"lr={m['train/lr']:.2e} grad_norm={m['train/grad_norm']:.3g} "
        f"{m['train/s_per_step']:.2f}s/b {m['train/samples_per_s']:.1f} samples/s"
    )


def epoch_header(epoch: int, epochs: int) -> None:
    log.info(f"\nEpoch {epoch + 1}/{epochs}")


def epoch_summary(train_terms: dict[str, float], val, seconds: float, improved: bool) -> None:
    if all(math.isnan(v) for v in train_terms.values()):  # resumed after the epoch's last step
        log.info("  Train: (no step of this epoch ran since the (re)start)")
    else:
        log.info(f"  Train: {format_terms(train_terms)} [{seconds:.1f}s]")
    best = " (best)" if improved else ""
    log.info(
        f"  Val:   {format_terms(val.terms)} "
        f"vrmse@1={val.vrmse_per_step[0]:.4f} (persistence {val.persistence_vrmse_per_step[0]:.4f}) "
        f"vrmse@{len(val.vrmse_per_step)}={val.vrmse_per_step[-1]:.4f}{best}"
    )
    if val.token_utilization:
        log.info(
            "  Tokens: utilization "
            + " ".join(f"{u:.0%}" for u in val.token_utilization)
            + " perplexity "
            + " ".join(f"{p:.1f}" for p in val.token_perplexity)
            + " (per codebook, predicted windows)"
        )
    if val.nonfinite_samples:
        log.warning(
            f"  Warning: the model's rollout is NaN/Inf on {val.nonfinite_samples} of "
            f"{val.n_samples} validation samples (diverged); the best model is not updated"
        )


def resume_summary(path: Path, state, micro_per_epoch: int, changes: dict, rng: str | None) -> None:
    """The seed's resume summary; `rng` is None when the random states were verified restored,
    else why not (accelerate swallows a failed RNG load)."""
    log.info(f"Resuming from checkpoint: {path}")
    log.info("  ✓ Loaded model weights\n  ✓ Loaded optimizer state\n  ✓ Loaded scheduler state")
    log.info("  ✓ Restored RNG states and data order" if rng is None else f"  ✗ RNG states: {rng}")
    log.info(f"  ✓ Resuming from epoch {state.epoch + 1}, step {state.global_step}")
    if 0 < state.batch_in_epoch < micro_per_epoch:
        log.info(
            f"    (Will skip first {state.batch_in_epoch} batches of epoch {state.epoch + 1} "
            "without reading them)"
        )
    if state.best_val_loss < float("inf"):
        log.info(f"  ✓ Best val loss so far: {state.best_val_loss:.6f}")
    else:
        log.info("  ✓ No validation history (first epoch incomplete)")
    if state.wandb_run_id:
        log.info(f"  ✓ Continuing W&B run {state.wandb_run_id}")
    for name, (old, new) in {**changes["applied"], **changes["changed"]}.items():
        how = "applied to the optimizer" if name in changes["applied"] else "takes effect"
        log.info(f"  ! --{name.replace('_', '-')} changed: {old!r} -> {new!r} ({how})")


def skip_advice(cfg: Config) -> str:
    t, w = cfg.data.timesteps, cfg.train.bptt_window
    if w is None and t > 32:
        return f"Backpropagating through {t} steps explodes gradients: add --bptt-window 32."
    return (
        f"Try a lower --lr (now {cfg.optim.lr:g}), a smaller --bptt-window, "
        "or check the data with `noa-data check`."
    )


def stopped(reason: str, state, path: Path) -> None:
    log.info(
        f"\nStopped ({reason}) at step {state.global_step}, epoch {state.epoch + 1}; "
        f"checkpoint saved: {path}\nResume with: --resume auto (same --run-name) or --resume {path}"
    )


def final_summary(outcome, run_dir: Path, wandb_location: str | None) -> None:
    st = outcome.state
    how = (
        "finished"
        if outcome.stopped_by in (None, "max-steps", "early-stop")
        else (f"stopped ({outcome.stopped_by}; resume with --resume auto)")
    )
    lines = [
        "=" * 64,
        f"Training {how}: {st.global_step} steps ({st.applied_steps} applied, "
        f"{st.skipped_steps} skipped), {st.epoch} epoch(s)",
    ]
    if outcome.val is not None:
        v = outcome.val
        lines += [
            f"  Final one-step VRMSE {v.vrmse_per_step[0]:.4f} vs persistence "
            f"{v.persistence_vrmse_per_step[0]:.4f} (ratio {v.one_step_ratio:.3f}; < 1 beats persistence)",
            f"  Rollout VRMSE at step {len(v.vrmse_per_step)}: {v.vrmse_per_step[-1]:.4f} "
            f"vs persistence {v.persistence_vrmse_per_step[-1]:.4f}",
            f"  Best val loss: {st.best_val_loss:.6f}",
        ]
    best = run_dir / "best"
    lines += [
        f"  Run directory: {run_dir}",
        f"  Checkpoints:   {outcome.checkpoint_dir}",
        f"  Best model:    {best if (best / 'COMPLETE').exists() else 'none yet'}",
        f"  Figures:       {run_dir / 'figures'}",
        f"  W&B run:       {wandb_location or 'disabled'}",
        "=" * 64,
    ]
    log.info("\n" + "\n".join(lines))


def setup_logging(*, is_main: bool) -> None:
    """One output channel: the `noa_dist` logger prints plain lines to stdout on the main
    process; other ranks print errors only (with their rank), so nothing appears N times."""
    handler = logging.StreamHandler(sys.stdout)
    rank = os.environ.get("RANK", "0")
    handler.setFormatter(
        logging.Formatter("%(message)s" if is_main else f"[rank {rank}] %(message)s")
    )
    log.handlers[:] = [handler]
    log.setLevel(logging.INFO if is_main else logging.ERROR)
    log.propagate = False
