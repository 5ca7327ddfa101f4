"""`FrozenTokenizer`: a trained tokenizer as the NOA trainer uses it (fp32, eval, frozen).

Shape legend: B samples, T window steps, C channels, H, W grid, D latent dim, K codebooks.
    z_e = tok.encode_window(states_BTCHW, input_BCHW)  # [B, D], differentiable w.r.t. states
    z_q, codes = tok.quantize(z_e)                      # [B, D] no grad, [B, K] long
encode_window = live features (noa_dist.features) -> the spec's feature order (identity,
or the pad policy's fill/drop) -> stored normalisation -> category encoders. Its parameters
never require grad, it stays in eval mode (`train()` is a no-op), autocast is off inside it,
and nothing in it updates a buffer or talks to other processes. Keep it out of
`accelerator.prepare` (it has no trainable state).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from noa_dist.errors import ConfigError
from noa_dist.features import CATEGORIES, FeatureConfig, trajectory_features
from noa_dist.models.vqvae import FeatureVQVAE, VQVAEConfig
from noa_dist.tokenizer.normalize import FeatureScaler, Normalization
from noa_dist.tokenizer.spec import FeatureMapping


class FrozenTokenizer(nn.Module):
    def __init__(
        self,
        spec: dict[str, Any],
        state_dict: dict[str, Tensor],
        mapping: FeatureMapping,
        *,
        metrics: dict[str, Any] | None = None,
        where: str = "tokenizer",
    ):
        super().__init__()
        self.spec, self.metrics = spec, metrics or {}
        names = list(spec["features"]["names"])
        normalization = Normalization.from_dict(spec["normalization"])
        model_cfg = VQVAEConfig.from_dict(
            {k: v for k, v in spec["model"].items() if k not in ("categories", "latent_dim")}
        )
        _check_input_dims(spec, normalization, model_cfg, where)
        self.model = FeatureVQVAE(model_cfg, sync_codebook=False)
        missing, unexpected = self.model.load_state_dict(state_dict, strict=False)
        if missing or unexpected:
            raise ConfigError(
                f"{where}: weights do not fit the spec's model: missing {sorted(missing)}, "
                f"unexpected {sorted(unexpected)}"
            )
        self.scaler = FeatureScaler(normalization, names)
        self._identity = mapping.identity
        source = torch.tensor(mapping.source, dtype=torch.long)
        self.register_buffer("_source", source.clamp(min=0), persistent=False)
        self.register_buffer("_missing", source < 0, persistent=False)
        self.register_buffer(
            "_fill", torch.tensor(normalization.mean, dtype=torch.float32), persistent=False
        )
        self.window_length: int = int(spec["window_length"])
        self.latent_dim: int = model_cfg.latent_dim
        self.codebook_sizes: list[int] = list(model_cfg.codebook_sizes)
        self.feature_names: list[str] = names
        self.dt: float = float(spec["dt"])
        self.grid: tuple[int, ...] = tuple(spec["grid"])
        self.n_channels: int = int(spec["n_channels"])
        d = model_cfg.code_dim
        self.latent_slices = {c: slice(i * d, (i + 1) * d) for i, c in enumerate(CATEGORIES)}
        # L_commit may use only the latent dims whose features carry gradient (not INITIAL).
        self.commit_mask = torch.tensor(
            [c != "initial" for c in CATEGORIES for _ in range(d)], dtype=torch.bool
        )
        self.requires_grad_(False)
        super().train(False)

    def train(self, mode: bool = True) -> FrozenTokenizer:
        """Always eval: a frozen tokenizer has no training mode."""
        return super().train(False)

    def features(self, states_BTCHW: Tensor, input_BCHW: Tensor) -> Tensor:
        """Raw features [B, F] in the spec's order (see the pad policy for fill/drop)."""
        self._check_window(states_BTCHW, input_BCHW)
        live = trajectory_features(
            states_BTCHW, input_BCHW, dt=self.dt, config=FeatureConfig()
        ).vector_BF
        if self._identity:
            return live
        picked = live.index_select(1, self._source)
        return torch.where(self._missing, self._fill, picked)

    def normalized_features(self, states_BTCHW: Tensor, input_BCHW: Tensor) -> Tensor:
        """[B, F_kept]: what the encoders read (and the decoder reconstructs)."""
        with torch.autocast(device_type=states_BTCHW.device.type, enabled=False):
            return self.scaler(self.features(states_BTCHW, input_BCHW))

    def encode_window(self, states_BTCHW: Tensor, input_BCHW: Tensor) -> Tensor:
        """z_e [B, latent_dim] fp32 of windows of `window_length` states (fields normalised
        with the dataset's stats.yaml, as WellWindowDataset returns them); differentiable
        with respect to states_BTCHW, constant in input_BCHW."""
        with torch.autocast(device_type=states_BTCHW.device.type, enabled=False):
            return self.model.encode(self.normalized_features(states_BTCHW, input_BCHW))

    def quantize(self, z_e_BD: Tensor) -> tuple[Tensor, Tensor]:
        """(z_q [B, latent_dim], codes [B, n_codebooks]): nearest codes, no gradient, no update."""
        return self.model.nearest_codes(z_e_BD)

    def decode(self, z_BD: Tensor) -> Tensor:
        """Reconstructed normalised features [B, F_kept] of latents (for reports)."""
        with torch.autocast(device_type=z_BD.device.type, enabled=False):
            return self.model.decode(z_BD.float())

    def check_channel_stats(self, mean_C, std_C, *, where: str, rtol: float = 1e-5) -> None:
        """ConfigError unless the fields are normalised with the stats.yaml mean/std the
        tokenizer was trained with (its features are not scale-free: other units, other codes).
        Pass `WellWindowDataset.norm.mean_predicted` / `.std_predicted`."""
        stored = self.spec.get("channel_stats")
        if stored is None:
            return
        pairs = {"mean": (stored["mean"], mean_C), "std": (stored["std"], std_C)}
        bad = [
            f"{key} {list(map(float, live))} (data) vs {list(ref)} (tokenizer)"
            for key, (ref, live) in pairs.items()
            if len(ref) != len(live)
            or not torch.allclose(
                torch.as_tensor(ref, dtype=torch.float64),
                torch.as_tensor(live, dtype=torch.float64),
                rtol=rtol,
                atol=0.0,
            )
        ]
        if bad:
            raise ConfigError(
                f"{where}: fields normalised differently from the tokenizer's training data: "
                + "; ".join(bad)
            )

    def _check_window(self, states_BTCHW: Tensor, input_BCHW: Tensor) -> None:
        if states_BTCHW.ndim != 5:
            raise ValueError(
                f"encode_window: states {tuple(states_BTCHW.shape)}, expected [B, T, C, H, W]"
            )
        _, t, c, *grid = states_BTCHW.shape
        if t != self.window_length or tuple(grid) != self.grid:
            raise ValueError(
                f"encode_window: a window of {t} states on a {list(grid)} grid, but the "
                f"tokenizer was trained on windows of {self.window_length} states on "
                f"{list(self.grid)} (train one with noa-train-vqvae --window {t})"
            )
        if input_BCHW.shape != states_BTCHW.shape[:1] + states_BTCHW.shape[2:]:
            raise ValueError(
                f"encode_window: input {tuple(input_BCHW.shape)}, expected [B, C, H, W] = "
                f"{[states_BTCHW.shape[0], c, *grid]}"
            )


def _check_input_dims(spec, normalization: Normalization, cfg: VQVAEConfig, where: str) -> None:
    """The kept features per category must be what the encoders were built for."""
    categories = spec["features"]["categories"]
    kept = normalization.kept(spec["features"]["names"])
    counts = tuple(sum(1 for i in kept if categories[i] == c) for c in CATEGORIES)
    if counts != tuple(cfg.input_dims):
        raise ConfigError(
            f"{where}: the spec's kept features per category {counts} do not match the model's "
            f"input dims {tuple(cfg.input_dims)}"
        )
