"""The verdict of `noa-diagnose` and its two renderings: a sectioned report and JSON.

`verdict(result)` is a pure function of the result dict (see `noa_dist.diagnose`): the first
rule that fires names the failure, in causal order: bad data makes everything non-finite,
a diverging forward makes the loss and gradients non-finite, and only with a finite forward
and loss do exploding gradients point at the autoregressive chain (fix: a BPTT window) or,
when the chain does not amplify, at the weights and step size (fix: a lower --lr).
"""

from __future__ import annotations

import json
import math
import shlex
import textwrap
from typing import Any

CHAIN_EXPLODES = 1e3  # chain gain over one gradient window that counts as an explosion
CHAIN_GROWS = 1.1  # per-step chain gain worth a note (x1.1 per step is x1e10 over 256 steps)
STEP_UNSTABLE = 10.0  # per-step gain of a single step: the weights themselves are unstable
GRAD_HUGE = 1e4  # total gradient norm (L_traj on normalised data is O(1))
SAFE_WINDOW = 32  # the prototype's working window; also rollout.FULL_BPTT_WARN_ABOVE
_LOWER_LR = "a 10x lower learning rate: the updates drove the weights into an unstable region"
SPARK = "▁▂▃▄▅▆▇█"

Result = dict[str, Any]


# ---------------------------------------------------------------- numbers and commands


def with_flags(args: list[str], flags: dict[str, str | None]) -> list[str]:
    """args without any earlier `--name X` / `--name=X` (either spelling) of `flags`, then
    `--name value` for every flag whose value is not None (None only removes it)."""
    names = {f"--{spelling}" for name in flags for spelling in (name, name.replace("-", "_"))}
    out, skip_value = [], False
    for arg in args:
        if skip_value:
            skip_value = False
            continue
        head, has_value = arg.split("=", 1)[0], "=" in arg
        if head in names:
            skip_value = not has_value
            continue
        out.append(arg)
    for name, value in flags.items():
        if value is not None:
            out += [f"--{name}", value]
    return out


