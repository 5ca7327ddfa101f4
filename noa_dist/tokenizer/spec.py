"""A tokenizer's spec (`spec.json`): everything needed to rebuild it and to check that the live
feature extractor still computes the features it was trained on.

Keys: format, version; window_length, dt, n_channels, channel_names, grid; channel_stats
(the stats.yaml mean/std the fields were normalised with: the units the features expect);
feature_config;
features {names, categories, channels, differentiable} in the extractor's order;
normalization {mean, std, dropped, std_floor, clip} per feature; model (VQVAEConfig plus
categories, latent_dim); training (provenance: command, dataset, epochs; not hashed);
spec_hash = sha256 of the canonical JSON of all keys but spec_hash and training.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass
from typing import Any

from noa_dist.errors import ConfigError
from noa_dist.features import CATEGORIES, FeatureConfig, FeatureSpec, feature_specs
from noa_dist.models.vqvae import VQVAEConfig
from noa_dist.tokenizer.normalize import Normalization

log = logging.getLogger("noa_dist")

FORMAT, VERSION = "noa-dist-tokenizer", 1
SPEC_FILE, WEIGHTS_FILE, METRICS_FILE = "spec.json", "model.safetensors", "metrics.json"
POLICIES = ("strict", "pad")
_UNHASHED = ("spec_hash", "training")


def feature_table(specs: list[FeatureSpec]) -> dict[str, list]:
    return {
        "names": [s.name for s in specs],
        "categories": [s.category for s in specs],
        "channels": [s.channel for s in specs],
        "differentiable": [s.differentiable for s in specs],
    }


def build_spec(
    *,
    specs: list[FeatureSpec],
    window_length: int,
    dt: float,
    channel_names: list[str],
    channel_stats: dict[str, list[float]],
    grid: tuple[int, ...],
    feature_config: FeatureConfig,
    normalization: Normalization,
    model: VQVAEConfig,
    training: dict[str, Any],
) -> dict[str, Any]:
    spec = {
        "format": FORMAT,
        "version": VERSION,
        "window_length": window_length,
        "dt": dt,
        "n_channels": len(channel_names),
        "channel_names": list(channel_names),
        "channel_stats": channel_stats,
        "grid": list(grid),
        "feature_config": feature_config.to_dict(),
        "features": feature_table(specs),
        "normalization": normalization.to_dict(),
        "model": {
            **model.to_dict(),
            "categories": list(CATEGORIES),
            "latent_dim": model.latent_dim,
        },
        "training": training,
    }
    spec["spec_hash"] = spec_hash(spec)
    return spec


def spec_hash(spec: dict[str, Any]) -> str:
    hashed = {k: v for k, v in spec.items() if k not in _UNHASHED}
    text = json.dumps(hashed, sort_keys=True, separators=(",", ":"), allow_nan=False)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def check_format(spec: dict[str, Any], where: str) -> None:
    """The spec is ours, of a known version, and unedited (its hash matches)."""
    if spec.get("format") != FORMAT or spec.get("version") != VERSION:
        raise ConfigError(
            f"{where}: not a {FORMAT} v{VERSION} spec (format={spec.get('format')!r}, "
            f"version={spec.get('version')!r}); was it written by noa-train-vqvae?"
        )
    missing = [k for k in ("features", "normalization", "model", "window_length") if k not in spec]
    if missing:
        raise ConfigError(f"{where}: spec without {missing}")


def check_hash(spec: dict[str, Any], where: str) -> None:
    expected = spec.get("spec_hash")
    if expected != spec_hash(spec):
        raise ConfigError(
            f"{where}: spec_hash {expected!r} does not match its contents (the file was edited "
            "or damaged); retrain the tokenizer or restore the file"
        )


@dataclass(frozen=True)
class FeatureMapping:
    """How to build the spec's feature vector from the live extractor's: spec feature i is live
    feature `source[i]`, or (source[i] == -1) missing and filled with its stored mean."""

    source: tuple[int, ...]
    missing: tuple[str, ...]
    extra: tuple[str, ...]

    @property
    def identity(self) -> bool:
        return not self.missing and not self.extra and self.source == tuple(range(len(self.source)))


def map_live_features(
    spec: dict[str, Any], *, n_channels: int, policy: str, where: str
) -> FeatureMapping:
    """Compare the spec's features with what the live extractor emits for `n_channels` and the
    spec's window length; refuse a difference (strict) or bridge it loudly (pad)."""
    if policy not in POLICIES:
        raise ConfigError(f"feature_policy {policy!r}: expected one of {', '.join(POLICIES)}")
    live_config = FeatureConfig()
    live = [s.name for s in feature_specs(n_channels, int(spec["window_length"]), live_config)]
    stored = list(spec["features"]["names"])
    live_index = {name: i for i, name in enumerate(live)}
    stored_set = set(stored)
    missing = tuple(n for n in stored if n not in live_index)
    extra = tuple(n for n in live if n not in stored_set)
    settings = _setting_differences(spec.get("feature_config", {}), live_config.to_dict())
    mapping = FeatureMapping(tuple(live_index.get(n, -1) for n in stored), missing, extra)
    if not (missing or extra or settings):
        return mapping
    problem = _mismatch_message(spec, n_channels, missing, extra, settings, where)
    if policy == "strict":
        raise ConfigError(
            f"{problem}\nRetrain the tokenizer with this noa-dist (noa-train-vqvae), or pass "
            "--vqvae-feature-policy pad to zero-fill missing and drop extra features (not advised)"
        )
    log.warning(
        f"WARNING: --vqvae-feature-policy pad: using a tokenizer whose features differ from the "
        f"extractor's.\n{problem}\nMissing features are filled with their training mean (0 after "
        "normalisation) and extra ones dropped: its codes and L_commit no longer mean what they "
        "meant in training"
    )
    return mapping


def _setting_differences(stored: dict, live: dict) -> list[str]:
    return [
        f"{key}: {stored.get(key)!r} (tokenizer) vs {live.get(key)!r} (live extractor)"
        for key in sorted(set(stored) | set(live))
        if stored.get(key) != live.get(key)
    ]


def _mismatch_message(spec, n_channels, missing, extra, settings, where) -> str:
    lines = [
        f"{where}: the tokenizer's features ({len(spec['features']['names'])}, window "
        f"{spec['window_length']}, {spec.get('n_channels')} channel(s) {spec.get('channel_names')}) "
        f"differ from what the live extractor computes for {n_channels} channel(s):"
    ]
    if missing:
        lines.append(f"  missing from the extractor ({len(missing)}): {', '.join(missing)}")
    if extra:
        lines.append(f"  extra in the extractor ({len(extra)}): {', '.join(extra)}")
    lines += [f"  extractor setting {s}" for s in settings]
    return "\n".join(lines)
