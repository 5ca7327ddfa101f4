"""What one report runs on: the checkpoint's model and config, the tokenizer, the split.

Everything is checked before any rollout, so bad input ends in one `ConfigError` (exit 2):
a missing checkpoint, a tokenizer whose window does not divide --timesteps or differs from
the loss windows the checkpoint was aligned with, a projector of another latent size.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.utils.data import Dataset

from noa_dist.alignment import loss_window_length
from noa_dist.build import spread_subset
from noa_dist.checkpoint import checkpoint_kind, load_weights_and_config
from noa_dist.config import Config
from noa_dist.data.dataset import WellWindowDataset
from noa_dist.diagnose.inputs import dataset_root, load_model
from noa_dist.errors import ConfigError
from noa_dist.tokenizer import FrozenTokenizer, load_tokenizer


@dataclass(frozen=True)
class Inputs:
    checkpoint: Path
    kind: str  # checkpoint_kind(): "step" | "zero" | "best" | "export"
    cfg: Config  # the checkpoint's own config
    root: Path
    split: str
    timesteps: int
    batch_size: int
    dataset: Dataset  # the split's windows of `timesteps` steps (all, or --n-samples spread)
    model: torch.nn.Module  # eval mode, on the CPU
    tokenizer: FrozenTokenizer
    vqvae_path: Path

    @property
    def windows_per_trajectory(self) -> int:
        return self.timesteps // self.tokenizer.window_length


def load_inputs(args: argparse.Namespace) -> Inputs:
    """Model, tokenizer and data for `args` (flags over the checkpoint's config)."""
    ckpt = Path(args.checkpoint).expanduser()
    kind = checkpoint_kind(ckpt)
    state_dict, cfg = load_weights_and_config(ckpt)
    timesteps = args.timesteps if args.timesteps is not None else cfg.data.timesteps
    batch_size = args.batch_size if args.batch_size is not None else cfg.data.batch_size
    problems = [f"--{k} {v}: must be >= 1" for k, v in
                (("timesteps", timesteps), ("batch-size", batch_size), ("n-samples", args.n_samples))
                if v is not None and v < 1]  # fmt: skip
    if problems:
        raise ConfigError("; ".join(problems))
    root = dataset_root(args, cfg)
    windows = WellWindowDataset(root, args.split, timesteps, window_stride=cfg.data.window_stride)
    vqvae_path = _vqvae_path(args, cfg, ckpt)
    tokenizer = load_tokenizer(
        vqvae_path,
        n_channels=windows.n_channels,
        feature_policy=args.vqvae_feature_policy or cfg.align.vqvae_feature_policy,
    )
    tokenizer.check_channel_stats(
        windows.norm.mean_predicted, windows.norm.std_predicted, where=f"--dataset {root}"
    )
    check_windows(cfg, tokenizer.window_length, timesteps, vqvae_path, ckpt)
    model = load_model(state_dict, cfg, windows, ckpt).eval()
    check_projector(model, tokenizer, vqvae_path, ckpt)
    dataset = spread_subset(windows, args.n_samples, "--n-samples")
    return Inputs(
        ckpt, kind, cfg, root, args.split, timesteps, batch_size, dataset, model, tokenizer,
        vqvae_path,
    )  # fmt: skip


def _vqvae_path(args: argparse.Namespace, cfg: Config, ckpt: Path) -> Path:
    if args.vqvae_path:
        return Path(args.vqvae_path).expanduser()
    if cfg.align.vqvae_path:
        return Path(cfg.align.vqvae_path)
    raise ConfigError(
        f"--vqvae-path: required ({ckpt} was trained without a tokenizer, so its config names none)"
    )


def check_windows(cfg: Config, length: int, timesteps: int, vqvae_path: Path, ckpt: Path) -> None:
    """The rollout cuts into whole tokenizer windows, of the length the model was aligned on."""
    if timesteps % length:
        raise ConfigError(
            f"--timesteps {timesteps}: not a multiple of the tokenizer's window of {length} "
            f"steps ({vqvae_path}); use --timesteps {max(length, timesteps - timesteps % length)}"
        )
    trained = loss_window_length(cfg)
    if cfg.align.vqvae_path and trained != length:
        raise ConfigError(
            f"--vqvae-path {vqvae_path}: a tokenizer of {length}-step windows, but {ckpt} was "
            f"aligned on loss windows of {trained} steps; pass a tokenizer trained with "
            f"`noa-train-vqvae --window {trained}`"
        )


def check_projector(model, tokenizer: FrozenTokenizer, vqvae_path: Path, ckpt: Path) -> None:
    projector = model.projector
    if projector is None:
        return
    size = projector.mlp[-1].out_features
    if size != tokenizer.latent_dim:
        raise ConfigError(
            f"--vqvae-path {vqvae_path}: latents of {tokenizer.latent_dim} dimensions, but the "
            f"L_latent projector of {ckpt} maps to {size}; pass the tokenizer it was trained with"
        )
