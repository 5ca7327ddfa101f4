"""`noa-bench step`, `sync` and `scale`: the trainer's step against a bare loop, the share of
the skip-together agreement, and samples/s at 1 and 2 processes.

Every comparison runs side by side in one launch (variants interleaved repeat by repeat,
`common.interleaved`); `scale` alternates 1- and 2-process launches. Samples/s counts every
rank's samples; the clock is rank 0's, started after a barrier.
"""

from __future__ import annotations

import argparse
import statistics
from pathlib import Path

from accelerate import Accelerator

from noa_dist.bench import common, launch
from noa_dist.bench.loops import AgreementOps, BareLoop, TrainerLoop, samples_per_step

LOOPS = {"trainer": TrainerLoop, "bare": BareLoop, "agreement": AgreementOps}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--steps", type=int, default=8, help="optimizer steps per timed repeat")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps per variant first")
    parser.add_argument(
        "--processes", default="1,2", help="comma list of process counts (step, sync)"
    )
    parser.add_argument("--variants", default="", help=argparse.SUPPRESS)  # worker side


def measure(accelerator: Accelerator, args: argparse.Namespace, flags: list[str]) -> dict:
    """Worker: every variant's samples/s (agreement: seconds/step) per repeat, interleaved."""
    cfg, root = common.trainer_config(flags)
    parts = common.build_parts(cfg, accelerator, root)
    micro = common.synthetic_batches(
        cfg,
        parts.layout,
        cfg.optim.gradient_accumulation_steps,
        seed=accelerator.process_index,
        device=accelerator.device,
    )
    loops = {name: LOOPS[name](parts, micro) for name in args.variants.split(",")}
    for loop in loops.values():
        loop.run(args.warmup)

    def seconds_per_step(loop) -> float:
        accelerator.wait_for_everyone()
        return common.timed(lambda: loop.run(args.steps)) / args.steps

    per_step = common.interleaved(
        {name: lambda loop=loop: seconds_per_step(loop) for name, loop in loops.items()},
        args.repeats,
    )
    return {
        "processes": accelerator.num_processes,
        "threads": common.torch.get_num_threads(),
        "samples_per_step": samples_per_step(parts),
        "n_params": parts.n_params,
        "seconds_per_step": per_step,
    }


def _launch(args, flags, processes: int, variants: str, threads: int | None = None) -> dict:
    threads = threads or common.set_threads(args.threads, processes)
    argv = [f"--variants={variants}", f"--steps={args.steps}", f"--warmup={args.warmup}"]
    argv += [f"--repeats={args.repeats}", *flags]
    return launch.run_workers(args.bench, processes, threads, argv, timeout=args.timeout)


def _processes(args) -> list[int]:
    return [int(p) for p in args.processes.split(",")]


def run_step(args: argparse.Namespace, flags: list[str]) -> tuple[dict, str]:
    config, rows, table_rows = _describe(flags), [], []
    for processes in _processes(args):
        r = _launch(args, flags, processes, "trainer,bare")
        rate = {k: [r["samples_per_step"] / s for s in v] for k, v in r["seconds_per_step"].items()}
        paired = [t / b for t, b in zip(rate["trainer"], rate["bare"], strict=True)]
        row = {
            "processes": processes,
            "threads_per_process": r["threads"],
            "trainer_samples_per_s": common.summary(rate["trainer"]),
            "bare_samples_per_s": common.summary(rate["bare"]),
            "ratio": common.summary(paired),
        }
        rows.append(row)
        table_rows.append(
            [
                processes,
                r["threads"],
                common.median_spread(row["trainer_samples_per_s"]),
                common.median_spread(row["bare_samples_per_s"]),
                common.median_spread(row["ratio"]),
            ]
        )
    headers = ["processes", "threads each", "trainer samples/s", "bare loop samples/s", "ratio"]
    payload = {"config": config, "rows": rows}
    return payload, _title(args) + common.markdown_table(headers, table_rows)


def run_sync(args: argparse.Namespace, flags: list[str]) -> tuple[dict, str]:
    config, rows, table_rows = _describe(flags), [], []
    for processes in _processes(args):
        r = _launch(args, flags, processes, "trainer,agreement")
        step_s, agree_s = r["seconds_per_step"]["trainer"], r["seconds_per_step"]["agreement"]
        share = [a / s for a, s in zip(agree_s, step_s, strict=True)]
        row = {
            "processes": processes,
            "step_s": common.summary(step_s),
            "agreement_s": common.summary(agree_s),
            "share": common.summary(share),
        }
        rows.append(row)
        table_rows.append(
            [
                processes,
                common.median_spread(row["step_s"]),
                f"{row['agreement_s']['median'] * 1e6:.0f} µs",
                f"{row['share']['median']:.3%} (max {row['share']['max']:.3%})",
            ]
        )
    headers = ["processes", "trainer step s", "agreement per step", "share of step time"]
    payload = {"config": config, "rows": rows}
    return payload, _title(args) + common.markdown_table(headers, table_rows)


def run_scale(args: argparse.Namespace, flags: list[str]) -> tuple[dict, str]:
    """Weak scaling: the per-process batch fixed, one thread per process, gloo."""
    config = _describe(flags)
    rates: dict[int, list[float]] = {1: [], 2: []}
    for _ in range(args.launches):
        for processes in (1, 2):
            r = _launch(args, flags, processes, "trainer", threads=1)
            per_repeat = [r["samples_per_step"] / s for s in r["seconds_per_step"]["trainer"]]
            rates[processes].append(statistics.median(per_repeat))
    one, two = common.summary(rates[1]), common.summary(rates[2])
    efficiency = common.summary([b / (2 * a) for a, b in zip(rates[1], rates[2], strict=True)])
    payload = {
        "config": config,
        "samples_per_s": {"1": one, "2": two},
        "weak_scaling_efficiency": efficiency,
    }
    table = common.markdown_table(
        ["processes (1 thread each)", "samples/s", "weak-scaling efficiency"],
        [
            [1, common.median_spread(one), "1"],
            [2, common.median_spread(two), common.median_spread(efficiency)],
        ],
    )
    return payload, _title(args) + table


def _describe(flags: list[str]) -> dict:
    cfg, root = common.trainer_config(flags)
    return {
        "dataset": str(root),
        **cfg.to_dict()["data"],
        **cfg.to_dict()["model"],
        **cfg.to_dict()["train"],
    }


def _title(args) -> str:
    m = common.machine()
    return (
        f"noa-bench {args.bench}: {m['cpu']}, {m['cores']} cores, torch {m['torch']}, "
        f"load average {m['load_average_1m']:.2f}; median (±half the spread) of "
        f"{args.repeats} interleaved repeats of {args.steps} steps\n\n"
    )


def worker(args: argparse.Namespace, flags: list[str]) -> None:
    cfg, _ = common.trainer_config(flags)
    launch.worker(cfg, Path(args.out), args.threads, lambda acc: measure(acc, args, flags))
