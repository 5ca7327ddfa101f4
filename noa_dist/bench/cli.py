"""`noa-bench NAME [options] [trainer flags]`: measure the trainer on this machine.

    noa-bench step      trainer step vs a bare PyTorch loop, samples/s, 1 and 2 processes
    noa-bench data      reader vs raw h5py (0/1/2 workers); data-wait share of a real run
    noa-bench memory    activation peak vs T (TBPTT, full BPTT); DDP/ZeRO-1/2/3 per-rank state
    noa-bench sync      the skip-together agreement's share of step time
    noa-bench scale     samples/s at 1 and 2 processes (one thread each), weak-scaling efficiency
    noa-bench flops     model FLOPs per sample, achieved FLOP/s vs the measured matmul peak (MFU)

Every option the trainer takes (`--config`, `--batch-size`, `--timesteps`, the model flags,
...) selects what is measured; with none, the demo profile on the demo set, like
`accelerate launch noa_dist/train.py`. Each prints a Markdown table and writes JSON
(`--json`, default noa-bench-NAME.json).
"""

from __future__ import annotations

import argparse
import importlib
import sys
from pathlib import Path

from noa_dist.bench import common

# name -> (module in noa_dist.bench, its run function); each module has `add_arguments` and,
# when it launches processes, `worker`
BENCHES = {
    "step": ("speed", "run_step"),
    "sync": ("speed", "run_sync"),
    "scale": ("speed", "run_scale"),
    "data": ("data", "run"),
    "memory": ("memory", "run"),
    "flops": ("flops", "run"),
}


def _module(name: str):
    return importlib.import_module(f"noa_dist.bench.{BENCHES[name][0]}")


def parse(argv: list[str]) -> tuple[argparse.Namespace, list[str]]:
    parser = argparse.ArgumentParser(
        prog="noa-bench",
        description=__doc__.split("\n\n")[0],
        epilog=__doc__.split("\n\n", 1)[1],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        allow_abbrev=False,  # the rest goes to the trainer's parser untouched
    )
    parser.add_argument("bench", choices=list(BENCHES))
    parser.add_argument("--json", type=Path, help="where to write the JSON")
    parser.add_argument("--repeats", type=int, default=5, help="interleaved repeats")
    parser.add_argument("--threads", type=int, help="threads per process (default cores/procs)")
    parser.add_argument("--launches", type=int, default=3, help="scale: launches per count")
    parser.add_argument("--timeout", type=float, default=1800, help="seconds per launch")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    name = next((a for a in argv if a in BENCHES), None)
    if name is not None:
        _module(name).add_arguments(parser)
    return parser.parse_known_args(argv)


def main(argv: list[str] | None = None) -> int:
    args, flags = parse(list(sys.argv[1:] if argv is None else argv))
    module = _module(args.bench)
    if args.worker:
        module.worker(args, flags)  # leaves the process
    payload, table = getattr(module, BENCHES[args.bench][1])(args, flags)
    path = args.json or Path(f"noa-bench-{args.bench}.json")
    common.write_report(path, args.bench, payload, table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
