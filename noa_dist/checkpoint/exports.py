"""Weight exports (`<run>/best/`, `<run>/final/`): canonical weights + metadata, sealed.

An export is a folder with `model.safetensors`, `meta.json` and a COMPLETE marker that lists
both (manifest.py), written to a hidden `.NAME.tmp` and renamed over the previous export, so
`best/` is always either the old or the new best model. `formats.load_model_weights` reads it.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedType
from safetensors.torch import save_file

from noa_dist.atomic import (
    atomic_write_text,
    fsync_tree,
    grant_default_mode,
    replace_folder,
)
from noa_dist.checkpoint import manifest
from noa_dist.checkpoint.agree import run_phase
from noa_dist.checkpoint.layout import META, WEIGHTS, old_dir, tmp_dir
from noa_dist.checkpoint.trainer_state import dumps_state


def save_model_weights(
    accelerator: Accelerator, model: torch.nn.Module, out_dir: Path, metadata: dict[str, Any]
) -> Path:
    """Export canonical weights (`model.safetensors`) + `meta.json` atomically to out_dir.

    Call on every rank (gathering ZeRO-3 weights is a collective); the main process writes.
    An existing out_dir (e.g. `best/`) is replaced only once the new export is sealed. A
    failure raises the same CheckpointError on every rank.
    """
    out_dir = Path(out_dir)
    meta_json = dumps_state(metadata)  # before the collective: a bad value fails every rank
    what = "exporting weights to"
    state = run_phase(
        accelerator,
        "gathering the weights",
        out_dir,
        lambda: canonical_state_dict(accelerator, model),
        what=what,
    )
    run_phase(
        accelerator,
        "writing",
        out_dir,
        lambda: _write_export(state, meta_json, out_dir),
        what=what,
        main_only=True,
    )
    return out_dir


def canonical_state_dict(accelerator: Accelerator, model: torch.nn.Module) -> dict:
    """The state dict under the bare module's keys (no `module.` / `_orig_mod.` prefix)."""
    if accelerator.distributed_type in (DistributedType.DEEPSPEED, DistributedType.FSDP):
        return accelerator.get_state_dict(model)  # collective: gathers ZeRO-3/FSDP shards
    return accelerator.unwrap_model(model, keep_torch_compile=False).state_dict()


def _write_export(state: dict[str, torch.Tensor], meta_json: str, out_dir: Path) -> None:
    tmp = tmp_dir(out_dir)
    if tmp.exists() or tmp.is_symlink():
        shutil.rmtree(tmp)  # left by an export that was killed
    tmp.mkdir(parents=True)
    save_file(_safetensors_ready(state), tmp / WEIGHTS, metadata={"format": "pt"})
    atomic_write_text(tmp / META, meta_json)
    grant_default_mode(tmp)  # safetensors writes 0600
    fsync_tree(tmp)
    manifest.seal(tmp, {"export": out_dir.name})
    replace_folder(tmp, out_dir, old_dir(out_dir))


def _safetensors_ready(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """CPU, contiguous, no two tensors sharing memory (safetensors refuses shared storage)."""
    out, seen = {}, set()
    for key, tensor in state.items():
        t = tensor.detach().to("cpu").contiguous()
        storage = t.untyped_storage().data_ptr()
        out[key] = t.clone() if storage in seen else t
        seen.add(storage)
    return out
