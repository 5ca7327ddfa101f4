"""The two renderings of a `noa-diagnose` result: a sectioned report like the seed's, and JSON.

Both read the typed `Diagnosis`; the JSON is `Diagnosis.to_dict()` made strict."""

from __future__ import annotations

import json
import math
import textwrap
from typing import Any

from noa_dist.diagnose.result import Diagnosis, Findings, Verdict
from noa_dist.diagnose.verdict import CHAIN_EXPLODES, fmt

SPARK = "▁▂▃▄▅▆▇█"


# ---------------------------------------------------------------- rendering


def to_json(d: Diagnosis) -> str:
    """Strict JSON: NaN/Inf become the strings "nan", "inf", "-inf"."""
    return json.dumps(finite_json(d.to_dict()), indent=2, allow_nan=False)


def finite_json(obj: Any) -> Any:
    """`obj` with non-finite floats spelled "nan", "inf", "-inf" (strict JSON)."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return str(obj)
    if isinstance(obj, dict):
        return {key: finite_json(value) for key, value in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [finite_json(value) for value in obj]
    return obj


def _mark(ok: bool) -> str:
    return "[ok]" if ok else "[!!]"


def render(d: Diagnosis) -> str:
    """The human report: six sections like the seed's diagnosis, then the verdict and fix."""
    f = d.findings
    sections = [
        _header(f),
        _config_section(f),
        _forward_section(f),
        _loss_section(f),
        _backward_section(f),
        _chain_section(f),
        _verdict_section(d.verdict),
    ]
    return "\n\n".join(sections)


def _header(f: Findings) -> str:
    s = f.settings
    window = (
        "full BPTT (no --bptt-window)"
        if s.bptt_window is None
        else f"--bptt-window {s.bptt_window} ({s.tbptt_mode})"
    )
    return (
        f"NOA training diagnosis\n  checkpoint  {f.checkpoint} ({f.format})\n"
        f"  data        {f.dataset} split {f.split}: {s.n_samples} samples, batch {s.batch_size}, "
        f"device {f.device}\n  rollout     T={s.timesteps}, {window}"
    )


def _config_section(f: Findings) -> str:
    lines = [
        f"  {'[!!]' if item.level == 'problem' else '[--]'} {item.message}"
        for item in f.config_check
    ]
    return "1. Configuration\n" + (
        "\n".join(lines) if lines else "  [ok] T, window and mode are consistent"
    )


def _rows(n: int, keep: set[int], limit: int = 12) -> list[int]:
    """Row indices to print: all if few, else the ends, an even spread and `keep`."""
    if n <= limit:
        return list(range(n))
    spread = {round(i * (n - 1) / (limit - 1)) for i in range(limit)}
    return sorted(spread | {0, 1, n - 2, n - 1} | {k for k in keep if 0 <= k < n})


def _forward_section(f: Findings) -> str:
    fw = f.forward
    first = fw.first_nonfinite_step
    head = f"  {'step':>5} {'min':>10} {'max':>10} {'mean':>10} {'std':>10} {'non-finite':>10}   target [min, max]"
    lines = ["2. Forward pass (predictions per rollout step)", head]
    for i in _rows(len(fw.steps), {first - 1} if first else set()):
        p, t = fw.steps[i], fw.target[i]
        lines.append(
            f"  {p.step:>5} {fmt(p.min):>10} {fmt(p.max):>10} {fmt(p.mean):>10} "
            f"{fmt(p.std):>10} {p.nonfinite:>10}   [{fmt(t.min)}, {fmt(t.max)}]"
        )
    lows, highs = [p.min for p in fw.steps], [p.max for p in fw.steps]
    t_lows, t_highs = [t.min for t in fw.target], [t.max for t in fw.target]
    span = f"range [{fmt(_nanmin(lows))}, {fmt(_nanmax(highs))}] vs target [{fmt(_nanmin(t_lows))}, {fmt(_nanmax(t_highs))}]"
    if fw.nonfinite_total:
        lines.append(
            f"  [!!] {fw.nonfinite_total:,} non-finite predicted values, first at step {first}; finite {span}"
        )
    else:
        lines.append(f"  [ok] all predictions finite; {span}")
    bad = f.data.nonfinite_samples
    lines += (
        [f"  [!!] input data: {b}" for b in bad]
        if bad
        else ["  [ok] inputs, targets and conditioning finite"]
    )
    return "\n".join(lines)


