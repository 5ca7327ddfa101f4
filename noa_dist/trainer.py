"""The training loop: epochs of optimizer steps, counting, logging, validation, checkpoints.

What one step does lives in `step.py`; what is built from the config in `build.py`. Every
decision to step, skip or stop is agreed by all ranks inside the step; printing, W&B and
files happen on the main process.
"""

from __future__ import annotations

import pickle
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from accelerate import Accelerator

from noa_dist import checkpoint, distributed, faults, plot_run, plots, report, run_status, tracking
from noa_dist.build import Built
from noa_dist.config import Config
from noa_dist.errors import NoaError
from noa_dist.evaluate import (
    RolloutResult,
    StoppedDuringValidation,
    ValResult,
    evaluate,
    rollout_set,
    validate_rollout,
)
from noa_dist.resume import current_lr
from noa_dist.state import TrainState
from noa_dist.step import StepResult, train_step
from noa_dist.stop import StopRequest
from noa_dist.stop import describe as describe_stop


def _rng_problem(path: Path, rank: int) -> str | None:
    """Is the torch CPU RNG now the one saved in `random_states_<rank>.pkl`?"""
    file = Path(path) / f"random_states_{rank}.pkl"
    try:
        saved = torch.load(file, weights_only=False)["torch_manual_seed"]
    except (OSError, KeyError, RuntimeError, pickle.UnpicklingError) as err:
        return f"cannot read {file} ({err}); the run continues, not bitwise reproducible"
    if not torch.equal(saved, torch.get_rng_state()):
        return f"{file} was not applied; the run continues, not bitwise reproducible"
    return None


class TrainingAborted(NoaError):
    """Too many consecutive skipped steps: the run cannot make progress."""


@dataclass
class Outcome:
    state: TrainState
    val: ValResult | None
    stopped_by: str | None  # signal name / "stop-at-step" / "max-steps" / "early-stop" / None
    checkpoint_dir: Path
    checkpoint: Path | None = None  # the checkpoint a requested stop saved


REQUESTED_STOPS = ("max-steps", "early-stop")  # end the run; anything else can be resumed


