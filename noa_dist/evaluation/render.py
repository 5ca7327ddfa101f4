"""The two renderings of a report dict: strict JSON, and Markdown tables (one per group)."""

from __future__ import annotations

import json
import math

from noa_dist.diagnose.report import finite_json

DASH = "—"


def to_json(report: dict) -> str:
    """Strict JSON: NaN/Inf become the strings "nan", "inf", "-inf"; undefined means are null."""
    return json.dumps(finite_json(report), indent=2, allow_nan=False)


def markdown(report: dict) -> str:
    parts = [_header(report)]
    for name, group in report["groups"].items():
        parts.append(_group_table(report, name, group))
        if len(report["dataset"]["channels"]) > 1:
            parts.append(_field_table(report, group))
        if "physics" in group:
            parts.append(_physics(group["physics"]))
    return "\n\n".join(parts)


def checkpoint_label(report: dict) -> str:
    """ "<path> (best, epoch 3, step 120)": which weights these numbers are of."""
    c = report["checkpoint"]
    trained = [f"{k.replace('global_', '')} {c[k]}" for k in ("epoch", "global_step") if k in c]
    return f"{c['path']} ({', '.join([c['format'], *trained])})"


def window_labels(report: dict) -> list[str]:
    """1-based step ranges of The Well's windows: "1", "2", "3-5", ..."""
    return [
        f"{start + 1}" if stop == start + 1 else f"{start + 1}-{stop}"
        for start, stop in report["settings"]["time_windows"]
    ]


def _header(report: dict) -> str:
    d, s = report["dataset"], report["settings"]
    excluded = d["excluded_nonfinite_data"]
    lines = [
        f"# noa-eval: {checkpoint_label(report)}",
        "",
        f"Dataset {d['name']} ({d['root']}), split {d['split']}: {d['trajectories']} "
        f"trajectories{f' ({excluded} left out: non-finite data)' if excluded else ''}, rolled "
        f"out {s['horizon']} steps from their first state without teacher forcing; channels "
        f"{', '.join(d['channels'])}; {s['world_size']} process(es).",
        "Denormalised fields; means over trajectories, then over fields. Columns "
        "'VRMSE a-b': mean over rollout steps a..b (The Well's time windows). Linear "
        "extrapolation is given the first two states, so it forecasts from step 2.",
    ]
    return "\n".join(lines)


def _group_table(report: dict, name: str, group: dict) -> str:
    labels = window_labels(report)
    head = ["method", *(f"VRMSE {w}" for w in labels), "rel. L2 (all)", "NMSE low",
            "NMSE mid", "NMSE high", "steps to VRMSE>1", "diverged"]  # fmt: skip
    rows = []
    for method in report["methods"]:
        windows = group["windows"][method]
        steps = group["per_step"][method]
        lengths = group["rollout"]["steps_to_vrmse_above_1"][method]
        diverged = group["rollout"]["diverged"] if method == "model" else 0
        rows.append(
            [
                method,
                *(_num(v) for v in windows["vrmse"]["mean"]),
                _num(_mean(steps["relative_l2"]["mean"])),
                *(_num(_mean(steps[f"spectral_nmse_{i}"]["mean"])) for i in range(3)),
                f"{_num(lengths['mean'])} (median {_num(lengths['median'])})",
                str(diverged),
            ]
        )
    title = f"## {name} ({group['trajectories']} trajectories)"
    notes = []
    first = group["rollout"]["first_nonfinite_steps"]
    if first:
        notes.append(f"Model predictions turned non-finite at steps {first}; per-step means "
                     "are over the trajectories still finite (see `finite` in eval.json).")  # fmt: skip
    return "\n".join([title, "", *_table(head, rows), *(["", *notes] if notes else [])])


def _field_table(report: dict, group: dict) -> str:
    labels = window_labels(report)
    head = ["field (model)", *(f"VRMSE {w}" for w in labels)]
    fields = group["windows"]["model"]["vrmse"]["fields"]
    rows = [[c, *(_num(v) for v in values)] for c, values in fields.items()]
    return "\n".join(_table(head, rows))


def _physics(physics: dict) -> str:
    lines = []
    if "bounds" in physics:
        b = physics["bounds"]
        lines.append(
            f"Allen-Cahn bounds [-1, 1]: {_pct(b['fraction_outside_pred_all_steps'])} of predicted "
            f"values outside (truth {_pct(b['fraction_outside_true_all_steps'])}); largest "
            f"excess {_num(b['max_excess_pred'])}."
        )
    if "mean_vorticity" in physics:
        m = physics["mean_vorticity"]
        lines.append(
            f"Navier-Stokes mean vorticity drift |<w_t> - <w_0>| at the last step: predicted "
            f"{_num(m['drift_pred_last_step'])}, truth {_num(m['drift_true_last_step'])}."
        )
    return "\n".join(lines)


def _table(head: list[str], rows: list[list[str]]) -> list[str]:
    return [
        "| " + " | ".join(head) + " |",
        "|" + "|".join(["---"] + ["---:"] * (len(head) - 1)) + "|",
        *("| " + " | ".join(r) + " |" for r in rows),
    ]


def _mean(values: list[float | None]) -> float | None:
    defined = [v for v in values if v is not None]
    return sum(defined) / len(defined) if defined else None


def _num(v: float | None) -> str:
    if v is None:
        return DASH
    if isinstance(v, float) and not math.isfinite(v):
        return str(v)
    return f"{v:.3g}"


def _pct(v: float | None) -> str:
    return DASH if v is None else f"{100 * v:.2g}%"
