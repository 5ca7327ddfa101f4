"""`noa-bench memory`: activation memory vs rollout length, and model-state bytes per rank
under DDP and ZeRO-1/2/3 next to the ZeRO paper's formula.

Activations: the bytes autograd saves for backward, counted exactly with
`torch.autograd.graph.saved_tensors_hooks` (distinct storages; parameters and the batch
excluded, they exist anyway); a step's figure is the largest over its windows, since each
window's graph is freed by its backward before the next is built. Process RSS on a CPU is too
noisy to show it; on a GPU `torch.cuda.max_memory_allocated` is reported too.

Model state: each mode is one launch of 2 ranks with the shipped config (`launch/<mode>.yaml`)
training the configured model with AdamW on synthetic batches, two micro-steps per step; on
the last step every rank counts the distinct storages it holds: parameters (ZeRO-3: its
partition and the persistent small ones), gradients (the larger of the non-boundary
micro-step, where ZeRO-1 still holds them whole, and the boundary), DeepSpeed's fp32 master
partition, and the AdamW moments. The formula (Rajbhandari et al. 2020, Fig. 1) for Psi
parameters on N ranks with P, G bytes per parameter and gradient and K of optimizer state:
DDP (P+G+K)Psi; ZeRO-1 (P+G)Psi + K Psi/N; ZeRO-2 P Psi + (G+K)Psi/N; ZeRO-3 (P+G+K)Psi/N.
The paper's mixed precision has P=G=2, K=12; in fp32 P=G=4 and K=12 under DeepSpeed (fp32
master + two moments), K=8 under DDP (the parameters are the master copy).
"""

from __future__ import annotations

import argparse
from collections.abc import Iterable
from dataclasses import replace
from pathlib import Path

import torch
from accelerate.utils import gather_object

from noa_dist import distributed
from noa_dist.bench import common, launch
from noa_dist.rollout import iter_windows, window_loss_weight

MODES = ("ddp", "zero1", "zero2", "zero3")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--rollouts", default="32,128,256", help="comma list of T")
    parser.add_argument("--window", type=int, default=32, help="TBPTT window W")
    parser.add_argument("--stages", default=",".join(MODES), help="modes; 'none' to skip")
    parser.add_argument("--max-full-gib", type=float, default=4.0, help="skip bigger full BPTT")
    parser.add_argument("--steps", type=int, default=3, help="steps per launch; last measured")
    parser.add_argument("--mode", help=argparse.SUPPRESS)  # worker side


# ------------------------------------------------------------------ activations
class SavedTensorMeter:
    """Sums the bytes of distinct storages autograd saves while active; `exclude` (parameters,
    the batch) exist anyway and cost nothing."""

    def __init__(self, exclude: Iterable[torch.Tensor]) -> None:
        self._excluded = {t.untyped_storage().data_ptr() for t in exclude}
        self._seen: set[int] = set()
        self.bytes = 0

    def _pack(self, tensor: torch.Tensor) -> torch.Tensor:
        key = tensor.untyped_storage().data_ptr()
        if key not in self._excluded and key not in self._seen:
            self._seen.add(key)
            self.bytes += tensor.untyped_storage().nbytes()
        return tensor

    def reset(self) -> None:
        self._seen.clear()
        self.bytes = 0

    def counting(self):
        return torch.autograd.graph.saved_tensors_hooks(self._pack, lambda tensor: tensor)