class Trainer:
    def __init__(
        self,
        cfg: Config,
        accelerator: Accelerator,
        built: Built,
        run_dir: Path,
        checkpoint_dir: Path,
        stop: StopRequest,
    ) -> None:
        self.cfg, self.accelerator, self.built = cfg, accelerator, built
        self.run_dir, self.checkpoint_dir, self.stop = run_dir, checkpoint_dir, stop
        self.model, self.optimizer, self.scheduler = built.model, built.optimizer, built.scheduler
        self.data = built.data
        self.state = TrainState(run_dir=str(run_dir))
        self.run_lock: checkpoint.RunLock | None = None  # held by the main process (train.py)
        self.term_names = list(built.step_settings.loss_weights)
        self.rollout = rollout_set(cfg, accelerator, built.data.val_source.root)
        if cfg.debug.debug_hang_in_save is not None:
            hook = faults.hang_in_save_hook(
                cfg.debug.debug_hang_in_save, lambda: self.state.global_step
            )
            accelerator.register_save_state_pre_hook(hook)

    @property
    def micro_per_epoch(self) -> int:
        return self.data.steps_per_epoch * self.cfg.optim.gradient_accumulation_steps

    # ----------------------------------------------------------------- checkpoints
    def restore(self, path: Path) -> str | None:
        """Weights, optimizer, scheduler, RNG, sampler position, history.

        Returns None when this rank's random states are verifiably restored, else why not
        (accelerate logs a failed RNG load at info level and carries on).
        """
        saved = checkpoint.load_checkpoint(self.accelerator, path)
        self.state = TrainState.from_dict(saved["state"])
        self.state.run_dir = str(self.run_dir)
        self.data.sampler.load_state_dict(saved["sampler"])
        return _rng_problem(path, self.accelerator.process_index)

    def _trainer_state(self) -> dict:
        return {
            "state": self.state.to_dict(),
            "sampler": self.data.sampler.state_dict(self.state.batch_in_epoch),
            "config": self.cfg.to_dict(),
            "args": sys.argv[1:],
        }

    def save(self) -> Path:
        return checkpoint.save_checkpoint(
            self.accelerator,
            self.checkpoint_dir,
            self.state.global_step,
            self._trainer_state(),
            keep_last=self.cfg.checkpoint.keep_last,
        )

    # ----------------------------------------------------------------- loop
    def fit(self) -> Outcome:
        val, stopped_by, saved = None, None, None
        if self.accelerator.is_main_process:  # a resumed run repeats the steps after its checkpoint
            run_status.truncate_metrics(self.run_dir, self.state.global_step)
        while self.state.epoch < self.cfg.train.epochs and stopped_by is None:
            report.epoch_header(self.state.epoch, self.cfg.train.epochs)
            epoch_start = time.perf_counter()
            stopped_by, train_terms = self._train_epoch()
            if stopped_by in (None, "max-steps"):
                try:
                    val = self._end_epoch(train_terms, time.perf_counter() - epoch_start)
                except StoppedDuringValidation as stop:
                    # The epoch's steps are done (batch_in_epoch == steps per epoch): the
                    # resumed run starts with this validation.
                    stopped_by = describe_stop(stop.code)
                    break
                stopped_by = stopped_by or self._early_stop()
        if stopped_by not in (None, *REQUESTED_STOPS):
            saved = self.save()
            report.stopped(stopped_by, self.state, saved)
        self._save_curves()
        return Outcome(self.state, val, stopped_by, self.checkpoint_dir, saved)

    def _train_epoch(self) -> tuple[str | None, dict[str, float]]:
        acc, st, data = self.accelerator, self.state, self.data
        accum = self.cfg.optim.gradient_accumulation_steps
        data.sampler.set_epoch(st.epoch)
        data.sampler.set_start_batch(st.batch_in_epoch)
        samples_per_step = self.cfg.data.batch_size * accum * acc.num_processes
        meter = report.StepMeter(acc, samples_per_step, self.term_names)
        batches = iter(data.train_loader)
        progress = report.progress_bar(acc, total=self.micro_per_epoch, initial=st.batch_in_epoch)
        stop = None
        while st.batch_in_epoch < self.micro_per_epoch and stop is None:
            with meter.waiting_for_data():
                micro = [distributed.batch_to_device(acc, next(batches)) for _ in range(accum)]
            result = train_step(
                acc,
                self.model,
                self.optimizer,
                self.scheduler,
                micro,
                self.built.loss_fn,
                self.built.step_settings,
                step=st.global_step + 1,
                stop_code=self.stop.code,
            )
            st.batch_in_epoch += accum
            progress.update(accum)
            stop = self._after_step(result, meter)
        progress.close()
        return stop, meter.epoch_means()

    def _after_step(self, result: StepResult, meter: report.StepMeter) -> str | None:
        st, cfg = self.state, self.cfg
        st.global_step += 1
        if result.applied:
            st.applied_steps += 1
            st.consecutive_skips = 0
        else:
            self._record_skip(result)
        meter.add(result)
        if st.global_step % cfg.train.log_every == 0:
            self._log_train(meter)
        if st.consecutive_skips >= cfg.train.max_consecutive_skips:
            self._abort_after_skips()
        if cfg.checkpoint.save_every and st.global_step % cfg.checkpoint.save_every == 0:
            self.save()
        if result.stop:
            return describe_stop(result.stop)  # the same on every rank, signalled or not
        if cfg.train.max_steps and st.global_step >= cfg.train.max_steps:
            return "max-steps"
        if cfg.train.stop_at_step and st.global_step >= cfg.train.stop_at_step:
            return "stop-at-step"
        return None

    def _record_skip(self, result: StepResult) -> None:
        st = self.state
        st.skipped_steps += 1
        st.consecutive_skips += 1
        st.history["skipped"].append(st.global_step)
        self._record("skip", {"reason": result.skip_reason})
        report.log.warning(
            f"Warning: NaN/Inf at step {st.global_step}, skipping update on all ranks: "
            f"{result.skip_reason}"
        )

    def _abort_after_skips(self) -> None:
        path = self.save()  # the weights are those of the last applied step
        n = self.state.consecutive_skips
        raise TrainingAborted(
            f"{n} consecutive steps skipped (step {self.state.global_step}): the loss or gradients stay "
            f"non-finite, so training cannot progress. The last good state is saved at {path}. "
            + report.skip_advice(self.cfg)
        )

    def _log_train(self, meter: report.StepMeter) -> None:
        metrics = meter.flush(lr=current_lr(self.scheduler), skipped=self.state.skipped_steps)
        st = self.state
        st.history["step"].append(st.global_step)
        st.history["train_loss"].append(metrics["train/loss"])
        for name in self.term_names:
            st.history.setdefault(f"train_{name}", []).append(metrics[f"train/{name}"])
        report.step_line(
            st.global_step,
            self.built.total_steps,
            self.term_names,
            metrics,
        )
        tracking.log_metrics(self.accelerator, metrics, step=st.global_step)
        self._record("train", {"epoch": st.epoch, **metrics})

    def _record(self, kind: str, row: dict) -> None:
        """One row of runs/<name>/metrics.jsonl (main process), what `noa-plot` draws."""
        if self.accelerator.is_main_process:
            run_status.append_metrics(self.run_dir, kind, self.state.global_step, row)

    # ----------------------------------------------------------------- epoch end
    def _end_epoch(self, train_terms: dict[str, float], seconds: float) -> ValResult:
        val = evaluate(
            self.accelerator,
            self.model,
            self.data.val_loader,
            self.data.val_n_real,
            self.built.val_loss_fn,
            self.built.step_settings.loss_weights,
            describe_sample=self.data.describe_val_sample,
            window=self.cfg.train.bptt_window,
            tokenizer=self.built.tokenizer,
            stop_code=lambda: self.stop.code,
        )
        if self.rollout is not None:
            val.rollout = validate_rollout(
                self.accelerator, self.model, self.rollout, stop_code=lambda: self.stop.code
            )
        st = self.state
        improved = val.nonfinite_samples == 0 and val.loss < st.best_val_loss
        if improved:
            st.best_val_loss, st.epochs_without_improvement = val.loss, 0
            self._save_best(val)
        else:
            st.epochs_without_improvement += 1
        st.history["epoch"].append(st.epoch)
        st.history["val_loss"].append(val.loss)
        for name in self.term_names:
            st.history.setdefault(f"val_{name}", []).append(val.terms[name])
        report.epoch_summary(train_terms, val, seconds, improved)
        if val.rollout is not None:
            _rollout_line(val.rollout)
        self._log_validation(val)
        st.epoch, st.batch_in_epoch = st.epoch + 1, 0
        self.save()
        return val

    def _save_best(self, val: ValResult) -> None:
        st = self.state
        checkpoint.save_model_weights(
            self.accelerator,
            self.model,
            self.run_dir / "best",
            {
                "config": self.cfg.to_dict(),
                "epoch": st.epoch,
                "global_step": st.global_step,
                "val_loss": val.loss,
                "val_terms": val.terms,
            },
        )

    def _log_validation(self, val: ValResult) -> None:
        metrics = {f"val/{name}": value for name, value in val.terms.items() if name != "total"}
        metrics.update(
            {
                "val/loss": val.loss,
                "val/vrmse": val.vrmse,
                "val/vrmse_ratio_step_1": val.one_step_ratio,
                "val/nonfinite_samples": val.nonfinite_samples,
                "epoch": self.state.epoch,
            }
        )
        for k, (used, perplexity) in enumerate(
            zip(val.token_utilization, val.token_perplexity, strict=True)
        ):
            metrics[f"val/token_utilization_{k}"] = used
            metrics[f"val/token_perplexity_{k}"] = perplexity
        for k, (m, p) in enumerate(
            zip(val.vrmse_per_step, val.persistence_vrmse_per_step, strict=True), start=1
        ):
            metrics[f"val/vrmse_step_{k}"], metrics[f"val/persistence_vrmse_step_{k}"] = m, p
        if val.rollout is not None:
            metrics.update(val.rollout.metrics())
        tracking.log_metrics(self.accelerator, metrics, step=self.state.global_step)
        self._record("val", metrics)
        if self.accelerator.is_main_process:
            run_status.write_val_metrics(
                self.run_dir, metrics, step=self.state.global_step, config=self.cfg.to_dict()
            )
        if self.accelerator.is_main_process and val.example is not None:
            self._validation_figures(val)

    def _validation_figures(self, val: ValResult) -> None:
        """figures/: per-step VRMSE, rollout frames and spectra of the long rollout (of the
        validation windows when it is off), named by epoch; the same figures go to W&B."""
        epoch = self.state.epoch + 1
        where = f"epoch {epoch} · step {self.state.global_step} · valid"
        if val.rollout is not None:
            figures = plots.long_rollout_figures(val.rollout, where)
        else:
            truth, pred = val.example
            n = len(val.vrmse_per_step)
            figures = {
                "val/rollout": plots.rollout_figure(truth, pred, title=f"{where} · channel 0"),
                "val/vrmse_per_step": plots.vrmse_figure(
                    val.vrmse_per_step,
                    val.persistence_vrmse_per_step,
                    title=f"{where}: {val.n_samples} windows of {n} steps",
                ),
            }
        for name, fig in figures.items():
            kind, _, label = name.split("/", 1)[1].partition("/")
            suffix = f"_{label}" if label else ""
            plots.save_figure(
                fig, self.run_dir / "figures" / f"{kind}_epoch{epoch:03d}{suffix}.png"
            )
        tracking.log_figures(self.accelerator, figures, step=self.state.global_step)

    def _early_stop(self) -> str | None:
        patience = self.cfg.train.early_stop_patience
        if patience and self.state.epochs_without_improvement >= patience:
            report.log.info(f"Early stopping: no validation improvement for {patience} epoch(s)")
            return "early-stop"
        return None

    def _save_curves(self) -> None:
        """figures/loss_curves.png: noa-plot's figure of the run's records so far."""
        records = run_status.read_metrics(self.run_dir) if self.accelerator.is_main_process else []
        if any(row["kind"] == "train" for row in records):
            fig = plot_run.curves_figure(records, title=self.run_dir.name)
            plots.save_figure(fig, self.run_dir / "figures" / "loss_curves.png")


def _rollout_line(r: RolloutResult) -> None:
    steps = r.steps_to_vrmse_above_1
    report.log.info(
        f"  Rollout: {r.trajectories} trajectories x {r.horizon} steps: "
        f"vrmse@{r.horizon}={_num(r.vrmse_per_step['model'][-1])} "
        f"(persistence {_num(r.vrmse_per_step['persistence'][-1])}), steps to VRMSE>1 "
        f"{_num(steps['model'], '.1f')} (persistence {_num(steps['persistence'], '.1f')})"
    )


def _num(value: float | None, spec: str = ".4f") -> str:
    return "n/a" if value is None else format(value, spec)
