"""Checkpoints: atomic saves with a verified COMPLETE marker, lookup, rotation, the run lock
(the store), and the readers of every format noa-dist writes (formats). Durable writes go
through `noa_dist.atomic`, the one atomic-write helper (re-exported here).

    layout.py         names on disk (step-XXXXXXXX, .tmp/.old leftovers, COMPLETE, ...)
    manifest.py       the COMPLETE marker: every file with its size (and sha256 if small)
    agree.py          CheckpointError; one collective per save phase so all ranks fail alike
    store.py          save_checkpoint / load_checkpoint / rotation (every rank)
    lookup.py         verify_checkpoint, latest_checkpoint, resolve_resume, agree_on_resume
    exports.py        save_model_weights: best/ and final/ weight exports (every rank)
    formats.py        readers: load_weights (any format, ZeRO-1/2/3 consolidated), ...
    trainer_state.py  trainer_state.json as strict JSON
    lock.py           RunLock: one job per run folder

Functions taking an `accelerator` must be called on every rank.
"""

from noa_dist.atomic import (
    atomic_write,
    atomic_write_bytes,
    atomic_write_text,
    fsync_tree,
    probe_writable,
)
from noa_dist.checkpoint.agree import CheckpointError
from noa_dist.checkpoint.exports import save_model_weights
from noa_dist.checkpoint.formats import (
    StateDict,
    checkpoint_kind,
    config_from_dict,
    load_model_weights,
    load_safetensors,
    load_weights,
    load_weights_and_config,
    model_channels,
    projector_dim,
    read_trainer_state,
    step_folder,
)
from noa_dist.checkpoint.layout import (
    COMPLETE,
    META,
    MIN_KEEP,
    RUN_LOCK,
    TRAINER_STATE,
    WEIGHTS,
    step_dir_name,
)
from noa_dist.checkpoint.lock import RunLock, lock_run_dir
from noa_dist.checkpoint.lookup import (
    agree_on_resume,
    latest_checkpoint,
    resolve_resume,
    verify_checkpoint,
)
from noa_dist.checkpoint.store import load_checkpoint, save_checkpoint
from noa_dist.checkpoint.trainer_state import dumps_state, loads_state

__all__ = [
    "COMPLETE",
    "META",
    "MIN_KEEP",
    "RUN_LOCK",
    "TRAINER_STATE",
    "WEIGHTS",
    "CheckpointError",
    "RunLock",
    "StateDict",
    "agree_on_resume",
    "atomic_write",
    "atomic_write_bytes",
    "atomic_write_text",
    "checkpoint_kind",
    "config_from_dict",
    "dumps_state",
    "fsync_tree",
    "latest_checkpoint",
    "load_checkpoint",
    "load_model_weights",
    "load_safetensors",
    "load_weights",
    "load_weights_and_config",
    "loads_state",
    "lock_run_dir",
    "model_channels",
    "projector_dim",
    "probe_writable",
    "read_trainer_state",
    "resolve_resume",
    "save_checkpoint",
    "save_model_weights",
    "step_dir_name",
    "step_folder",
    "verify_checkpoint",
]