def _nanmin(values: list[float]) -> float:
    finite = [v for v in values if not math.isnan(v)]
    return min(finite) if finite else math.nan


def _nanmax(values: list[float]) -> float:
    finite = [v for v in values if not math.isnan(v)]
    return max(finite) if finite else math.nan


def _loss_section(f: Findings) -> str:
    return f"3. Loss\n  {_mark(f.loss.finite)} L_traj = {fmt(f.loss.traj)}"


def _backward_section(f: Findings) -> str:
    g = f.gradients
    norms = (("min", g.norm_min), ("p50", g.norm_p50), ("p90", g.norm_p90), ("p99", g.norm_p99),
             ("max", g.norm_max))  # fmt: skip
    stats = "  ".join(f"{name} {fmt(value)}" for name, value in norms)
    lines = [
        f"4. Backward pass ({g.n_params} parameters)",
        f"  gradient norm per parameter: {stats}",
        f"  total norm {fmt(g.total_norm)}; largest: "
        + ", ".join(f"{x.name} {fmt(x.norm)}" for x in g.largest[:3]),
    ]
    if g.n_nonfinite:
        everywhere = " (ALL of them)" if g.n_nonfinite == g.n_params - len(g.no_grad_params) else ""
        lines.append(
            f"  [!!] non-finite gradients in {g.n_nonfinite} of {g.n_params} parameters{everywhere}:"
        )
        lines += textwrap.wrap(
            ", ".join(g.nonfinite_params),
            96,
            initial_indent="       ",
            subsequent_indent="       ",
        )
    else:
        lines.append("  [ok] all gradients finite")
    if g.no_grad_params:
        lines.append(f"  [--] no gradient at all: {', '.join(g.no_grad_params)}")
    return "\n".join(lines)


def _sparkline(values: list[float]) -> str:
    logs = [math.log10(v) if math.isfinite(v) and v > 0 else None for v in values]
    finite = [v for v in logs if v is not None]
    lo, hi = (min(finite), max(finite)) if finite else (0.0, 0.0)
    scale = (len(SPARK) - 1) / (hi - lo) if hi > lo else 0.0
    return "".join("!" if v is None else SPARK[round((v - lo) * scale)] for v in logs)


def _chain_section(f: Findings) -> str:
    c, s = f.chain, f.settings
    scope = (
        f"full BPTT over {c.window} steps"
        if s.bptt_window is None or s.bptt_window >= s.timesteps
        else f"within each --bptt-window of {c.window} steps"
    )
    lines = [
        f"5. Gradient growth back through the autoregressive chain ({scope})",
        f"  {'depth':>5}  {'state':<7} {'|dL/du|':>10} {'chain gain':>11} {'x/step':>8}",
    ]
    for i in _rows(len(c.depths), set()):
        row = c.depths[i]
        state = "-" if row.state_step is None else f"u_{row.state_step}"
        lines.append(
            f"  {row.depth:>5}  {state:<7} {fmt(row.grad_norm):>10} {fmt(row.chain_gain):>11} "
            f"{fmt(row.growth):>8}"
        )
    lines.append(
        f"  chain gain by depth (log scale): {_sparkline([r.chain_gain for r in c.depths])}"
    )
    ok = math.isfinite(c.amplification) and c.amplification <= CHAIN_EXPLODES
    lines.append(
        f"  {_mark(ok)} x{fmt(c.amplification)} over {c.window} steps, x{fmt(c.growth_per_step)} per step"
        f" (full BPTT through T={c.extrapolated_steps} at this rate: x{fmt(c.extrapolated_amplification)})"
    )
    return "\n".join(lines)


def _verdict_section(v: Verdict) -> str:
    lines = [f"6. Verdict: {v.title}", *(f"  - {reason}" for reason in v.reasons)]
    if v.fixes:
        lines.append("\nRecommended fix (keep your usual `accelerate launch` options):")
        for fix in v.fixes:
            lines += [f"  # {fix.why}", f"  {fix.command}"]
    return "\n".join(lines)
