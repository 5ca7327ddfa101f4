"""Model-state memory per rank under DDP and DeepSpeed ZeRO-1/2/3 (the shipped launch configs).

    python -m noa_dist.bench.optimizer_memory [--json memory.json] [--modes ddp,zero1,zero2,zero3]

For each mode this launches itself with `accelerate launch --config_file launch/<mode>.yaml`
(2 processes by default), trains the U-AFNO with AdamW for a few steps on random data and, on
the last step, counts on every rank the bytes of distinct storages it holds for:

  params   the module's parameters (ZeRO-3: the rank's partition + persistent/gathered ones)
  grads    gradients after backward (DDP: p.grad; ZeRO: the reduced gradient partition)
  master   DeepSpeed's fp32 master copy of the rank's partition (DDP: none, the params are it)
  moments  AdamW's exp_avg + exp_avg_sq (+ step) as held by the (inner) optimizer
  buffers  persistent communication buffers (DDP's reducer buckets, ZeRO-3's reduce bucket)

"optimizer state" = master + moments. The measured step is not the first: ZeRO-3 releases
every parameter on its first (tracing) step, whatever its reuse settings say afterwards.
Storages are counted once (views of one flat buffer are one buffer), so the figures are what
the rank holds, not what the tensors' shapes add up to.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from accelerate.utils import gather_object
from tqdm import tqdm

from noa_dist import distributed
from noa_dist.config import ModelConfig
from noa_dist.errors import ConfigError
from noa_dist.models.build import build_model

MIB = 2**20
MODES = ("ddp", "zero1", "zero2", "zero3")
REPO_ROOT = Path(__file__).resolve().parents[2]


@dataclass(frozen=True)
class RankMemory:
    mode: str
    rank: int
    world_size: int
    n_params: int
    param_bytes: int
    grad_bytes: int
    master_bytes: int
    moment_bytes: int
    buffer_bytes: int

    @property
    def optimizer_bytes(self) -> int:
        return self.master_bytes + self.moment_bytes

    @property
    def model_state_bytes(self) -> int:
        return self.param_bytes + self.grad_bytes + self.optimizer_bytes


# ------------------------------------------------------------------ counting held storages
class StorageCounter:
    """Bytes of storages not seen before: a storage shared by two categories counts once."""

    def __init__(self) -> None:
        self._seen: set[int] = set()

    def count(self, tensors: Iterable[torch.Tensor | None]) -> int:
        total = 0
        for tensor in tensors:
            if tensor is None or not torch.is_tensor(tensor):
                continue
            storage = tensor.untyped_storage()
            if storage.nbytes() and storage.data_ptr() not in self._seen:
                self._seen.add(storage.data_ptr())
                total += storage.nbytes()
        return total


def _flatten(value: object) -> list[torch.Tensor]:
    """Tensors inside nested lists/tuples/dicts (DeepSpeed keeps partitions in all three)."""
    if torch.is_tensor(value):
        return [value]
    if isinstance(value, dict):
        value = list(value.values())
    if isinstance(value, list | tuple):
        return [t for item in value for t in _flatten(item)]
    return []


def zero_optimizer(model: torch.nn.Module) -> object | None:
    """The ZeRO optimizer of a DeepSpeedEngine (None under DDP)."""
    return getattr(model, "optimizer", None) if hasattr(model, "zero_optimization_stage") else None


def param_tensors(module: torch.nn.Module) -> list[torch.Tensor]:
    # ZeRO-3 keeps the rank's partition in `ds_tensor`; `data` is empty unless gathered.
    params = list(module.parameters())
    return [p.data for p in params] + [getattr(p, "ds_tensor", None) for p in params]


def grad_tensors(module: torch.nn.Module, zero: object | None) -> list[torch.Tensor]:
    grads = [p.grad for p in module.parameters()]
    if zero is not None:
        for name in ("averaged_gradients", "grads_in_partition", "grad_partitions_flat_buffer"):
            grads += _flatten(getattr(zero, name, None))
        grads += [t.grad for t in master_tensors(zero)]
    return grads


def master_tensors(zero: object | None) -> list[torch.Tensor]:
    """ZeRO-1/2: single_partition_of_fp32_groups; ZeRO-3: fp32_partitioned_groups_flat."""
    if zero is None:
        return []
    for name in ("single_partition_of_fp32_groups", "fp32_partitioned_groups_flat"):
        if hasattr(zero, name):
            return _flatten(getattr(zero, name))
    raise RuntimeError(
        f"{type(zero).__name__}: no fp32 partition attribute found (DeepSpeed changed?)"
    )


def moment_tensors(optimizer: torch.optim.Optimizer, zero: object | None) -> list[torch.Tensor]:
    inner = zero.optimizer if zero is not None else optimizer  # ZeRO wraps the torch AdamW
    return [t for state in inner.state.values() for t in _flatten(state)]


def buffer_bytes(model: torch.nn.Module, zero: object | None, counter: StorageCounter) -> int:
    if zero is None:  # DDP's reducer buckets: one more copy of the gradients
        sizes = model._get_ddp_logging_data().get("bucket_sizes", "")
        return sum(int(s) for s in str(sizes).split(",") if s.strip())
    buckets = getattr(zero, "ipg_buckets", {}) or {}
    return counter.count(t for bucket in buckets.values() for t in _flatten(bucket.buffer))


# ---------------------------------------------------------------------------- the worker
def _check_wrapping(accelerator, model: torch.nn.Module, mode: str) -> None:
    """Refuse to report numbers for a launch that did not set up what `mode` claims."""
    if accelerator.num_processes < 2:
        raise RuntimeError(
            f"{mode}: world size {accelerator.num_processes}; the comparison needs >= 2 ranks"
        )
    if mode == "ddp":
        ok = isinstance(model, torch.nn.parallel.DistributedDataParallel)
    else:
        stage = getattr(model, "zero_optimization_stage", lambda: None)()
        ok = stage == int(mode.removeprefix("zero"))
    if not ok:
        raise RuntimeError(
            f"{mode}: the launch produced {type(model).__name__}, not the expected wrapper"
        )


def _build(
    args: argparse.Namespace, accelerator
) -> tuple[torch.nn.Module, torch.optim.Optimizer, int]:
    torch.manual_seed(0)  # identical initial weights on every rank
    cfg = ModelConfig(
        base_channels=args.base_channels,
        encoder_levels=args.encoder_levels,
        modes=args.modes_kept,
        afno_blocks=args.afno_blocks,
    )
    model = build_model(cfg, in_channels=args.in_channels, cond_channels=args.cond_channels)
    n_params = sum(p.numel() for p in model.parameters())
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    distributed.configure_deepspeed(
        accelerator, micro_batch_size=args.batch_size, gradient_clipping=1.0
    )
    model, optimizer = accelerator.prepare(model, optimizer)
    return model, optimizer, n_params


def _random_batch(args: argparse.Namespace, rank: int, step: int) -> tuple[torch.Tensor, ...]:
    gen = torch.Generator().manual_seed(1000 * rank + step)  # each rank its own data
    shape = (args.batch_size, args.grid, args.grid)
    u_BCHW = torch.randn(shape[0], args.in_channels, *shape[1:], generator=gen)
    cond_BCHW = torch.randn(shape[0], args.cond_channels, *shape[1:], generator=gen)
    target_BCHW = torch.randn(shape[0], args.in_channels, *shape[1:], generator=gen)
    return u_BCHW, cond_BCHW, target_BCHW


def measure_rank(args: argparse.Namespace) -> list[dict[str, object]] | None:
    """Train `args.steps` steps, count held bytes on the last; every rank's row on the main process."""
    accelerator = distributed.build_accelerator(
        gradient_accumulation_steps=1, mixed_precision=args.mixed_precision, log_with=None
    )
    model, optimizer, n_params = _build(args, accelerator)
    _check_wrapping(accelerator, model, args.mode)
    zero, module = zero_optimizer(model), accelerator.unwrap_model(model)
    counter, sizes = StorageCounter(), {}
    for step in range(args.steps):
        batch = _random_batch(args, accelerator.process_index, step)
        u_BCHW, cond_BCHW, target_BCHW = batch  # the model casts to its weights' dtype itself
        with accelerator.autocast():  # DDP + bf16: autocast over fp32 weights
            loss = torch.nn.functional.mse_loss(model(u_BCHW, cond_BCHW).state, target_BCHW)
        # accelerator.backward would also run DeepSpeed's step; we measure between the two.
        if zero is not None:
            model.backward(loss)
        else:
            accelerator.backward(loss)
        if step == args.steps - 1:  # after backward: ZeRO-3 partitioned, gradients reduced
            sizes["param_bytes"] = counter.count(param_tensors(module))
            sizes["grad_bytes"] = counter.count(grad_tensors(module, zero))
            sizes["buffer_bytes"] = buffer_bytes(model, zero, counter)
        if zero is not None:
            model.step()
        else:
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
    sizes["master_bytes"] = counter.count(master_tensors(zero))
    sizes["moment_bytes"] = counter.count(moment_tensors(optimizer, zero))
    row = RankMemory(
        args.mode, accelerator.process_index, accelerator.num_processes, n_params, **sizes
    )
    rows = gather_object([asdict(row)])
    is_main = accelerator.is_main_process
    distributed.shutdown(accelerator)
    return rows if is_main else None


