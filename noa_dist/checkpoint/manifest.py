"""The COMPLETE marker: written last, it lists every file of the folder it seals.

A marker alone proves only that the save reached its end; a weights file truncated or
overwritten later (a full disk on a copy, a half-synced rsync, bit rot) would still be
trusted, and `--resume auto` would fail on it at every requeue instead of falling back to
the previous checkpoint. So the marker records each file's relative path and size, and the
sha256 of the small ones (trainer state, scheduler, RNG pickles, small shards) where a
flipped byte would not change the size. Large files are checked by size only: hashing
gigabytes of ZeRO shards at every lookup would cost minutes.

Markers written before files were listed (no "files" key) are accepted on the old rule:
the marker exists and the folder's JSON file is readable.
"""

from __future__ import annotations

import hashlib
import json
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from noa_dist.atomic import atomic_write_text
from noa_dist.checkpoint.layout import COMPLETE
from noa_dist.checkpoint.trainer_state import loads_state

SMALL_FILE_BYTES = 1 << 20  # files below this size are hashed as well as sized


def seal(folder: Path, info: dict[str, Any]) -> str:
    """Write COMPLETE into folder, listing every file now in it; returns the marker's text.

    Call it only once every file is durable (fsynced): the marker must never describe
    data that a crash could still lose.
    """
    marker = {
        **info,
        "saved_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "files": inventory(folder),
    }
    text = json.dumps(marker, indent=1, sort_keys=True) + "\n"
    atomic_write_text(folder / COMPLETE, text)
    return text


def inventory(folder: Path) -> dict[str, dict[str, Any]]:
    """{relative path: {"size", "sha256" if small}} of every file under folder but COMPLETE."""
    files = {}
    for path in sorted(folder.rglob("*")):
        rel = path.relative_to(folder).as_posix()
        if rel == COMPLETE or not path.is_file():
            continue
        size = path.stat().st_size
        files[rel] = {
            "size": size,
            **({"sha256": _sha256(path)} if size < SMALL_FILE_BYTES else {}),
        }
    return files


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 16), b""):
            digest.update(block)
    return digest.hexdigest()


def read_marker(folder: Path) -> tuple[dict[str, Any] | None, str | None]:
    """(marker, None) or (None, why there is no usable marker)."""
    try:
        marker = json.loads((folder / COMPLETE).read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None, f"no {COMPLETE} marker: the save was interrupted"
    except (OSError, ValueError) as err:
        return None, f"its {COMPLETE} marker is not readable JSON ({err})"
    if not isinstance(marker, dict):
        return None, f"its {COMPLETE} marker is not a JSON object"
    return marker, None


def verify(folder: Path, json_name: str) -> str | None:
    """Why folder is not a whole, sealed save (None if it is).

    Every file the marker lists must exist with its recorded size (and hash, if small), and
    json_name (trainer_state.json or meta.json) must be readable JSON.
    """
    marker, reason = read_marker(folder)
    if reason is not None:
        return reason
    files = marker.get("files")
    if files is not None:
        if json_name not in files:
            return f"its {COMPLETE} marker does not list {json_name}"
        for rel, recorded in files.items():
            if (reason := _file_mismatch(folder / rel, rel, recorded)) is not None:
                return reason
    try:
        loads_state((folder / json_name).read_text(encoding="utf-8"))
    except FileNotFoundError:
        return f"has a {COMPLETE} marker but no {json_name}"
    except (OSError, ValueError) as err:
        return f"{json_name} is not readable JSON ({err})"
    return None


def _file_mismatch(path: Path, rel: str, recorded: dict[str, Any]) -> str | None:
    after = "damaged or replaced after the save"
    try:
        size = path.stat().st_size
    except FileNotFoundError:
        return f"{rel} is missing (listed in {COMPLETE})"
    except OSError as err:
        return f"{rel} cannot be read ({err})"
    if size != recorded.get("size"):
        return f"{rel} has {size} bytes, {COMPLETE} recorded {recorded.get('size')}: {after}"
    if "sha256" in recorded:
        try:
            digest = _sha256(path)
        except OSError as err:
            return f"{rel} cannot be read ({err})"
        if digest != recorded["sha256"]:
            return f"{rel} does not match the sha256 recorded in {COMPLETE}: {after}"
    return None
