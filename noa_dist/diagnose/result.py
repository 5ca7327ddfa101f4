"""What `noa-diagnose` finds, as typed records: measured `Findings`, their `Verdict`, and the
`Diagnosis` that joins them.

Field names are the `--json` keys documented in `noa_dist.diagnose` (and the README) and
their order is the order of the JSON output, so `Diagnosis.to_dict()` is the JSON object.
Non-finite floats stay floats here; the JSON renderer spells them "nan", "inf", "-inf".
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Literal


@dataclass(frozen=True)
class Settings:
    """The rollout being diagnosed: flags over the checkpoint's own config."""

    timesteps: int
    bptt_window: int | None
    """None: full BPTT."""
    tbptt_mode: str
    batch_size: int
    n_samples: int


@dataclass(frozen=True)
class TrainedWith:
    """What the checkpoint's config trained with (the fixes are relative to it)."""

    timesteps: int
    bptt_window: int | None
    tbptt_mode: str
    lr: float


@dataclass(frozen=True)
class ConfigItem:
    level: Literal["problem", "note"]
    message: str


@dataclass(frozen=True)
class DataCheck:
    nonfinite_samples: list[str]
    """One description per sample whose inputs, targets or conditioning hold NaN/Inf."""


@dataclass(frozen=True)
class StepStats:
    """Statistics of one rollout step over all samples (finite values only)."""

    step: int
    min: float
    max: float
    mean: float
    std: float
    nonfinite: int


@dataclass(frozen=True)
class ForwardSummary:
    steps: list[StepStats]
    """The predictions, step 1..T (warm-up steps included)."""
    target: list[StepStats]
    nonfinite_total: int
    first_nonfinite_step: int | None


@dataclass(frozen=True)
class LossSummary:
    traj: float
    """L_traj as training computes it (window weights), mean over the samples."""
    finite: bool


@dataclass(frozen=True)
class ParamNorm:
    name: str
    norm: float


@dataclass(frozen=True)
class GradientSummary:
    n_params: int
    n_nonfinite: int
    nonfinite_params: list[str]
    no_grad_params: list[str]
    total_norm: float
    norm_min: float
    norm_p50: float
    norm_p90: float
    norm_p99: float
    norm_max: float
    largest: list[ParamNorm]
    """The 5 parameters with the largest gradient norm."""


@dataclass(frozen=True)
class DepthRow:
    """The gradient at depth k: k steps back from the end of a gradient window."""

    depth: int
    grad_norm: float
    """|dL/du| of the full window loss."""
    chain_gain: float
    """|dL_last/du| / |dL_last/du_end|, L_last the loss of the window's last step alone."""
    state_step: int | None
    """The rollout step of that state; None when several windows are pooled."""
    growth: float | None
    """chain_gain over that of depth k-1 (None at depth 0)."""


@dataclass(frozen=True)
class ChainSummary:
    window: int
    """Steps with gradients (the deepest depth)."""
    depths: list[DepthRow]
    amplification: float
    growth_per_step: float
    extrapolated_steps: int
    extrapolated_amplification: float


@dataclass(frozen=True)
class Findings:
    """Everything measured and looked up; the verdict is a pure function of this."""

    checkpoint: str
    format: str
    """"step" | "zero" | "best" | "export"."""
    dataset: str
    split: str
    device: str
    settings: Settings
    trained_with: TrainedWith
    config_check: list[ConfigItem]
    data: DataCheck
    forward: ForwardSummary
    loss: LossSummary
    gradients: GradientSummary
    chain: ChainSummary
    training_command: str
    """The training command the fixes extend (from the checkpoint)."""
    previous_checkpoint: str | None
    """The newest complete step checkpoint before this one."""


@dataclass(frozen=True)
class Fix:
    why: str
    command: str


@dataclass(frozen=True)
class Verdict:
    status: str
    healthy: bool
    title: str
    reasons: list[str]
    fixes: list[Fix]


@dataclass(frozen=True)
class Diagnosis:
    findings: Findings
    verdict: Verdict

    @property
    def exit_code(self) -> int:
        """0: healthy; 1: a problem was found (2, bad input, never gets this far)."""
        return 0 if self.verdict.healthy else 1

    def to_dict(self) -> dict[str, Any]:
        """The `--json` object: the findings' keys, then verdict and exit_code."""
        return {
            **dataclasses.asdict(self.findings),
            "verdict": dataclasses.asdict(self.verdict),
            "exit_code": self.exit_code,
        }
