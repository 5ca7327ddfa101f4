"""The one place that knows about Accelerate, DeepSpeed and torch.distributed.

Decisions to skip or stop a step are taken by all ranks together: a rank that
skipped backward alone would leave its peers waiting in the gradient all-reduce
until the process-group timeout (seen on gloo). Every helper here that returns a
decision runs one collective on every rank.
"""

from __future__ import annotations

import os
from datetime import timedelta

import torch
from accelerate import Accelerator
from accelerate.utils import (
    DistributedDataParallelKwargs,
    InitProcessGroupKwargs,
    gather_object,
)

from noa_dist.errors import ConfigError


def process_group_backend() -> str:
    """NCCL on GPUs; gloo on CPU-only machines (accelerate defaults to NCCL otherwise)."""
    return "nccl" if torch.cuda.is_available() else "gloo"


def deepspeed_requested() -> bool:
    return os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true"


def launched_distributed() -> bool:
    """Started by a launcher that set up a process group (accelerate launch, torchrun, srun)."""
    return "WORLD_SIZE" in os.environ or deepspeed_requested()


def build_accelerator(
    *,
    gradient_accumulation_steps: int,
    mixed_precision: str | None,
    log_with: list[str] | None,
    project_dir: str | None = None,
    timeout_s: int = 1800,
) -> Accelerator:
    """An Accelerator for DDP, DeepSpeed or a single process, configured by `accelerate launch`."""
    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")  # DeepSpeed otherwise probes for CUDA
    handlers = [
        # The rollout calls forward T times per step; broadcasting buffers on each call would
        # add T collectives. The model has no buffers that differ across ranks.
        DistributedDataParallelKwargs(broadcast_buffers=False),
    ]
    if launched_distributed():
        # Without an explicit gloo backend on CPU, accelerate reports world size 1.
        handlers.append(
            InitProcessGroupKwargs(
                backend=process_group_backend(), timeout=timedelta(seconds=timeout_s)
            )
        )
    return Accelerator(
        # On CPU-only machines accelerate picks DDP (MULTI_CPU, gloo) only when told `cpu=True`;
        # otherwise it starts a process group but leaves the model unwrapped (no gradient sync).
        cpu=not torch.cuda.is_available() and not deepspeed_requested(),
        gradient_accumulation_steps=gradient_accumulation_steps,
        mixed_precision=mixed_precision,
        log_with=log_with,
        project_dir=project_dir,
        # We step the scheduler ourselves, once per applied optimizer step; accelerate's
        # default would step it num_processes times per step.
        step_scheduler_with_optimizer=False,
        kwargs_handlers=handlers,
    )


def any_rank(accelerator: Accelerator, *flags: torch.Tensor | bool) -> tuple[bool, ...]:
    """For each flag: true on every rank if true on any rank. One int32 MAX all-reduce. # sync point"""
    values = torch.stack(
        [torch.as_tensor(f, device=accelerator.device).to(torch.int32).reshape(()) for f in flags]
    )
    if accelerator.num_processes > 1:
        torch.distributed.all_reduce(values, op=torch.distributed.ReduceOp.MAX)
    return tuple(bool(v) for v in values.tolist())


def nonfinite(value: torch.Tensor) -> torch.Tensor:
    """A 0-d bool tensor on value's device: does it hold NaN/Inf? (no host sync)"""
    return ~torch.isfinite(value.detach()).all()


def all_finite(accelerator: Accelerator, value: torch.Tensor) -> bool:
    """True on every rank only if `value` is finite on every rank. # sync point"""
    return not any_rank(accelerator, nonfinite(value))[0]


def sum_across_ranks(accelerator: Accelerator, tensor: torch.Tensor) -> torch.Tensor:
    return accelerator.reduce(tensor, reduction="sum") if accelerator.num_processes > 1 else tensor


def gather_reports(accelerator: Accelerator, report: object) -> list:
    """Every rank's `report`, in rank order, on every rank (rare path: after a skip)."""
    if accelerator.num_processes == 1:
        return [report]
    return gather_object([report])


