"""Documented debug fault injection: check skip-together and atomic saves on your own setup.

`--debug-inject-nan SPEC[,SPEC...]` wraps the loss function (the step knows nothing of it):
SPEC = RANK:STEP[:TARGET][:micro=M][:window=K], with STEP the 1-based optimizer step, M and K
1-based (default: every micro-step and window of that step) and TARGET
  loss   the first loss term (L_traj) becomes NaN (default)
  grad   the loss stays finite, the gradient through the prediction becomes NaN
  NAME   that loss term becomes NaN (e.g. traj)
e.g. `1:3:micro=1` (rank 1, step 3, first micro-step), `0:5:grad:window=2`.
`--debug-hang-in-save STEP` stalls inside that step's checkpoint save until killed, so a test
can kill a job mid-write.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from noa_dist.rollout import Window

SPEC_HELP = "RANK:STEP[:loss|grad|TERM][:micro=M][:window=K], several separated by commas"


@dataclass(frozen=True)
class NanInjection:
    rank: int
    step: int  # optimizer step, 1-based
    target: str  # "loss", "grad" or a loss term name
    micro: int | None = None  # 1-based; None = every micro-step
    window: int | None = None  # 1-based; None = every window

    def hits(self, rank: int, window: Window) -> bool:
        return (
            rank == self.rank
            and window.step == self.step
            and self.micro in (None, window.micro + 1)
            and self.window in (None, window.index + 1)
        )


def parse_nan_injections(spec: str) -> list[NanInjection]:
    """'1:3', '1:3:grad:micro=2', '1:3:loss,0:3:grad' -> injections; ValueError naming the flag."""
    try:
        return [_parse_one(part) for part in spec.split(",")]
    except ValueError:
        raise ValueError(f"--debug-inject-nan: expected {SPEC_HELP}, got {spec!r}") from None


def _parse_one(text: str) -> NanInjection:
    rank, step, *rest = text.strip().split(":")
    fields: dict[str, str] = {}
    target = "loss"
    for token in rest:
        key, sep, value = token.partition("=")
        if sep:
            fields[key] = value
        elif token:
            target = token
    if set(fields) - {"micro", "window"} or int(rank) < 0 or int(step) < 1:
        raise ValueError(text)
    where = {key: int(value) for key, value in fields.items()}
    if any(value < 1 for value in where.values()):
        raise ValueError(text)
    return NanInjection(int(rank), int(step), target, **where)


class _PoisonGradient(torch.autograd.Function):
    """Identity forward, NaN gradient backward: a non-finite gradient with a finite loss."""

    @staticmethod
    def forward(ctx, x):
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return grad * math.nan


LossFn = Callable[[Window, dict], dict[str, torch.Tensor]]


def with_nan_injection(loss_fn: LossFn, injections: list[NanInjection], rank: int) -> LossFn:
    """`loss_fn` with this rank's injections applied; `loss_fn` itself when there are none."""
    mine = [injection for injection in injections if injection.rank == rank]
    if not mine:
        return loss_fn

    def injected(window: Window, batch: dict) -> dict[str, torch.Tensor]:
        hits = [injection for injection in mine if injection.hits(rank, window)]
        if any(injection.target == "grad" for injection in hits):
            window = window._replace(pred_BTCHW=_PoisonGradient.apply(window.pred_BTCHW))
        terms = dict(loss_fn(window, batch))
        for injection in hits:
            if injection.target != "grad":
                name = next(iter(terms)) if injection.target == "loss" else injection.target
                if name not in terms:
                    raise ValueError(
                        f"--debug-inject-nan: no loss term {name!r} (terms: {', '.join(terms)})"
                    )
                terms[name] = terms[name] * math.nan
        return terms

    return injected


def hang_in_save_hook(step: int, current_step: Callable[[], int]):
    """A save-state pre-hook for `Accelerator.register_save_state_pre_hook`: stall forever
    inside the save of optimizer step `step`."""

    def hook(_models, _weights, output_dir: str) -> None:
        if current_step() == step:
            print(
                f"debug: hanging inside the checkpoint save of step {step} ({output_dir}) until killed",
                flush=True,
            )
            while True:
                time.sleep(3600)

    return hook
