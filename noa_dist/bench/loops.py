"""The loops the speed benchmarks time, on one set of prepared parts and in-memory batches.

`TrainerLoop` is our trainer's step as `Trainer._train_epoch` runs it (the data path off):
`train_step` (skip-together checks, accumulation, one agreed decision), the logging meter,
its flush every `--log-every` steps. `BareLoop` is the same math written as a plain PyTorch
loop: the same model (DDP-wrapped when distributed), TBPTT windows, batch, loss, clipping,
AdamW and schedule (the configured L_traj, called directly), without any check. `AgreementOps` is the skip-together machinery alone:
what one step spends on the per-window finite flags, the poison factor, the fused check of the
norm and the one MAX all-reduce.
"""

from __future__ import annotations

import contextlib
import math

import torch

from noa_dist import distributed, report
from noa_dist.bench.common import Batch, Parts
from noa_dist.resume import current_lr
from noa_dist.rollout import Window, count_windows
from noa_dist.step import _BadTermTracker, train_step


def samples_per_step(parts: Parts) -> int:
    cfg = parts.cfg
    return (
        cfg.data.batch_size
        * cfg.optim.gradient_accumulation_steps
        * parts.accelerator.num_processes
    )


class TrainerLoop:
    def __init__(self, parts: Parts, micro_batches: list[Batch]) -> None:
        self.parts, self.micro_batches, self.step = parts, micro_batches, 0
        self.meter = report.StepMeter(
            parts.accelerator, samples_per_step(parts), list(parts.settings.loss_weights)
        )

    def run(self, n_steps: int) -> None:
        p = self.parts
        for _ in range(n_steps):
            self.step += 1
            micro = [distributed.batch_to_device(p.accelerator, b) for b in self.micro_batches]
            result = train_step(
                p.accelerator,
                p.model,
                p.optimizer,
                p.scheduler,
                micro,
                p.loss_fn,
                p.settings,
                step=self.step,
            )
            self.meter.add(result)
            if self.step % p.cfg.train.log_every == 0:
                self.meter.flush(lr=current_lr(p.scheduler), skipped=0)


class BareLoop:
    def __init__(self, parts: Parts, micro_batches: list[Batch]) -> None:
        self.parts, self.micro_batches = parts, micro_batches
        ddp = isinstance(parts.model, torch.nn.parallel.DistributedDataParallel)
        self.no_sync = parts.model.no_sync if ddp else contextlib.nullcontext

    def run(self, n_steps: int) -> None:
        p, s = self.parts, self.parts.settings
        for _ in range(n_steps):
            n_micro = len(self.micro_batches)
            for m, batch in enumerate(self.micro_batches):
                self._micro_step(batch, s.bptt_window, s.tbptt_mode, n_micro, last=m == n_micro - 1)
            torch.nn.utils.clip_grad_norm_(p.model.parameters(), s.max_grad_norm)
            p.optimizer.step()
            p.scheduler.step()
            p.optimizer.zero_grad(set_to_none=True)

    def _micro_step(self, batch: Batch, window: int | None, mode: str, n_micro: int, last: bool):
        model, target_BTCHW = self.parts.model, batch["target"]
        cond = batch["cond"] if batch["cond"].shape[1] > 0 else None
        n_steps = target_BTCHW.shape[1]
        length = n_steps if window is None else min(window, n_steps)
        starts = [n_steps - length] if mode == "last" else list(range(0, n_steps, length))
        u_BCHW = batch["u0"]
        with torch.no_grad():
            for _ in range(starts[0]):
                u_BCHW = model(u_BCHW, cond).state
        for k, start in enumerate(starts):
            stop = min(start + length, n_steps)
            reduce = last and k == len(starts) - 1
            with contextlib.nullcontext() if reduce else self.no_sync():
                states = []
                for _ in range(start, stop):
                    u_BCHW = model(u_BCHW, cond).state
                    states.append(u_BCHW)
                window_ = Window(start, stop, torch.stack(states, dim=1), (), batch["u0"])
                loss = self.parts.loss_fn(window_, batch)["traj"]  # the trainer's L_traj
                weight = 1.0 if mode == "last" else (stop - start) / n_steps
                (loss * weight / n_micro).backward()
            u_BCHW = u_BCHW.detach()


class AgreementOps:
    """One step's worth of the skip-together agreement, on finite values (the common case)."""

    def __init__(self, parts: Parts, micro_batches: list[Batch]) -> None:
        s = parts.settings
        self.parts, self.n_micro = parts, len(micro_batches)
        self.n_steps = micro_batches[0]["target"].shape[1]
        self.n_windows = count_windows(self.n_steps, s.bptt_window, s.tbptt_mode)
        device = parts.accelerator.device
        self.terms = {name: torch.rand((), device=device) for name in s.loss_weights}
        self.norm = torch.rand((), device=device)
        self.empty = torch.zeros(0, device=device)

    def run(self, n_steps: int) -> None:
        acc, names = self.parts.accelerator, list(self.parts.settings.loss_weights)
        for step in range(1, n_steps + 1):
            tracker = _BadTermTracker(names, self.n_windows, acc.device)
            for micro in range(self.n_micro):
                for index in range(self.n_windows):
                    window = Window(0, 1, self.empty, (), self.empty, index, micro, step)
                    terms_T = torch.stack([self.terms[n].detach().float() for n in names])
                    ok = tracker.update(window, terms_T)
                    poison = torch.where(ok, 1.0, math.nan)
                    _ = self.norm * poison
            grad_bad = distributed.nonfinite(self.norm)
            distributed.max_across_ranks(acc, tracker.any_bad, grad_bad, 0)
