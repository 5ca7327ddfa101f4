"""Read an offline W&B run (`run-<id>.wandb`) back into Python: config, history, summary.

wandb 0.31 ships no reader for these files (its Python `datastore.py` is gone; the Go core
writes them). The file is a LevelDB-style log (github.com/google/leveldb doc/log_format.md)
with a W&B header, and each payload is a `wandb.proto.wandb_internal_pb2.Record`:

    file   := header block*         header := ident ":W&B" | magic uint16 0xBEE1 | version uint8 0
    block  := chunk* zero-trailer   (32768 bytes; a chunk never starts in the last 6 bytes)
    chunk  := crc uint32 | length uint16 | type uint8 | data[length]     (little-endian)
    type   := FULL 1 | FIRST 2 | MIDDLE 3 | LAST 4   (FIRST MIDDLE* LAST spans blocks)
    crc    := zlib.crc32(data, zlib.crc32(bytes([type])))
"""

from __future__ import annotations

import json
import re
import struct
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from noa_dist.errors import DataError

_FILE_HEADER = struct.Struct("<4sHB")
_CHUNK_HEADER = struct.Struct("<IHB")
_IDENT, _MAGIC, _VERSION = b":W&B", 0xBEE1, 0
_BLOCK_LEN = 32768
_FULL, _FIRST, _MIDDLE, _LAST = 1, 2, 3, 4
_TYPE_CRC = {t: zlib.crc32(bytes([t])) for t in (_FULL, _FIRST, _MIDDLE, _LAST)}
_INTERNAL_KEY = "_wandb"


@dataclass
class OfflineRun:
    """One offline run segment. A resumed run has one segment (directory) per process start."""

    run_id: str
    path: Path
    """The `.wandb` file."""
    name: str = ""
    project: str = ""
    config: dict[str, Any] = field(default_factory=dict)
    history: list[dict[str, Any]] = field(default_factory=list)
    """One dict per committed step; `_step` is the step passed to `accelerator.log`."""
    summary: dict[str, Any] = field(default_factory=dict)
    finished: bool = False
    """True if the run wrote its exit record (False: crashed or still running)."""

    def series(self, key: str) -> tuple[list[int], list[Any]]:
        """(steps, values) of `key` over the rows that logged it."""
        rows = [row for row in self.history if key in row]
        return [row["_step"] for row in rows], [row[key] for row in rows]


def find_offline_runs(wandb_dir: Path | str) -> list[Path]:
    """Offline run directories under `wandb_dir` (the `dir` given to W&B or its `wandb/`
    subfolder), oldest first, so the segments of a resumed run come out in order."""
    root = Path(wandb_dir)
    if not root.is_dir():
        raise DataError(f"{root}: not a directory (expected a W&B dir holding offline-run-*)")
    runs = [
        p for p in (*root.glob("offline-run-*"), *root.glob("wandb/offline-run-*")) if p.is_dir()
    ]
    return sorted(runs, key=_segment_order)


def _segment_order(run_dir: Path) -> tuple[str, int, str]:
    """offline-run-<YYYYmmdd_HHMMSS>-<id>[-<n>]: wandb appends -1, -2 ... within one second."""
    match = re.fullmatch(r"offline-run-(\d{8}_\d{6})-(.+?)(?:-(\d+))?", run_dir.name)
    if match is None:
        return (run_dir.name, 0, "")
    stamp, run_id, copy = match.groups()
    return (stamp, int(copy or 0), run_id)


def read_run(run: Path | str) -> OfflineRun:
    """Decode an offline run directory or its `.wandb` file."""
    path = _wandb_file(Path(run))
    result = OfflineRun(run_id=path.stem.removeprefix("run-"), path=path)
    for record in iter_records(path):
        _apply(result, record)
    return result


def _wandb_file(run: Path) -> Path:
    if run.is_file():
        return run
    candidates = sorted(run.glob("run-*.wandb"))
    if len(candidates) != 1:
        raise DataError(f"{run}: expected exactly one run-<id>.wandb file, found {len(candidates)}")
    return candidates[0]


