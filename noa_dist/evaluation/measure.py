"""The measurement: roll each trajectory of this rank's shard out from its first state, step
by step without teacher forcing, and add every metric of model and baselines up per step.

Shape legend: B trajectories, T steps, C channels, K metrics, G groups, M methods (the model
and the baselines). Nothing of a rollout is kept but its current state: per step the metrics
of all methods against the denormalised truth go into sums [K, G, M, T, C] (float64, with a
count of finite values beside each sum, so a diverged trajectory leaves a step's mean instead
of making it NaN), and per trajectory a few integers (first non-finite step, steps before
VRMSE > 1). Padded and non-finite-data trajectories are members of no group.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor

from noa_dist.evaluation.groups import Groups
from noa_dist.evaluation.physics import PhysicsSums
from noa_dist.metrics import (
    SPECTRAL_BINS,
    binned_spectral_error,
    linear_extrapolation,
    relative_l2,
    spatial_mean_forecast,
    vrmse,
)

METHODS = ("model", "persistence", "linear_extrapolation", "spatial_mean")
LINEAR = METHODS.index("linear_extrapolation")  # given u1: no forecast of step 1
METRICS = (
    "vrmse",
    "relative_l2",
    *(f"spectral_mse_{i}" for i in range(SPECTRAL_BINS)),
    *(f"spectral_nmse_{i}" for i in range(SPECTRAL_BINS)),
)
VRMSE_LIMIT = 1.0  # the spatial mean's score: beyond it a forecast says nothing


@dataclass
class Frames:
    """One trajectory's denormalised truth and model rollout, for the frame figures."""

    trajectory: int
    group: str
    truth_TCHW: Tensor
    pred_TCHW: Tensor


@dataclass
class Sums:
    """Sums over trajectories; `samples` [N, 3 + M] rows of (trajectory, first non-finite
    step or 0, steps before VRMSE > 1 per method, largest Allen-Cahn bounds excess)."""

    values: Tensor  # [K, G, M, T, C]
    counts: Tensor  # [K, G, M, T, C] finite values added
    physics: dict[str, Tensor]  # name -> [T]
    samples: Tensor
    excluded_nonfinite_data: Tensor  # [] trajectories whose stored data is not finite
    frames: list[Frames] = field(default_factory=list)


@torch.no_grad()
def measure(
    model, loader, n_real: int, groups: Groups, norm, n_steps: int, device, n_frames: int = 0
) -> Sums:
    """This rank's sums; `n_real` leading items of the loader are real (the rest padding).
    `norm` gives (mean_C, std_C) of the predicted channels; `n_frames` rollouts are kept."""
    mean_C11, std_C11 = (torch.as_tensor(v, device=device)[:, None, None] for v in norm)
    n_channels = mean_C11.shape[0]
    shape = (len(METRICS), len(groups.names), len(METHODS), n_steps, n_channels)
    sums = Sums(
        values=torch.zeros(shape, dtype=torch.float64, device=device),
        counts=torch.zeros(shape, dtype=torch.float64, device=device),
        physics={},
        samples=torch.zeros(0, 3 + len(METHODS), dtype=torch.float64),
        excluded_nonfinite_data=torch.zeros((), dtype=torch.float64, device=device),
    )
    physics = PhysicsSums(groups.physics(), groups.state_channel, n_steps, device)
    rows, seen = [], 0
    for batch in loader:
        batch = {k: v.to(device) if isinstance(v, Tensor) else v for k, v in batch.items()}
        n = max(0, min(len(batch["index"]), n_real - seen))  # padding rows come last
        seen += len(batch["index"])
        member_BG = groups.member(batch["index"], device)
        member_BG[n:] = 0
        data_ok_B = _finite_data(batch)
        sums.excluded_nonfinite_data += ((~data_ok_B)[:n]).sum()
        member_BG *= data_ok_B[:, None]
        keep = _frame_rows(groups, batch["index"][:n], sums.frames, n_frames)
        rollout = _rollout(model, batch, (mean_C11, std_C11), member_BG, sums, physics, keep)
        rows_B = torch.cat([batch["index"][:, None].double(), rollout], dim=1)
        rows.append(rows_B[:n][data_ok_B[:n]].cpu())
        for row, pred_TCHW, truth_TCHW in keep_frames(keep):
            name = groups.name_of(int(batch["index"][row]))
            sums.frames.append(Frames(int(batch["index"][row]), name, truth_TCHW, pred_TCHW))
    sums.physics = physics.sums
    sums.samples = torch.cat(rows) if rows else sums.samples
    return sums


