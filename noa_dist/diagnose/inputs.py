"""What one diagnosis runs on: the checkpoint's weights and config, its data, the settings.

Everything here is checked before anything is computed, so bad input ends with one
`ConfigError` (exit code 2) instead of a traceback halfway through a rollout.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path

import torch

from noa_dist import checkpoint
from noa_dist.checkpoint import (
    checkpoint_kind,
    load_weights_and_config,
    projector_dim,
    step_folder,
)
from noa_dist.config import Config
from noa_dist.data.dataset import WellWindowDataset
from noa_dist.diagnose.result import ConfigItem, Settings, TrainedWith
from noa_dist.errors import ConfigError
from noa_dist.models.build import build_model
from noa_dist.rollout import FULL_BPTT_WARN_ABOVE, bptt_warning, validate_bptt


@dataclass(frozen=True)
class Inputs:
    checkpoint: Path
    kind: str
    """checkpoint_kind(): "step" | "zero" | "best" | "export"."""
    cfg: Config
    """The checkpoint's own config."""
    settings: Settings
    root: Path
    dataset: WellWindowDataset
    model: torch.nn.Module

    def trained_with(self) -> TrainedWith:
        cfg = self.cfg
        return TrainedWith(
            cfg.data.timesteps, cfg.train.bptt_window, cfg.train.tbptt_mode, cfg.optim.lr
        )


def load_inputs(args: argparse.Namespace) -> Inputs:
    """Weights, config, settings, data and model for `args`; any problem is a ConfigError."""
    ckpt = Path(args.checkpoint).expanduser()
    kind = checkpoint_kind(ckpt)
    state_dict, cfg = load_weights_and_config(ckpt)
    settings = resolve_settings(args, cfg)
    root = dataset_root(args, cfg)
    dataset = WellWindowDataset(
        root,
        args.split,
        settings.timesteps,
        n_samples=settings.n_samples,
        window_stride=cfg.data.window_stride,
    )
    model = load_model(state_dict, cfg, dataset, ckpt)
    return Inputs(ckpt, kind, cfg, settings, root, dataset, model)


def resolve_settings(args: argparse.Namespace, cfg: Config) -> Settings:
    """Flags over the checkpoint's config; every invalid value in one ConfigError."""
    window = cfg.train.bptt_window
    problems = []
    if args.bptt_window is not None:
        try:
            window = None if args.bptt_window.lower() in ("none", "full") else int(args.bptt_window)
        except ValueError:
            problems.append(f"--bptt-window {args.bptt_window!r}: expected an integer or 'none'")
    timesteps = args.timesteps if args.timesteps is not None else cfg.data.timesteps
    mode = args.tbptt_mode or cfg.train.tbptt_mode
    batch = (
        args.batch_size
        if args.batch_size is not None
        else min(cfg.data.batch_size, max(args.n_samples, 1))
    )
    problems += [f"--n-samples {args.n_samples}: must be >= 1"] if args.n_samples < 1 else []
    problems += [f"--batch-size {batch}: must be >= 1"] if batch < 1 else []
    problems += validate_bptt(timesteps, window, mode, allow_window_above_steps=True)
    if problems:
        raise ConfigError("; ".join(problems))
    return Settings(timesteps, window, mode, batch, args.n_samples)


def config_check(s: Settings, cfg: Config) -> list[ConfigItem]:
    """Problems and notes about T / W / mode, before anything is computed."""
    items = []
    full = s.bptt_window is None or s.bptt_window >= s.timesteps
    if full and s.timesteps > FULL_BPTT_WARN_ABOVE:
        items.append(
            ConfigItem(
                "problem",
                f"timesteps={s.timesteps} with full BPTT: gradients pass through {s.timesteps} "
                f"autoregressive steps, which is what made the prototype's gradients explode; "
                f"add --bptt-window {FULL_BPTT_WARN_ABOVE}",
            )
        )
    if s.bptt_window is not None and s.bptt_window > s.timesteps:
        items.append(
            ConfigItem(
                "note",
                f"--bptt-window {s.bptt_window} > --timesteps {s.timesteps}: the window covers "
                "the whole rollout, i.e. full BPTT",
            )
        )
    elif (warning := bptt_warning(s.timesteps, s.bptt_window, s.tbptt_mode)) and not full:
        items.append(ConfigItem("note", warning))
    if cfg.train.mixed_precision not in (None, "no"):
        items.append(
            ConfigItem(
                "note",
                f"trained with --mixed-precision {cfg.train.mixed_precision}; diagnosed in fp32",
            )
        )
    trained = (cfg.data.timesteps, cfg.train.bptt_window, cfg.train.tbptt_mode)
    if (s.timesteps, s.bptt_window, s.tbptt_mode) != trained:
        items.append(
            ConfigItem(
                "note",
                f"diagnosing with T={s.timesteps}, W={s.bptt_window or 'none'}, mode "
                f"{s.tbptt_mode}; the checkpoint trained with T={trained[0]}, "
                f"W={trained[1] or 'none'}, mode {trained[2]}",
            )
        )
    return items


def dataset_root(args: argparse.Namespace, cfg: Config) -> Path:
    """--dataset, else the config's dataset (the demo set's folder for 'demo'); must exist."""
    if args.dataset:
        root, source = Path(args.dataset), "--dataset"
    elif cfg.data.dataset == "demo":  # never generate data while diagnosing
        root, source = Path(cfg.data.demo_dir), "the checkpoint's demo_dir"
    else:
        root, source = Path(cfg.data.dataset), "the checkpoint's dataset"
    if not root.is_dir():
        raise ConfigError(f"{root} ({source}): no such dataset folder; pass --dataset ROOT")
    return root


def load_model(
    state_dict: dict, cfg: Config, dataset: WellWindowDataset, ckpt: Path
) -> torch.nn.Module:
    """The checkpoint's model; weights that do not fit the data are a ConfigError."""
    model = build_model(
        cfg.model,
        in_channels=dataset.n_channels,
        cond_channels=dataset.n_cond_channels,
        latent_dim=projector_dim(state_dict),
    )
    try:
        model.load_state_dict(state_dict)
    except RuntimeError as err:
        raise ConfigError(
            f"{ckpt}: the weights do not fit a model for {dataset.root} ({dataset.n_channels} "
            f"channels + {dataset.n_cond_channels} conditioning) built from the checkpoint's "
            f"config; is this the dataset it was trained on? ({str(err).splitlines()[0]})"
        ) from None
    return model


def previous_checkpoint(ckpt: Path, kind: str) -> str | None:
    """The newest complete step checkpoint before this one (to go back to damaged weights)."""
    folder = step_folder(ckpt) if kind in ("step", "zero") else None
    if folder is None or not folder.name.startswith("step-"):
        return None
    earlier = [
        p
        for p in folder.parent.glob("step-*")
        if p.name < folder.name and (p / checkpoint.COMPLETE).is_file()
    ]
    return str(max(earlier)) if earlier else None