def broadcast_from_main(accelerator: Accelerator, value: object) -> object:
    """The main process's `value` on every rank (e.g. a timestamped run name)."""
    if accelerator.num_processes == 1:
        return value
    payload = [value]
    torch.distributed.broadcast_object_list(payload, src=0)
    return payload[0]


def nonfinite_grad_names(model: torch.nn.Module) -> list[str]:
    """Names of parameters whose gradient holds NaN/Inf (rare path: only after a skip)."""
    return [
        name
        for name, p in model.named_parameters()
        if p.grad is not None and not torch.isfinite(p.grad).all()
    ]


def unwrap(accelerator: Accelerator, model: torch.nn.Module) -> torch.nn.Module:
    return accelerator.unwrap_model(model)


def uses_deepspeed(accelerator: Accelerator) -> bool:
    return accelerator.distributed_type.name == "DEEPSPEED"


def check_world(accelerator: Accelerator) -> None:
    """Refuse a launch where several processes run but the model would not be synchronised."""
    if accelerator.num_processes > 1 and accelerator.distributed_type.name == "NO":
        raise ConfigError(
            f"{accelerator.num_processes} processes but no data-parallel wrapper: gradients would not be "
            "synchronised. Launch with `accelerate launch --multi_gpu` (DDP) or `--use_deepspeed`."
        )


def configure_deepspeed(
    accelerator: Accelerator, *, micro_batch_size: int, gradient_clipping: float
) -> None:
    """Fill what DeepSpeed cannot infer: we don't pass a dataloader to prepare (our sampler
    shards by rank itself), and ZeRO's global overflow skip needs gradient_clipping set."""
    if not uses_deepspeed(accelerator):
        return
    ds_config = accelerator.state.deepspeed_plugin.deepspeed_config
    if ds_config.get("train_micro_batch_size_per_gpu", "auto") == "auto":
        ds_config["train_micro_batch_size_per_gpu"] = micro_batch_size
    if ds_config.get("gradient_clipping", "auto") == "auto":
        ds_config["gradient_clipping"] = gradient_clipping
    if ds_config.get("train_batch_size") == "auto":
        ds_config["train_batch_size"] = (
            micro_batch_size * accelerator.gradient_accumulation_steps * accelerator.num_processes
        )


def discard_gradients(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> None:
    """Drop accumulated gradients after a skip (DeepSpeed's wrapper makes zero_grad a no-op)."""
    engine_optimizer = getattr(model, "optimizer", None)  # a DeepSpeedEngine's ZeRO optimizer
    if engine_optimizer is not None and hasattr(engine_optimizer, "zero_grad"):
        engine_optimizer.zero_grad(set_to_none=True)
    else:
        optimizer.zero_grad(set_to_none=True)


def backward(
    accelerator: Accelerator, model: torch.nn.Module, loss: torch.Tensor, *, last_of_step: bool
) -> None:
    """Backward one TBPTT window. Windows before the last of a micro-step only accumulate
    gradients: DDP skips its all-reduce, DeepSpeed its engine step (accelerate's backward
    would step the engine after every window)."""
    if last_of_step:
        accelerator.backward(loss)
    elif uses_deepspeed(accelerator):
        accelerator.deepspeed_engine_wrapped.backward(loss, sync_gradients=False)
    else:
        with accelerator.no_sync(model):
            accelerator.backward(loss)


def batch_to_device(
    accelerator: Accelerator, batch: dict[str, torch.Tensor]
) -> dict[str, torch.Tensor]:
    """Move a batch to the device, fp32 as read: the model casts its inputs to its weights'
    dtype itself and keeps the autoregressive state in fp32."""
    return {k: v.to(accelerator.device, non_blocking=True) for k, v in batch.items()}


def shutdown(accelerator: Accelerator) -> None:
    """Leave together: a barrier, then tear the process group down (a rank exiting while a peer's
    gloo threads still run can abort it with 'terminate called without an active exception')."""
    accelerator.wait_for_everyone()
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