def _apply(run: OfflineRun, record: Any) -> None:
    """Fold one protobuf Record into the run."""
    kind = record.WhichOneof("record_type")
    if kind == "run":
        run.run_id = record.run.run_id or run.run_id
        run.name, run.project = record.run.display_name, record.run.project
        _update(run.config, record.run.config.update, record.run.config.remove)
    elif kind == "config":
        _update(run.config, record.config.update, record.config.remove)
    elif kind == "summary":
        _update(run.summary, record.summary.update, record.summary.remove)
    elif kind == "history":
        row: dict[str, Any] = {}
        _update(row, record.history.item, ())
        row.setdefault("_step", record.history.step.num)
        run.history.append(row)
    elif kind == "exit":
        run.finished = True
    run.config.pop(_INTERNAL_KEY, None)
    run.summary.pop(_INTERNAL_KEY, None)


def _update(target: dict[str, Any], updates: Any, removes: Any) -> None:
    """Apply proto items (`key` or `nested_key` path, JSON value) to a nested dict."""
    for item in updates:
        *parents, leaf = _key_path(item)
        node = target
        for name in parents:
            node = node.setdefault(name, {})
        node[leaf] = json.loads(item.value_json)
    for item in removes:
        *parents, leaf = _key_path(item)
        node = target
        for name in parents:
            node = node.get(name, {})
        node.pop(leaf, None)


def _key_path(item: Any) -> list[str]:
    return [item.key] if item.key else list(item.nested_key)


def iter_records(path: Path) -> Iterator[Any]:
    """Parsed `Record` protobufs in file order; a torn final record (crash) ends the scan."""
    from wandb.proto import wandb_internal_pb2

    for payload in _iter_payloads(path):
        record = wandb_internal_pb2.Record()
        record.ParseFromString(payload)
        yield record


def _iter_payloads(path: Path) -> Iterator[bytes]:
    """Reassemble FULL / FIRST..LAST chunks into record payloads."""
    data = path.read_bytes()
    _check_file_header(path, data)
    pending: list[bytes] | None = None
    for offset, kind, chunk in _iter_chunks(path, data):
        if kind == _FULL and pending is None:
            yield chunk
        elif kind == _FIRST and pending is None:
            pending = [chunk]
        elif kind in (_MIDDLE, _LAST) and pending is not None:
            pending.append(chunk)
            if kind == _LAST:
                yield b"".join(pending)
                pending = None
        else:
            raise DataError(f"{path}: chunk of type {kind} out of sequence at byte {offset}")


def _check_file_header(path: Path, data: bytes) -> None:
    if len(data) < _FILE_HEADER.size:
        raise DataError(f"{path}: {len(data)} bytes, too short for a W&B log header")
    ident, magic, version = _FILE_HEADER.unpack_from(data)
    if (ident, magic, version) != (_IDENT, _MAGIC, _VERSION):
        raise DataError(
            f"{path}: header {ident!r}/{magic:#06x}/v{version}, "
            f"expected {_IDENT!r}/{_MAGIC:#06x}/v{_VERSION} (not an offline W&B run file?)"
        )


def _iter_chunks(path: Path, data: bytes) -> Iterator[tuple[int, int, bytes]]:
    """(offset, type, data) of each checksummed chunk, skipping block trailers."""
    offset = _FILE_HEADER.size
    while True:
        block_left = _BLOCK_LEN - offset % _BLOCK_LEN
        if block_left < _CHUNK_HEADER.size:
            offset += block_left
            continue
        if offset + _CHUNK_HEADER.size > len(data):
            return
        crc, length, kind = _CHUNK_HEADER.unpack_from(data, offset)
        if (crc, length, kind) == (0, 0, 0):  # zero padding (LevelDB's preallocated tail)
            offset += block_left
            continue
        start = offset + _CHUNK_HEADER.size
        if start + length > len(data):
            return  # torn write at the end of a crashed run
        chunk = data[start : start + length]
        if kind not in _TYPE_CRC or crc != zlib.crc32(chunk, _TYPE_CRC[kind]):
            raise DataError(f"{path}: corrupt chunk (type {kind}, bad checksum) at byte {offset}")
        yield offset, kind, chunk
        offset = start + length
