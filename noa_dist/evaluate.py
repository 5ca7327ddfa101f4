"""Validation: full rollouts on the valid split, sharded across ranks and reduced.

Each rank sees an equal number of batches (the eval sampler pads; padded samples
are masked out), so model calls that gather parameters (ZeRO-3) never deadlock.
Sums stay on the device until the single all-reduce at the end.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from accelerate import Accelerator

from noa_dist import distributed
from noa_dist.metrics import persistence_prediction, vrmse
from noa_dist.rollout import rollout_states


@dataclass
class ValResult:
    loss: float  # mean L_traj over all predicted steps
    vrmse_per_step: list[float]  # mean over samples and channels, per rollout step
    persistence_vrmse_per_step: list[float]
    n_samples: int
    example: (
        tuple[torch.Tensor, torch.Tensor] | None
    )  # (truth_TCHW, pred_TCHW) of one sample, main process

    @property
    def one_step_ratio(self) -> float:
        """Model one-step VRMSE / persistence one-step VRMSE (< 1 beats persistence)."""
        return self.vrmse_per_step[0] / max(self.persistence_vrmse_per_step[0], 1e-12)


def evaluate(accelerator: Accelerator, model: torch.nn.Module, loader, n_real: int) -> ValResult:
    """Roll out every validation window; `n_real` = this rank's unpadded sample count."""
    was_training = model.training
    model.eval()
    device = accelerator.device
    sums = None  # [3 + 2T]: loss_sum, count, pad, vrmse sums, persistence sums
    seen, example = 0, None
    for batch in loader:
        batch = distributed.batch_to_device(accelerator, batch)
        u0, target, cond = batch["u0"], batch["target"], batch["cond"]
        cond = cond if cond.shape[1] > 0 else None
        pred = rollout_states(lambda u: model(u, cond), u0, target.shape[1])  # noqa: B023
        mask = (torch.arange(u0.shape[0], device=device) + seen < n_real).float()  # padding -> 0
        seen += u0.shape[0]
        per_sample_mse = ((pred.float() - target) ** 2).mean(dim=(1, 2, 3, 4))
        model_vrmse = vrmse(pred.float(), target).mean(dim=2)  # [B, T]
        base_vrmse = vrmse(persistence_prediction(u0.float(), target.shape[1]), target).mean(dim=2)
        batch_sums = torch.cat(
            [
                (per_sample_mse * mask).sum().reshape(1),
                mask.sum().reshape(1),
                (model_vrmse * mask[:, None]).sum(0),
                (base_vrmse * mask[:, None]).sum(0),
            ]
        )
        sums = batch_sums if sums is None else sums + batch_sums
        if example is None and accelerator.is_main_process:
            example = (target[0].cpu(), pred[0].float().cpu())
    model.train(was_training)
    sums = distributed.sum_across_ranks(accelerator, sums).cpu()  # sync point: once per validation
    count = max(float(sums[1]), 1.0)
    steps = (len(sums) - 2) // 2
    return ValResult(
        loss=float(sums[0]) / count,
        vrmse_per_step=(sums[2 : 2 + steps] / count).tolist(),
        persistence_vrmse_per_step=(sums[2 + steps :] / count).tolist(),
        n_samples=int(sums[1]),
        example=example,
    )
