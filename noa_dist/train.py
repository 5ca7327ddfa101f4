"""Train NOA: `accelerate launch noa_dist/train.py [--config X.yaml] [--flag value ...]`.

Parse and check everything (config, data) before the process group starts; then agree on
the run folder and the checkpoint to resume, build, restore, train, and leave a marker.
"""

from __future__ import annotations

import sys
from pathlib import Path

if __name__ == "__main__" and not __package__:
    # Run as a script: import the package, not its modules as top-level names.
    sys.path[0] = str(Path(__file__).resolve().parents[1])
if __name__ == "__main__":
    from noa_dist import stop as _stop  # light: os/signal only, before torch's seconds of imports

    _stop.catch_early()

import os
import time

from noa_dist import checkpoint, distributed, preflight, report, run_status, tracking
from noa_dist.build import build
from noa_dist.config import Config, load_config
from noa_dist.errors import ConfigError, NoaError, user_message
from noa_dist.export import export_checkpoint
from noa_dist.resume import apply_optimizer_overrides, config_changes, refusal_message
from noa_dist.rollout import bptt_warning
from noa_dist.stop import StopRequest, adopt_early, launched_by_agent, watch_parent
from noa_dist.trainer import REQUESTED_STOPS, Outcome, Trainer, TrainingAborted

log = report.log


def resolve_run_dir(cfg: Config, accelerator) -> Path:
    """One directory per run: --run-name, else the W&B sweep run (under `wandb agent`), else
    slurm-<jobid>, else a timestamp agreed by all ranks."""
    name = cfg.checkpoint.run_name or tracking.agent_run_name()
    if name is None and "SLURM_JOB_ID" in os.environ:
        name = f"slurm-{os.environ['SLURM_JOB_ID']}"
    if name is None:
        name = distributed.broadcast_from_main(accelerator, time.strftime("noa-%Y%m%d-%H%M%S"))
    return Path(cfg.checkpoint.output_dir) / name


def _check_flags(cfg: Config) -> None:
    stable = (
        cfg.checkpoint.run_name
        or cfg.checkpoint.checkpoint_dir
        or tracking.agent_run_name()
        or "SLURM_JOB_ID" in os.environ
    )
    if cfg.checkpoint.resume == "auto" and not stable:
        raise ConfigError(
            "--resume auto needs a stable place to look: give --run-name or --checkpoint-dir"
        )


def _check_precision(accelerator) -> None:
    if accelerator.mixed_precision == "fp16" and accelerator.device.type == "cpu":
        raise ConfigError(
            "--mixed-precision fp16: fp16 training needs loss scaling on a GPU (CUDA); on this "
            "CPU-only machine it would silently run in fp32. Use --mixed-precision bf16 or no"
        )


def _refuse_existing_run(run_dir: Path, checkpoint_dir: Path) -> None:
    """A folder that already holds a run is resumed or refused, never silently reused."""
    found = checkpoint.latest_checkpoint(checkpoint_dir)
    if found is None:
        return
    cmd = "accelerate launch noa_dist/train.py ..."
    raise ConfigError(
        f"{run_dir} already holds a run (its latest checkpoint is {found.name}). Continue it:\n"
        f"  {cmd} --resume auto\nor start a new run next to it:\n"
        f"  {cmd} --run-name {run_dir.name}-2"
    )


def _probe_folders(accelerator, run_dir: Path, checkpoint_dir: Path) -> None:
    """Every rank writes into the checkpoint folder (its RNG state, its ZeRO shards): find an
    unwritable one now, not at the first save an epoch in."""
    checkpoint.probe_writable(checkpoint_dir, "--checkpoint-dir (checkpoints)")
    if accelerator.is_main_process:
        checkpoint.probe_writable(run_dir, "--output-dir/--run-name (the run folder)")


def _check_resumable(cfg: Config, accelerator, path: Path) -> dict:
    """The checkpoint's trainer_state, after checking what this launch would change in it."""
    saved = checkpoint.read_trainer_state(path)
    deepspeed = distributed.uses_deepspeed(accelerator)
    changes = config_changes(saved["config"], cfg, deepspeed=deepspeed)
    saved_world = saved["sampler"].get("num_replicas")
    if saved_world != accelerator.num_processes:
        why = (
            "ZeRO partitions the optimizer state per rank"
            if deepspeed
            else "each rank's share of the data order depends on it"
        )
        changes["refused"].append(
            f"number of processes: checkpoint {saved_world}, now {accelerator.num_processes} ({why})"
        )
    if changes["refused"]:
        raise ConfigError(refusal_message(path, changes["refused"]))
    saved["changes"] = changes
    return saved


def _agree_on_start(cfg: Config, accelerator, run_dir: Path, checkpoint_dir: Path):
    """(run lock, checkpoint to resume or None, its trainer_state), the same on every rank:
    the run folder locked by the main process and writable by every rank."""
    lock = checkpoint.lock_run_dir(accelerator, run_dir, wait_s=cfg.checkpoint.run_lock_wait)
    distributed.run_agreed(
        accelerator, lambda: _probe_folders(accelerator, run_dir, checkpoint_dir)
    )
    resume = cfg.checkpoint.resume if cfg.checkpoint.resume not in (None, "", "none") else None
    if resume is None:
        distributed.run_agreed(accelerator, lambda: _refuse_existing_run(run_dir, checkpoint_dir))
        return lock, None, None
    path = checkpoint.agree_on_resume(accelerator, resume, checkpoint_dir)
    if path is None:  # the lookup said so, once
        return lock, None, None
    saved = distributed.run_agreed(accelerator, lambda: _check_resumable(cfg, accelerator, path))
    return lock, path, saved


