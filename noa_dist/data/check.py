"""`noa-data check` (every problem in a dataset root, at once) and `noa-data info` (a summary).

`check_dataset` keeps going after a problem: a run should not fail on its fifth start because
of the fifth of five problems that one pass could have listed. Each problem is one line that
starts with the file or directory it is about. Training needs train and valid; an absent test
split is a note (`dataset_notes`), not a problem.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import h5py
import numpy as np
from tqdm import tqdm

from noa_dist.data.schema import (
    DATA_DIR,
    REQUIRED_SPLITS,
    SPLITS,
    STATS_FILE,
    ShardInfo,
    channel_layout,
    list_shards,
    load_stats,
    open_hdf5,
    read_shard_info,
    shard_difference,
    split_dir,
    stats_problems,
)
from noa_dist.errors import DataError

SCAN_BLOCK_BYTES = 64 * 2**20  # NaN scan reads at most this much at once
_MAX_LISTED = 10


def check_dataset(
    root: str | os.PathLike,
    *,
    timesteps: int | None = None,
    n_channels: int | None = None,
    grid: int | tuple[int, ...] | None = None,
    progress: bool = False,
) -> list[str]:
    """All problems of a dataset root, and of it against a training config if given.

    Finds missing or empty train/valid splits, unreadable shards, missing attrs/groups, shards
    that disagree, NaN/Inf per trajectory, stats.yaml gaps, and timesteps/grid/channel-count
    mismatches.
    """
    root = Path(root)
    if not root.is_dir():
        return [f"{root}: dataset root not found"]
    problems: list[str] = []
    shards_by_split: dict[str, list[ShardInfo]] = {}
    for split in SPLITS:
        shards, split_problems = _read_split(root, split)
        problems += split_problems
        if shards:
            shards_by_split[split] = shards
    if not shards_by_split:
        return problems
    problems += _cross_split_problems(shards_by_split)
    reference = next(iter(shards_by_split.values()))[0]
    problems += _stats_check(root, reference)
    problems += _config_problems(root, shards_by_split, timesteps, n_channels, grid)
    all_shards = [s for shards in shards_by_split.values() for s in shards]
    for shard in tqdm(all_shards, desc="scanning for NaN/Inf", unit="shard", disable=not progress):
        problems += _nonfinite_problems(shard)
    return problems


def dataset_notes(root: str | os.PathLike) -> list[str]:
    """What is absent but not needed: a split other than train and valid without shards."""
    if not Path(root).is_dir():
        return []  # check_dataset reports the missing root
    return [
        f"{split_dir(root, split)}: no {split} split (optional: training reads only "
        f"{' and '.join(REQUIRED_SPLITS)})"
        for split in SPLITS
        if split not in REQUIRED_SPLITS and _absent(Path(root), split)
    ]


def describe_dataset(root: str | os.PathLike) -> str:
    """A human summary for `noa-data info`: splits, grid, channels, scalars, stats, size."""
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"{root}: dataset root not found")
    lines, reference = [], None
    for split in SPLITS:
        shards, problems = _read_split(root, split)
        reference = reference or (shards[0] if shards else None)
        if shards:
            n_traj = sum(s.n_trajectories for s in shards)
            n_steps = shards[0].n_steps
            lines.append(
                f"  {split:6} {len(shards):4} shards {n_traj:6} trajectories  n_steps {n_steps}"
            )
        lines += [f"  {split:6} problem: {p}" for p in problems]
        if not shards and not problems:
            lines.append(f"  {split:6} absent (optional)")
    if reference is None:
        return "\n".join([f"dataset root {root}: no readable shard", *lines])
    header = [
        f"dataset  {reference.dataset_name}  ({root})",
        f"grid     {' x '.join(map(str, reference.spatial_shape))} {reference.grid_type} "
        f"({', '.join(reference.spatial_dims)})",
        "splits",
    ]
    return "\n".join(
        header + lines + _channel_lines(reference) + _scalar_lines(reference) + _footer(root)
    )


# --- reading and comparing shards ---------------------------------------------------------


def _absent(root: Path, split: str) -> bool:
    directory = split_dir(root, split)
    return not directory.is_dir() or not list_shards(root, split)


def _read_split(root: Path, split: str) -> tuple[list[ShardInfo], list[str]]:
    """Readable shards of a split and the problems of the others (missing dir, empty, ...);
    an absent optional split has neither."""
    if split not in REQUIRED_SPLITS and _absent(root, split):
        return [], []
    try:
        paths = list_shards(root, split)
    except DataError as err:
        return [], [str(err)]
    if not paths:
        return [], [f"{split_dir(root, split)}: empty split, no .hdf5 shards"]
    shards, problems = [], []
    for path in paths:
        try:
            shards.append(read_shard_info(path))
        except DataError as err:
            problems.append(str(err))
    for other in shards[1:]:
        difference = shard_difference(shards[0], other)
        if difference:
            problems.append(f"{other.path}: disagrees with {shards[0].path}: {difference}")
    if shards and sum(s.n_trajectories for s in shards) == 0:
        problems.append(f"{split_dir(root, split)}: empty split, its shards hold 0 trajectories")
    return shards, problems


def _cross_split_problems(shards_by_split: dict[str, list[ShardInfo]]) -> list[str]:
    """Splits may differ in n_steps, but not in fields or grid."""
    splits = list(shards_by_split.items())
    reference_split, (reference, *_) = splits[0]
    problems = []
    for split, (first, *_) in splits[1:]:
        difference = shard_difference(reference, first, compare_steps=False)
        if difference:
            problems.append(
                f"{first.path}: split {split!r} disagrees with split {reference_split!r} "
                f"({reference.path}): {difference}"
            )
    return problems


def _stats_check(root: Path, reference: ShardInfo) -> list[str]:
    try:
        stats = load_stats(root)
    except DataError as err:
        return [str(err)]
    return stats_problems(stats, reference.fields, root / STATS_FILE)


def _config_problems(root, shards_by_split, timesteps, n_channels, grid) -> list[str]:
    """The dataset against the training config: window length, grid, channel count."""
    problems = []
    for split, shards in shards_by_split.items():
        where = split_dir(root, split)
        n_steps = min(s.n_steps for s in shards)
        if timesteps is not None and timesteps + 1 > n_steps:
            problems.append(
                f"{where}: --timesteps {timesteps} needs {timesteps + 1} frames per window "
                f"(u0 + targets) but n_steps={n_steps}"
            )
        shape = shards[0].spatial_shape
        expected = (grid,) * len(shape) if isinstance(grid, int) else grid
        if expected is not None and tuple(expected) != shape:
            problems.append(f"{where}: grid {list(shape)} but --grid expects {list(expected)}")
        predicted = channel_layout(shards[0].fields).predicted
        if n_channels is not None and n_channels != len(predicted):
            problems.append(
                f"{where}: {len(predicted)} predicted channels {list(predicted)} "
                f"but the config expects n_channels={n_channels}"
            )
    return problems


# --- NaN/Inf scan ----------------------------------------------------------------------------


def _nonfinite_problems(shard: ShardInfo) -> list[str]:
    """One problem per field holding NaN/Inf, naming the trajectories (rows) affected."""
    problems = []
    try:
        with open_hdf5(shard.path) as f:
            for field in shard.fields:
                bad = _nonfinite_rows(f[field.key], field.sample_varying)
                if bad is None:
                    problems.append(
                        f"{shard.path}: {field.key}: NaN/Inf (shared by all trajectories)"
                    )
                elif bad:
                    problems.append(
                        f"{shard.path}: {field.key}: NaN/Inf in trajectories {_listed(bad)}"
                    )
    except (DataError, OSError) as err:
        problems.append(f"{shard.path}: cannot read field values: {err}")
    return problems


def _nonfinite_rows(ds: h5py.Dataset, sample_varying: bool) -> list[int] | None:
    """Trajectory rows with a non-finite value; None if a field without rows is non-finite."""
    if not sample_varying:
        return None if not all(np.isfinite(b).all() for b in _blocks(ds, ())) else []
    return [
        row
        for row in range(ds.shape[0])
        if not all(np.isfinite(b).all() for b in _blocks(ds, (row,)))
    ]


def _blocks(ds: h5py.Dataset, prefix: tuple[int, ...]) -> Iterator[np.ndarray]:
    """ds[prefix] in slices along its next axis, each at most SCAN_BLOCK_BYTES (streaming)."""
    rest = ds.shape[len(prefix) :]
    if not rest:
        yield ds[prefix]
        return
    bytes_per_slice = int(np.prod(rest[1:], dtype=np.int64)) * ds.dtype.itemsize
    step = max(1, SCAN_BLOCK_BYTES // max(1, bytes_per_slice))
    for start in range(0, rest[0], step):
        yield ds[(*prefix, slice(start, start + step))]


def _listed(rows: list[int]) -> str:
    shown = ", ".join(map(str, rows[:_MAX_LISTED]))
    return f"[{shown}]" if len(rows) <= _MAX_LISTED else f"[{shown}, ...] ({len(rows)} in all)"


# --- info ------------------------------------------------------------------------------------


def _channel_lines(shard: ShardInfo) -> list[str]:
    layout = channel_layout(shard.fields)
    lines = []
    for title, fields, names in (
        ("predicted", layout.predicted_fields, layout.predicted),
        ("conditioning", layout.conditioning_fields, layout.conditioning),
    ):
        lines.append(f"{title} channels ({len(names)}): {', '.join(names) or '-'}")
        lines += [
            f"  {f.key:32} order {f.order}  per trajectory {list(f.shape)}"
            f"{'' if f.sample_varying else '  (shared by all trajectories)'}"
            for f in fields
        ]
    return lines


def _scalar_lines(shard: ShardInfo) -> list[str]:
    with open_hdf5(shard.path) as f:
        described = [_describe_scalar(f["scalars"][s.name], s) for s in shard.scalars]
    return [f"scalars ({len(described)})", *(f"  {d}" for d in described)]


def _describe_scalar(ds: h5py.Dataset, spec) -> str:
    if spec.time_varying:
        return f"{spec.name:24} time series"
    if spec.sample_varying and ds.size:
        values = ds[()]
        return f"{spec.name:24} per trajectory, {np.min(values):.4g} .. {np.max(values):.4g}"
    return f"{spec.name:24} {ds[()]!s:.12}"


def _footer(root: Path) -> list[str]:
    stats = root / STATS_FILE
    size = sum(p.stat().st_size for p in (root / DATA_DIR).rglob("*") if p.is_file())
    return [
        f"stats    {stats if stats.is_file() else 'MISSING: ' + str(stats)}",
        f"size     {size / 2**20:.1f} MiB on disk",
    ]


def summary_line(root: str | os.PathLike) -> str:
    """One line for `noa-data check` when nothing is wrong: splits, n_steps, grid, channels."""
    root = Path(root)
    shards_by_split = {split: _read_split(root, split)[0] for split in SPLITS}
    shards_by_split = {split: shards for split, shards in shards_by_split.items() if shards}
    first = next(iter(shards_by_split.values()))[0]
    splits = ", ".join(
        f"{split} {len(shards)} shards/{sum(s.n_trajectories for s in shards)} trajectories"
        for split, shards in shards_by_split.items()
    )
    return (
        f"{splits}; n_steps {first.n_steps}, grid {list(first.spatial_shape)}, "
        f"{len(channel_layout(first.fields).predicted)} predicted channels"
    )
