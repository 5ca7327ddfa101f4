"""Training losses as pure functions of tensors: no modules, no state, no distributed code.

Each term is a scalar tensor with its graph; `combine` weights them into the total that
backward() sees, and `loss_terms` also returns detached copies for logging. Later terms
(L_commit, L_latent) are new functions here and new keys in the same dicts.
"""

from __future__ import annotations

from typing import NamedTuple

import torch.nn.functional as F
from torch import Tensor


class LossTerms(NamedTuple):
    """The weighted total (with graph) and each unweighted term (detached, for logging)."""

    total: Tensor
    terms: dict[str, Tensor]


def trajectory_mse(pred_BTCHW: Tensor, target_BTCHW: Tensor) -> Tensor:
    """L_traj: mean squared error over batch, steps, channels and space, computed in fp32."""
    if pred_BTCHW.shape != target_BTCHW.shape:
        raise ValueError(
            f"trajectory_mse: pred {tuple(pred_BTCHW.shape)} and target "
            f"{tuple(target_BTCHW.shape)} differ"
        )
    return F.mse_loss(pred_BTCHW.float(), target_BTCHW.float())


def combine(terms: dict[str, Tensor], weights: dict[str, float]) -> Tensor:
    """sum_k weights[k] * terms[k]; every term needs a weight, extra weights are ignored.

    Zero-weight terms are multiplied, not skipped, so every parameter stays in the graph and
    DDP sees the same set of used parameters on every step.
    """
    if not terms:
        raise ValueError("combine: no loss terms given")
    missing = sorted(set(terms) - set(weights))
    if missing:
        raise ValueError(f"combine: no weight for loss term(s) {missing}")
    not_scalar = sorted(name for name, term in terms.items() if term.ndim != 0)
    if not_scalar:
        raise ValueError(f"combine: loss term(s) {not_scalar} are not scalars")
    return sum(weights[name] * term for name, term in terms.items())


def loss_terms(terms: dict[str, Tensor], weights: dict[str, float]) -> LossTerms:
    """`combine` plus detached copies of the unweighted terms (no host sync)."""
    detached = {name: term.detach() for name, term in terms.items()}
    return LossTerms(total=combine(terms, weights), terms=detached)
