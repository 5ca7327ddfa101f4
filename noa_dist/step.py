"""One optimizer step: every window of every micro-step forward and backward, one agreed decision.

The promise: a step whose loss or gradients are non-finite on any rank is skipped on every
rank, exactly as if it never happened. The shape that keeps it (torchtitan's, extended to
TBPTT windows, gradient accumulation and ZeRO):

1. For each micro-batch and each TBPTT window: the loss terms, their weighted total, backward.
   Never an early return: peers are waiting in the gradient reductions. A non-finite term sets
   a device-side flag (no host sync) and scales this rank's backward by NaN, so every later
   reduction (DDP's all-reduce, ZeRO's reduce-scatter) carries it to every rank's gradients.
2. After the last backward: DDP takes one fused gradient norm and clips; DeepSpeed's
   `engine.step()` clips and skips a non-finite step itself, and its overflow path clears the
   reduced gradients ZeRO keeps in its own buffers (a `zero_grad` would leave them).
3. One MAX all-reduce of [loss_bad, grad_bad, stop], one read to the host: the step's only
   sync point. Then optimizer and scheduler step, or the gradients are discarded.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from accelerate import Accelerator
from torch import Tensor

from noa_dist import distributed
from noa_dist.losses import combine
from noa_dist.rollout import Window, count_windows, iter_windows, window_loss_weight

Batch = dict[str, Tensor]
LossFn = Callable[[Window, Batch], dict[str, Tensor]]
_NONE_BAD = torch.iinfo(torch.int64).max  # "no non-finite term yet" in the location code


@dataclass(frozen=True)
class StepSettings:
    """What the step needs from the config (see noa_dist.config)."""

    bptt_window: int | None
    tbptt_mode: str
    max_grad_norm: float
    loss_weights: dict[str, float]


@dataclass
class StepResult:
    applied: bool  # agreed by every rank
    stop: int  # 0, else the stop code some rank was asked to stop with (stop.StopRequest)
    grad_norm: Tensor  # pre-clipping global norm, on device (inf/NaN on a skip)
    terms: dict[str, Tensor]  # per-step mean of every unweighted term + "total", on device
    skip_reason: str = ""  # who saw what, when not applied (names rank, micro-step, window, term)


class _BadTermTracker:
    """The first (micro-step, window, term) whose value is non-finite on this rank, on device.

    Encoded as one int64 (smallest code = first in step order) so tracking costs no host sync.
    """

    def __init__(self, names: Sequence[str], n_windows: int, device: torch.device) -> None:
        self.names, self.n_windows = list(names), n_windows
        self.code = torch.full((), _NONE_BAD, dtype=torch.int64, device=device)
        self.value = torch.zeros((), device=device)

    def update(self, window: Window, terms_T: Tensor) -> Tensor:
        """Record the window's non-finite terms; returns its `ok` flag (0-d bool tensor)."""
        bad_T = ~torch.isfinite(terms_T)
        first = (window.micro * self.n_windows + window.index) * len(self.names)
        codes_T = torch.arange(len(self.names), device=bad_T.device) + first
        window_code = torch.where(bad_T, codes_T, _NONE_BAD).min()
        value = terms_T[(window_code - first).clamp(0, len(self.names) - 1)]
        self.value = torch.where(window_code < self.code, value, self.value)
        self.code = torch.minimum(self.code, window_code)
        return ~bad_T.any()

    @property
    def any_bad(self) -> Tensor:
        return self.code != _NONE_BAD

    def describe(self, code: int, value: float) -> str:
        """Host-side text of a code read after the decision (rare path)."""
        term = self.names[code % len(self.names)]
        micro, window = divmod(code // len(self.names), self.n_windows)
        return f"micro-step {micro + 1}, window {window + 1} of {self.n_windows}: {term}={value}"


def train_step(
    accelerator: Accelerator,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    micro_batches: Sequence[Batch],
    loss_fn: LossFn,
    settings: StepSettings,
    *,
    step: int,
    stop_code: int = 0,
) -> StepResult:
    """Run optimizer step `step` (1-based) over `micro_batches`; call on every rank.

    `loss_fn(window, batch)` returns the unweighted terms; they are combined with
    `settings.loss_weights`. The gradients of a skipped step are discarded on every rank;
    the scheduler advances only with an applied step.
    """
    n_steps = micro_batches[0]["target"].shape[1]
    n_windows = count_windows(n_steps, settings.bptt_window, settings.tbptt_mode)
    names = list(settings.loss_weights)
    tracker = _BadTermTracker(names, n_windows, accelerator.device)
    sums_T = torch.zeros(len(names) + 1, device=accelerator.device)  # terms..., total
    for micro, batch in enumerate(micro_batches):
        windows = _windows(model, batch, settings, n_steps)
        for index in range(n_windows):
            # Only the step's last window reduces gradients; DDP's no_sync must cover the
            # window's forward (run by next()) as well as its backward.
            reduce = micro == len(micro_batches) - 1 and index == n_windows - 1
            with distributed.sync_context(accelerator, model, reduce=reduce):
                window = next(windows)._replace(micro=micro, step=step)
                sums_T += _window_backward(
                    accelerator, model, window, batch, loss_fn, settings, tracker, n_steps, reduce
                )
            del window  # free its graph before the next window is built
    grad_norm, grad_bad = distributed.finish_gradients(accelerator, model, settings.max_grad_norm)
    # sync point: the step's one host read, one collective
    loss_bad, grad_bad, stop = distributed.max_across_ranks(
        accelerator, tracker.any_bad, grad_bad, stop_code
    )
    applied = not (loss_bad or grad_bad)
    reason = "" if applied else _skip_reason(accelerator, model, tracker, loss_bad)
    distributed.apply_or_discard(accelerator, model, optimizer, scheduler, applied=applied)
    terms = {name: sums_T[i] / len(micro_batches) for i, name in enumerate([*names, "total"])}
    return StepResult(applied, stop, grad_norm, terms, reason)


def _windows(model: torch.nn.Module, batch: Batch, settings: StepSettings, n_steps: int):
    cond = batch["cond"] if batch["cond"].shape[1] > 0 else None
    return iter_windows(
        lambda u: model(u, cond), batch["u0"], n_steps, settings.bptt_window, settings.tbptt_mode
    )


def _window_backward(
    accelerator: Accelerator,
    model: torch.nn.Module,
    window: Window,
    batch: Batch,
    loss_fn: LossFn,
    settings: StepSettings,
    tracker: _BadTermTracker,
    n_steps: int,
    reduce: bool,
) -> Tensor:
    """Loss terms and backward of one window; returns its weighted [terms..., total], detached."""
    terms = loss_fn(window, batch)
    missing = sorted(set(settings.loss_weights) - set(terms))
    if missing:
        raise ValueError(f"loss_fn returned no term(s) {missing} for configured weights")
    terms_T = torch.stack([terms[name].detach().float() for name in settings.loss_weights])
    ok = tracker.update(window, terms_T)
    weight = window_loss_weight(window, n_steps, settings.tbptt_mode)
    total = combine({k: terms[k] for k in settings.loss_weights}, settings.loss_weights)
    # NaN-scaled on this rank if any term is non-finite: the reductions then carry it everywhere
    poison = torch.where(ok, 1.0, math.nan).to(total.dtype)
    distributed.backward(accelerator, model, total * weight * poison, boundary=reduce)
    return torch.cat([terms_T, total.detach().float().reshape(1)]) * weight


def _skip_reason(
    accelerator: Accelerator, model: torch.nn.Module, tracker: _BadTermTracker, loss_bad: bool
) -> str:
    """What each rank saw, gathered from every rank (rare path: every rank agreed to skip).

    Call before the gradients are discarded: under DDP it names the non-finite parameters
    (identical on every rank after the all-reduce, so rank 0's list is shown).
    """
    local = {
        "rank": accelerator.process_index,
        "code": int(tracker.code),
        "value": float(tracker.value),
    }
    if not loss_bad and not distributed.uses_deepspeed(accelerator):
        local["params"] = distributed.nonfinite_grad_names(model)
    reports = distributed.gather_reports(accelerator, local)
    if loss_bad:
        parts = [
            f"rank {r['rank']} {tracker.describe(r['code'], r['value'])}"
            for r in reports
            if r["code"] != _NONE_BAD
        ]
        return "non-finite loss on " + "; ".join(parts)
    if distributed.uses_deepspeed(accelerator):
        return (
            "non-finite gradients (the loss was finite on every rank); DeepSpeed's overflow check "
            "skipped the step on every rank. ZeRO partitions gradients: run noa-diagnose on the "
            "last checkpoint to name the parameters"
        )
    params = reports[0]["params"]
    names = ", ".join(params[:8]) + (f" (+{len(params) - 8} more)" if len(params) > 8 else "")
    return "non-finite gradients after the all-reduce (the loss was finite on every rank): " + (
        names or "no parameter named (the norm itself overflowed)"
    )
