"""The measurements behind `noa-diagnose`: one training-like forward/backward on a few samples,
and their summaries as typed findings (`forward_summary`, `gradient_summary`, `chain_summary`).

The rollout runs through `rollout.iter_windows` exactly as training does (same window, same
mode, same loss weights), with a recording step function in between that
  - accumulates per-step statistics of every predicted state (warm-up steps included);
  - turns the first state of every gradient window into a leaf that requires grad and keeps
    every state of the window with `retain_grad`, so that after backward `u_t.grad` is
    d L / d u_t (the gradient that reaches u_t through the rest of the chain);
  - before that backward, takes d L_last / d u_t with `autograd.grad`, where L_last is the
    loss of the window's last step alone: its growth with depth is the pure amplification
    of the chain (d L / d u_t also grows because more loss terms lie downstream).
Depth k counts steps back from the end of a window (k = 0: the last state; k = window
length: the window's input); only full-length windows count (all-windows mode may end with
a shorter one). Norms are root-sum-squares over the samples and windows, in
float64 so that large finite gradients do not overflow while being measured.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from noa_dist.data.dataset import WellWindowDataset
from noa_dist.diagnose.result import (
    ChainSummary,
    DepthRow,
    ForwardSummary,
    GradientSummary,
    ParamNorm,
    Settings,
    StepStats,
)
from noa_dist.losses import trajectory_mse
from noa_dist.models.uafno import StepOutput
from noa_dist.rollout import iter_windows, window_loss_weight


@dataclass
class RunningStats:
    """min / max / mean / std over the finite values seen, and a count of the non-finite ones."""

    count: int = 0
    nonfinite: int = 0
    low: float = math.inf
    high: float = -math.inf
    total: float = 0.0
    total_sq: float = 0.0

    def add(self, values: Tensor) -> None:
        values = values.detach().double()
        finite = torch.isfinite(values)
        self.nonfinite += int((~finite).sum())  # sync point (diagnosis only)
        kept = values[finite]
        if kept.numel():
            self.count += kept.numel()
            self.low, self.high = (
                min(self.low, kept.min().item()),
                max(self.high, kept.max().item()),
            )
            self.total += kept.sum().item()
            self.total_sq += kept.square().sum().item()

    def summary(self) -> dict[str, float | int]:
        mean = self.total / self.count if self.count else math.nan
        var = self.total_sq / self.count - mean**2 if self.count else math.nan
        return {
            "min": self.low if self.count else math.nan,
            "max": self.high if self.count else math.nan,
            "mean": mean,
            "std": math.sqrt(max(var, 0.0)) if self.count else math.nan,
            "nonfinite": self.nonfinite,
        }


@dataclass
class DepthNorms:
    """Squared gradient norms by depth, summed over samples and windows."""

    total_sq: dict[int, float] = field(default_factory=dict)  # |d L / d u|^2
    last_sq: dict[int, float] = field(default_factory=dict)  # |d L_last / d u|^2

    def add(self, depth: int, total: Tensor | None, last: Tensor | None) -> None:
        for store, grad in ((self.total_sq, total), (self.last_sq, last)):
            value = math.nan if grad is None else grad.detach().double().square().sum().item()
            store[depth] = store.get(depth, 0.0) + value

    def rows(self) -> list[dict[str, float | int]]:
        """Per depth: d L / d u norm and the chain gain |dL_last/du_depth| / |dL_last/du_0|."""
        base = math.sqrt(self.last_sq.get(0, math.nan))
        return [
            {
                "depth": k,
                "grad_norm": math.sqrt(self.total_sq[k]),
                "chain_gain": ratio(math.sqrt(self.last_sq[k]), base),
            }
            for k in sorted(self.total_sq)
        ]


@dataclass
class ProbeResult:
    pred: list[RunningStats]  # per rollout step 1..T
    target: list[RunningStats]
    loss: float  # L_traj as training computes it (window weights), mean over samples
    bad_samples: list[str]  # samples whose u0/target/cond hold NaN/Inf, described
    grad_norms: dict[str, float]  # per parameter, inf for a non-finite gradient
    nonfinite_params: list[str]
    no_grad_params: list[str]
    depth: DepthNorms
    n_samples: int


class _RecordingStep:
    """step_fn for iter_windows: statistics of every state, graph bookkeeping of grad windows."""

    def __init__(self, model: nn.Module, cond_BCHW: Tensor | None, pred_stats: list[RunningStats]):
        self.model, self.cond_BCHW, self.pred_stats = model, cond_BCHW, pred_stats
        self.window_states: list[Tensor] = []  # [input leaf, u_1, ..., u_W] of the current window
        self.step = 0

    def __call__(self, u_BCHW: Tensor) -> StepOutput:
        if torch.is_grad_enabled() and not u_BCHW.requires_grad:
            u_BCHW = u_BCHW.detach().requires_grad_()  # a new gradient window starts here
            self.window_states = [u_BCHW]
        out = self.model(u_BCHW, self.cond_BCHW)
        self.pred_stats[self.step].add(out.state)
        self.step += 1
        if out.state.requires_grad:
            out.state.retain_grad()
            self.window_states.append(out.state)
        return out


def run_probe(
    model: nn.Module,
    dataset: WellWindowDataset,
    *,
    bptt_window: int | None,
    tbptt_mode: str,
    batch_size: int,
    device: torch.device,
    progress: bool = True,
) -> ProbeResult:
    """Forward, loss and backward of every sample of `dataset`, gradients summed as one batch."""
    n_steps, n_samples = dataset.timesteps, len(dataset)
    pred = [RunningStats() for _ in range(n_steps)]
    target = [RunningStats() for _ in range(n_steps)]
    depth, loss, bad = DepthNorms(), 0.0, []
    model.to(device).train()
    model.zero_grad(set_to_none=True)
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=0)
    for batch in tqdm(loader, desc="diagnose", disable=not progress, leave=False):
        batch = {k: v.to(device) if isinstance(v, Tensor) else v for k, v in batch.items()}
        bad += _bad_samples(dataset, batch)
        for t in range(n_steps):
            target[t].add(batch["target"][:, t])
        fraction = batch["u0"].shape[0] / n_samples
        loss += fraction * _batch_backward(
            model, batch, pred, depth, bptt_window, tbptt_mode, fraction
        )
    norms, nonfinite, no_grad = _parameter_gradients(model)
    return ProbeResult(pred, target, loss, bad, norms, nonfinite, no_grad, depth, n_samples)


def _batch_backward(model, batch, pred, depth, bptt_window, tbptt_mode, fraction) -> float:
    """Roll out one batch window by window; backward each window's loss scaled by `fraction`."""
    u0, target = batch["u0"], batch["target"]
    cond = batch["cond"] if batch["cond"].shape[1] > 0 else None
    n_steps = target.shape[1]
    full_length = n_steps if bptt_window is None else min(bptt_window, n_steps)
    step = _RecordingStep(model, cond, pred)
    loss = 0.0
    for window in iter_windows(step, u0, n_steps, bptt_window, tbptt_mode):
        target_BTCHW = target[:, window.start : window.stop]
        window_loss = trajectory_mse(window.pred_BTCHW, target_BTCHW)
        weight = window_loss_weight(window, n_steps, tbptt_mode)
        last_loss = trajectory_mse(window.pred_BTCHW[:, -1:], target_BTCHW[:, -1:])
        states = step.window_states
        last_grads = torch.autograd.grad(last_loss, states, retain_graph=True, allow_unused=True)
        for state in states:
            state.grad = None  # retain_grad also caught the autograd.grad pass above
        (window_loss * weight * fraction).backward()
        if window.stop - window.start == full_length:  # a shorter last window would skew depths
            for index, (state, last_grad) in enumerate(zip(states, last_grads, strict=True)):
                depth.add(len(states) - 1 - index, state.grad, last_grad)
        loss += weight * window_loss.item()  # sync point (diagnosis only)
        step.window_states = []
    return loss


