"""What one evaluation runs on: the checkpoint's model and config, a split, the horizon.

Everything is checked before any rollout, so bad input ends in one `ConfigError` (exit 2).
Each trajectory is one sample: the window from its first stored state over `horizon` steps.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path

import torch

from noa_dist.checkpoint import (
    checkpoint_kind,
    config_from_dict,
    load_model_weights,
    load_weights,
    read_trainer_state,
    step_folder,
)
from noa_dist.config import Config
from noa_dist.data.dataset import WellWindowDataset
from noa_dist.data.schema import read_split_info, split_dir
from noa_dist.diagnose.inputs import dataset_root, load_model
from noa_dist.errors import ConfigError
from noa_dist.evaluation.groups import Groups, trajectory_groups


@dataclass(frozen=True)
class Inputs:
    checkpoint: Path
    kind: str  # checkpoint_kind(): "step" | "zero" | "best" | "export"
    trained: dict  # {epoch (1-based: the epoch the weights are from), global_step} if recorded
    cfg: Config  # the checkpoint's own config
    root: Path
    split: str
    horizon: int
    batch_size: int
    dataset: WellWindowDataset  # one window per trajectory, from its first state
    model: torch.nn.Module  # eval mode, on the CPU
    groups: Groups


def load_inputs(args: argparse.Namespace) -> Inputs:
    """Model and data for `args` (flags over the checkpoint's config)."""
    ckpt = Path(args.checkpoint).expanduser()
    kind = checkpoint_kind(ckpt)
    state_dict, saved_config, trained = _load(ckpt, kind)
    if saved_config is None:
        raise ConfigError(f"{ckpt}: holds no config, so the model cannot be rebuilt")
    cfg = config_from_dict(saved_config)
    batch_size = args.batch_size if args.batch_size is not None else cfg.data.batch_size
    problems = [
        f"--{k} {v}: must be >= 1"
        for k, v in (("horizon", args.horizon), ("batch-size", batch_size))
        if v is not None and v < 1
    ]
    problems += [f"--frames {args.frames}: must be >= 0"] if args.frames < 0 else []  # fmt: skip
    if problems:
        raise ConfigError("; ".join(problems))
    root = dataset_root(args, cfg)
    stored = read_split_info(root, args.split).n_steps
    horizon = args.horizon if args.horizon is not None else stored - 1
    if not 1 <= horizon <= stored - 1:
        raise ConfigError(
            f"--horizon {horizon}: {split_dir(root, args.split)} stores {stored} states per "
            f"trajectory, so the rollout from the first one has at most {stored - 1} steps"
        )
    dataset = WellWindowDataset(root, args.split, horizon, window_stride=stored)
    model = load_model(state_dict, cfg, dataset, ckpt).eval()
    groups = trajectory_groups(dataset.info, dataset.layout.predicted)
    return Inputs(
        ckpt, kind, trained, cfg, root, args.split, horizon, batch_size, dataset, model, groups
    )


def _load(ckpt: Path, kind: str) -> tuple[dict, dict | None, dict]:
    """(state_dict, config dict, {epoch, global_step} as far as the format records them).

    best/ stores the 0-based epoch it was validated at; a step folder the trainer state, whose
    epoch counts finished epochs (the one in progress if batch_in_epoch > 0)."""
    if kind == "best":
        state_dict, meta = load_model_weights(ckpt)
        trained = {"epoch": meta["epoch"] + 1} if "epoch" in meta else {}
        trained |= {"global_step": meta["global_step"]} if "global_step" in meta else {}
        return state_dict, meta.get("config"), trained
    state_dict, config = load_weights(ckpt)
    if kind not in ("step", "zero"):
        return state_dict, config, {}
    state = read_trainer_state(step_folder(ckpt)).get("state", {})
    trained = {"global_step": state["global_step"]} if "global_step" in state else {}
    if "epoch" in state:
        trained["epoch"] = state["epoch"] + (1 if state.get("batch_in_epoch", 0) > 0 else 0)
    return state_dict, config, trained