def activation_peak(model, batch: common.Batch, window: int | None, mode: str) -> dict:
    """One forward + backward over every window of a batch, as the trainer runs it."""
    n_steps = batch["target"].shape[1]
    tbptt = "last" if mode == "full" else mode
    meter = SavedTensorMeter([*model.parameters(), *batch.values()])
    cond = batch.get("cond")
    step_fn = model if cond is None or cond.shape[1] == 0 else (lambda u: model(u, cond))
    peak, windows = 0, 0
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    with meter.counting():
        for w in iter_windows(step_fn, batch["u0"], n_steps, window, tbptt):
            loss = torch.nn.functional.mse_loss(w.pred_BTCHW, batch["target"][:, w.start : w.stop])
            (loss * window_loss_weight(w, n_steps, tbptt)).backward()
            peak, windows = max(peak, meter.bytes), windows + 1
            meter.reset()
    model.zero_grad(set_to_none=True)
    row = {"T": n_steps, "mode": mode, "windows": windows, "saved_bytes": peak}
    if torch.cuda.is_available():
        row["cuda_peak_bytes"] = torch.cuda.max_memory_allocated()
    return row


def activation_rows(args, flags: list[str]) -> list[dict]:
    cfg, root = common.trainer_config(flags)
    model, layout = common.bare_model(cfg, root)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model.to(device)
    rows: list[dict] = []
    for mode in ("last", "all-windows", "full"):
        for t in sorted(int(x) for x in args.rollouts.split(",")):
            full = [r for r in rows if r["mode"] == "full" and "saved_bytes" in r]
            if (
                mode == "full"
                and full
                and full[-1]["saved_bytes"] / full[-1]["T"] * t > args.max_full_gib * 2**30
            ):
                rows.append(
                    {"T": t, "mode": "full", "skipped": f"> --max-full-gib {args.max_full_gib}"}
                )
                continue
            step_cfg = replace(cfg, data=replace(cfg.data, timesteps=t))
            batch = common.synthetic_batches(step_cfg, layout, 1, seed=0, device=device)[0]
            rows.append(
                activation_peak(model, batch, None if mode == "full" else args.window, mode)
            )
    for row in rows:
        base = next(r for r in rows if r["mode"] == row["mode"])
        if "saved_bytes" in row:
            row["vs_smallest_T"] = row["saved_bytes"] / base["saved_bytes"]
    return rows


# ------------------------------------------------------------------ model state per rank
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
    raise RuntimeError(f"{type(zero).__name__}: no fp32 partition attribute (DeepSpeed changed?)")


def moment_tensors(optimizer: torch.optim.Optimizer, zero: object | None) -> list[torch.Tensor]:
    inner = zero.optimizer if zero is not None else optimizer  # ZeRO wraps the torch AdamW
    return [t for state in inner.state.values() for t in _flatten(state)]


def formula_bytes(mode: str, n_params: int, ranks: int, bf16: bool) -> dict[str, float]:
    """The ZeRO paper's per-rank model state for this mode (see the module docstring)."""
    deepspeed = mode != "ddp"
    p = g = 2 if (bf16 and deepspeed) else 4
    k = 12 if deepspeed else 8
    n = {"ddp": (1, 1, 1), "zero1": (1, 1, ranks), "zero2": (1, ranks, ranks)}.get(
        mode, (ranks, ranks, ranks)
    )
    parts = {"param": p / n[0], "grad": g / n[1], "optimizer": k / n[2]}
    return {k_: v * n_params for k_, v in parts.items()} | {"total": sum(parts.values()) * n_params}


