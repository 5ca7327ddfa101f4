"""`noa-bench flops`: model FLOPs per training sample and the achieved share of the machine's
matmul peak (MFU), on one process.

FLOPs are counted by torch's `FlopCounterMode` over one optimizer step (forward and backward
of every window of every micro-batch), with what it lacks registered: the FFTs
(`_fft_r2c`/`_fft_c2r` ~2.5 N log2 N real FLOPs per transform of N points, `_fft_c2c`
5 N log2 N) and complex matmuls (it counts them as real: 4x low). Pointwise work (GELU,
soft-shrink, the optimizer) is not counted, as in every MFU figure.

Peak: a 2048^2 fp32 matmul at the same threads, interleaved with the trainer's steps; on a
GPU the datasheet's dense peak for the precision is reported too.
"""

from __future__ import annotations

import argparse
import math

import torch
from torch.utils.flop_counter import FlopCounterMode, flop_registry

from noa_dist import distributed
from noa_dist.bench import common
from noa_dist.bench.loops import BareLoop, TrainerLoop, samples_per_step

aten = torch.ops.aten
MATMULS = (aten.mm, aten.bmm, aten.addmm, aten.baddbmm)
# Dense (no sparsity) datasheet peaks, FLOP/s, by a substring of the device name.
DATASHEET_PEAKS = {
    "H100": {"bf16": 989e12, "no": 67e12},
    "H200": {"bf16": 989e12, "no": 67e12},
    "A100": {"bf16": 312e12, "no": 19.5e12},
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--steps", type=int, default=8, help="optimizer steps per timed repeat")
    parser.add_argument("--matmul-size", type=int, default=2048)


def _fft_points(shape, dim) -> tuple[int, int]:
    n = math.prod(shape[d] for d in dim)
    return n, math.prod(shape) // max(n, 1)


def _r2c(x, dim, *args, out_val=None, **kwargs) -> int:
    n, batch = _fft_points(x.shape, dim)
    return int(2.5 * n * math.log2(max(n, 2)) * batch)


def _c2r(x, dim, *args, out_val=None, **kwargs) -> int:
    n, batch = _fft_points(out_val.shape, dim)
    return int(2.5 * n * math.log2(max(n, 2)) * batch)


def _c2c(x, dim, *args, out_val=None, **kwargs) -> int:
    n, batch = _fft_points(x.shape, dim)
    return int(5 * n * math.log2(max(n, 2)) * batch)


def _complex_aware(op):
    """torch's formula for `op`, 4x when its operands are complex."""
    base = flop_registry[op]

    def count(*args, out_val=None, **kwargs) -> int:
        flops = base(*args, out_val=out_val, **kwargs)  # torch's wrapper takes the shapes
        return 4 * flops if any(torch.is_tensor(a) and a.is_complex() for a in args) else flops

    return count


def flop_mapping() -> dict:
    mapping = {aten._fft_r2c: _r2c, aten._fft_c2r: _c2r, aten._fft_c2c: _c2c}
    mapping.update({op: _complex_aware(op) for op in MATMULS})
    for fn in mapping.values():
        fn._get_raw = True  # FlopCounterMode passes tensors, not shapes
    return mapping


def count_step_flops(loop: BareLoop) -> tuple[int, dict[str, int]]:
    """FLOPs of one optimizer step and the total per op."""
    counter = FlopCounterMode(display=False, custom_mapping=flop_mapping())
    with counter:
        loop.run(1)
    by_op = {str(op): n for op, n in counter.get_flop_counts()["Global"].items()}
    return counter.get_total_flops(), by_op


def matmul_flop_per_s(n: int) -> float:
    a, b = torch.randn(n, n), torch.randn(n, n)
    torch.mm(a, b)
    return 2 * n**3 / common.timed(lambda: torch.mm(a, b))


def run(args: argparse.Namespace, flags: list[str]) -> tuple[dict, str]:
    cfg, root = common.trainer_config(flags)
    threads = common.set_threads(args.threads)
    accelerator = distributed.build_accelerator(
        gradient_accumulation_steps=cfg.optim.gradient_accumulation_steps,
        mixed_precision=cfg.train.mixed_precision or "no",
        log_with=None,
    )
    parts = common.build_parts(cfg, accelerator, root)
    micro = common.synthetic_batches(
        cfg, parts.layout, cfg.optim.gradient_accumulation_steps, seed=0, device=accelerator.device
    )
    step_flops, by_op = count_step_flops(BareLoop(parts, micro))
    per_sample = step_flops / samples_per_step(parts)
    trainer = TrainerLoop(parts, micro)
    trainer.run(2)
    timings = common.interleaved(
        {
            "peak": lambda: matmul_flop_per_s(args.matmul_size),
            "step_s": lambda: common.timed(lambda: trainer.run(args.steps)) / args.steps,
        },
        args.repeats,
    )
    achieved = [step_flops / s for s in timings["step_s"]]
    mfu = [a / p for a, p in zip(achieved, timings["peak"], strict=True)]
    payload = {
        "threads": threads,
        "n_params": parts.n_params,
        "flops_per_step": step_flops,
        "flops_per_sample": per_sample,
        "flops_by_op": by_op,
        "achieved_flop_per_s": common.summary(achieved),
        "matmul_peak_flop_per_s": common.summary(timings["peak"]),
        "mfu": common.summary(mfu),
    }
    rows = [
        ["model GFLOP per training sample", f"{per_sample / 1e9:.3f}"],
        [
            "achieved GFLOP/s (trainer step)",
            common.median_spread(_giga(payload["achieved_flop_per_s"])),
        ],
        [
            f"matmul peak GFLOP/s ({args.matmul_size}², fp32)",
            common.median_spread(_giga(payload["matmul_peak_flop_per_s"])),
        ],
        [
            "MFU vs measured matmul peak",
            f"{payload['mfu']['median']:.1%} (±{payload['mfu']['spread'] / 2:.0%})",
        ],
    ]
    if torch.cuda.is_available():
        name = torch.cuda.get_device_name()
        precision = cfg.train.mixed_precision or "no"
        peak = next((p[precision] for k, p in DATASHEET_PEAKS.items() if k in name), None)
        if peak:
            payload["datasheet_peak_flop_per_s"] = peak
            payload["mfu_datasheet"] = payload["achieved_flop_per_s"]["median"] / peak
            rows.append(
                [f"MFU vs {name} datasheet ({precision})", f"{payload['mfu_datasheet']:.1%}"]
            )
    top = sorted(by_op.items(), key=lambda kv: -kv[1])[:6]
    m = common.machine()
    table = (
        f"noa-bench flops: {m['cpu']}, {m['cores']} cores, {threads} thread(s), load average "
        f"{m['load_average_1m']:.2f}; {parts.n_params:,} parameters; median of {args.repeats} "
        f"interleaved repeats\n\n"
        + common.markdown_table(["quantity", "value"], rows)
        + "\n\nFLOPs by op (one step): "
        + ", ".join(f"{op} {n / step_flops:.0%}" for op, n in top)
    )
    return payload, table


def _giga(s: dict[str, float]) -> dict[str, float]:
    return {k: (v / 1e9 if k in ("median", "min", "max") else v) for k, v in s.items()}
