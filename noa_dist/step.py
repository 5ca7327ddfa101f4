"""One training micro-step and one optimizer update, with all-ranks-agree skipping.

`forward_backward` runs the truncated-BPTT windows of one batch; before each
backward it agrees with every rank that the window's loss is finite. `apply_update`
agrees that the gradients are finite (one fused norm, one all-reduce) before the
optimizer and scheduler step. A skip is always taken by every rank together.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from accelerate import Accelerator

from noa_dist import distributed
from noa_dist.config import NanInjection
from noa_dist.losses import trajectory_mse
from noa_dist.rollout import iter_windows, window_loss_weight


@dataclass
class MicroStep:
    loss: torch.Tensor  # detached, on device: mean L_traj over the supervised steps
    finite: bool  # agreed by all ranks


@dataclass
class Update:
    applied: bool
    grad_norm: torch.Tensor  # pre-clipping total norm, on device
    reason: str = ""  # why the step was skipped ("" if applied)
    stop: bool = False  # some rank was asked to stop (agreed in the same all-reduce)


class _PoisonGradient(torch.autograd.Function):
    """Identity forward, NaN gradient backward: a non-finite gradient with a finite loss."""

    @staticmethod
    def forward(ctx, x):
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return grad * float("nan")


def _inject(pred: torch.Tensor, loss_fn, injection: NanInjection | None, rank: int, step: int):
    """Debug fault injection (--debug-inject-nan RANK:STEP[:loss|grad]); step is 1-based."""
    if not (injection and injection.rank == rank and injection.step == step):
        return loss_fn(pred)
    if injection.target == "grad":
        return loss_fn(_PoisonGradient.apply(pred))
    return loss_fn(pred) * float("nan")


def forward_backward(
    accelerator: Accelerator,
    model: torch.nn.Module,
    batch: dict[str, torch.Tensor],
    *,
    bptt_window: int | None,
    tbptt_mode: str,
    step_number: int,
    injection: NanInjection | None = None,
) -> MicroStep:
    """Roll out the batch window by window; backward each window's loss if all ranks agree it's finite."""
    u0, target, cond = batch["u0"], batch["target"], batch["cond"]
    n_steps = target.shape[1]
    cond = cond if cond.shape[1] > 0 else None
    total = torch.zeros((), device=u0.device)
    windows = iter_windows(lambda u: model(u, cond), u0, n_steps, bptt_window, tbptt_mode)
    for window in windows:
        window_target = target[:, window.start : window.stop]
        loss = _inject(
            window.pred_BTCHW,
            lambda p: trajectory_mse(p, window_target),  # noqa: B023
            injection,
            accelerator.process_index,
            step_number,
        )
        if not distributed.all_finite(accelerator, loss):  # sync point: one all-reduce per window
            windows.close()
            return MicroStep(loss=loss.detach(), finite=False)
        weight = window_loss_weight(window, n_steps, tbptt_mode)
        distributed.backward(accelerator, model, loss * weight, last_of_step=window.stop == n_steps)
        total += loss.detach() * weight
    return MicroStep(loss=total, finite=True)


def apply_update(
    accelerator: Accelerator,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    *,
    max_grad_norm: float,
    loss_finite: bool,
    stop_requested: bool = False,
) -> Update:
    """Clip, then step optimizer and scheduler only if every rank's gradients are finite.

    On a skip the gradients are left in place for `describe_skip`; the caller discards them.
    Under DeepSpeed the engine has already clipped and stepped inside `accelerator.backward`
    (ZeRO's global overflow check skips a non-finite step on every rank); we read its verdict.
    """
    if not loss_finite:
        stop = distributed.any_rank(accelerator, stop_requested)[0]  # sync point
        return Update(
            applied=False, grad_norm=torch.full((), float("nan")), reason="loss", stop=stop
        )
    if distributed.uses_deepspeed(accelerator):
        grad_norm = torch.tensor(
            float(accelerator.clip_grad_norm_(model.parameters(), max_grad_norm) or 0.0)
        )
        overflow = optimizer.step_was_skipped
    else:
        grad_norm = accelerator.clip_grad_norm_(model.parameters(), max_grad_norm)
        overflow = distributed.nonfinite(grad_norm)
    # sync point: one all-reduce carries both decisions
    bad_grads, stop = distributed.any_rank(accelerator, overflow, stop_requested)
    if bad_grads:
        return Update(applied=False, grad_norm=grad_norm.detach(), reason="grad", stop=stop)
    optimizer.step()  # a no-op under DeepSpeed (the engine stepped in backward)
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    return Update(applied=True, grad_norm=grad_norm.detach(), stop=stop)


def describe_skip(
    accelerator: Accelerator, model: torch.nn.Module, update: Update, loss: torch.Tensor
) -> str:
    """Which ranks saw what, gathered from every rank (rare path: runs only after a skip).

    Call before zeroing the gradients: it names the parameters whose gradient is non-finite.
    """
    if update.reason == "loss":
        local = {"rank": accelerator.process_index, "loss": float(loss)}
    elif distributed.uses_deepspeed(accelerator):
        return (
            "non-finite gradients: DeepSpeed's global overflow check skipped the step on every rank "
            "(ZeRO partitions gradients; run noa-diagnose on the last checkpoint to name the parameters)"
        )
    else:
        local = {
            "rank": accelerator.process_index,
            "params": distributed.nonfinite_grad_names(model),
        }
    reports = distributed.gather_reports(accelerator, local)
    if update.reason == "loss":
        bad = [
            f"rank {r['rank']} (loss={r['loss']})"
            for r in reports
            if r["loss"] != r["loss"] or abs(r["loss"]) == float("inf")
        ]
        return "non-finite loss on " + ", ".join(bad)
    parts = []
    for r in reports:
        if r["params"]:
            names = ", ".join(r["params"][:8]) + (
                f" (+{len(r['params']) - 8} more)" if len(r["params"]) > 8 else ""
            )
            parts.append(f"rank {r['rank']}: {names}")
    return "non-finite gradients on " + "; ".join(parts)