def recommended_window(timesteps: int, window: int | None) -> int:
    """32 for long rollouts, half of T for short ones, half the current window if one is set."""
    if window is None or window >= timesteps:
        return SAFE_WINDOW if timesteps > SAFE_WINDOW else max(1, timesteps // 2)
    return max(1, window // 2)


def _command(r: Result, flags: dict[str, str | None]) -> str:
    """The training command with `flags` set, plus the diagnosed T/mode if they differ."""
    s, trained = r["settings"], r["trained_with"]
    extra = {}
    if s["timesteps"] != trained["timesteps"]:
        extra["timesteps"] = str(s["timesteps"])
    if s["tbptt_mode"] != trained["tbptt_mode"]:
        extra["tbptt-mode"] = s["tbptt_mode"]
    words = shlex.split(r["training_command"])  # "accelerate launch noa_dist/train.py" + flags
    return shlex.join([*words[:3], *with_flags(words[3:], {**extra, **flags})])


def _window_fix(r: Result) -> dict[str, str]:
    s = r["settings"]
    w = recommended_window(s["timesteps"], s["bptt_window"])
    return {"why": f"truncated BPTT: gradients flow through at most {w} steps",
            "command": _command(r, {"bptt-window": str(w)})}


def _lr_fix(r: Result, why: str) -> dict[str, str]:
    flags = {"lr": f"{r['trained_with']['lr'] / 10:g}"}
    if r.get("previous_checkpoint") and "--resume" in r["training_command"]:
        flags["resume"] = r["previous_checkpoint"]
        why += f" (from the previous checkpoint {r['previous_checkpoint']})"
    return {"why": why, "command": _command(r, flags)}


# ---------------------------------------------------------------- verdict


def verdict(r: Result) -> dict[str, Any]:
    """{status, healthy, title, reasons, fixes} of a diagnosis result."""
    for rule in (_data_rule, _forward_rule, _loss_rule, _chain_rule, _gradient_rule, _config_rule):
        found = rule(r)
        if found is not None:
            return {**found, "healthy": False}
    return {"status": "healthy", "healthy": True, "title": "HEALTHY", "reasons": _healthy_reasons(r), "fixes": []}


def _found(status: str, title: str, reasons: list[str], fixes: list[dict[str, str]]) -> dict[str, Any]:
    return {"status": status, "title": title, "reasons": reasons, "fixes": fixes}


def _data_rule(r: Result) -> dict[str, Any] | None:
    bad = r["data"]["nonfinite_samples"]
    if not bad:
        return None
    reasons = [f"{len(bad)} sample(s) hold NaN/Inf before the model sees them:", *bad[:5]]
    fix = {"why": "find every bad value in the dataset", "command": shlex.join(["noa-data", "check", r["dataset"]])}
    return _found("data_problem", "DATA PROBLEM", reasons, [fix])


def _forward_rule(r: Result) -> dict[str, Any] | None:
    f = r["forward"]
    if not f["nonfinite_total"]:
        return None
    first = f["first_nonfinite_step"]
    reasons = [f"the rollout itself diverges: {f['nonfinite_total']:,} predicted values are NaN/Inf, "
               f"the first at step {first} of {r['settings']['timesteps']}"]
    if first > 2:
        start, end = f["steps"][0], f["steps"][first - 2]
        reasons.append(f"max |u| grows from {_num(_absmax(start))} at step 1 to {_num(_absmax(end))} at step "
                       f"{first - 1} (targets stay within {_num(max(_absmax(t) for t in f['target']))})")
    reasons.append("the weights are already damaged; a shorter gradient window cannot repair the forward")
    return _found("nonfinite_forward", "NON-FINITE FORWARD", reasons, [_lr_fix(r, _LOWER_LR)])


def _loss_rule(r: Result) -> dict[str, Any] | None:
    if r["loss"]["finite"]:
        return None
    reasons = [f"L_traj = {_num(r['loss']['traj'])} while every prediction is finite: predictions "
               "so large that their squared error overflows"]
    return _found("nonfinite_loss", "NON-FINITE LOSS", reasons, [_lr_fix(r, _LOWER_LR)])


def _chain_rule(r: Result) -> dict[str, Any] | None:
    c, g = r["chain"], r["gradients"]
    gain, per_step = c["amplification"], c["growth_per_step"]  # NaN compares False: not evidence
    if not (gain > CHAIN_EXPLODES or (g["n_nonfinite"] and per_step > 1.0)):
        return None
    reasons = [f"the gradient grows back through the autoregressive chain: x{_num(gain)} over "
               f"{c['window']} steps (x{_num(per_step)} per step) while the forward stays finite"]
    reasons += _gradient_reasons(g)
    fixes = [_window_fix(r)]
    if per_step > STEP_UNSTABLE:
        reasons.append(f"a single step amplifies the gradient x{_num(per_step)}: the weights are unstable too")
        fixes.append(_lr_fix(r, "a 10x lower learning rate as well"))
    return _found("exploding_chain", "EXPLODING GRADIENTS THROUGH THE AUTOREGRESSIVE CHAIN", reasons, fixes)


def _gradient_rule(r: Result) -> dict[str, Any] | None:
    g = r["gradients"]
    if not (g["n_nonfinite"] or g["total_norm"] > GRAD_HUGE):
        return None
    c = r["chain"]
    chain = (f"the chain does not amplify (x{_num(c['amplification'])} over {c['window']} steps)"
             if math.isfinite(c["amplification"]) else "the chain gain cannot be measured (NaN gradients)")
    reasons = [*_gradient_reasons(g), f"{chain}, so a BPTT window is not the fix"]
    status = "nonfinite_gradients" if g["n_nonfinite"] else "huge_gradients"
    return _found(status, status.replace("_", " ").upper(), reasons, [_lr_fix(r, _LOWER_LR)])


def _config_rule(r: Result) -> dict[str, Any] | None:
    problems = [item["message"] for item in r["config_check"] if item["level"] == "problem"]
    if not problems:
        return None
    reasons = [*problems, "the gradients measured on these samples are still finite; the seed's run "
               "failed after ~1.6k batches of growth"]
    return _found("risky_config", "RISKY CONFIGURATION", reasons, [_window_fix(r)])


def _absmax(stats: dict[str, float]) -> float:
    return max(abs(stats["min"]), abs(stats["max"]))


def _gradient_reasons(g: Result) -> list[str]:
    reasons = [f"total gradient norm {_num(g['total_norm'])} (max per parameter {_num(g['norm_max'])})"]
    if g["n_nonfinite"]:
        reasons.append(f"non-finite gradients in {g['n_nonfinite']} of {g['n_params']} parameters")
    return reasons


def _healthy_reasons(r: Result) -> list[str]:
    c = r["chain"]
    notes = [f"forward finite, L_traj = {_num(r['loss']['traj'])}, gradient norm {_num(r['gradients']['total_norm'])}",
             f"chain gain x{_num(c['amplification'])} over {c['window']} steps (x{_num(c['growth_per_step'])} per step)"]
    if c["growth_per_step"] > CHAIN_GROWS and c["window"] < c["extrapolated_steps"]:
        notes.append(f"note: at this rate full BPTT through {c['extrapolated_steps']} steps would amplify "
                     f"x{_num(c['extrapolated_amplification'])}; keep the window")
    return notes


# ---------------------------------------------------------------- rendering


def to_json(r: Result) -> str:
    """Strict JSON: NaN/Inf become the strings "nan", "inf", "-inf"."""
    return json.dumps(_finite_json(r), indent=2, allow_nan=False)


def _finite_json(obj: Any) -> Any:
    if isinstance(obj, float) and not math.isfinite(obj):
        return str(obj)
    if isinstance(obj, dict):
        return {key: _finite_json(value) for key, value in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite_json(value) for value in obj]
    return obj


def _num(x: float | None) -> str:
    return "-" if x is None else f"{x:.3g}" if math.isfinite(x) else str(x)


def _mark(ok: bool) -> str:
    return "[ok]" if ok else "[!!]"


def render(r: Result) -> str:
    """The human report: six sections like the seed's diagnosis, then the verdict and fix."""
    sections = [_header(r), _config_section(r), _forward_section(r), _loss_section(r),
                _backward_section(r), _chain_section(r), _verdict_section(r)]
    return "\n\n".join(sections)


def _header(r: Result) -> str:
    s = r["settings"]
    window = "full BPTT (no --bptt-window)" if s["bptt_window"] is None else f"--bptt-window {s['bptt_window']} ({s['tbptt_mode']})"
    return (f"NOA training diagnosis\n  checkpoint  {r['checkpoint']} ({r['format']})\n"
            f"  data        {r['dataset']} split {r['split']}: {s['n_samples']} samples, batch {s['batch_size']}, "
            f"device {r['device']}\n  rollout     T={s['timesteps']}, {window}")


def _config_section(r: Result) -> str:
    lines = [f"  {'[!!]' if i['level'] == 'problem' else '[--]'} {i['message']}" for i in r["config_check"]]
    return "1. Configuration\n" + ("\n".join(lines) if lines else "  [ok] T, window and mode are consistent")


def _rows(n: int, keep: set[int], limit: int = 12) -> list[int]:
    """Row indices to print: all if few, else the ends, an even spread and `keep`."""
    if n <= limit:
        return list(range(n))
    spread = {round(i * (n - 1) / (limit - 1)) for i in range(limit)}
    return sorted(spread | {0, 1, n - 2, n - 1} | {k for k in keep if 0 <= k < n})


def _forward_section(r: Result) -> str:
    f = r["forward"]
    first = f["first_nonfinite_step"]
    head = f"  {'step':>5} {'min':>10} {'max':>10} {'mean':>10} {'std':>10} {'non-finite':>10}   target [min, max]"
    lines = ["2. Forward pass (predictions per rollout step)", head]
    for i in _rows(len(f["steps"]), {first - 1} if first else set()):
        p, t = f["steps"][i], f["target"][i]
        lines.append(f"  {p['step']:>5} {_num(p['min']):>10} {_num(p['max']):>10} {_num(p['mean']):>10} "
                     f"{_num(p['std']):>10} {p['nonfinite']:>10}   [{_num(t['min'])}, {_num(t['max'])}]")
    lows, highs = [p["min"] for p in f["steps"]], [p["max"] for p in f["steps"]]
    t_lows, t_highs = [t["min"] for t in f["target"]], [t["max"] for t in f["target"]]
    span = f"range [{_num(_nanmin(lows))}, {_num(_nanmax(highs))}] vs target [{_num(_nanmin(t_lows))}, {_num(_nanmax(t_highs))}]"
    if f["nonfinite_total"]:
        lines.append(f"  [!!] {f['nonfinite_total']:,} non-finite predicted values, first at step {first}; finite {span}")
    else:
        lines.append(f"  [ok] all predictions finite; {span}")
    bad = r["data"]["nonfinite_samples"]
    lines += [f"  [!!] input data: {b}" for b in bad] if bad else ["  [ok] inputs, targets and conditioning finite"]
    return "\n".join(lines)


def _nanmin(values: list[float]) -> float:
    finite = [v for v in values if not math.isnan(v)]
    return min(finite) if finite else math.nan


def _nanmax(values: list[float]) -> float:
    finite = [v for v in values if not math.isnan(v)]
    return max(finite) if finite else math.nan


def _loss_section(r: Result) -> str:
    loss = r["loss"]
    return f"3. Loss\n  {_mark(loss['finite'])} L_traj = {_num(loss['traj'])}"


def _backward_section(r: Result) -> str:
    g = r["gradients"]
    stats = "  ".join(f"{k} {_num(g[f'norm_{k}'])}" for k in ("min", "p50", "p90", "p99", "max"))
    lines = [f"4. Backward pass ({g['n_params']} parameters)", f"  gradient norm per parameter: {stats}",
             f"  total norm {_num(g['total_norm'])}; largest: "
             + ", ".join(f"{x['name']} {_num(x['norm'])}" for x in g["largest"][:3])]
    if g["n_nonfinite"]:
        everywhere = " (ALL of them)" if g["n_nonfinite"] == g["n_params"] - len(g["no_grad_params"]) else ""
        lines.append(f"  [!!] non-finite gradients in {g['n_nonfinite']} of {g['n_params']} parameters{everywhere}:")
        lines += textwrap.wrap(", ".join(g["nonfinite_params"]), 96, initial_indent="       ", subsequent_indent="       ")
    else:
        lines.append("  [ok] all gradients finite")
    if g["no_grad_params"]:
        lines.append(f"  [--] no gradient at all: {', '.join(g['no_grad_params'])}")
    return "\n".join(lines)


def _sparkline(values: list[float]) -> str:
    logs = [math.log10(v) if math.isfinite(v) and v > 0 else None for v in values]
    finite = [v for v in logs if v is not None]
    lo, hi = (min(finite), max(finite)) if finite else (0.0, 0.0)
    scale = (len(SPARK) - 1) / (hi - lo) if hi > lo else 0.0
    return "".join("!" if v is None else SPARK[round((v - lo) * scale)] for v in logs)


def _chain_section(r: Result) -> str:
    c, s = r["chain"], r["settings"]
    scope = f"full BPTT over {c['window']} steps" if s["bptt_window"] is None or s["bptt_window"] >= s["timesteps"] \
        else f"within each --bptt-window of {c['window']} steps"
    lines = [f"5. Gradient growth back through the autoregressive chain ({scope})",
             f"  {'depth':>5}  {'state':<7} {'|dL/du|':>10} {'chain gain':>11} {'x/step':>8}"]
    rows = c["depths"]
    for i in _rows(len(rows), set()):
        row = rows[i]
        state = "-" if row["state_step"] is None else f"u_{row['state_step']}"
        lines.append(f"  {row['depth']:>5}  {state:<7} {_num(row['grad_norm']):>10} {_num(row['chain_gain']):>11} "
                     f"{_num(row['growth']):>8}")
    lines.append(f"  chain gain by depth (log scale): {_sparkline([row['chain_gain'] for row in rows])}")
    ok = math.isfinite(c["amplification"]) and c["amplification"] <= CHAIN_EXPLODES
    lines.append(f"  {_mark(ok)} x{_num(c['amplification'])} over {c['window']} steps, x{_num(c['growth_per_step'])} per step"
                 f" (full BPTT through T={c['extrapolated_steps']} at this rate: x{_num(c['extrapolated_amplification'])})")
    return "\n".join(lines)


def _verdict_section(r: Result) -> str:
    v = r["verdict"]
    lines = [f"6. Verdict: {v['title']}", *(f"  - {reason}" for reason in v["reasons"])]
    if v["fixes"]:
        lines.append("\nRecommended fix:")
        for fix in v["fixes"]:
            lines += [f"  # {fix['why']}", f"  {fix['command']}"]
    return "\n".join(lines)
