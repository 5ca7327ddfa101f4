"""Training losses as pure functions of tensors: no modules, no state, no distributed code.

Each term is a scalar tensor with its graph; `combine` weights them into the total that
backward() sees. The trainer's loss function (build.py) returns them by name: traj, commit,
latent.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor

from noa_dist.metrics import vrmse_squared


def trajectory_mse(pred_BTCHW: Tensor, target_BTCHW: Tensor) -> Tensor:
    """L_traj: mean squared error over batch, steps, channels and space, computed in fp32."""
    if pred_BTCHW.shape != target_BTCHW.shape:
        raise ValueError(
            f"trajectory_mse: pred {tuple(pred_BTCHW.shape)} and target "
            f"{tuple(target_BTCHW.shape)} differ"
        )
    return F.mse_loss(pred_BTCHW.float(), target_BTCHW.float())


VARIANCE_FLOOR = 1e-4  # added to the target's variance: (nearly) constant fields stay finite


def variance_normalized_mse(pred_BTCHW: Tensor, target_BTCHW: Tensor) -> Tensor:
    """L_traj as The Well's VRMSE squared: per sample, step and field, the squared error over
    the target's spatial variance, averaged.

    Plain MSE weighs each sample by the size of its field: on the demo mix an Allen-Cahn state
    starts at a tenth of the others' amplitude, so MSE all but ignores its early dynamics and
    the model ends worse than persistence there. Normalised, every sample counts in the units
    the evaluation reports."""
    return vrmse_squared(pred_BTCHW, target_BTCHW, eps=VARIANCE_FLOOR).mean()


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


def commitment_loss(z_e: Tensor, z_q: Tensor) -> Tensor:
    """L_commit = mean (z_e - sg[z_q])^2: the prediction's tokenizer latent stays near its
    nearest codes (gradient into z_e only; the frozen tokenizer's codebook is not trained)."""
    return F.mse_loss(z_e.float(), z_q.detach().float())


def latent_alignment_loss(projected_BD: Tensor, target_BD: Tensor) -> Tensor:
    """L_latent = mean ||P(h) - sg[z_e(target)]||^2 / D over the batch."""
    return F.mse_loss(projected_BD.float(), target_BD.detach().float())


def sampled_steps(n_steps: int, k: int) -> list[int]:
    """Which steps of a window L_latent averages: 3 = first/middle/last, N evenly spaced,
    -1 = all (the seed's --latent-sample-steps)."""
    if k == -1 or k >= n_steps:
        return list(range(n_steps))
    return sorted({round(i * (n_steps - 1) / max(k - 1, 1)) for i in range(k)})
