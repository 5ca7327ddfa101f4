"""Read throughput of `WellWindowDataset` in a DataLoader vs raw h5py reads of the same windows.

    python -m noa_dist.bench.read_throughput ROOT --timesteps 32 --split train --samples 256

Every mode reads the same windows in the same (shuffled, as in training) order after one
untimed warm-up pass, so the page cache is equally warm for all. Raw h5py opens each shard
once and reads `ds[row, s:s+T+1]` per time-varying field and `ds[row]` per constant one, with
no float32 conversion, normalisation or torch; the ratio shows what the reader costs on top.
Steady-state samples/s excludes the first batch; its time (worker start-up) is listed apart.
Each figure is the best of --repeats runs.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader

from noa_dist.data.dataset import WellWindowDataset
from noa_dist.data.schema import open_hdf5


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m noa_dist.bench.read_throughput")
    parser.add_argument("root", help="Well dataset root")
    parser.add_argument("--timesteps", type=int, default=32, help="rollout length T")
    parser.add_argument("--split", default="train")
    parser.add_argument("--samples", type=int, default=256, help="windows to read (clipped)")
    parser.add_argument("--window-stride", type=int, default=None, help="default: timesteps")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--workers", default="0,1,2", help="comma list of num_workers")
    parser.add_argument("--seed", type=int, default=0, help="seed of the shuffled read order")
    parser.add_argument("--repeats", type=int, default=3, help="best of N runs per mode")
    parser.add_argument(
        "--threads", type=int, default=None, help="torch threads of this process (collation)"
    )
    return parser.parse_args(argv)


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
        start = time.perf_counter()
        reader.read(order)
        seconds = time.perf_counter() - start
    finally:
        reader.close()
    return {"samples_per_s": len(order) / seconds, "startup_s": 0.0}


def time_getitem(ds: WellWindowDataset, order: list[int]) -> dict[str, float]:
    """`ds[i]` in a loop: the reader's own cost, without DataLoader batching and collation."""
    start = time.perf_counter()
    for index in order:
        ds[index]
    seconds = time.perf_counter() - start
    ds.close()
    return {"samples_per_s": len(order) / seconds, "startup_s": 0.0}


def time_loader(
    ds: WellWindowDataset, order: list[int], workers: int, batch_size: int
) -> dict[str, float]:
    """Steady-state samples/s after the first batch, and the time to that first batch."""
    loader = DataLoader(ds, batch_size=batch_size, sampler=order, num_workers=workers)
    start = time.perf_counter()
    batches = iter(loader)
    first = next(batches)
    after_first = time.perf_counter()
    n_rest = sum(len(batch["index"]) for batch in batches)
    seconds = time.perf_counter() - after_first
    ds.close()  # workers=0 opened files in this process; start the next mode cold
    return {
        "samples_per_s": n_rest / seconds
        if n_rest
        else len(first["index"]) / (after_first - start),
        "startup_s": after_first - start,
    }


def best_of(repeats: int, run) -> dict[str, float]:
    """The fastest of `repeats` runs: other load on the machine only ever slows a run down."""
    return max((run() for _ in range(max(1, repeats))), key=lambda r: r["samples_per_s"])


def format_table(rows: list[tuple[str, dict[str, float]]], bytes_per_sample: int) -> str:
    raw_rate = rows[0][1]["samples_per_s"]
    lines = [f"{'mode':28} {'samples/s':>10} {'MiB/s':>8} {'vs raw':>7} {'first batch s':>14}"]
    for name, result in rows:
        rate = result["samples_per_s"]
        lines.append(
            f"{name:28} {rate:10.1f} {rate * bytes_per_sample / 2**20:8.1f} "
            f"{rate / raw_rate:7.2f} {result['startup_s']:14.3f}"
        )
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    full = WellWindowDataset(
        args.root, args.split, args.timesteps, window_stride=args.window_stride
    )
    n_samples = min(args.samples, len(full))
    ds = WellWindowDataset(
        args.root, args.split, args.timesteps, n_samples=n_samples, window_stride=args.window_stride
    )
    order = np.random.default_rng(args.seed).permutation(n_samples).tolist()
    warm_up = RawReader(ds)
    bytes_per_sample = warm_up.read(order[:1])
    warm_up.read(order)  # untimed: the page cache is equally warm for every mode
    warm_up.close()
    print(
        f"{args.root} split {args.split}: {n_samples} windows of T={args.timesteps} "
        f"({ds.n_channels} + {ds.n_cond_channels} channels on {list(ds.spatial_shape)}, "
        f"{bytes_per_sample / 2**20:.2f} MiB each), batch size {args.batch_size}, shuffled, "
        f"{torch.get_num_threads()} torch threads"
    )
    rows = [
        ("raw h5py (open once)", best_of(args.repeats, lambda: time_raw(ds, order))),
        ("dataset[i], no DataLoader", best_of(args.repeats, lambda: time_getitem(ds, order))),
    ]
    for workers in (int(w) for w in args.workers.split(",")):
        result = best_of(args.repeats, lambda w=workers: time_loader(ds, order, w, args.batch_size))
        rows.append((f"WellWindowDataset workers={workers}", result))
    print(format_table(rows, bytes_per_sample))


if __name__ == "__main__":
    main()
