"""The one place that knows about Accelerate, DeepSpeed and torch.distributed.

Decisions to skip or stop a step are taken by all ranks together: a rank that
skipped backward alone would leave its peers waiting in the gradient all-reduce
until the process-group timeout (seen on gloo). Every helper here that returns a
decision runs one collective on every rank.
"""

from __future__ import annotations

import atexit
import contextlib
import logging
import math
import os
import sys
import warnings
from collections.abc import Callable
from datetime import timedelta
from typing import NoReturn, TypeVar

import torch
from accelerate import Accelerator
from accelerate.utils import (
    DistributedDataParallelKwargs,
    InitProcessGroupKwargs,
    gather_object,
)

from noa_dist.errors import ConfigError, NoaError

T = TypeVar("T")


def process_group_backend() -> str:
    """NCCL on GPUs; gloo on CPU-only machines (accelerate defaults to NCCL otherwise)."""
    return "nccl" if torch.cuda.is_available() else "gloo"


def deepspeed_requested() -> bool:
    return os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true"


def launched_distributed() -> bool:
    """Started by a launcher that set up a process group (accelerate launch, torchrun, srun)."""
    return "WORLD_SIZE" in os.environ or deepspeed_requested()


def set_threads(requested: int | None) -> str:
    """Give each process its share of the node's cores and say why (for the start banner).

    `accelerate launch` (and torchrun) export OMP_NUM_THREADS=1 unless told otherwise, which
    leaves all but one core idle on a CPU run: under a launcher only a larger value counts as
    the user's; without one, any OMP_NUM_THREADS the user set is kept."""
    local_processes = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    env = os.environ.get("OMP_NUM_THREADS", "")
    launcher = "ACCELERATE_DYNAMO_BACKEND" in os.environ or "TORCHELASTIC_RUN_ID" in os.environ
    if requested is not None:
        threads, why = requested, "--threads-per-process"
    elif env.isdigit() and int(env) >= (2 if launcher else 1):
        threads, why = int(env), "OMP_NUM_THREADS"
    else:
        threads = max(1, (cores or 1) // local_processes)
        why = f"{cores} core(s) / {local_processes} process(es) on this node"
    torch.set_num_threads(threads)
    return f"{threads} thread(s) per process ({why})"


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
    if deepspeed_requested():
        check_deepspeed_config_file()
    handlers = [
        # The rollout calls forward T times per step; broadcasting buffers on each call would
        # add T collectives. The model has no buffers that differ across ranks.
        DistributedDataParallelKwargs(broadcast_buffers=False),
    ]
    # torch now warns on every rank that the name is deprecated; accelerate's handler has no other.
    warnings.filterwarnings("ignore", "`broadcast_buffers` is deprecated", FutureWarning)
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


def max_across_ranks(accelerator: Accelerator, *values: torch.Tensor | int) -> tuple[int, ...]:
    """For each value (a flag or a small code): its maximum over all ranks, on every rank.

    One int32 MAX all-reduce and one read to the host. # sync point
    """
    stacked = torch.stack(
        [torch.as_tensor(v, device=accelerator.device).to(torch.int32).reshape(()) for v in values]
    )
    if accelerator.num_processes > 1:
        torch.distributed.all_reduce(stacked, op=torch.distributed.ReduceOp.MAX)
    return tuple(stacked.tolist())


def nonfinite(value: torch.Tensor) -> torch.Tensor:
    """A 0-d bool tensor on value's device: does it hold NaN/Inf? (no host sync)"""
    return ~torch.isfinite(value.detach()).all()


def sum_across_ranks(accelerator: Accelerator, tensor: torch.Tensor) -> torch.Tensor:
    return accelerator.reduce(tensor, reduction="sum") if accelerator.num_processes > 1 else tensor


def gather_reports(accelerator: Accelerator, report: object) -> list:
    """Every rank's `report`, in rank order, on every rank (rare path: after a skip)."""
    if accelerator.num_processes == 1:
        return [report]
    return gather_object([report])


def run_agreed(accelerator: Accelerator, fn: Callable[[], T]) -> T:
    """`fn()` on every rank; if it raises a NoaError on any rank, every rank raises it.

    For rank-local checks before training (the run folder, the checkpoint to resume): a
    rank that raised alone would leave its peers waiting in the next collective.
    """
    try:
        result, error = fn(), None
    except NoaError as exc:
        result, error = None, (type(exc), str(exc))
    errors = [e for e in gather_reports(accelerator, error) if e is not None]
    if errors:
        kind, message = errors[0]
        raise kind(message)
    return result


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


def uses_deepspeed(accelerator: Accelerator) -> bool:
    return accelerator.distributed_type.name == "DEEPSPEED"


def check_world(accelerator: Accelerator) -> None:
    """Refuse a launch where several processes run but the model would not be synchronised."""
    if accelerator.num_processes > 1 and accelerator.distributed_type.name == "NO":
        raise ConfigError(
            f"{accelerator.num_processes} processes but no data-parallel wrapper: gradients would not be "
            "synchronised. Launch with `accelerate launch --multi_gpu` (DDP) or `--use_deepspeed`."
        )


# DeepSpeed's defaults size buffers for billion-parameter models (5e8-element buckets: a 2 GB
# reduce buffer for a 38 MB U-AFNO); these fit ours and are used where the config says nothing.
ZERO_TUNING = {
    "reduce_bucket_size": 5_000_000,
    "allgather_bucket_size": 5_000_000,
    "contiguous_gradients": True,
    "stage3_prefetch_bucket_size": 5_000_000,
    "stage3_param_persistence_threshold": 100_000,
}


def configure_deepspeed(
    accelerator: Accelerator, *, micro_batch_size: int, gradient_clipping: float
) -> None:
    """Fill the DeepSpeed config before `prepare`, keeping what the user's config sets.

    - the micro-batch: our sampler shards the data itself, no dataloader goes to prepare;
    - clipping: ZeRO detects a non-finite fp32 step only through the clipped global norm;
    - bucket sizes (ZERO_TUNING);
    - ZeRO-3 gathers full 16-bit weights on save: best/ exports need them (without it the
      first export crashed an epoch into the run);
    - with optimizer offload, the trainer's torch AdamW runs on the CPU partition (no
      DeepSpeedCPUAdam op to compile).
    """
    if not uses_deepspeed(accelerator):
        return
    ds_config = accelerator.state.deepspeed_plugin.deepspeed_config
    if ds_config.get("train_micro_batch_size_per_gpu", "auto") == "auto":
        ds_config["train_micro_batch_size_per_gpu"] = micro_batch_size
    if ds_config.get("gradient_clipping", "auto") in ("auto", None, 0, 0.0):
        ds_config["gradient_clipping"] = gradient_clipping
    if ds_config.get("train_batch_size") == "auto":
        ds_config["train_batch_size"] = (
            micro_batch_size * accelerator.gradient_accumulation_steps * accelerator.num_processes
        )
    zero = ds_config.setdefault("zero_optimization", {})
    for key, value in ZERO_TUNING.items():
        zero.setdefault(key, value)
    if zero.get("stage") == 3:
        zero["stage3_gather_16bit_weights_on_model_save"] = True
    if zero.get("offload_optimizer", {}).get("device", "none") != "none":
        ds_config.setdefault("zero_force_ds_cpu_optimizer", False)


def check_deepspeed_config_file() -> None:
    """A relative `deepspeed_config_file` is resolved against the working directory, not the
    launch YAML: say so in one line instead of DeepSpeed's traceback."""
    path = os.environ.get("ACCELERATE_DEEPSPEED_CONFIG_FILE")
    if path and path != "none" and not os.path.isfile(path):
        where = "" if os.path.isabs(path) else f" (relative to the working directory {os.getcwd()})"
        raise ConfigError(
            f"deepspeed_config_file {path!r} of the launch config does not exist{where}; give "
            "an absolute path, or use launch/zero*.yaml, whose DeepSpeed settings are inline"
        )


def sync_context(accelerator: Accelerator, model: torch.nn.Module, *, reduce: bool):
    """Context for one TBPTT window's forward and backward.

    DDP all-reduces gradients in the backward of a forward run outside `no_sync`, so every
    window but the step's last runs inside it (forward included: wrapping the backward alone
    still syncs). DeepSpeed takes the accumulation boundary at `backward` instead.
    """
    if reduce or uses_deepspeed(accelerator) or accelerator.num_processes == 1:
        return contextlib.nullcontext()
    return accelerator.no_sync(model)


def backward(
    accelerator: Accelerator, model: torch.nn.Module, loss: torch.Tensor, *, boundary: bool
) -> None:
    """Backward of one window's loss, scaled by 1/accumulation steps by the backend.

    Under DeepSpeed the engine is told whether this is the step's last backward (where ZeRO
    finishes reducing gradients) and never steps here: `finish_gradients` does, once.
    """
    if uses_deepspeed(accelerator):
        model.set_gradient_accumulation_boundary(boundary)
        model.backward(loss)
    else:
        accelerator.backward(loss)  # GradScaler-scaled under fp16


def finish_gradients(
    accelerator: Accelerator, model: torch.nn.Module, max_grad_norm: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """After the step's last backward: (global pre-clip grad norm, non-finite flag), on device.

    DDP: one fused norm over the reduced gradients, then clipping. DeepSpeed: `engine.step()`
    clips and, when the norm is non-finite on any rank, skips the update and clears ZeRO's
    reduced-gradient buffers itself; its verdict is read back (no host sync of ours).
    """
    if uses_deepspeed(accelerator):
        model.step()
        norm = model.get_global_grad_norm()
        norm = torch.as_tensor(math.nan if norm is None else norm, device=accelerator.device)
        return norm.float(), torch.as_tensor(not model.was_step_applied(), device=norm.device)
    norm = accelerator.clip_grad_norm_(model.parameters(), max_grad_norm)
    return norm.detach(), nonfinite(norm)


def apply_or_discard(
    accelerator: Accelerator,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    *,
    applied: bool,
) -> None:
    """Take the agreed decision: optimizer + scheduler step, or drop the gradients.

    Under DeepSpeed the engine already stepped or skipped in `finish_gradients`. A GradScaler
    (fp16 on GPUs) still updates its scale on a skip: it saw the overflow in `unscale_`, and
    the next step's `unscale_` would otherwise fail.
    """
    if uses_deepspeed(accelerator):
        if applied:
            scheduler.step()
        elif model.was_step_applied():
            raise RuntimeError(
                "internal error: every rank agreed to skip, but DeepSpeed applied the update"
            )
        return
    if applied:
        optimizer.step()
        scheduler.step()
    elif accelerator.scaler is not None:
        accelerator.scaler.update()
    optimizer.zero_grad(set_to_none=True)


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


def exit_process(code: int) -> NoReturn:
    """End a launched process with `code` once its work is done, without interpreter teardown.

    Objects that still hold a process group (DDP's reducer, DeepSpeed's groups) would otherwise
    be destroyed during finalisation, where gloo's threads intermittently abort the process
    (SIGABRT, "terminate called without an active exception", seen once in ~50 two-rank
    launches) and the launcher reports a finished run as a crash. atexit handlers (W&B,
    DataLoader workers) still run first, while the interpreter is whole."""
    atexit._run_exitfuncs()
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def run_tool(load: Callable[[], T], work: Callable[[Accelerator, T], None]) -> int:
    """The frame of a tool that runs on one process or under `accelerate launch` (noa-align-
    report, noa-eval): an Accelerator, `load()` on every rank (a problem on any rank stops
    all of them with the same error), `work(accelerator, loaded)`, one `error:` line from the
    main process for bad input (exit code 2), and the ranks leave together."""
    accelerator = None
    set_threads(None)
    try:
        accelerator = build_accelerator(
            gradient_accumulation_steps=1, mixed_precision="no", log_with=None
        )
        check_world(accelerator)
        work(accelerator, run_agreed(accelerator, load))
    except NoaError as exc:
        if accelerator is None or accelerator.is_main_process:
            print(f"error: {exc}", file=sys.stderr)
        return 2
    finally:
        if accelerator is not None:
            shutdown(accelerator)
    return 0
