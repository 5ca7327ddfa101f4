"""What every benchmark shares: the config (the trainer's own flags), the model, optimizer and
step built as training builds them, synthetic batches of the dataset's shapes, interleaved
timing with median and spread, the machine description, Markdown tables and JSON.

Model, optimizer, loss and step settings come from `noa_dist.config` (the trainer's flags, its
`--config` YAML, the demo profile when nothing is given) through `noa_dist.build`: a benchmark
measures the model the trainer would train, never a private copy of its flags.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from accelerate import Accelerator

from noa_dist import alignment, build, distributed, preflight
from noa_dist.config import Config, load_config
from noa_dist.data.dataset import WellWindowDataset
from noa_dist.step import LossFn, StepSettings

Batch = dict[str, torch.Tensor]
SCHEDULE_STEPS = 1_000_000  # the LR schedule's length: benchmarks never reach its end


def trainer_config(flags: Sequence[str]) -> tuple[Config, Path]:
    """The trainer's config from its own flags, and the dataset root (shapes and stats only:
    the rollout length may exceed the dataset's frames, batches are synthetic)."""
    cfg = load_config(list(flags))
    return cfg, preflight.dataset_root(cfg)


def set_threads(threads: int | None, processes: int = 1) -> int:
    """Threads per process: as given, else this process's cores / processes (what the trainer
    does; `accelerate launch` alone would leave 1)."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    n = threads or max(1, (cores or 1) // processes)
    torch.set_num_threads(n)
    return n


# ------------------------------------------------------------------ model, optimizer, batches
@dataclass
class Parts:
    """What `train_step` needs, built and prepared exactly as `noa_dist.build.build` does."""

    cfg: Config
    accelerator: Accelerator
    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    loss_fn: LossFn
    settings: StepSettings
    layout: WellWindowDataset  # the train split's reader: channels, grid
    n_params: int


def layout_source(root: Path) -> WellWindowDataset:
    return WellWindowDataset(root, "train", 1)


def bare_model(cfg: Config, root: Path) -> tuple[torch.nn.Module, WellWindowDataset]:
    """The trainer's U-AFNO for this config and dataset (unprepared, no projector)."""
    layout = layout_source(root)
    return build.bare_model(cfg, layout, root, None), layout


def build_parts(cfg: Config, accelerator: Accelerator, root: Path) -> Parts:
    if cfg.align.vqvae_path:
        raise SystemExit("noa-bench measures the L_traj step; drop --vqvae-path")
    model, layout = bare_model(cfg, root)
    n_params = sum(p.numel() for p in model.parameters())
    optimizer, scheduler = build.build_optimizer(cfg, model, SCHEDULE_STEPS)
    distributed.configure_deepspeed(
        accelerator, micro_batch_size=cfg.data.batch_size, gradient_clipping=cfg.optim.max_grad_norm
    )
    model, optimizer, scheduler = accelerator.prepare(model, optimizer, scheduler)
    loss_fn = alignment.build_loss_fn(cfg, None, None)
    settings = build.step_settings(cfg, alignment.loss_weights(cfg))
    return Parts(cfg, accelerator, model, optimizer, scheduler, loss_fn, settings, layout, n_params)


def synthetic_batches(
    cfg: Config, layout: WellWindowDataset, n: int, *, seed: int, device: torch.device
) -> list[Batch]:
    """`n` batches shaped like the reader's (u0, target, cond), standard-normal like the
    normalised data; the data path stays out of the measurement."""
    g = torch.Generator().manual_seed(seed)
    b, t, grid = cfg.data.batch_size, cfg.data.timesteps, tuple(layout.spatial_shape)
    c, cc = layout.n_channels, layout.n_cond_channels

    def draw(*shape: int) -> torch.Tensor:
        return torch.randn(shape, generator=g).to(device)

    return [
        {"u0": draw(b, c, *grid), "target": draw(b, t, c, *grid), "cond": draw(b, cc, *grid)}
        for _ in range(n)
    ]


# ------------------------------------------------------------------ timing
def summary(values: Sequence[float]) -> dict[str, float]:
    """Median and spread ((max - min) / median) of repeated measurements."""
    median = statistics.median(values)
    return {
        "median": median,
        "min": min(values),
        "max": max(values),
        "spread": (max(values) - min(values)) / median if median else float("nan"),
        "n": len(values),
    }


def interleaved(variants: dict[str, Callable[[], float]], repeats: int) -> dict[str, list[float]]:
    """Each variant once per repeat, the order reversed every other repeat (ABBA), so slow
    drifts of the machine's load fall on every variant alike."""
    names, results = list(variants), {name: [] for name in variants}
    for r in range(repeats):
        for name in names if r % 2 == 0 else reversed(names):
            results[name].append(variants[name]())
    return results


def timed(fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


# ------------------------------------------------------------------ the machine, output
def machine() -> dict[str, object]:
    """Hardware and load, for the record next to every figure."""
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    info: dict[str, object] = {
        "cpu": cpu,
        "cores": len(os.sched_getaffinity(0))
        if hasattr(os, "sched_getaffinity")
        else os.cpu_count(),
        "torch": torch.__version__,
        "load_average_1m": os.getloadavg()[0],
    }
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
    return info


def fmt(value: object) -> str:
    if isinstance(value, float):
        return f"{value:.3g}" if abs(value) < 1000 else f"{value:,.0f}"
    return str(value)


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(fmt(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def median_spread(s: dict[str, float]) -> str:
    return f"{fmt(s['median'])} (±{s['spread'] / 2:.0%})"


def write_report(path: Path, name: str, payload: dict, table: str) -> None:
    """Print the table; write the JSON (`machine` filled in when absent)."""
    payload = {"bench": name, "machine": payload.pop("machine", machine()), **payload}
    print(table)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload, indent=2, default=str))
    print(f"\nwrote {path}")
