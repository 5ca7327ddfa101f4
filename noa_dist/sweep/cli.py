"""`noa-sweep FILE (--list | --run-index I | --summary RUNS_DIR)`: W&B sweeps offline.

noa-sweep configs/sweeps/lambda_latent.yaml --list              # rows, as the agent renders ${args}
noa-sweep configs/sweeps/lambda_latent.yaml --run-index 3       # run row 3 (again: resume it)
noa-sweep configs/sweeps/lambda_latent.yaml --summary runs/sweeps/lambda_latent
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys
from pathlib import Path

from noa_dist.config import load_config
from noa_dist.errors import NoaError, OneLineErrorParser, user_message
from noa_dist.sweep import expand, launch, summary
from noa_dist.sweep.render import render_args, render_command, unset_envvars
from noa_dist.sweep.spec import Sweep, load_sweep


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineErrorParser(
        prog="noa-sweep",
        description="Expand, run and summarise a W&B sweep YAML without the W&B server.",
    )
    parser.add_argument("file", help="sweep YAML (the file `wandb sweep` takes)")
    what = parser.add_mutually_exclusive_group(required=True)
    what.add_argument("--list", action="store_true", help="print the rows, one per line")
    what.add_argument("--run-index", type=int, metavar="I", help="run row I (0-based)")
    what.add_argument("--summary", metavar="RUNS_DIR", help="tabulate and plot the runs there")
    parser.add_argument(
        "--count", type=int, help="rows of a random/bayes sweep to list (default: run_cap or 10)"
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of the random rows")
    parser.add_argument(
        "--runs-dir",
        help="parent of the rows' run folders (default: runs/sweeps/<sweep name>)",
    )
    parser.add_argument(
        "--command", action="store_true", help="with --list: print each row's whole command"
    )
    parser.add_argument("--plot", help="with --summary: PNG path (default: RUNS_DIR/<name>.png)")
    return parser


def list_rows(sweep: Sweep, count: int | None, seed: int, whole_command: bool) -> None:
    """One line per row: index, tab, the rendered `${args}` (or command). Every row is checked
    by the trainer's own parser first."""
    if sweep.method == "bayes":
        print(
            f"note: {sweep.path}: bayes is drawn offline like random (seed {seed})", file=sys.stderr
        )
    for name in unset_envvars(sweep.command, os.environ):
        print(f"note: {name} is not set; the agent would pass the bare name", file=sys.stderr)
    lines = []
    for i, row in enumerate(expand.rows(sweep, count, seed)):
        argv = render_command(sweep.command, row, program=sweep.program)
        try:
            load_config(launch.trainer_argv(argv, sweep.program, row))
        except NoaError as exc:
            raise type(exc)(f"row {i} ({shlex.join(render_args(row))}): {exc}") from None
        lines.append(f"{i}\t{shlex.join(argv if whole_command else render_args(row))}")
    print("\n".join(lines))


def show_summary(sweep: Sweep, runs_dir: str, plot_path: str | None) -> None:
    results = summary.collect(Path(runs_dir))
    print(summary.table(results))
    path = Path(plot_path) if plot_path else Path(runs_dir) / f"{launch.safe_name(sweep.name)}.png"
    print(f"Plot: {summary.plot(results, path, title=f'{sweep.name}: val VRMSE vs lambda_latent')}")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        sweep = load_sweep(args.file)
        if args.list:
            list_rows(sweep, args.count, args.seed, args.command)
            return 0
        if args.summary is not None:
            show_summary(sweep, args.summary, args.plot)
            return 0
        row = expand.row(sweep, args.run_index, args.seed)
        runs_dir = Path(args.runs_dir) if args.runs_dir else None
        return launch.run_row(sweep, args.run_index, row, runs_dir)
    except NoaError as exc:
        print(f"error: {user_message(exc)}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
