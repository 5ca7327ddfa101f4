"""Train under `accelerate launch` and dump, per rank, what the distributed tests compare.

Usage: NOA_TEST_OUT=DIR accelerate launch ... tests/dist/train_worker.py [train.py flags]
Writes DIR/rank<r>.pt: world size, final parameters, the dataset indices this rank
trained on, the trainer state (history, skips) and why training stopped.

Test-only variables (the trainer knows nothing of them):
  NOA_TEST_SKIP_STEPS=2,5  the reference run for "skipped as if it never happened": those
                           optimizer steps consume their batches but run no forward, no
                           backward and no optimizer or scheduler step.
  NOA_TEST_STOP_IN_VALIDATION=R:V / NOA_TEST_STOP_IN_ROLLOUT=R:V  a SIGUSR1 stop request
                           pending on rank R from the start of validation V's windows / of
                           its long rollout.
  NOA_TEST_COUNT=1         count, per optimizer step, the Python-level collectives, the host
                           reads of device tensors and DDP's gradient all-reduces (a comm hook).
"""

from __future__ import annotations

import collections
import math
import os
import signal
import sys
from pathlib import Path

import torch

from noa_dist import distributed, train
from noa_dist import trainer as trainer_module
from noa_dist.config import load_config
from noa_dist.step import StepResult


class RecordingLoader:
    """Wraps the training DataLoader and records the dataset indices it serves."""

    def __init__(self, loader, seen: list[int]) -> None:
        self.loader, self.seen = loader, seen

    def __iter__(self):
        for batch in self.loader:
            self.seen.extend(batch["index"].tolist())
            yield batch


def skipping_step(real_step, skip: set[int]):
    """train_step, except that the steps in `skip` are skipped before any forward."""

    def step(accelerator, model, optimizer, scheduler, micro, loss_fn, settings, *, step, **kw):
        if step not in skip:
            return real_step(
                accelerator, model, optimizer, scheduler, micro, loss_fn, settings, step=step, **kw
            )
        names = [*settings.loss_weights, "total"]
        nan = torch.full((), math.nan, device=accelerator.device)
        return StepResult(False, 0, nan, dict.fromkeys(names, nan), "reference skip")

    return step


def stop_signal_in_validation(real_evaluate, rank: int, validation: int):
    """evaluate, except that on `rank` a SIGUSR1 stop request is pending from the start of
    validation number `validation` (1-based) on: a signal arriving as validation begins."""
    calls = []

    def evaluate(*args, stop_code=None, **kwargs):
        calls.append(None)
        if int(os.environ["RANK"]) == rank and len(calls) == validation:
            stop_code = lambda: int(signal.SIGUSR1)  # noqa: E731
        return real_evaluate(*args, stop_code=stop_code, **kwargs)

    return evaluate


class Counter:
    """Calls per optimizer step of collectives, host reads and DDP gradient all-reduces.

    Collectives and host reads (`.item()`, `.tolist()`, ...) count the calls made from
    noa_dist's own code: its sync points on a GPU. Library-internal reads of CPU scalars
    (AdamW's step counter) are no syncs; DDP's gradient all-reduce is counted by the hook.
    """

    COLLECTIVES = ("all_reduce", "all_gather", "broadcast", "all_gather_object", "reduce_scatter",
                   "broadcast_object_list", "barrier", "gather_object")
    READS = ("item", "tolist", "__bool__", "__float__", "__int__")

    def __init__(self) -> None:
        self.active, self.now = False, collections.Counter()
        self.per_step: list[dict[str, int]] = []
        for name in self.COLLECTIVES:
            self._wrap(torch.distributed, name, "collectives")
        for name in self.READS:
            self._wrap(torch.Tensor, name, "host_reads")

    def _wrap(self, owner, name: str, kind: str) -> None:
        original = getattr(owner, name)

        def counted(*args, **kwargs):
            caller = sys._getframe(1).f_code.co_filename
            if self.active and "noa_dist" in caller:
                self.now[kind] += 1
                self.active = False  # count the outermost call only
                try:
                    return original(*args, **kwargs)
                finally:
                    self.active = True
            return original(*args, **kwargs)

        setattr(owner, name, counted)

    def comm_hook(self, _state, bucket):
        self.now["gradient_allreduces"] += 1
        from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook

        return allreduce_hook(None, bucket)

    def wrap_step(self, real_step):
        def step(*args, **kwargs):
            self.now.clear()
            self.active = True
            try:
                return real_step(*args, **kwargs)
            finally:
                self.active = False
                self.per_step.append(dict(self.now))

        return step


def main() -> None:
    out = Path(os.environ["NOA_TEST_OUT"])
    counter = Counter() if os.environ.get("NOA_TEST_COUNT") else None
    skip = {int(s) for s in os.environ.get("NOA_TEST_SKIP_STEPS", "").split(",") if s}
    if skip:
        trainer_module.train_step = skipping_step(trainer_module.train_step, skip)
    if counter:
        trainer_module.train_step = counter.wrap_step(trainer_module.train_step)
    if stop_in_validation := os.environ.get("NOA_TEST_STOP_IN_VALIDATION"):  # RANK:VALIDATION
        rank, validation = map(int, stop_in_validation.split(":"))
        trainer_module.evaluate = stop_signal_in_validation(trainer_module.evaluate, rank, validation)
    if stop_in_rollout := os.environ.get("NOA_TEST_STOP_IN_ROLLOUT"):  # RANK:VALIDATION
        rank, validation = map(int, stop_in_rollout.split(":"))
        trainer_module.validate_rollout = stop_signal_in_validation(
            trainer_module.validate_rollout, rank, validation
        )
    trainer = train.prepare(load_config(sys.argv[1:]))
    if counter and isinstance(trainer.model, torch.nn.parallel.DistributedDataParallel):
        trainer.model.register_comm_hook(None, counter.comm_hook)
    seen: list[int] = []
    trainer.data.train_loader = RecordingLoader(trainer.data.train_loader, seen)
    outcome = trainer.fit()
    acc = trainer.accelerator
    # get_state_dict gathers ZeRO-3 partitions (a collective: every rank calls it)
    state_dict = acc.get_state_dict(trainer.model) or {}  # None off the main process under ZeRO-3
    params = {k: v.detach().cpu().float().clone() for k, v in state_dict.items()}
    torch.save(
        {
            "rank": acc.process_index,
            "world_size": acc.num_processes,
            "params": params,
            "seen": seen,
            "state": trainer.state.to_dict(),
            "stopped_by": outcome.stopped_by,
            "counts": counter.per_step if counter else None,
        },
        out / f"rank{acc.process_index}.pt",
    )
    train.finish(trainer, outcome)


if __name__ == "__main__":
    main()
    distributed.exit_process(0)
