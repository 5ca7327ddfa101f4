"""Activation memory of one training step (forward + backward) under TBPTT vs full BPTT.

    python -m noa_dist.bench.bptt_memory --grid 64 --batch-size 1 --timesteps 32,128,256 --window 32

Memory is the bytes autograd saves for backward, counted exactly with
`torch.autograd.graph.saved_tensors_hooks` (unique storages; parameters and the batch
excluded, they exist anyway): that is
the activation memory, the part that grows with the rollout, on any device. Process RSS on
CPU is too noisy to show it. With CUDA, `torch.cuda.max_memory_allocated` is reported too.
The figure for a step is the largest over its windows, since each window's graph is freed
by its backward before the next window is built.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn
from tqdm import tqdm

from noa_dist.losses import trajectory_mse
from noa_dist.models import UAFNO
from noa_dist.rollout import iter_windows, window_loss_weight

MIB = 2**20


@dataclass(frozen=True)
class Measurement:
    n_steps: int
    mode: str  # "last", "all-windows" or "full"
    n_windows: int
    supervised_steps: int
    saved_bytes: int  # peak over windows of autograd-saved activation bytes
    seconds: float
    cuda_peak_bytes: int | None


class SavedTensorMeter:
    """Sums the bytes of distinct storages autograd saves while `counting()` is active.

    `exclude` are tensors that exist anyway (parameters, the batch): saving them costs nothing.
    """

    def __init__(self, exclude: Iterable[torch.Tensor]) -> None:
        self._excluded = {t.untyped_storage().data_ptr() for t in exclude}
        self._seen: set[int] = set()
        self.bytes = 0

    def _pack(self, tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        key = storage.data_ptr()
        if key not in self._excluded and key not in self._seen:
            self._seen.add(key)
            self.bytes += storage.nbytes()
        return tensor

    def reset(self) -> None:
        self._seen.clear()
        self.bytes = 0

    @contextmanager
    def counting(self) -> Iterator[SavedTensorMeter]:
        with torch.autograd.graph.saved_tensors_hooks(self._pack, lambda tensor: tensor):
            yield self


def measure_step(
    model: nn.Module,
    u0_BCHW: torch.Tensor,
    target_BTCHW: torch.Tensor,
    window: int | None,
    mode: str,
) -> Measurement:
    """One forward + backward over all windows of a batch, as the trainer runs it.

    `mode` is "last", "all-windows" or "full" (pass window=None with "full").
    """
    n_steps, tbptt_mode = target_BTCHW.shape[1], "last" if mode == "full" else mode
    meter = SavedTensorMeter([*model.parameters(), u0_BCHW, target_BTCHW])
    peak, n_windows, supervised = 0, 0, 0
    cuda = u0_BCHW.device.type == "cuda"
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    started = time.perf_counter()
    with meter.counting():
        for w in iter_windows(
            model, u0_BCHW, n_steps, window, tbptt_mode
        ):  # model(u) -> StepOutput
            loss = trajectory_mse(w.pred_BTCHW, target_BTCHW[:, w.start : w.stop])
            (loss * window_loss_weight(w, n_steps, tbptt_mode)).backward()
            peak, n_windows = max(peak, meter.bytes), n_windows + 1
            supervised += w.stop - w.start
            meter.reset()
    if cuda:
        torch.cuda.synchronize()
    model.zero_grad(set_to_none=True)
    cuda_peak = torch.cuda.max_memory_allocated() if cuda else None
    seconds = time.perf_counter() - started
    return Measurement(n_steps, mode, n_windows, supervised, peak, seconds, cuda_peak)


def plan_runs(timesteps: list[int], window: int) -> list[tuple[int, int | None, str]]:
    """(T, window, mode) for each row: both TBPTT modes at every T, then full BPTT."""
    runs: list[tuple[int, int | None, str]] = []
    for mode in ("last", "all-windows"):
        runs += [(t, window, mode) for t in timesteps]
    return runs + [(t, None, "full") for t in timesteps]


def format_table(rows: list[Measurement]) -> str:
    """Fixed-width table; `ratio` is relative to the same mode at the smallest T."""
    base = {}
    for row in rows:
        base.setdefault(row.mode, row.saved_bytes)
    lines = [
        f"{'T':>5} {'mode':<12} {'windows':>7} {'supervised':>10} {'saved MiB':>10} "
        f"{'ratio':>6} {'seconds':>8}"
        + (" cuda peak MiB" if rows and rows[0].cuda_peak_bytes else "")
    ]
    for r in rows:
        line = (
            f"{r.n_steps:>5} {r.mode:<12} {r.n_windows:>7} {r.supervised_steps:>10} "
            f"{r.saved_bytes / MIB:>10.1f} {r.saved_bytes / base[r.mode]:>6.2f} {r.seconds:>8.1f}"
        )
        if r.cuda_peak_bytes is not None:
            line += f" {r.cuda_peak_bytes / MIB:>13.1f}"
        lines.append(line)
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--grid", type=int, default=64, help="H = W of the field")
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--channels", type=int, default=1, help="state channels")
    parser.add_argument(
        "--timesteps", default="32,128,256", help="comma-separated rollout lengths T"
    )
    parser.add_argument("--window", type=int, default=32, help="TBPTT window W")
    parser.add_argument("--base-channels", type=int, default=16)
    parser.add_argument("--encoder-levels", type=int, default=3)
    parser.add_argument("--afno-blocks", type=int, default=4)
    parser.add_argument("--modes", type=int, default=16)
    parser.add_argument(
        "--max-full-gib",
        type=float,
        default=4.0,
        help="skip full-BPTT runs whose extrapolated activations exceed this",
    )
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args(argv)
    try:
        args.timesteps = sorted({int(t) for t in args.timesteps.split(",")})
    except ValueError:
        parser.error(f"--timesteps={args.timesteps!r}: expected comma-separated integers")
    if min(args.timesteps) < 1 or args.window < 1:
        parser.error("--timesteps and --window must be >= 1")
    return args


def run(args: argparse.Namespace) -> list[Measurement]:
    torch.manual_seed(0)
    model = UAFNO(
        args.channels,
        base_channels=args.base_channels,
        encoder_levels=args.encoder_levels,
        modes=args.modes,
        afno_blocks=args.afno_blocks,
    ).to(args.device)
    nn.init.normal_(model.head.weight, std=0.02)  # as after training: gradients reach all layers
    shape = (args.batch_size, args.channels, args.grid, args.grid)
    u0_BCHW = torch.randn(shape, device=args.device)
    warm_target_BTCHW = torch.randn(args.batch_size, 1, *shape[1:], device=args.device)
    measure_step(model, u0_BCHW, warm_target_BTCHW, None, "full")  # one-off kernel setup
    rows: list[Measurement] = []
    for n_steps, window, mode in tqdm(plan_runs(args.timesteps, args.window), desc="bptt-memory"):
        if mode == "full" and _full_bptt_too_big(rows, n_steps, args.max_full_gib):
            tqdm.write(
                f"skipped full BPTT at T={n_steps}: extrapolated activations exceed "
                f"--max-full-gib={args.max_full_gib}"
            )
            continue
        target_BTCHW = torch.randn(args.batch_size, n_steps, *shape[1:], device=args.device)
        rows.append(measure_step(model, u0_BCHW, target_BTCHW, window, mode))
    return rows


def _full_bptt_too_big(rows: list[Measurement], n_steps: int, max_gib: float) -> bool:
    """Full-BPTT memory is linear in T: extrapolate from the last full run, if any."""
    full = [r for r in rows if r.mode == "full"]
    if not full:
        return False
    estimate = full[-1].saved_bytes / full[-1].n_steps * n_steps
    return estimate > max_gib * 2**30


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    rows = run(args)
    print(
        f"U-AFNO base={args.base_channels} levels={args.encoder_levels} grid={args.grid} "
        f"batch={args.batch_size} window={args.window} device={args.device}"
    )
    print(format_table(rows))


if __name__ == "__main__":
    main()
