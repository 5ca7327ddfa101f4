"""Truncated backpropagation through time (TBPTT) for autoregressive rollouts.

Backpropagating through hundreds of autoregressive steps multiplies hundreds of Jacobians:
in the prototype the gradient norm grew from 1e3 to inf over ~1.6k batches while the forward
stayed finite. TBPTT bounds both the gradient path and the activation memory by a window W.

`iter_windows` yields windows; for each one the caller computes its loss terms and calls
backward before asking for the next window. Nothing here knows about optimizers or processes. Step indices are 0-based over the T
predicted states u_1..u_T: window [start, stop) predicts targets[:, start:stop].

Modes (flag --tbptt-mode):
  "last"         T-W warm-up steps without a graph, then one window of W steps with gradients.
                 Only the last W states are supervised (the seed's behaviour).
  "all-windows"  ceil(T/W) windows, each starting from the previous window's detached last
                 state: every state is supervised, memory still bounded by W.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import NamedTuple

import torch
from torch import Tensor

from noa_dist.models.uafno import StepOutput

TBPTT_MODES = ("last", "all-windows")
FULL_BPTT_WARN_ABOVE = 32  # full BPTT beyond this many steps is what blew up the prototype

StepFn = Callable[[Tensor], StepOutput]


class Window(NamedTuple):
    """Steps [start, stop) of a rollout with their graph: what a loss function sees.

    `micro` and `step` locate the window in training (set by the step, 0 elsewhere), so a
    skip report or a fault injection can name it.
    """

    start: int
    stop: int
    pred_BTCHW: Tensor  # [B, stop - start, C, H, W] fp32
    bottleneck: tuple[Tensor, ...]  # per step: the features its state was decoded from
    input_BCHW: Tensor  # the (detached) state the window starts from
    index: int = 0  # window number within the micro-step (0-based)
    micro: int = 0  # micro-step within the optimizer step (0-based)
    step: int = 0  # optimizer step (1-based in training)


def iter_windows(
    step_fn: StepFn,
    u0_BCHW: Tensor,
    n_steps: int,
    window: int | None,
    mode: str = "last",
) -> Iterator[Window]:
    """Roll `step_fn` out for `n_steps` steps from u0, yielding the windows that carry gradients.

    `window` None or >= n_steps means full BPTT: one window of n_steps starting at u0 itself
    (so gradients reach u0 if it requires them). Windows run in the caller's grad mode; the
    warm-up of "last" mode always runs under no_grad. The generator drops each window before
    building the next, so at most one window's graph is alive on its side.
    """
    problems = validate_bptt(n_steps, window, mode, allow_window_above_steps=True)
    if problems:
        raise ValueError("; ".join(problems))
    length = n_steps if window is None else min(window, n_steps)
    if mode == "last":
        u_BCHW = _warm_up(step_fn, u0_BCHW, n_steps - length)
        yield _unroll(step_fn, u_BCHW, n_steps - length, n_steps, index=0)
        return
    u_BCHW = u0_BCHW
    for index, start in enumerate(range(0, n_steps, length)):
        window_ = _unroll(step_fn, u_BCHW, start, min(start + length, n_steps), index)
        # the next window starts a fresh graph; a copy, so the stacked window can be freed
        u_BCHW = window_.pred_BTCHW[:, -1].detach().clone()
        yield window_
        del window_  # do not keep the previous window alive while building the next


def count_windows(n_steps: int, window: int | None, mode: str) -> int:
    """How many windows `iter_windows` yields for these settings."""
    if mode == "last" or window is None or window >= n_steps:
        return 1
    return -(-n_steps // window)


@torch.no_grad()
def rollout_states(step_fn: StepFn, u0_BCHW: Tensor, n_steps: int) -> Tensor:
    """Autoregressive rollout without a graph (evaluation): [B, n_steps, C, H, W] fp32."""
    return _unroll(step_fn, u0_BCHW, 0, n_steps, index=0).pred_BTCHW


def window_loss_weight(window: Window, n_steps: int, mode: str) -> float:
    """Weight so that sum_w weight_w * mean_loss(w) is the mean over all supervised steps."""
    if mode == "last":
        return 1.0
    return (window.stop - window.start) / n_steps


def validate_bptt(
    timesteps: int,
    bptt_window: int | None,
    mode: str,
    allow_window_above_steps: bool = False,
) -> list[str]:
    """All problems with --timesteps / --bptt-window / --tbptt-mode, as messages (empty if ok)."""
    problems = []
    if timesteps < 1:
        problems.append(f"--timesteps={timesteps}: must be >= 1")
    if mode not in TBPTT_MODES:
        problems.append(f"--tbptt-mode={mode!r}: expected one of {', '.join(TBPTT_MODES)}")
    if bptt_window is not None and bptt_window < 1:
        problems.append(f"--bptt-window={bptt_window}: must be >= 1 (omit it for full BPTT)")
    elif bptt_window is not None and bptt_window > timesteps and not allow_window_above_steps:
        problems.append(
            f"--bptt-window={bptt_window} is larger than --timesteps={timesteps}: "
            "use a window <= timesteps, or omit --bptt-window for full BPTT"
        )
    return problems


def bptt_warning(timesteps: int, bptt_window: int | None, mode: str = "last") -> str | None:
    """A warning for valid but risky settings, or None."""
    if bptt_window is None and timesteps > FULL_BPTT_WARN_ABOVE:
        return (
            f"timesteps={timesteps} without --bptt-window: backpropagating through "
            f"{timesteps} autoregressive steps makes gradients explode (see docs); "
            f"add --bptt-window {FULL_BPTT_WARN_ABOVE}"
        )
    if bptt_window is not None and bptt_window < timesteps and mode == "last":
        return (
            f"--tbptt-mode=last supervises only the last {bptt_window} of {timesteps} steps; "
            "--tbptt-mode all-windows supervises every step at the same memory"
        )
    return None


def _warm_up(step_fn: StepFn, u_BCHW: Tensor, steps: int) -> Tensor:
    """Advance `steps` steps without building a graph; returns a state with no history."""
    with torch.no_grad():
        for _ in range(steps):
            u_BCHW = step_fn(u_BCHW).state
    return u_BCHW


def _unroll(step_fn: StepFn, u_BCHW: Tensor, start: int, stop: int, index: int) -> Window:
    """Steps [start, stop) from state u in the ambient grad mode."""
    input_BCHW, states, features = u_BCHW.detach(), [], []
    for _ in range(start, stop):
        out = step_fn(u_BCHW)
        u_BCHW = out.state
        states.append(out.state)
        features.append(out.bottleneck)
    return Window(start, stop, torch.stack(states, dim=1), tuple(features), input_BCHW, index)
