"""`noa-bench data`: the reader against raw h5py reads of the same windows, and the share of a
real training run's time spent waiting for data.

Reader: every mode reads the same windows (the split's first `--samples`, shuffled as in
training) after one untimed pass, so the page cache is equally warm for all; the modes are
interleaved repeat by repeat. Raw h5py opens each shard once and reads `ds[row, s:s+T+1]` per
time-varying field and `ds[row]` per constant one (no float32 conversion, normalisation or
torch). A DataLoader's samples/s is its steady state after the first batch (worker start-up
is listed apart).

Data wait: the trainer itself (`noa_dist.train.prepare` + `fit`) runs `--train-steps` steps of
the configured run (the demo profile by default, its default workers) in a temporary folder;
the logging meter's `train/data_wait_frac` of every log interval is collected, the first
interval (worker start-up) reported apart.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from contextlib import contextmanager

import numpy as np
from torch.utils.data import DataLoader

from noa_dist import tracking
from noa_dist.bench import common
from noa_dist.data.dataset import WellWindowDataset
from noa_dist.data.schema import open_hdf5


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--samples", type=int, default=256, help="windows to read per repeat")
    parser.add_argument("--split", default="train")
    parser.add_argument("--workers", default="0,1,2", help="comma list of num_workers")
    parser.add_argument("--train-steps", type=int, default=64, help="steps of the real run")


class RawReader:
    """Plain h5py: every shard and field dataset opened once up front, then window slices."""

    def __init__(self, ds: WellWindowDataset):
        self.ds = ds
        self.files = {shard.path: open_hdf5(shard.path) for shard in ds.info.shards}
        self.datasets = {
            path: {field.key: f[field.key] for field in ds.info.fields}
            for path, f in self.files.items()
        }

    def read(self, order: list[int]) -> int:
        """Read the windows of `order`; returns the bytes read."""
        n_bytes = 0
        for index in order:
            path, row, start = self.ds.locate(index)
            for field in self.ds.info.fields:
                where = ((row,) if field.sample_varying else ()) + (
                    (slice(start, start + self.ds.timesteps + 1),) if field.time_varying else ()
                )
                n_bytes += self.datasets[path][field.key][where].nbytes
        return n_bytes

    def close(self) -> None:
        for f in self.files.values():
            f.close()


def time_raw(ds: WellWindowDataset, order: list[int]) -> dict[str, float]:
    reader = RawReader(ds)
    try:
        seconds = common.timed(lambda: reader.read(order))
    finally:
        reader.close()
    return {"samples_per_s": len(order) / seconds, "startup_s": 0.0}


def time_getitem(ds: WellWindowDataset, order: list[int]) -> dict[str, float]:
    """`ds[i]` in a loop: the reader's own cost, without DataLoader batching and collation."""
    seconds = common.timed(lambda: [ds[i] for i in order])
    ds.close()
    return {"samples_per_s": len(order) / seconds, "startup_s": 0.0}


def time_loader(
    ds: WellWindowDataset, order: list[int], workers: int, batch_size: int
) -> dict[str, float]:
    loader = DataLoader(ds, batch_size=batch_size, sampler=order, num_workers=workers)
    start = time.perf_counter()
    batches = iter(loader)
    first = next(batches)
    after_first = time.perf_counter()
    n_rest = sum(len(batch["index"]) for batch in batches)
    seconds = time.perf_counter() - after_first
    ds.close()  # workers=0 opened files in this process; start the next mode cold
    rate = n_rest / seconds if n_rest else len(first["index"]) / (after_first - start)
    return {"samples_per_s": rate, "startup_s": after_first - start}


