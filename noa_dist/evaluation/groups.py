"""Which rows a trajectory's numbers go into: "all", and its demo family where one is known.

The demo generator (noa_dist/data/generate.py) stores each trajectory's family as the integer
scalar `family` (an index into FAMILIES) and its state as the one channel `u`: the phase field
for Allen-Cahn, the vorticity for Navier-Stokes. Those facts are what the physics checks need,
so they run only on a dataset that carries them; any other Well dataset has one group "all".
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from noa_dist.data.generate import DATASET_NAME, FAMILIES
from noa_dist.data.schema import SCALARS, DatasetInfo, open_hdf5
from noa_dist.errors import DataError

ALL = "all"
FAMILY_SCALAR = "family"
STATE_CHANNEL = "u"
# family -> physics check on the state channel (see evaluation/physics.py)
PHYSICS = {"allen_cahn": "bounds", "navier_stokes": "mean_vorticity"}


@dataclass(frozen=True)
class Groups:
    """Group names ("all" first) and each trajectory's membership, [n_trajectories, G] bool."""

    names: tuple[str, ...]
    member_NG: np.ndarray
    state_channel: int | None  # index of `u` among the predicted channels, for the physics

    def member(self, trajectory_B: torch.Tensor, device: torch.device) -> torch.Tensor:
        """[B, G] float64 membership of the batch's trajectories."""
        rows = self.member_NG[trajectory_B.cpu().numpy()]
        return torch.from_numpy(rows).to(device=device, dtype=torch.float64)

    def name_of(self, trajectory: int) -> str:
        """The most specific group of a trajectory (its family, else "all")."""
        return self.names[int(self.member_NG[trajectory].nonzero()[0][-1])]

    def physics(self) -> dict[str, int]:
        """{check name: group index} of the checks that can run on this dataset."""
        if self.state_channel is None:
            return {}
        return {PHYSICS[n]: g for g, n in enumerate(self.names) if n in PHYSICS}


def trajectory_groups(info: DatasetInfo, channels: tuple[str, ...]) -> Groups:
    """Groups of the split's trajectories (in dataset order: shards sorted, then rows)."""
    codes = _family_codes(info)
    if codes is None:
        return Groups((ALL,), np.ones((info.n_trajectories, 1), bool), None)
    present = [f for k, f in enumerate(FAMILIES) if (codes == k).any()]
    member = np.stack([np.ones(len(codes), bool)] + [codes == FAMILIES.index(f) for f in present])
    channel = channels.index(STATE_CHANNEL) if STATE_CHANNEL in channels else None
    return Groups((ALL, *present), member.T, channel)


def _family_codes(info: DatasetInfo) -> np.ndarray | None:
    """The `family` scalar of every trajectory, or None if this is not the demo dataset."""
    if info.dataset_name != DATASET_NAME:
        return None
    parts = []
    for shard in info.shards:
        if FAMILY_SCALAR not in {s.name for s in shard.scalars}:
            return None
        with open_hdf5(shard.path) as f:
            codes = np.asarray(f[SCALARS][FAMILY_SCALAR][()]).reshape(-1)
        if codes.size != shard.n_trajectories or not np.isin(codes, range(len(FAMILIES))).all():
            raise DataError(
                f"{shard.path}: scalars/{FAMILY_SCALAR} should hold one code in "
                f"0..{len(FAMILIES) - 1} per trajectory ({shard.n_trajectories}), got {codes}"
            )
        parts.append(codes)
    return np.concatenate(parts)