def _rollout(model, batch, norm, member_BG, sums: Sums, physics: PhysicsSums, keep: dict):
    """Roll the batch out, adding to `sums` and `physics`; returns [B, 2 + M] per-trajectory
    (first non-finite step, steps before VRMSE > 1 per method, bounds excess). `keep`
    (row -> lists) receives the denormalised prediction and truth of each step."""
    mean_C11, std_C11 = norm
    cond = batch["cond"] if batch["cond"].shape[1] > 0 else None
    u0 = batch["u0"] * std_C11 + mean_C11
    u1 = batch["target"][:, 0] * std_C11 + mean_C11
    mean_forecast = spatial_mean_forecast(u0)
    state = batch["u0"]
    b = u0.shape[0]
    first_nonfinite_B = torch.zeros(b, device=u0.device)
    steps_ok_BM = torch.zeros(b, len(METHODS), device=u0.device)
    alive_BM = torch.ones(b, len(METHODS), dtype=torch.bool, device=u0.device)
    excess_B = torch.zeros(b, dtype=torch.float64, device=u0.device)
    for t in range(batch["target"].shape[1]):
        state = model(state, cond).state
        pred = state * std_C11 + mean_C11
        truth = batch["target"][:, t] * std_C11 + mean_C11
        forecasts_BMCHW = torch.stack(
            [pred, u0, linear_extrapolation(u0, u1, t + 1), mean_forecast], dim=1
        )
        values_KBMC = step_metrics(forecasts_BMCHW, truth)
        if t == 0:
            values_KBMC[:, :, LINEAR] = float("nan")  # it was given this step
        add_step(sums, t, values_KBMC, member_BG)
        exceeded_BM = ~(values_KBMC[0].mean(dim=-1) <= VRMSE_LIMIT)  # NaN counts as exceeded
        if t == 0:
            exceeded_BM[:, LINEAR] = False
        alive_BM &= ~exceeded_BM
        steps_ok_BM += alive_BM
        bad_B = ~torch.isfinite(pred).flatten(1).all(dim=1)
        first_nonfinite_B = torch.where((first_nonfinite_B == 0) & bad_B, t + 1, first_nonfinite_B)
        excess_B = torch.maximum(excess_B, physics.add(t, pred, truth, u0, member_BG))
        for row, (preds, truths) in keep.items():
            preds.append(pred[row].cpu())
            truths.append(truth[row].cpu())
    return torch.cat([first_nonfinite_B[:, None], steps_ok_BM, excess_B[:, None]], dim=1).double()


def step_metrics(forecasts_BMCHW: Tensor, truth_BCHW: Tensor) -> Tensor:
    """Every metric of M forecasts of one step against its truth, [K, B, M, C]."""
    truth_BMCHW = truth_BCHW[:, None].expand_as(forecasts_BMCHW)
    mse, nmse = binned_spectral_error(forecasts_BMCHW, truth_BCHW[:, None])
    return torch.stack(
        [
            vrmse(forecasts_BMCHW, truth_BMCHW),
            relative_l2(forecasts_BMCHW, truth_BMCHW),
            *mse.float().unbind(-1),
            *nmse.float().unbind(-1),
        ]
    )


def add_step(sums: Sums, t: int, values_KBMC: Tensor, member_BG: Tensor) -> None:
    """Add step t's metrics of every member to its groups' sums; non-finite values are counted
    out (a zero-variance truth or a diverged forecast)."""
    finite = torch.isfinite(values_KBMC)
    values = torch.where(finite, values_KBMC.double(), 0.0)
    sums.values[:, :, :, t] += torch.einsum("kbmc,bg->kgmc", values, member_BG)
    sums.counts[:, :, :, t] += torch.einsum("kbmc,bg->kgmc", finite.double(), member_BG)


def _finite_data(batch: dict) -> Tensor:
    """[B] bool: the trajectory's stored states and constant fields are all finite."""
    parts = [batch[k].flatten(1) for k in ("u0", "target", "cond") if batch[k].numel()]
    return torch.stack([torch.isfinite(p).all(dim=1) for p in parts]).all(dim=0)


def _frame_rows(groups: Groups, index_B: Tensor, frames: list[Frames], n_frames: int) -> dict:
    """Rows of this batch to keep for figures: the first trajectory of each group not yet
    shown, then any, until `n_frames` are kept; row -> ([preds], [truths])."""
    shown = {f.group for f in frames}
    rows: dict[int, tuple[list, list]] = {}
    for fresh_only in (True, False):
        for row, trajectory in enumerate(index_B.tolist()):
            if len(frames) + len(rows) >= n_frames:
                return rows
            name = groups.name_of(trajectory)
            if row not in rows and (not fresh_only or name not in shown):
                rows[row] = ([], [])
                shown.add(name)
    return rows


def keep_frames(keep: dict):
    """(row, pred [T, C, H, W], truth [T, C, H, W]) of every kept row."""
    for row, (preds, truths) in keep.items():
        yield row, torch.stack(preds), torch.stack(truths)


def reduce(sums: Sums, sum_across_ranks, gather) -> Sums:
    """Sums over all ranks (one all-reduce; the per-trajectory rows by one gather), sorted by
    trajectory; frames stay where they were taken."""
    physics_names = sorted(sums.physics)
    flat = torch.cat(
        [sums.values.flatten(), sums.counts.flatten(), sums.excluded_nonfinite_data.reshape(1)]
        + [sums.physics[k] for k in physics_names]
    )
    flat = sum_across_ranks(flat).cpu()  # sync point: once per evaluation
    n = sums.values.numel()
    values, counts = flat[:n].view_as(sums.values), flat[n : 2 * n].view_as(sums.counts)
    steps = sums.values.shape[3]
    physics = {
        k: flat[2 * n + 1 + i * steps : 2 * n + 1 + (i + 1) * steps]
        for i, k in enumerate(physics_names)
    }
    samples = torch.cat(gather(sums.samples))
    samples = samples[samples[:, 0].argsort()]
    return Sums(values, counts, physics, samples, flat[2 * n], sums.frames)