def reader_rows(args, cfg, root) -> tuple[list[dict], int, int]:
    ds = WellWindowDataset(
        root, args.split, cfg.data.timesteps, window_stride=cfg.data.window_stride
    )
    n = min(args.samples, len(ds))
    order = np.random.default_rng(cfg.train.seed).permutation(n).tolist()
    warm = RawReader(ds)
    bytes_per_sample = warm.read(order[:1])
    warm.read(order)  # untimed: the page cache is equally warm for every mode
    warm.close()
    modes = {"raw h5py (open once)": lambda: time_raw(ds, order)}
    modes["dataset[i], no DataLoader"] = lambda: time_getitem(ds, order)
    for w in (int(w) for w in args.workers.split(",")):
        modes[f"DataLoader, {w} workers"] = lambda w=w: time_loader(
            ds, order, w, cfg.data.batch_size
        )
    runs = common.interleaved(modes, args.repeats)
    rows = []
    raw = [r["samples_per_s"] for r in runs["raw h5py (open once)"]]
    for name, results in runs.items():
        rate = [r["samples_per_s"] for r in results]
        rows.append(
            {
                "mode": name,
                "samples_per_s": common.summary(rate),
                "mb_per_s": common.summary([r * bytes_per_sample / 1e6 for r in rate]),
                "vs_raw": common.summary([a / b for a, b in zip(rate, raw, strict=True)]),
                "first_batch_s": common.summary([r["startup_s"] for r in results]),
            }
        )
    return rows, bytes_per_sample, n


@contextmanager
def _collect_train_metrics(sink: list[dict]):
    """The trainer's logged metrics (it logs through tracking.log_metrics) are also kept."""
    original = tracking.log_metrics

    def keep(accelerator, metrics, step):
        sink.append({"step": step, **{k: float(v) for k, v in metrics.items()}})
        original(accelerator, metrics, step)

    tracking.log_metrics = keep
    try:
        yield
    finally:
        tracking.log_metrics = original


def data_wait(flags: list[str], steps: int) -> dict:
    """Run the real trainer for `steps` steps; the meter's data-wait share per log interval."""
    from noa_dist import train  # the trainer's entry point, imported only here

    logged: list[dict] = []
    with tempfile.TemporaryDirectory(prefix="noa-bench-run-") as out:
        run_flags = [*flags, "--output-dir", out, "--run-name", "bench", "--resume", "none"]
        run_flags += ["--max-steps", str(steps), "--wandb-mode", "disabled"]
        with _collect_train_metrics(logged):
            cfg = train.load_config(run_flags)
            trainer = train.prepare(cfg)
            train.finish(trainer, trainer.fit())
    intervals = [m for m in logged if "train/data_wait_frac" in m]
    if not intervals:
        raise RuntimeError(f"the run logged no step metrics in {steps} steps (raise --train-steps)")
    steady = intervals[1:] or intervals
    seconds = [m["train/s_per_step"] for m in steady]
    return {
        "num_workers": cfg.data.num_workers,
        "steps": steps,
        "log_every": cfg.train.log_every,
        "first_interval_data_wait_frac": intervals[0]["train/data_wait_frac"],
        "data_wait_frac": common.summary([m["train/data_wait_frac"] for m in steady]),
        "s_per_step": common.summary(seconds),
        "samples_per_s": common.summary([m["train/samples_per_s"] for m in steady]),
    }


def run(args: argparse.Namespace, flags: list[str]) -> tuple[dict, str]:
    cfg, root = common.trainer_config(flags)
    common.set_threads(args.threads)
    rows, bytes_per_sample, n = reader_rows(args, cfg, root)
    wait = data_wait(flags, args.train_steps)
    m = common.machine()
    table = (
        f"noa-bench data: {m['cpu']}, {m['cores']} cores, load average {m['load_average_1m']:.2f}; "
        f"{root} split {args.split}, {n} windows of T={cfg.data.timesteps} "
        f"({bytes_per_sample / 1e6:.2f} MB each), batch {cfg.data.batch_size}; "
        f"median (±half the spread) of {args.repeats} interleaved repeats\n\n"
    )
    table += common.markdown_table(
        ["reader", "samples/s", "MB/s", "vs raw h5py", "first batch s"],
        [
            [
                r["mode"],
                common.median_spread(r["samples_per_s"]),
                common.fmt(r["mb_per_s"]["median"]),
                common.median_spread(r["vs_raw"]),
                common.fmt(r["first_batch_s"]["median"]),
            ]
            for r in rows
        ],
    )
    d = wait["data_wait_frac"]
    table += (
        f"\n\nReal training run ({wait['steps']} steps, {wait['num_workers']} worker(s), "
        f"{wait['s_per_step']['median']:.3f} s/step): data-wait fraction "
        f"{d['median']:.2%} median over {d['n']} log intervals (max {d['max']:.2%}); "
        f"first interval (worker start-up) {wait['first_interval_data_wait_frac']:.2%}"
    )
    payload = {"reader": rows, "bytes_per_sample": bytes_per_sample, "training_run": wait}
    return payload, table