# ---------------------------------------------------------------------------- the parent
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch_command(mode: str, args: argparse.Namespace, out: Path) -> list[str]:
    config = REPO_ROOT / "launch" / f"{mode}.yaml"
    if not config.is_file():
        raise ConfigError(
            f"{config}: launch config not found (run from a source checkout of noa-dist)"
        )
    forwarded = (
        "base_channels",
        "encoder_levels",
        "modes_kept",
        "afno_blocks",
        "grid",
        "in_channels",
        "cond_channels",
        "batch_size",
        "steps",
        "mixed_precision",
    )
    worker_flags = [f"--{n.replace('_', '-')}={getattr(args, n)}" for n in forwarded]
    launcher = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(config)]
    launcher += [f"--num_processes={args.num_processes}", f"--main_process_port={_free_port()}"]
    worker = ["-m", "noa_dist.bench.optimizer_memory", "--worker", f"--mode={mode}", f"--out={out}"]
    return [*launcher, *worker, *worker_flags]


def run_mode(mode: str, args: argparse.Namespace, workdir: Path) -> list[RankMemory]:
    """One `accelerate launch` from the repo root (the configs name their JSON relative to it)."""
    out = workdir / f"{mode}.json"
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    env.setdefault("OMP_NUM_THREADS", "1")
    proc = subprocess.Popen(
        launch_command(mode, args, out),
        cwd=REPO_ROOT,
        env=env,
        text=True,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    try:
        output, _ = proc.communicate(timeout=args.timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        output, _ = proc.communicate()
        raise RuntimeError(
            f"{mode}: launch timed out after {args.timeout}s:\n{output[-3000:]}"
        ) from None
    if proc.returncode != 0 or not out.is_file():
        raise RuntimeError(f"{mode}: launch failed ({proc.returncode}):\n{output[-4000:]}")
    return [RankMemory(**row) for row in json.loads(out.read_text())]


def ratios(rows: list[RankMemory]) -> list[dict[str, object]]:
    """Each row with its ratios to DDP on the same rank (optimizer state, moments, all model state)."""
    ddp = {r.rank: r for r in rows if r.mode == "ddp"}
    table = []
    for r in rows:
        base = ddp.get(r.rank)
        entry: dict[str, object] = {
            **asdict(r),
            "optimizer_bytes": r.optimizer_bytes,
            "model_state_bytes": r.model_state_bytes,
        }
        if base is not None:
            entry["optimizer_ratio"] = r.optimizer_bytes / base.optimizer_bytes
            entry["moment_ratio"] = r.moment_bytes / base.moment_bytes
            entry["model_state_ratio"] = r.model_state_bytes / base.model_state_bytes
        table.append(entry)
    return table


def format_table(table: list[dict[str, object]]) -> str:
    header = (
        f"{'mode':<6} {'rank':>4} {'param':>8} {'grad':>8} {'master':>8} {'moments':>8} "
        f"{'opt state':>9} {'vs DDP':>6} {'all model':>9} {'vs DDP':>6} {'buffers':>8}"
    )
    lines = [
        header,
        " " * 12 + "(MiB; 'opt state' = master + moments; 'all model' = param + grad + opt state)",
    ]
    for e in table:
        mib = {k: v / MIB for k, v in e.items() if k.endswith("_bytes")}
        lines.append(
            f"{e['mode']:<6} {e['rank']:>4} {mib['param_bytes']:>8.2f} {mib['grad_bytes']:>8.2f} "
            f"{mib['master_bytes']:>8.2f} {mib['moment_bytes']:>8.2f} {mib['optimizer_bytes']:>9.2f} "
            f"{e.get('optimizer_ratio', float('nan')):>6.2f} {mib['model_state_bytes']:>9.2f} "
            f"{e.get('model_state_ratio', float('nan')):>6.2f} {mib['buffer_bytes']:>8.2f}"
        )
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--modes", default=",".join(MODES), help=f"comma-separated subset of {','.join(MODES)}"
    )
    parser.add_argument("--json", type=Path, help="also write the table here")
    parser.add_argument("--num-processes", type=int, default=2)
    parser.add_argument("--base-channels", type=int, default=32)
    parser.add_argument("--encoder-levels", type=int, default=3)
    parser.add_argument("--modes-kept", type=int, default=16, help="AFNO Fourier modes kept")
    parser.add_argument("--afno-blocks", type=int, default=4)
    parser.add_argument("--grid", type=int, default=64)
    parser.add_argument("--in-channels", type=int, default=1)
    parser.add_argument("--cond-channels", type=int, default=4)
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument(
        "--mixed-precision",
        choices=("no", "bf16"),
        default="no",
        help="bf16: DDP autocasts fp32 weights; DeepSpeed keeps bf16 weights + fp32 master",
    )
    parser.add_argument(
        "--steps", type=int, default=3, help="steps per launch; the last is measured"
    )
    parser.add_argument("--timeout", type=float, default=900, help="seconds per launch")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--mode", help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    args.modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    if unknown := [m for m in args.modes if m not in MODES]:
        parser.error(f"--modes: unknown {unknown}; expected a subset of {list(MODES)}")
    if args.steps < 2:
        parser.error("--steps must be >= 2 (ZeRO-3's first step is a tracing step)")
    if args.num_processes < 2:
        parser.error("--num-processes must be >= 2 (nothing is partitioned on one rank)")
    return args


def main(argv: list[str] | None = None) -> list[dict[str, object]] | None:
    args = parse_args(argv)
    if args.worker:
        rows = measure_rank(args)
        if rows is not None:
            args.out.write_text(json.dumps(rows))
        distributed.exit_process(0)
    rows: list[RankMemory] = []
    with tempfile.TemporaryDirectory(prefix="noa-optmem-") as workdir:
        for mode in tqdm(args.modes, desc="optimizer-memory"):
            rows += run_mode(mode, args, Path(workdir))
    table = ratios(rows)
    print(
        f"U-AFNO, {rows[0].n_params:,} parameters, AdamW, mixed precision {args.mixed_precision}, "
        f"{args.num_processes} ranks"
    )
    print(format_table(table))
    if args.json is not None:
        meta = {"n_params": rows[0].n_params, "world_size": args.num_processes}
        meta["mixed_precision"] = args.mixed_precision
        args.json.write_text(json.dumps({**meta, "rows": table}, indent=2))
    return table


if __name__ == "__main__":
    main()
