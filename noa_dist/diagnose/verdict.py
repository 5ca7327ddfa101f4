"""The verdict of `noa-diagnose`: which failure the measurements show, and the command that fixes it.

`verdict(findings)` is a pure function of the typed findings (`result.Findings`): the first
rule that fires names the failure, in causal order: bad data makes everything non-finite,
a diverging forward makes the loss and gradients non-finite, and only with a finite forward
and loss do exploding gradients point at the autoregressive chain (fix: a BPTT window) or,
when the chain does not amplify, at the weights and step size (fix: a lower --lr).
"""

from __future__ import annotations

import math
import shlex

from noa_dist.diagnose.commands import with_flags
from noa_dist.diagnose.result import Findings, Fix, GradientSummary, StepStats, Verdict

CHAIN_EXPLODES = 1e3  # chain gain over one gradient window that counts as an explosion
CHAIN_GROWS = 1.1  # per-step chain gain worth a note (x1.1 per step is x1e10 over 256 steps)
STEP_UNSTABLE = 10.0  # per-step gain of a single step: the weights themselves are unstable
GRAD_HUGE = 1e4  # total gradient norm (L_traj on normalised data is O(1))
SAFE_WINDOW = 32  # the prototype's working window; also rollout.FULL_BPTT_WARN_ABOVE
_LOWER_LR = "a 10x lower learning rate: the updates drove the weights into an unstable region"


# ---------------------------------------------------------------- numbers and commands


