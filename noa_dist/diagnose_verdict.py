"""The verdict of `noa-diagnose`: which failure the measurements show, and the command that fixes it.

`verdict(result)` is a pure function of the result dict (see `noa_dist.diagnose`): the first
rule that fires names the failure, in causal order: bad data makes everything non-finite,
a diverging forward makes the loss and gradients non-finite, and only with a finite forward
and loss do exploding gradients point at the autoregressive chain (fix: a BPTT window) or,
when the chain does not amplify, at the weights and step size (fix: a lower --lr).
"""

from __future__ import annotations

import math
import shlex
from typing import Any

CHAIN_EXPLODES = 1e3  # chain gain over one gradient window that counts as an explosion
CHAIN_GROWS = 1.1  # per-step chain gain worth a note (x1.1 per step is x1e10 over 256 steps)
STEP_UNSTABLE = 10.0  # per-step gain of a single step: the weights themselves are unstable
GRAD_HUGE = 1e4  # total gradient norm (L_traj on normalised data is O(1))
SAFE_WINDOW = 32  # the prototype's working window; also rollout.FULL_BPTT_WARN_ABOVE
_LOWER_LR = "a 10x lower learning rate: the updates drove the weights into an unstable region"

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
    return {
        "why": f"truncated BPTT: gradients flow through at most {w} steps",
        "command": _command(r, {"bptt-window": str(w)}),
    }


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
    return {
        "status": "healthy",
        "healthy": True,
        "title": "HEALTHY",
        "reasons": _healthy_reasons(r),
        "fixes": [],
    }


def _found(
    status: str, title: str, reasons: list[str], fixes: list[dict[str, str]]
) -> dict[str, Any]:
    return {"status": status, "title": title, "reasons": reasons, "fixes": fixes}


def _data_rule(r: Result) -> dict[str, Any] | None:
    bad = r["data"]["nonfinite_samples"]
    if not bad:
        return None
    reasons = [f"{len(bad)} sample(s) hold NaN/Inf before the model sees them:", *bad[:5]]
    fix = {
        "why": "find every bad value in the dataset",
        "command": shlex.join(["noa-data", "check", r["dataset"]]),
    }
    return _found("data_problem", "DATA PROBLEM", reasons, [fix])


def _forward_rule(r: Result) -> dict[str, Any] | None:
    f = r["forward"]
    if not f["nonfinite_total"]:
        return None
    first = f["first_nonfinite_step"]
    reasons = [
        f"the rollout itself diverges: {f['nonfinite_total']:,} predicted values are NaN/Inf, "
        f"the first at step {first} of {r['settings']['timesteps']}"
    ]
    if first > 2:
        start, end = f["steps"][0], f["steps"][first - 2]
        reasons.append(
            f"max |u| grows from {fmt(_absmax(start))} at step 1 to {fmt(_absmax(end))} at step "
            f"{first - 1} (targets stay within {fmt(max(_absmax(t) for t in f['target']))})"
        )
    reasons.append(
        "the weights are already damaged; a shorter gradient window cannot repair the forward"
    )
    return _found("nonfinite_forward", "NON-FINITE FORWARD", reasons, [_lr_fix(r, _LOWER_LR)])


def _loss_rule(r: Result) -> dict[str, Any] | None:
    if r["loss"]["finite"]:
        return None
    reasons = [
        f"L_traj = {fmt(r['loss']['traj'])} while every prediction is finite: predictions "
        "so large that their squared error overflows"
    ]
    return _found("nonfinite_loss", "NON-FINITE LOSS", reasons, [_lr_fix(r, _LOWER_LR)])


def _chain_rule(r: Result) -> dict[str, Any] | None:
    c, g = r["chain"], r["gradients"]
    gain, per_step = c["amplification"], c["growth_per_step"]  # NaN compares False: not evidence
    if not (gain > CHAIN_EXPLODES or (g["n_nonfinite"] and per_step > 1.0)):
        return None
    reasons = [
        f"the gradient grows back through the autoregressive chain: x{fmt(gain)} over "
        f"{c['window']} steps (x{fmt(per_step)} per step) while the forward stays finite"
    ]
    reasons += _gradient_reasons(g)
    fixes = [_window_fix(r)]
    if per_step > STEP_UNSTABLE:
        reasons.append(
            f"a single step amplifies the gradient x{fmt(per_step)}: the weights are unstable too"
        )
        fixes.append(_lr_fix(r, "a 10x lower learning rate as well"))
    return _found(
        "exploding_chain", "EXPLODING GRADIENTS THROUGH THE AUTOREGRESSIVE CHAIN", reasons, fixes
    )


def _gradient_rule(r: Result) -> dict[str, Any] | None:
    g = r["gradients"]
    if not (g["n_nonfinite"] or g["total_norm"] > GRAD_HUGE):
        return None
    c = r["chain"]
    chain = (
        f"the chain does not amplify (x{fmt(c['amplification'])} over {c['window']} steps)"
        if math.isfinite(c["amplification"])
        else "the chain gain cannot be measured (NaN gradients)"
    )
    reasons = [*_gradient_reasons(g), f"{chain}, so a BPTT window is not the fix"]
    status = "nonfinite_gradients" if g["n_nonfinite"] else "huge_gradients"
    return _found(status, status.replace("_", " ").upper(), reasons, [_lr_fix(r, _LOWER_LR)])


def _config_rule(r: Result) -> dict[str, Any] | None:
    problems = [item["message"] for item in r["config_check"] if item["level"] == "problem"]
    if not problems:
        return None
    reasons = [
        *problems,
        "the gradients measured on these samples are still finite; the seed's run "
        "failed after ~1.6k batches of growth",
    ]
    return _found("risky_config", "RISKY CONFIGURATION", reasons, [_window_fix(r)])


def _absmax(stats: dict[str, float]) -> float:
    return max(abs(stats["min"]), abs(stats["max"]))


def _gradient_reasons(g: Result) -> list[str]:
    reasons = [
        f"total gradient norm {fmt(g['total_norm'])} (max per parameter {fmt(g['norm_max'])})"
    ]
    if g["n_nonfinite"]:
        reasons.append(f"non-finite gradients in {g['n_nonfinite']} of {g['n_params']} parameters")
    return reasons


def _healthy_reasons(r: Result) -> list[str]:
    c = r["chain"]
    notes = [
        f"forward finite, L_traj = {fmt(r['loss']['traj'])}, gradient norm {fmt(r['gradients']['total_norm'])}",
        f"chain gain x{fmt(c['amplification'])} over {c['window']} steps (x{fmt(c['growth_per_step'])} per step)",
    ]
    if c["growth_per_step"] > CHAIN_GROWS and c["window"] < c["extrapolated_steps"]:
        notes.append(
            f"note: at this rate full BPTT through {c['extrapolated_steps']} steps would amplify "
            f"x{fmt(c['extrapolated_amplification'])}; keep the window"
        )
    return notes


def fmt(x: float | None) -> str:
    """A number for the report: 3 significant digits, nan/inf spelled out, None as '-'."""
    return "-" if x is None else f"{x:.3g}" if math.isfinite(x) else str(x)
