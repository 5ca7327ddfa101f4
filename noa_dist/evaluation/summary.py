"""Reduced sums -> the report's numbers: per-step means, The Well's time windows, per group.

A mean is over the trajectories whose value was finite at that step (null when there were
none, e.g. linear extrapolation at step 1, which it was given); `finite` says how many.
Window means are means of the per-step means over the window's steps, as The Well's trainer
averages them. Fields are averaged with equal weight ("mean", The Well's "full").
"""

from __future__ import annotations

import math

import torch

from noa_dist.evaluation.groups import PHYSICS, Groups
from noa_dist.evaluation.measure import METHODS, METRICS, Sums
from noa_dist.evaluation.physics import SUMS as PHYSICS_SUMS


def group_report(sums: Sums, groups: Groups, g: int, channels: tuple[str, ...], windows) -> dict:
    """Everything about group g: per-step and per-window means, rollout lengths."""
    in_group = sums.samples[group_rows(sums, groups, g)]
    n_steps = sums.values.shape[3]
    per_step, per_window, finite = {}, {}, {}
    for m, method in enumerate(METHODS):
        means_KTC = sums.values[:, g, m] / sums.counts[:, g, m]  # 0/0 = NaN: no finite value
        finite[method] = sums.counts[0, g, m].amin(dim=-1).long().tolist()
        per_step[method] = {k: _fields(means_KTC[i], channels) for i, k in enumerate(METRICS)}
        per_window[method] = {
            k: _fields(_window_means(means_KTC[i], windows), channels)
            for i, k in enumerate(METRICS)
        }
    return {
        "trajectories": len(in_group),
        "finite": finite,
        "per_step": per_step,
        "windows": per_window,
        "rollout": _rollout_lengths(in_group, n_steps),
    }


def group_rows(sums: Sums, groups: Groups, g: int) -> torch.Tensor:
    """[N] bool: which rows of `sums.samples` belong to group g."""
    return torch.from_numpy(groups.member_NG[sums.samples[:, 0].long().numpy(), g])


def _fields(means_TC: torch.Tensor, channels: tuple[str, ...]) -> dict:
    """{"fields": {channel: [per step]}, "mean": [per step, mean over fields]}."""
    mean_T = means_TC.mean(dim=-1)
    return {
        "fields": {c: _floats(means_TC[:, i]) for i, c in enumerate(channels)},
        "mean": _floats(mean_T),
    }


def _window_means(means_TC: torch.Tensor, windows) -> torch.Tensor:
    """[W, C] mean of the defined per-step means in each window (NaN if none is defined)."""
    rows = []
    for start, stop in windows:
        piece = means_TC[start:stop]
        rows.append(piece.nanmean(dim=0))
    return torch.stack(rows)


def _floats(values: torch.Tensor) -> list[float | None]:
    return [None if not math.isfinite(v) else v for v in values.tolist()]


def _rollout_lengths(rows: torch.Tensor, n_steps: int) -> dict:
    """Per method, the steps before VRMSE > 1 over the group; the first non-finite steps."""
    first = rows[:, 1]
    lengths = {}
    for m, method in enumerate(METHODS):
        steps = rows[:, 2 + m]
        lengths[method] = {
            "mean": steps.mean().item() if len(steps) else None,
            "median": steps.median().item() if len(steps) else None,
            "never_above": int((steps == n_steps).sum()),
        }
    return {
        "steps_to_vrmse_above_1": lengths,
        "diverged": int((first > 0).sum()),
        "first_nonfinite_steps": sorted(int(s) for s in first[first > 0].tolist()),
    }


def physics_report(sums: Sums, groups: Groups, check: str, g: int) -> dict:
    """The check's per-step numbers (model and truth) and their summary over all steps."""
    s = {name: sums.physics[f"{check}/{name}"] for name in PHYSICS_SUMS[check]}
    if check == "bounds":
        points = s["points"].clamp(min=1)
        excess = sums.samples[group_rows(sums, groups, g), -1]
        return {
            "bounds": [-1.0, 1.0],
            "fraction_outside_pred": _floats(s["outside_pred"] / points),
            "fraction_outside_true": _floats(s["outside_true"] / points),
            "fraction_outside_pred_all_steps": _ratio(s["outside_pred"], s["points"]),
            "fraction_outside_true_all_steps": _ratio(s["outside_true"], s["points"]),
            "max_excess_pred": excess.max().item() if len(excess) else None,
        }
    n = s["samples"].clamp(min=1)
    return {
        "drift_pred": _floats(s["drift_pred"] / n),
        "drift_true": _floats(s["drift_true"] / n),
        "drift_pred_last_step": _floats(s["drift_pred"][-1:] / n[-1:])[0],
        "drift_true_last_step": _floats(s["drift_true"][-1:] / n[-1:])[0],
    }


def _ratio(num: torch.Tensor, den: torch.Tensor) -> float | None:
    total = den.sum().item()
    return num.sum().item() / total if total else None


def sample_rows(sums: Sums, groups: Groups) -> list[dict]:
    """Per trajectory (sorted): its group, first non-finite step, steps before VRMSE > 1."""
    rows = []
    for row in sums.samples.tolist():
        name = groups.name_of(int(row[0]))
        rows.append(
            {
                "trajectory": int(row[0]),
                "group": name,
                "first_nonfinite_step": int(row[1]) or None,
                "steps_to_vrmse_above_1": {m: int(row[2 + i]) for i, m in enumerate(METHODS)},
                **({"bounds_max_excess": row[-1]} if PHYSICS.get(name) == "bounds" else {}),
            }
        )
    return rows
