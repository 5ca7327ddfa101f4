"""`noa-data`: generate the demo dataset and compute stats.yaml for any Well dataset.

Each subcommand has its own `_add_<cmd>_parser(subparsers)` that registers its flags and its
handler (`handler=`); `main` only parses, dispatches and turns a NoaError into one line.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from noa_dist.data.check import check_dataset, dataset_notes, describe_dataset, summary_line
from noa_dist.data.generate import FAMILIES, dataset_summary, generate_dataset
from noa_dist.data.stats import write_stats
from noa_dist.data.writer import COMPRESSIONS
from noa_dist.errors import ConfigError, NoaError, OneLineErrorParser


def _comma_list(flag: str, convert: type) -> Callable[[str], list]:
    def parse(text: str) -> list:
        try:
            return [convert(item.strip()) for item in text.split(",") if item.strip()]
        except ValueError:
            raise ConfigError(
                f"{flag} {text!r}: expected a comma-separated list of {convert.__name__}"
            ) from None

    return parse


def _add_generate_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "generate", help="write the demo PDE dataset (Well format) and its stats.yaml"
    )
    p.add_argument(
        "out_dir", type=Path, help="dataset root to create (<out_dir>/data/<split>/*.hdf5)"
    )
    p.add_argument(
        "--n-trajectories",
        type=int,
        default=256,
        help="stored trajectories, all splits (default 256)",
    )
    p.add_argument("--grid", type=int, default=64, help="grid points per side (default 64)")
    p.add_argument(
        "--timesteps",
        type=int,
        default=64,
        help="steps after the initial state; stores timesteps+1 frames",
    )
    p.add_argument(
        "--families",
        type=_comma_list("--families", str),
        default=list(FAMILIES),
        help=f"comma list from {','.join(FAMILIES)}",
    )
    p.add_argument(
        "--split",
        type=_comma_list("--split", float),
        default=[0.8, 0.1, 0.1],
        help="train,valid,test fractions (default 0.8,0.1,0.1)",
    )
    p.add_argument(
        "--trajectories-per-shard",
        type=int,
        default=64,
        help="trajectories per HDF5 file (default 64)",
    )
    p.add_argument(
        "--seed", type=int, default=0, help="same seed -> byte-identical arrays, whatever --workers"
    )
    p.add_argument("--workers", type=int, default=2, help="simulation processes (default 2)")
    p.add_argument(
        "--n-realizations",
        type=int,
        default=1,
        help="noisy rollouts per (IC, params); >1 adds white-noise forcing",
    )
    p.add_argument(
        "--compression", choices=COMPRESSIONS, default="none", help="HDF5 filter (default none)"
    )
    p.add_argument(
        "--overwrite", action="store_true", help="replace an existing dataset in out_dir"
    )
    p.set_defaults(handler=_run_generate)


def _add_stats_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "stats", help="compute stats.yaml (mean/std/rms and deltas) of a Well dataset split"
    )
    p.add_argument("root", type=Path, help="dataset root holding data/<split>/*.hdf5")
    p.add_argument("--split", default="train", help="split to compute the stats on (default train)")
    p.add_argument(
        "--output", type=Path, default=None, help="output file (default ROOT/stats.yaml)"
    )
    p.add_argument("--overwrite", action="store_true", help="replace an existing output file")
    p.set_defaults(handler=_run_stats)


def _add_check_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "check",
        help="list every problem of a Well dataset (exit 1 if any; test split optional), "
        "optionally vs a config",
    )
    p.add_argument("root", type=Path, help="dataset root (data/<split>/*.hdf5, stats.yaml)")
    p.add_argument("--timesteps", type=int, help="rollout length T to check n_steps against")
    p.add_argument("--grid", type=int, help="expected grid points per side")
    p.add_argument("--n-channels", type=int, help="expected number of predicted channels")
    p.set_defaults(handler=_run_check)


def _add_info_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("info", help="summarise a Well dataset: splits, grid, channels")
    p.add_argument("root", type=Path, help="dataset root holding data/<split>/*.hdf5")
    p.set_defaults(handler=_run_info)


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineErrorParser(prog="noa-data", description="Well-format data tools for noa-dist.")
    subparsers = parser.add_subparsers(dest="command", required=True)
    _add_generate_parser(subparsers)
    _add_stats_parser(subparsers)
    _add_check_parser(subparsers)
    _add_info_parser(subparsers)
    return parser


def _disk_bytes(root: Path) -> int:
    return sum(p.stat().st_size for p in root.rglob("*") if p.is_file())


def _run_generate(args: argparse.Namespace) -> None:
    start = time.perf_counter()
    root = generate_dataset(
        args.out_dir,
        n_trajectories=args.n_trajectories,
        grid=args.grid,
        timesteps=args.timesteps,
        families=args.families,
        split_fractions=args.split,
        trajectories_per_shard=args.trajectories_per_shard,
        seed=args.seed,
        workers=args.workers,
        n_realizations=args.n_realizations,
        compression=args.compression,
        progress=True,
        overwrite=args.overwrite,
    )
    seconds = time.perf_counter() - start
    print(f"wrote {root}")
    for split, counts in dataset_summary(root).items():
        families = ", ".join(f"{f} {counts[f]}" for f in FAMILIES if counts.get(f))
        print(
            f"  {split:5s}: {counts.get('trajectories', 0):5d} trajectories in {counts['shards']} shard(s) ({families})"
        )
    print(f"  size {_disk_bytes(root) / 2**20:.1f} MiB, {seconds:.1f} s")


def _run_stats(args: argparse.Namespace) -> None:
    output = write_stats(
        args.root, split=args.split, output=args.output, overwrite=args.overwrite, progress=True
    )
    print(f"wrote {output}")


def _run_check(args: argparse.Namespace) -> None:
    problems = check_dataset(
        args.root,
        timesteps=args.timesteps,
        n_channels=args.n_channels,
        grid=args.grid,
        progress=sys.stderr.isatty(),
    )
    for problem in problems:
        print(problem)
    for note in dataset_notes(args.root):
        print(f"note: {note}")
    if problems:
        print(f"FAILED: {len(problems)} problem(s) in {args.root}", file=sys.stderr)
        sys.exit(1)
    print(f"OK: {args.root}: {summary_line(args.root)}")


def _run_info(args: argparse.Namespace) -> None:
    print(describe_dataset(args.root))


def main(argv: Sequence[str] | None = None) -> None:
    """Entry point of the `noa-data` console script."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
        args.handler(args)
    except NoaError as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)