def recommended_window(timesteps: int, window: int | None) -> int:
    """32 for long rollouts, half of T for short ones, half the current window if one is set."""
    if window is None or window >= timesteps:
        return SAFE_WINDOW if timesteps > SAFE_WINDOW else max(1, timesteps // 2)
    return max(1, window // 2)


def _command(f: Findings, flags: dict[str, str | None]) -> str:
    """The training command with `flags` set, plus the diagnosed T/mode if they differ."""
    s, trained = f.settings, f.trained_with
    extra = {}
    if s.timesteps != trained.timesteps:
        extra["timesteps"] = str(s.timesteps)
    if s.tbptt_mode != trained.tbptt_mode:
        extra["tbptt-mode"] = s.tbptt_mode
    words = shlex.split(f.training_command)  # "accelerate launch noa_dist/train.py" + flags
    return shlex.join([*words[:3], *with_flags(words[3:], {**extra, **flags})])


def _window_fix(f: Findings) -> Fix:
    w = recommended_window(f.settings.timesteps, f.settings.bptt_window)
    return Fix(
        f"truncated BPTT: gradients flow through at most {w} steps",
        _command(f, {"bptt-window": str(w)}),
    )


def _lr_fix(f: Findings, why: str) -> Fix:
    flags = {"lr": f"{f.trained_with.lr / 10:g}"}
    if f.previous_checkpoint and "--resume" in f.training_command:
        flags["resume"] = f.previous_checkpoint
        why += f" (from the previous checkpoint {f.previous_checkpoint})"
    return Fix(why, _command(f, flags))


# ---------------------------------------------------------------- verdict


def verdict(f: Findings) -> Verdict:
    """The first rule that fires, in causal order; healthy when none does."""
    for rule in (_data_rule, _forward_rule, _loss_rule, _chain_rule, _gradient_rule, _config_rule):
        found = rule(f)
        if found is not None:
            return found
    return Verdict("healthy", True, "HEALTHY", _healthy_reasons(f), [])


def _found(status: str, title: str, reasons: list[str], fixes: list[Fix]) -> Verdict:
    return Verdict(status, False, title, reasons, fixes)


def _data_rule(f: Findings) -> Verdict | None:
    bad = f.data.nonfinite_samples
    if not bad:
        return None
    reasons = [f"{len(bad)} sample(s) hold NaN/Inf before the model sees them:", *bad[:5]]
    fix = Fix("find every bad value in the dataset", shlex.join(["noa-data", "check", f.dataset]))
    return _found("data_problem", "DATA PROBLEM", reasons, [fix])


def _forward_rule(f: Findings) -> Verdict | None:
    fw = f.forward
    if not fw.nonfinite_total:
        return None
    first = fw.first_nonfinite_step
    reasons = [
        f"the rollout itself diverges: {fw.nonfinite_total:,} predicted values are NaN/Inf, "
        f"the first at step {first} of {f.settings.timesteps}"
    ]
    if first > 2:
        start, end = fw.steps[0], fw.steps[first - 2]
        reasons.append(
            f"max |u| grows from {fmt(_absmax(start))} at step 1 to {fmt(_absmax(end))} at step "
            f"{first - 1} (targets stay within {fmt(max(_absmax(t) for t in fw.target))})"
        )
    reasons.append(
        "the weights are already damaged; a shorter gradient window cannot repair the forward"
    )
    return _found("nonfinite_forward", "NON-FINITE FORWARD", reasons, [_lr_fix(f, _LOWER_LR)])


def _loss_rule(f: Findings) -> Verdict | None:
    if f.loss.finite:
        return None
    reasons = [
        f"L_traj = {fmt(f.loss.traj)} while every prediction is finite: predictions "
        "so large that their squared error overflows"
    ]
    return _found("nonfinite_loss", "NON-FINITE LOSS", reasons, [_lr_fix(f, _LOWER_LR)])


def _chain_rule(f: Findings) -> Verdict | None:
    c, g = f.chain, f.gradients
    gain, per_step = c.amplification, c.growth_per_step  # NaN compares False: not evidence
    if not (gain > CHAIN_EXPLODES or (g.n_nonfinite and per_step > 1.0)):
        return None
    reasons = [
        f"the gradient grows back through the autoregressive chain: x{fmt(gain)} over "
        f"{c.window} steps (x{fmt(per_step)} per step) while the forward stays finite"
    ]
    reasons += _gradient_reasons(g)
    fixes = [_window_fix(f)]
    if per_step > STEP_UNSTABLE:
        reasons.append(
            f"a single step amplifies the gradient x{fmt(per_step)}: the weights are unstable too"
        )
        fixes.append(_lr_fix(f, "a 10x lower learning rate as well"))
    return _found(
        "exploding_chain", "EXPLODING GRADIENTS THROUGH THE AUTOREGRESSIVE CHAIN", reasons, fixes
    )


def _gradient_rule(f: Findings) -> Verdict | None:
    g, c = f.gradients, f.chain
    if not (g.n_nonfinite or g.total_norm > GRAD_HUGE):
        return None
    chain = (
        f"the chain does not amplify (x{fmt(c.amplification)} over {c.window} steps)"
        if math.isfinite(c.amplification)
        else "the chain gain cannot be measured (NaN gradients)"
    )
    reasons = [*_gradient_reasons(g), f"{chain}, so a BPTT window is not the fix"]
    status = "nonfinite_gradients" if g.n_nonfinite else "huge_gradients"
    return _found(status, status.replace("_", " ").upper(), reasons, [_lr_fix(f, _LOWER_LR)])


def _config_rule(f: Findings) -> Verdict | None:
    problems = [item.message for item in f.config_check if item.level == "problem"]
    if not problems:
        return None
    reasons = [
        *problems,
        "the gradients measured on these samples are still finite; the seed's run "
        "failed after ~1.6k batches of growth",
    ]
    return _found("risky_config", "RISKY CONFIGURATION", reasons, [_window_fix(f)])


def _absmax(stats: StepStats) -> float:
    return max(abs(stats.min), abs(stats.max))


def _gradient_reasons(g: GradientSummary) -> list[str]:
    reasons = [f"total gradient norm {fmt(g.total_norm)} (max per parameter {fmt(g.norm_max)})"]
    if g.n_nonfinite:
        reasons.append(f"non-finite gradients in {g.n_nonfinite} of {g.n_params} parameters")
    return reasons


def _healthy_reasons(f: Findings) -> list[str]:
    c = f.chain
    notes = [
        f"forward finite, L_traj = {fmt(f.loss.traj)}, gradient norm {fmt(f.gradients.total_norm)}",
        f"chain gain x{fmt(c.amplification)} over {c.window} steps (x{fmt(c.growth_per_step)} per step)",
    ]
    if c.growth_per_step > CHAIN_GROWS and c.window < c.extrapolated_steps:
        notes.append(
            f"note: at this rate full BPTT through {c.extrapolated_steps} steps would amplify "
            f"x{fmt(c.extrapolated_amplification)}; keep the window"
        )
    return notes


def fmt(x: float | None) -> str:
    """A number for the report: 3 significant digits, nan/inf spelled out, None as '-'."""
    return "-" if x is None else f"{x:.3g}" if math.isfinite(x) else str(x)