def _parameter_gradients(model: nn.Module) -> tuple[dict[str, float], list[str], list[str]]:
    """Gradient norm per parameter (inf if any element is NaN/Inf), non-finite and unused names."""
    norms, nonfinite, no_grad = {}, [], []
    for name, param in model.named_parameters():
        if param.grad is None:
            no_grad.append(name)
            continue
        grad = param.grad.detach().double()
        if bool(torch.isfinite(grad).all()):
            norms[name] = grad.norm().item()
        else:
            norms[name] = math.inf
            nonfinite.append(name)
    return norms, nonfinite, no_grad


def _bad_samples(dataset: WellWindowDataset, batch: dict) -> list[str]:
    """Descriptions of the samples whose inputs, targets or conditioning are not finite."""
    bad = []
    for row, index in enumerate(batch["index"].tolist()):
        parts = [
            name
            for name in ("u0", "target", "cond")
            if not bool(torch.isfinite(batch[name][row]).all())
        ]
        if parts:
            bad.append(f"{dataset.describe_sample(index)}: non-finite {', '.join(parts)}")
    return bad


def ratio(value: float, base: float) -> float:
    """value / base for norms (>= 0): NaN stays NaN, x/0 is inf, 0/0 is 1 (no growth)."""
    if math.isnan(value) or math.isnan(base) or (math.isinf(value) and math.isinf(base)):
        return math.nan
    if base == 0:
        return 1.0 if value == 0 else math.inf
    return value / base


