"""Feature normalisation fitted once on the train split and stored with the tokenizer.

Never per batch: the mean and std are dataset statistics (float64 sums over every training
window of every rank), so a sample normalises the same alone, in any batch and on any rank.
Features whose std is zero (up to float noise, `zero_variance_tol`) are dropped and recorded;
the std of the others is floored at `std_floor` and normalised values are clipped to +-clip.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

ZERO_VARIANCE_TOL = 1e-6  # relative: std <= tol * max(1, |mean|) counts as constant


@dataclass(frozen=True)
class Normalization:
    """Per feature of the spec (all of them, dropped included): mean and fitted std."""

    mean: tuple[float, ...]
    std: tuple[float, ...]
    dropped: tuple[str, ...]  # names of the zero-variance features
    std_floor: float
    clip: float

    def kept(self, names: Sequence[str]) -> list[int]:
        dropped = set(self.dropped)
        return [i for i, name in enumerate(names) if name not in dropped]

    def to_dict(self) -> dict:
        return {
            "mean": list(self.mean),
            "std": list(self.std),
            "dropped": list(self.dropped),
            "std_floor": self.std_floor,
            "clip": self.clip,
        }

    @classmethod
    def from_dict(cls, values: dict) -> Normalization:
        return cls(
            mean=tuple(float(v) for v in values["mean"]),
            std=tuple(float(v) for v in values["std"]),
            dropped=tuple(values["dropped"]),
            std_floor=float(values["std_floor"]),
            clip=float(values["clip"]),
        )


def fit_normalization(
    features_NF: Tensor,
    names: Sequence[str],
    *,
    std_floor: float,
    clip: float,
    sum_across_ranks: Callable[[Tensor], Tensor] = lambda t: t,
) -> Normalization:
    """Mean/std of every feature over the rows of all ranks (two passes, float64).

    `features_NF`: this rank's training windows; `sum_across_ranks` all-reduces a tensor (the
    identity on one process). Call on every rank: it runs two collectives."""
    x = features_NF.double()
    count = sum_across_ranks(torch.tensor([float(x.shape[0])], dtype=torch.float64))
    mean = sum_across_ranks(x.sum(dim=0)) / count
    var = sum_across_ranks((x - mean).square().sum(dim=0)) / count
    std = var.sqrt()
    constant = std <= ZERO_VARIANCE_TOL * mean.abs().clamp(min=1.0)
    return Normalization(
        mean=tuple(mean.tolist()),
        std=tuple(std.tolist()),
        dropped=tuple(name for name, c in zip(names, constant.tolist(), strict=True) if c),
        std_floor=std_floor,
        clip=clip,
    )


class FeatureScaler(torch.nn.Module):
    """x [B, F] (spec order) -> clip((x[:, kept] - mean) / max(std, floor)) [B, F_kept], fp32."""

    def __init__(self, normalization: Normalization, names: Sequence[str]):
        super().__init__()
        kept = normalization.kept(names)
        mean = torch.tensor(normalization.mean, dtype=torch.float64)[kept]
        std = torch.tensor(normalization.std, dtype=torch.float64)[kept]
        self.clip = normalization.clip
        self.register_buffer("kept", torch.tensor(kept, dtype=torch.long), persistent=False)
        self.register_buffer("mean", mean.float(), persistent=False)
        self.register_buffer(
            "scale", std.clamp(min=normalization.std_floor).float(), persistent=False
        )

    def forward(self, x_BF: Tensor) -> Tensor:
        x = x_BF.float().index_select(1, self.kept)
        return ((x - self.mean) / self.scale).clamp(-self.clip, self.clip)