def prepare(cfg: Config) -> Trainer:
    """Check data, start the process group, agree on the run, build, restore, start W&B."""
    report.setup_logging(is_main=int(os.environ.get("RANK", "0")) == 0)
    _check_flags(cfg)
    root = preflight.check_data(cfg)
    mode = tracking.wandb_mode(cfg.tracking.wandb_mode)
    threads = distributed.set_threads(cfg.train.threads_per_process)
    accelerator = distributed.build_accelerator(
        gradient_accumulation_steps=cfg.optim.gradient_accumulation_steps,
        mixed_precision=cfg.train.mixed_precision,
        log_with=tracking.log_with(mode),
    )
    distributed.check_world(accelerator)
    _check_precision(accelerator)
    run_dir = resolve_run_dir(cfg, accelerator)
    checkpoint_dir = Path(cfg.checkpoint.checkpoint_dir or run_dir / "checkpoints")
    log.info(
        f"noa-dist: {accelerator.num_processes} process(es), {accelerator.distributed_type.name}, "
        f"device {accelerator.device}, {threads}\n"
        f"Resolved configuration:\n{cfg.to_yaml()}"
    )
    if warning := bptt_warning(cfg.data.timesteps, cfg.train.bptt_window, cfg.train.tbptt_mode):
        log.warning(f"Warning: {warning}")
    stop = StopRequest()
    stop.install()
    adopt_early(stop)
    if launched_by_agent():
        watch_parent(stop)
    lock, resume_path, saved = _agree_on_start(cfg, accelerator, run_dir, checkpoint_dir)
    built = build(cfg, accelerator, root)
    log.info(
        f"Model: U-AFNO with {built.n_params:,} parameters; {len(built.data.train)} training "
        f"windows, {built.data.steps_per_epoch} steps/epoch"
    )
    trainer = Trainer(cfg, accelerator, built, run_dir, checkpoint_dir, stop)
    trainer.run_lock = lock
    run_id = tracking.start_run(
        accelerator,
        project=cfg.tracking.wandb_project,
        run_name=run_dir.name,
        run_dir=run_dir,
        config=cfg.to_dict(),
        mode=mode,
        resume_run_id=saved["state"].get("wandb_run_id") if saved else None,
        resume_step=saved["state"]["global_step"] if saved else None,
    )
    if resume_path is not None:
        _restore(trainer, resume_path, saved["changes"])
    trainer.state.wandb_run_id = run_id
    if accelerator.is_main_process:
        run_status.clear(run_dir)
    return trainer


def _restore(trainer: Trainer, path: Path, changes: dict) -> None:
    rng = trainer.restore(path)
    cfg = trainer.cfg
    if changes["applied"]:
        apply_optimizer_overrides(trainer.scheduler, cfg.optim.lr, cfg.optim.weight_decay)
    report.resume_summary(path, trainer.state, trainer.micro_per_epoch, changes, rng)


def export_best(trainer: Trainer) -> None:
    """best/ -> best_model.pt: a plain fp32 state dict + config, loadable without DeepSpeed."""
    best = trainer.run_dir / "best"
    if trainer.accelerator.is_main_process and (best / checkpoint.COMPLETE).exists():
        out = export_checkpoint(best, trainer.run_dir / "best_model.pt")
        log.info(f"Exported the best model to {out}")


def _leave_marker(trainer: Trainer, outcome: Outcome) -> None:
    if not trainer.accelerator.is_main_process:
        return
    st = outcome.state
    fields = {"step": st.global_step, "epoch": st.epoch, "checkpoint": outcome.checkpoint}
    if outcome.stopped_by in (None, *REQUESTED_STOPS):
        run_status.mark(
            trainer.run_dir, run_status.FINISHED, reason=outcome.stopped_by or "done", **fields
        )
    else:
        run_status.mark(trainer.run_dir, run_status.STOPPED, reason=outcome.stopped_by, **fields)


def finish(trainer: Trainer, outcome: Outcome) -> None:
    """Export, summarise, close W&B, leave the run folder's marker, leave together."""
    export_best(trainer)
    accelerator = trainer.accelerator
    report.final_summary(outcome, trainer.run_dir, tracking.run_location(accelerator))
    resumable_stop = outcome.stopped_by not in (None, *REQUESTED_STOPS)
    tracking.finish(accelerator, preempted=resumable_stop)
    _leave_marker(trainer, outcome)
    distributed.shutdown(accelerator)
    if trainer.run_lock is not None:
        trainer.run_lock.release()


def run(cfg: Config) -> Outcome:
    trainer = prepare(cfg)
    outcome = trainer.fit()
    finish(trainer, outcome)
    return outcome


def main(argv: list[str] | None = None) -> int:
    """Exit 0 when the run finished or stopped on request (the run folder's marker tells
    which), 1 when training aborted, 2 on bad input."""
    report.setup_logging(is_main=int(os.environ.get("RANK", "0")) == 0)
    try:
        run(load_config(argv))
    except TrainingAborted as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except NoaError as exc:
        print(f"error: {user_message(exc)}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    distributed.exit_process(main())