# ---------------------------------------------------------------- summaries


def forward_summary(probe: ProbeResult) -> ForwardSummary:
    """Per-step statistics of predictions and targets, and where non-finite values start."""
    steps = [StepStats(t, **st.summary()) for t, st in enumerate(probe.pred, start=1)]
    target = [StepStats(t, **st.summary()) for t, st in enumerate(probe.target, start=1)]
    first = next((row.step for row in steps if row.nonfinite), None)
    return ForwardSummary(steps, target, sum(row.nonfinite for row in steps), first)


def gradient_summary(probe: ProbeResult) -> GradientSummary:
    """Norm percentiles over the parameters (nearest rank, so each is one parameter's norm)."""
    norms = np.array(list(probe.grad_norms.values()), dtype=np.float64)
    q = {
        k: float(np.percentile(norms, p, method="nearest")) if norms.size else math.nan
        for k, p in (("min", 0), ("p50", 50), ("p90", 90), ("p99", 99), ("max", 100))
    }
    largest = sorted(probe.grad_norms.items(), key=lambda kv: -kv[1])[:5]
    return GradientSummary(
        n_params=len(probe.grad_norms) + len(probe.no_grad_params),
        n_nonfinite=len(probe.nonfinite_params),
        nonfinite_params=probe.nonfinite_params,
        no_grad_params=probe.no_grad_params,
        total_norm=float(np.sqrt(np.square(norms).sum())),
        norm_min=q["min"],
        norm_p50=q["p50"],
        norm_p90=q["p90"],
        norm_p99=q["p99"],
        norm_max=q["max"],
        largest=[ParamNorm(name, norm) for name, norm in largest],
    )


def chain_summary(probe: ProbeResult, s: Settings) -> ChainSummary:
    """Gradient growth by depth; the per-step growth extrapolated to full BPTT over T steps."""
    single = s.tbptt_mode == "last" or s.bptt_window is None or s.bptt_window >= s.timesteps
    rows, previous_gain = [], None
    for row in probe.depth.rows():
        gain = row["chain_gain"]
        rows.append(
            DepthRow(
                depth=row["depth"],
                grad_norm=row["grad_norm"],
                chain_gain=gain,
                state_step=s.timesteps - row["depth"] if single else None,
                growth=None if previous_gain is None else ratio(gain, previous_gain),
            )
        )
        previous_gain = gain
    window = rows[-1].depth if rows else 0
    amplification = rows[-1].chain_gain if rows else math.nan
    per_step = _power(amplification, 1 / window) if window else math.nan
    return ChainSummary(
        window=window,
        depths=rows,
        amplification=amplification,
        growth_per_step=per_step,
        extrapolated_steps=s.timesteps,
        extrapolated_amplification=_power(per_step, s.timesteps),
    )


def _power(base: float, exponent: float) -> float:
    """base ** exponent for base >= 0 that saturates at inf instead of raising OverflowError."""
    if not math.isfinite(base) or base <= 0:
        return base if base != 0 else 0.0
    log = exponent * math.log(base)
    return math.inf if log > 700 else math.exp(log)
