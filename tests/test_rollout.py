"""Truncated BPTT windows: which steps carry gradients, what memory the graph holds, coverage,
loss weights, and the config checks."""

from __future__ import annotations

import weakref

import pytest
import torch
from torch import nn

from noa_dist.losses import trajectory_mse
from noa_dist.models.uafno import StepOutput
from noa_dist.rollout import (
    bptt_warning,
    count_windows,
    iter_windows,
    rollout_states,
    validate_bptt,
    window_loss_weight,
)


class Stepper(nn.Module):
    """A small real autoregressive step, u -> u + 0.1 tanh(conv(u)); records grad mode per call."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(2, 2, 3, padding=1, padding_mode="circular")
        self.grad_enabled_per_call: list[bool] = []

    def forward(self, u_BCHW: torch.Tensor) -> StepOutput:
        self.grad_enabled_per_call.append(torch.is_grad_enabled())
        features_BCHW = torch.tanh(self.conv(u_BCHW))
        return StepOutput(u_BCHW + 0.1 * features_BCHW, features_BCHW)


def _u0(requires_grad: bool = False) -> torch.Tensor:
    torch.manual_seed(1)
    return torch.randn(2, 2, 8, 8, requires_grad=requires_grad)


def _saved_tensor_count(n_steps: int, window: int | None, mode: str) -> int:
    """Tensors autograd saves for backward over the whole generator run (graphs kept alive)."""
    step, count, windows = Stepper(), 0, []

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        nonlocal count
        count += 1
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        for w in iter_windows(step, _u0(), n_steps, window, mode):
            windows.append(w)  # keep every graph alive: counts what one batch would hold
    return count


def test_last_mode_warms_up_without_graph_then_runs_one_window_with_grad():
    step = Stepper()
    windows = list(iter_windows(step, _u0(), n_steps=10, window=4, mode="last"))
    assert [(w.start, w.stop) for w in windows] == [(6, 10)]
    assert step.grad_enabled_per_call == [False] * 6 + [True] * 4
    assert windows[0].pred_BTCHW.shape == (2, 4, 2, 8, 8)


def test_last_mode_gradient_does_not_reach_the_initial_state():
    u0 = _u0(requires_grad=True)
    step = Stepper()
    (window,) = iter_windows(step, u0, n_steps=10, window=4, mode="last")
    loss = window.pred_BTCHW.square().mean()
    grad_u0, grad_weight = torch.autograd.grad(loss, [u0, step.conv.weight], allow_unused=True)
    assert grad_u0 is None  # the warm-up state is detached
    assert grad_weight is not None and grad_weight.abs().sum() > 0


def test_full_bptt_without_window_reaches_the_initial_state():
    u0 = _u0(requires_grad=True)
    (window,) = iter_windows(Stepper(), u0, n_steps=6, window=None)
    assert (window.start, window.stop) == (0, 6)
    (grad_u0,) = torch.autograd.grad(window.pred_BTCHW.square().mean(), [u0])
    assert grad_u0.abs().sum() > 0


def test_window_as_long_as_the_rollout_is_full_bptt():
    windows = list(iter_windows(Stepper(), _u0(), n_steps=5, window=9, mode="all-windows"))
    assert [(w.start, w.stop) for w in windows] == [(0, 5)]


def test_warm_up_memory_does_not_grow_with_rollout_length():
    assert _saved_tensor_count(8, 4, "last") == _saved_tensor_count(32, 4, "last") > 0


def test_full_bptt_memory_grows_linearly_with_rollout_length():
    assert _saved_tensor_count(16, None, "last") == 2 * _saved_tensor_count(8, None, "last")


def test_all_windows_cover_every_step_exactly_once():
    windows = list(iter_windows(Stepper(), _u0(), n_steps=10, window=4, mode="all-windows"))
    assert [(w.start, w.stop) for w in windows] == [(0, 4), (4, 8), (8, 10)]
    assert [w.pred_BTCHW.shape[1] for w in windows] == [4, 4, 2]


def test_all_windows_cut_the_graph_between_windows():
    u0 = _u0(requires_grad=True)
    first, second = iter_windows(Stepper(), u0, n_steps=8, window=4, mode="all-windows")
    (grad_first,) = torch.autograd.grad(first.pred_BTCHW.sum(), [u0])
    assert grad_first.abs().sum() > 0
    (grad_second,) = torch.autograd.grad(second.pred_BTCHW.sum(), [u0], allow_unused=True)
    assert grad_second is None


def test_windows_reproduce_the_plain_rollout():
    step, u0 = Stepper(), _u0()
    with torch.no_grad():
        states, u = [], u0
        for _ in range(7):
            u = step(u).state
            states.append(u)
        expected_BTCHW = torch.stack(states, dim=1)
        windows = list(iter_windows(step, u0, n_steps=7, window=3, mode="all-windows"))
        (last,) = iter_windows(step, u0, n_steps=7, window=3, mode="last")
    torch.testing.assert_close(torch.cat([w.pred_BTCHW for w in windows], dim=1), expected_BTCHW)
    torch.testing.assert_close(last.pred_BTCHW, expected_BTCHW[:, 4:])
    torch.testing.assert_close(rollout_states(step, u0, 7), expected_BTCHW)


def test_windows_carry_their_bottleneck_input_and_index():
    step, u0 = Stepper(), _u0()
    windows = list(iter_windows(step, u0, n_steps=7, window=3, mode="all-windows"))
    assert (
        [w.index for w in windows] == [0, 1, 2] == list(range(count_windows(7, 3, "all-windows")))
    )
    assert [len(w.bottleneck) for w in windows] == [3, 3, 1]
    torch.testing.assert_close(windows[0].input_BCHW, u0)
    torch.testing.assert_close(windows[1].input_BCHW, windows[0].pred_BTCHW[:, -1])
    assert not windows[1].input_BCHW.requires_grad
    with torch.no_grad():
        torch.testing.assert_close(windows[2].bottleneck[0], step(windows[2].input_BCHW).bottleneck)
    assert count_windows(7, 3, "last") == count_windows(7, None, "all-windows") == 1


def test_previous_window_is_freed_before_the_next_one_is_built():
    step, first_pred = Stepper(), None
    alive_during_next_window: list[bool] = []

    def step_fn(u_BCHW: torch.Tensor) -> StepOutput:
        if first_pred is not None:  # refcounting frees it at once: no gc.collect() needed
            alive_during_next_window.append(first_pred() is not None)
        return step(u_BCHW)

    windows = iter_windows(step_fn, _u0(), n_steps=8, window=4, mode="all-windows")
    first = next(windows)
    first.pred_BTCHW.mean().backward()
    first_pred = weakref.ref(first.pred_BTCHW)
    del first
    next(windows)
    assert alive_during_next_window == [False] * 4


@pytest.mark.parametrize(("mode", "n_steps", "window"), [("all-windows", 10, 4), ("last", 10, 4)])
def test_weighted_window_losses_sum_to_the_mean_over_supervised_steps(mode, n_steps, window):
    torch.manual_seed(2)
    target_BTCHW = torch.randn(2, n_steps, 2, 8, 8)
    with torch.no_grad():
        windows = list(iter_windows(Stepper(), _u0(), n_steps, window, mode))
    total = sum(
        window_loss_weight(w, n_steps, mode)
        * trajectory_mse(w.pred_BTCHW, target_BTCHW[:, w.start : w.stop])
        for w in windows
    )
    supervised = torch.cat([w.pred_BTCHW for w in windows], dim=1)
    first = windows[0].start
    torch.testing.assert_close(total, trajectory_mse(supervised, target_BTCHW[:, first:]))


def test_validate_reports_every_problem_at_once():
    problems = validate_bptt(0, -1, "sometimes")
    assert len(problems) == 3
    assert any("--timesteps=0" in p for p in problems)
    assert any("--tbptt-mode='sometimes'" in p for p in problems)
    assert any("--bptt-window=-1" in p for p in problems)


def test_validate_rejects_window_longer_than_rollout_and_accepts_good_settings():
    (problem,) = validate_bptt(16, 32, "last")
    assert "--bptt-window=32 is larger than --timesteps=16" in problem
    assert validate_bptt(256, 32, "all-windows") == [] and validate_bptt(16, None, "last") == []


def test_invalid_window_raises_when_iterated():
    with pytest.raises(ValueError, match="--bptt-window=0"):
        next(iter_windows(Stepper(), _u0(), n_steps=4, window=0))


def test_long_full_bptt_warns_and_suggests_a_window():
    warning = bptt_warning(256, None)
    assert warning.startswith("timesteps=256 without --bptt-window")
    assert "add --bptt-window 32" in warning
    assert bptt_warning(32, None) is None
    assert bptt_warning(256, 32, "all-windows") is None


def test_last_mode_warns_that_early_steps_are_unsupervised():
    assert "only the last 32 of 256" in bptt_warning(256, 32, "last")


def test_benchmark_memory_is_flat_in_rollout_length_under_tbptt_and_linear_without():
    from noa_dist.bench.memory import activation_peak

    model = Stepper()
    saved = {}
    for mode, window in (("last", 4), ("all-windows", 4), ("full", None)):
        for n_steps in (8, 16):
            target_BTCHW = torch.zeros(2, n_steps, 2, 8, 8)
            row = activation_peak(model, {"u0": _u0(), "target": target_BTCHW}, window, mode)
            saved[mode, n_steps] = row["saved_bytes"]
    assert saved["last", 8] == saved["last", 16] == saved["all-windows", 16] > 0
    assert saved["full", 16] == 2 * saved["full", 8] == 4 * saved["last", 8]
