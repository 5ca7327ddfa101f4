"""Old import path of the checkpoint readers, now in `noa_dist.checkpoint` (formats.py).

Kept only so code written against `noa_dist.weights` while the package moved (the trainer
rewrite imports `load_weights` and `read_trainer_state` from here) keeps importing; new code
imports from `noa_dist.checkpoint`. Delete once nothing imports it.
"""

from noa_dist.checkpoint.formats import (
    EXPECTED,
    StateDict,
    checkpoint_kind,
    config_from_dict,
    load_weights,
    model_channels,
    read_trainer_state,
    step_folder,
)

__all__ = [
    "EXPECTED",
    "StateDict",
    "checkpoint_kind",
    "config_from_dict",
    "load_weights",
    "model_channels",
    "read_trainer_state",
    "step_folder",
]
