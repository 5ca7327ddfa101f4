"""The tokenizer artifact on disk: one folder written atomically, and `load_tokenizer`.

    DIR/spec.json          what the tokenizer is (spec.py), with its hash
    DIR/model.safetensors  FeatureVQVAE weights and codebooks, canonical (unwrapped) keys
    DIR/metrics.json       training history and final validation metrics

The folder is built under a temporary name next to DIR, every file fsynced, then renamed
over DIR (noa_dist.atomic): a reader sees the old artifact or the new one, never a part.

`load_tokenizer` also reads the formats of the prototype's checkpoints when the spec.json
they were trained with lies next to them (a folder holding spec.json and one weights file,
or the weights file itself): a `.pt`/`.pth`/`.safetensors` state dict whose keys start with
`_orig_mod.vqvae.` (compiled and nested), `vqvae.` (nested; other keys are ignored) or
nothing (raw), optionally inside {"state_dict": ...} or {"model_state_dict": ...}.
"""

from __future__ import annotations

import json
import math
import os
import shutil
from pathlib import Path
from typing import Any

import torch

from noa_dist.atomic import atomic_write_bytes, atomic_write_text, fsync_tree, replace_folder
from noa_dist.checkpoint.formats import load_safetensors
from noa_dist.errors import ConfigError, DataError
from noa_dist.tokenizer.frozen import FrozenTokenizer
from noa_dist.tokenizer.spec import (
    METRICS_FILE,
    SPEC_FILE,
    WEIGHTS_FILE,
    check_format,
    check_hash,
    map_live_features,
)

WEIGHT_SUFFIXES = (".safetensors", ".pt", ".pth")
KEY_PREFIXES = ("_orig_mod.vqvae.", "vqvae.", "_orig_mod.")  # tried in this order
WRAPPER_KEYS = ("state_dict", "model_state_dict")


def write_artifact(
    out: Path, spec: dict[str, Any], state_dict: dict[str, torch.Tensor], metrics: dict[str, Any]
) -> Path:
    """Write the artifact folder `out` atomically (replacing an older artifact there)."""
    from safetensors.torch import save

    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    old = out.with_name(f".{out.name}.old-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        tensors = {k: v.detach().cpu().contiguous() for k, v in state_dict.items()}
        atomic_write_bytes(tmp / WEIGHTS_FILE, save(tensors))
        atomic_write_text(tmp / SPEC_FILE, json.dumps(spec, indent=1, allow_nan=False) + "\n")
        atomic_write_text(tmp / METRICS_FILE, json.dumps(_finite(metrics), indent=1) + "\n")
        fsync_tree(tmp)
        replace_folder(tmp, out, old)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def is_artifact(folder: Path) -> bool:
    return (Path(folder) / SPEC_FILE).is_file()


def load_tokenizer(
    path: str | os.PathLike, *, n_channels: int, feature_policy: str = "strict"
) -> FrozenTokenizer:
    """The frozen tokenizer at `path` (an artifact folder, or a prototype weights file or folder
    with its spec.json). Its features are checked against the live extractor for `n_channels`
    and the stored window length: a difference is a ConfigError listing the missing and extra
    feature names, unless feature_policy="pad" (loud warning; missing filled, extra dropped)."""
    spec_path, weights_path = _resolve(Path(path).expanduser())
    where = str(spec_path)
    spec = _read_json(spec_path)
    check_format(spec, where)
    mapping = map_live_features(spec, n_channels=n_channels, policy=feature_policy, where=where)
    check_hash(spec, where)
    metrics_path = spec_path.parent / METRICS_FILE
    metrics = _read_json(metrics_path) if metrics_path.is_file() else None
    state = read_weights(weights_path)
    return FrozenTokenizer(spec, state, mapping, metrics=metrics, where=str(weights_path))


def read_weights(path: Path) -> dict[str, torch.Tensor]:
    """A tokenizer state dict with canonical keys from any accepted weights file."""
    if path.suffix == ".safetensors":
        state = load_safetensors(path)
    else:
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as err:  # torch raises many types for a bad file
            raise DataError(f"{path}: cannot be read as a torch file ({err})") from None
        for key in WRAPPER_KEYS:
            if isinstance(state, dict) and isinstance(state.get(key), dict):
                state = state[key]
                break
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise DataError(f"{path}: expected a state dict (names -> tensors)")
    for prefix in KEY_PREFIXES:
        nested = {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}
        if nested:
            return nested
    return state


def _resolve(path: Path) -> tuple[Path, Path]:
    """(spec.json, weights file) of an artifact folder, a folder with one weights file, or a
    weights file with spec.json next to it."""
    if not path.exists():
        raise ConfigError(f"{path}: no such tokenizer (expected a noa-train-vqvae folder)")
    folder = path if path.is_dir() else path.parent
    spec = folder / SPEC_FILE
    if not spec.is_file():
        raise ConfigError(
            f"{path}: no {SPEC_FILE} {'in' if path.is_dir() else 'next to'} it; a tokenizer needs "
            "the spec it was trained with (noa-train-vqvae writes both)"
        )
    if path.is_file():
        return spec, path
    if (folder / WEIGHTS_FILE).is_file():
        return spec, folder / WEIGHTS_FILE
    candidates = sorted(p for p in folder.iterdir() if p.suffix in WEIGHT_SUFFIXES)
    if len(candidates) != 1:
        raise ConfigError(
            f"{folder}: expected {WEIGHTS_FILE} or exactly one weights file "
            f"({', '.join(WEIGHT_SUFFIXES)}), found {[p.name for p in candidates]}; pass the file"
        )
    return spec, candidates[0]


def _read_json(path: Path) -> dict[str, Any]:
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise DataError(f"{path}: not readable JSON ({err})") from None
    if not isinstance(value, dict):
        raise DataError(f"{path}: expected a JSON object")
    return value


def _finite(value: Any) -> Any:
    """JSON-safe metrics: NaN/Inf become null."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_finite(v) for v in value]
    return value
