"""trainer_state.json as strict JSON: what a checkpoint stores besides accelerate's files.

Strict (no bare NaN/Infinity, which other JSON readers refuse): non-finite floats are stored
as {"__float__": "nan" | "inf" | "-inf"}. Values JSON cannot hold (tensors, non-str keys)
raise TypeError naming where they are, before anything is written.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import torch

_FLOAT_TAG = "__float__"


def dumps_state(state: Any) -> str:
    """Strict JSON (no bare NaN/Infinity) that `loads_state` turns back into the same values."""
    return json.dumps(_to_json(state, "state"), indent=2, allow_nan=False)


def loads_state(text: str) -> Any:
    return json.loads(text, object_hook=_from_json)


def _to_json(obj: Any, where: str) -> Any:
    if obj is None or isinstance(obj, (bool, int, str)):
        return obj
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else {_FLOAT_TAG: str(obj)}
    if isinstance(obj, np.generic) or (isinstance(obj, torch.Tensor) and obj.dim() == 0):
        return _to_json(obj.item(), where)  # sync point for a device tensor
    if isinstance(obj, Path):
        return str(obj)
    if isinstance(obj, (list, tuple)):
        return [_to_json(item, f"{where}[{i}]") for i, item in enumerate(obj)]
    if isinstance(obj, dict):
        bad_keys = [key for key in obj if not isinstance(key, str)]
        if bad_keys:
            raise TypeError(f"{where}: key {bad_keys[0]!r} is not a str; JSON keys must be str")
        return {key: _to_json(value, f"{where}[{key!r}]") for key, value in obj.items()}
    raise TypeError(f"{where}: {type(obj).__name__} cannot be stored in a checkpoint's JSON")


def _from_json(obj: dict[str, Any]) -> Any:
    if obj.keys() == {_FLOAT_TAG}:
        return float(obj[_FLOAT_TAG])
    return obj