def measure_rank(accelerator, args, flags: list[str]) -> list[dict] | None:
    cfg, root = common.trainer_config(flags)
    parts = common.build_parts(cfg, accelerator, root)
    model, optimizer = parts.model, parts.optimizer
    zero, module = zero_optimizer(model), accelerator.unwrap_model(model)
    sizes: dict[str, int] = {}
    for step in range(args.steps):
        batches = common.synthetic_batches(
            cfg, parts.layout, 2, seed=step, device=accelerator.device
        )
        grads = []
        for micro, batch in enumerate(batches):
            boundary = micro == len(batches) - 1
            with distributed.sync_context(accelerator, model, reduce=boundary):
                with accelerator.autocast():
                    pred = model(batch["u0"], batch["cond"]).state
                loss = torch.nn.functional.mse_loss(pred.float(), batch["target"][:, 0])
                distributed.backward(accelerator, model, loss, boundary=boundary)
            counter = StorageCounter()
            counter.count(param_tensors(module))
            grads.append(counter.count(grad_tensors(module, zero)))
        if step == args.steps - 1:  # after backward: ZeRO-3 partitioned, gradients reduced
            counter = StorageCounter()
            sizes["param_bytes"] = counter.count(param_tensors(module))
            sizes["grad_bytes"] = max(grads)
        distributed.finish_gradients(accelerator, model, cfg.optim.max_grad_norm)
        distributed.apply_or_discard(accelerator, model, optimizer, parts.scheduler, applied=True)
    counter = StorageCounter()
    counter.count(param_tensors(module))
    sizes["master_bytes"] = counter.count(master_tensors(zero))
    sizes["moment_bytes"] = counter.count(moment_tensors(optimizer, zero))
    sizes["model_state_bytes"] = sum(sizes.values())
    row = {
        "mode": args.mode,
        "rank": accelerator.process_index,
        "n_params": parts.n_params,
        **sizes,
    }
    row["world_size"] = accelerator.num_processes
    return gather_object([row])


def state_rows(args, flags: list[str]) -> list[dict]:
    cfg, _ = common.trainer_config(flags)
    bf16 = cfg.train.mixed_precision == "bf16"
    rows = []
    for mode in [m for m in args.stages.split(",") if m in MODES]:
        ranks = launch.run_workers(
            "memory",
            2,
            1,
            [f"--mode={mode}", f"--steps={args.steps}", *flags],
            timeout=args.timeout,
            config_file=launch.REPO_ROOT / "launch" / f"{mode}.yaml",
        )
        for row in ranks:
            f = formula_bytes(mode, row["n_params"], row["world_size"], bf16)
            rows.append({**row, "formula": f, "vs_formula": row["model_state_bytes"] / f["total"]})
    return rows


def worker(args: argparse.Namespace, flags: list[str]) -> None:
    cfg, _ = common.trainer_config(flags)
    launch.worker(cfg, Path(args.out), args.threads, lambda acc: measure_rank(acc, args, flags))


# ------------------------------------------------------------------ report
def run(args: argparse.Namespace, flags: list[str]) -> tuple[dict, str]:
    common.set_threads(args.threads)
    cfg, _ = common.trainer_config(flags)
    acts = activation_rows(args, flags)
    mib = 2**20
    m = common.machine()
    table = (
        f"noa-bench memory: {m['cpu']}; model of the config, batch {cfg.data.batch_size}, "
        f"W={args.window}; activation bytes saved for backward, peak over a step's windows\n\n"
    )
    table += common.markdown_table(
        ["T", "mode", "windows", "saved MiB", "vs smallest T"],
        [
            [
                r["T"],
                r["mode"],
                r.get("windows", "-"),
                r.get("skipped") or f"{r['saved_bytes'] / mib:.1f}",
                r.get("vs_smallest_T", "-"),
            ]
            for r in acts
        ],
    )
    state = state_rows(args, flags) if args.stages != "none" else []
    if state:
        table += f"\n\nModel state per rank, MiB (2 ranks, {state[0]['n_params']:,} parameters, precision {cfg.train.mixed_precision or 'no'}):\n\n"
        table += common.markdown_table(
            [
                "mode",
                "rank",
                "params",
                "grads (peak)",
                "fp32 master",
                "moments",
                "total",
                "formula",
                "vs formula",
            ],
            [
                [
                    r["mode"],
                    r["rank"],
                    r["param_bytes"] / mib,
                    r["grad_bytes"] / mib,
                    r["master_bytes"] / mib,
                    r["moment_bytes"] / mib,
                    r["model_state_bytes"] / mib,
                    r["formula"]["total"] / mib,
                    f"{r['vs_formula']:.3f}",
                ]
                for r in state
            ],
        )
    return {"activations": acts, "model_state": state}, table
