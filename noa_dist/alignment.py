"""The loss NOA trains with: L_traj + lambda_commit * L_commit + lambda_latent * L_latent.

Glue between a rollout window, the frozen VQ-VAE tokenizer and the model's latent projector;
the terms themselves are the pure functions of `losses.py`.

- L_commit: z_e of the *predicted* window's features against its nearest codes (sg): the
  prediction stays on the tokenizer's manifold. Gradients flow through the tokenizer into the
  prediction; the tokenizer's own parameters never change (frozen, eval, outside `prepare`).
- L_latent: the projector applied to the bottleneck of the window's own forward, averaged over
  the sampled steps (`--latent-sample-steps`), against sg[z_e(target)], where target is the
  ground-truth window (default) or the prediction (`--latent-target pred`, the prototype's
  moving target).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch
from torch import Tensor

from noa_dist.config import Config
from noa_dist.errors import ConfigError
from noa_dist.losses import (
    commitment_loss,
    latent_alignment_loss,
    sampled_steps,
    trajectory_mse,
    variance_normalized_mse,
)
from noa_dist.rollout import Window

Batch = dict[str, Tensor]
LossFn = Callable[[Window, Batch], dict[str, Tensor]]


def loss_weights(cfg: Config) -> dict[str, float]:
    """Every term the configured loss returns, with its weight (L_traj's is 1)."""
    weights = {"traj": 1.0}
    if cfg.align.vqvae_path:
        weights["commit"] = cfg.align.lambda_commit
        if cfg.align.enable_latent_loss:
            weights["latent"] = cfg.align.lambda_latent
    return weights


def load_frozen_tokenizer(cfg: Config, dataset):
    """The run's tokenizer (None without --vqvae-path), checked against the loss windows and
    against the dataset's normalisation (its features were fitted on fields normalised so)."""
    if not cfg.align.vqvae_path:
        return None
    from noa_dist.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(
        Path(cfg.align.vqvae_path),
        n_channels=dataset.n_channels,
        feature_policy=cfg.align.vqvae_feature_policy,
    )
    check_window_length(cfg, tokenizer.window_length)
    tokenizer.check_channel_stats(
        dataset.norm.mean_predicted, dataset.norm.std_predicted, where=f"--dataset {dataset.root}"
    )
    return tokenizer


def loss_window_length(cfg: Config) -> int:
    """Steps per loss window: the TBPTT window (all of T without one)."""
    window = cfg.train.bptt_window
    return cfg.data.timesteps if window is None else min(window, cfg.data.timesteps)


def check_window_length(cfg: Config, trained_on: int) -> None:
    length = loss_window_length(cfg)
    ragged = cfg.train.tbptt_mode == "all-windows" and cfg.data.timesteps % length
    if trained_on != length or ragged:
        raise ConfigError(
            f"--vqvae-path {cfg.align.vqvae_path}: the tokenizer was trained on windows of "
            f"{trained_on} steps, but this run's loss sees windows of {length} steps"
            + (f" (and a last one of {cfg.data.timesteps % length})" if ragged else "")
            + f"; train one with `noa-train-vqvae --window {length}` or set --bptt-window "
            f"{trained_on} (with --timesteps a multiple of it)"
        )


def build_loss_fn(cfg: Config, tokenizer, projector: torch.nn.Module | None) -> LossFn:
    """(window, batch) -> the unweighted terms `loss_weights(cfg)` names."""
    latent = cfg.align.enable_latent_loss
    commit_dims = tokenizer.commit_mask if tokenizer is not None else None
    traj_loss = variance_normalized_mse if cfg.train.traj_loss == "vrmse" else trajectory_mse

    def loss_fn(window: Window, batch: Batch) -> dict[str, Tensor]:
        target_BTCHW = batch["target"][:, window.start : window.stop]
        terms = {"traj": traj_loss(window.pred_BTCHW, target_BTCHW)}
        if tokenizer is None:
            return terms
        z_e = tokenizer.encode_window(window.pred_BTCHW, window.input_BCHW)
        z_q, _ = tokenizer.quantize(z_e)
        differentiable = commit_dims.to(z_e.device)  # INITIAL features carry no gradient
        terms["commit"] = commitment_loss(z_e[:, differentiable], z_q[:, differentiable])
        if latent:
            terms["latent"] = latent_alignment_loss(
                projector(sampled_bottleneck(window, cfg.align.latent_sample_steps)),
                z_e
                if cfg.align.latent_target == "pred"
                else _true_latent(tokenizer, window, batch),
            )
        return terms

    return loss_fn


def sampled_bottleneck(window: Window, k: int) -> Tensor:
    """The bottleneck of the window's own forward, averaged over the sampled steps, fp32."""
    steps = sampled_steps(len(window.bottleneck), k)
    return torch.stack([window.bottleneck[i].float() for i in steps]).mean(dim=0)


def true_window(window: Window, batch: Batch) -> tuple[Tensor, Tensor]:
    """(ground-truth states of the window's steps, the true state before them)."""
    target = batch["target"]
    start_BCHW = batch["u0"] if window.start == 0 else target[:, window.start - 1]
    return target[:, window.start : window.stop], start_BCHW


def _true_latent(tokenizer, window: Window, batch: Batch) -> Tensor:
    """z_e of the ground-truth window, started from the true state before it."""
    with torch.no_grad():
        return tokenizer.encode_window(*true_window(window, batch))
