"""The readers: model weights, config and trainer state from any noa-dist format, no launcher.

Accepted paths (`checkpoint_kind` names them):
  "step"    a step checkpoint folder `step-XXXXXXXX/` saved under DDP or one process
            (`model.safetensors` + `trainer_state.json` + `COMPLETE`);
  "zero"    a step checkpoint folder saved under DeepSpeed ZeRO-1/2/3, or its tag subfolder
            (`pytorch_model/` with `mp_rank_00_model_states.pt` under ZeRO-1/2, one
            `zero_pp_rank_<r>_mp_rank_00_model_states.pt` per rank under ZeRO-3), consolidated
            to fp32 with DeepSpeed's zero_to_fp32 (deepspeed is imported only then);
  "best"    an exported weights folder such as `<run>/best/` (`model.safetensors` + `meta.json`);
  "export"  a `.pt` file written by `noa-export` ({"model", "config", "source"}).
Everything returns canonical (unwrapped) keys as saved: prefixes are never patched on load.
Folders are verified against their COMPLETE marker before anything is read (manifest.py).
This module holds the project's one trainer_state.json reader and one safetensors loader.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import sys
from pathlib import Path
from typing import Any

import torch

from noa_dist.checkpoint import manifest
from noa_dist.checkpoint.layout import META, TRAINER_STATE, WEIGHTS
from noa_dist.checkpoint.lookup import latest_checkpoint, verify_checkpoint
from noa_dist.checkpoint.trainer_state import loads_state
from noa_dist.config import SECTIONS, Config
from noa_dist.errors import ConfigError, DataError

logger = logging.getLogger(__name__)

StateDict = dict[str, torch.Tensor]
EXPECTED = (
    "a step-XXXXXXXX checkpoint folder, a best/ weights folder (model.safetensors + meta.json) "
    "or a .pt file written by noa-export"
)
# DeepSpeed's model-states files in a tag folder: `mp_rank_00_model_states.pt` (ZeRO-1/2) or
# `zero_pp_rank_<r>_mp_rank_00_model_states.pt` per rank (ZeRO-3); zero_to_fp32 globs the same.
ZERO_MODEL_STATES = "*_model_states.pt"


def load_weights(path: str | os.PathLike) -> tuple[StateDict, dict[str, Any] | None]:
    """(state_dict with canonical keys, config dict or None) of `path`; tensors keep their
    saved dtype (ZeRO shards are consolidated to fp32). The config is `Config.to_dict()`."""
    path = Path(path).expanduser()
    kind = checkpoint_kind(path)
    if kind == "export":
        return _load_export(path)
    if kind == "best":
        state_dict, meta = load_model_weights(path)
        return state_dict, meta.get("config")
    folder, tag = _step_folder_and_tag(path)
    config = read_trainer_state(folder).get("config")
    if kind == "zero":
        return _consolidate_zero(folder, tag), config
    return load_safetensors(folder / WEIGHTS), config


def load_weights_and_config(path: str | os.PathLike) -> tuple[StateDict, Config]:
    """`load_weights`, with the Config the weights were trained with: what a tool needs to
    rebuild the model and its data. A file without a config is refused, naming it."""
    state_dict, saved_config = load_weights(path)
    if saved_config is None:
        raise ConfigError(f"{path}: holds no config, so the model and data cannot be rebuilt")
    return state_dict, config_from_dict(saved_config)


def checkpoint_kind(path: Path) -> str:
    """ "step", "zero", "best" or "export"; a ConfigError naming the path for anything else."""
    if not path.exists():
        raise ConfigError(f"{path}: no such file or folder (expected {EXPECTED})")
    if path.is_file():
        if path.suffix != ".pt":
            raise ConfigError(f"{path}: not a .pt file (expected {EXPECTED})")
        return "export"
    if (path / META).is_file():
        return "best"
    if _is_zero_tag(path) and (path.parent / TRAINER_STATE).is_file():
        return "zero"  # the tag subfolder of a ZeRO step checkpoint
    if (path / TRAINER_STATE).is_file():
        return "step" if (path / WEIGHTS).is_file() else "zero"
    raise ConfigError(f"{path}: {_folder_hint(path)}")


def read_trainer_state(folder: Path) -> dict[str, Any]:
    """trainer_state.json of a whole step checkpoint (keys state, sampler, config, args).
    The project's one reader of that file; the folder is verified against COMPLETE first."""
    reason = verify_checkpoint(folder)
    if reason is not None:
        raise ConfigError(f"{folder}: {reason}; use the previous step-XXXXXXXX folder")
    try:
        return loads_state((folder / TRAINER_STATE).read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise DataError(f"{folder / TRAINER_STATE}: not readable JSON ({err})") from None


def load_model_weights(path: Path) -> tuple[StateDict, dict[str, Any]]:
    """(state_dict, metadata) of an export written by `save_model_weights`; no accelerate."""
    path = Path(path)
    if not path.is_dir():
        raise ConfigError(f"{path}: no such weights folder")
    reason = manifest.verify(path, META)
    if reason is not None:
        raise ConfigError(f"cannot load weights from {path}: {reason}")
    meta = loads_state((path / META).read_text(encoding="utf-8"))
    return load_safetensors(path / WEIGHTS), meta


def step_folder(path: Path) -> Path | None:
    """The step checkpoint folder behind `path` (itself or a ZeRO tag's parent), else None."""
    kind = checkpoint_kind(path)
    return _step_folder_and_tag(path)[0] if kind in ("step", "zero") else None


def config_from_dict(sections: dict[str, Any]) -> Config:
    """A Config from `Config.to_dict()` output; missing fields take their defaults.

    Unknown keys in the model section are an error (they would change the architecture);
    unknown keys elsewhere (a newer or older noa-dist) are ignored with a warning.
    """
    if not isinstance(sections, dict):
        raise ConfigError(
            f"saved config: expected a mapping of sections, got {type(sections).__name__}"
        )
    built, ignored = {}, []
    for name, values in sections.items():
        if name not in SECTIONS or not isinstance(values, dict):
            ignored.append(name)
            continue
        known = {f.name for f in dataclasses.fields(SECTIONS[name])}
        unknown = sorted(set(values) - known)
        if unknown and name == "model":
            raise ConfigError(
                f"saved config: unknown model field(s) {unknown}; was it written by another noa-dist version?"
            )
        ignored += [f"{name}.{key}" for key in unknown]
        built[name] = SECTIONS[name](**{k: v for k, v in values.items() if k in known})
    if ignored:
        logger.warning("saved config: ignoring unknown entries %s", ignored)
    return Config(**built)


def model_channels(state_dict: StateDict) -> tuple[int, int]:
    """(in_channels, cond_channels) of U-AFNO weights: the head predicts in_channels, the stem
    reads in_channels + cond_channels."""
    try:
        in_channels = state_dict["head.weight"].shape[0]
        return in_channels, state_dict["stem.weight"].shape[1] - in_channels
    except (KeyError, IndexError):
        raise DataError("weights: no head.weight / stem.weight of a U-AFNO model") from None


def projector_dim(state_dict: StateDict) -> int | None:
    """The latent size of the L_latent projector in U-AFNO weights (None: none was trained)."""
    last = state_dict.get("projector.mlp.3.weight")
    return None if last is None else int(last.shape[0])


# ---------------------------------------------------------------- formats


def _load_export(path: Path) -> tuple[StateDict, dict[str, Any] | None]:
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises many types for a bad file
        raise DataError(f"{path}: cannot be read as a torch file ({err})") from None
    if not isinstance(payload, dict) or not isinstance(payload.get("model"), dict):
        raise DataError(
            f"{path}: expected a noa-export file, a dict with 'model' (a state dict) and 'config'"
        )
    bad = [k for k, v in payload["model"].items() if not isinstance(v, torch.Tensor)]
    if bad:
        raise DataError(f"{path}: 'model' entry {bad[0]!r} is not a tensor")
    return payload["model"], payload.get("config")


def load_safetensors(file: Path) -> StateDict:
    """The project's one safetensors loader: a DataError naming the file if it is unreadable."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(file)
    except (OSError, SafetensorError) as err:
        raise DataError(f"{file}: cannot read the weights ({err})") from None


def _is_zero_tag(path: Path) -> bool:
    return path.is_dir() and any(path.glob(ZERO_MODEL_STATES))


def _step_folder_and_tag(path: Path) -> tuple[Path, str | None]:
    """(step folder, ZeRO tag or None) for a step folder or the tag subfolder inside one."""
    if _is_zero_tag(path) and (path.parent / TRAINER_STATE).is_file():
        return path.parent, path.name
    return path, None


def _zero_tag(folder: Path) -> str:
    """The subfolder holding the model's ZeRO shards: `latest` names it; else the only one."""
    latest = folder / "latest"
    if latest.is_file():
        tag = latest.read_text(encoding="utf-8").strip()
        if _is_zero_tag(folder / tag):
            return tag
    tags = sorted({p.parent.name for p in folder.glob(f"*/{ZERO_MODEL_STATES}")})
    if "pytorch_model" in tags:  # accelerate's tag of the first prepared model
        return "pytorch_model"
    if len(tags) == 1:
        return tags[0]
    raise ConfigError(
        f"{folder}: has {TRAINER_STATE} but neither {WEIGHTS} nor a DeepSpeed tag folder with "
        f"model states (mp_rank_00_model_states.pt, or zero_pp_rank_<r>_mp_rank_00_"
        f"model_states.pt under ZeRO-3; found {tags or 'none'}); expected {EXPECTED}"
    )


def _consolidate_zero(folder: Path, tag: str | None) -> StateDict:
    """fp32 weights gathered from the ZeRO shards of every rank (deepspeed's zero_to_fp32)."""
    tag = tag or _zero_tag(folder)
    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")  # DeepSpeed otherwise probes for CUDA
    try:
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
    except ImportError:
        raise ConfigError(
            f"{folder}: a DeepSpeed ZeRO checkpoint; consolidating it needs deepspeed "
            "(pip install 'noa-dist[deepspeed]'), or export it once with noa-export where "
            "deepspeed is installed"
        ) from None
    with contextlib.redirect_stdout(sys.stderr):  # it prints progress; keep stdout for results
        try:
            state = get_fp32_state_dict_from_zero_checkpoint(str(folder), tag=tag)
        except (OSError, ValueError, KeyError, RuntimeError, AssertionError) as err:
            raise DataError(f"{folder / tag}: cannot consolidate the ZeRO shards ({err})") from None
    return {key: value.contiguous() for key, value in state.items()}


def _folder_hint(path: Path) -> str:
    """Why a folder is none of the formats, with the nearest usable path if there is one."""
    if (path / "checkpoints").is_dir() or (path / "best").is_dir():
        return f"a run folder; pass {path / 'best'} or one of {path / 'checkpoints'}/step-XXXXXXXX"
    steps = sorted(p.name for p in path.glob("step-*") if p.is_dir())
    if steps:
        latest = latest_checkpoint(path)
        suggestion = f" (the latest complete one is {latest})" if latest else ""
        return f"a folder of checkpoints; pass one of its step-XXXXXXXX folders{suggestion}"
    return f"not a checkpoint (expected {EXPECTED})"
