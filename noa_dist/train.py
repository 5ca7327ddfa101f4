"""Train NOA: `accelerate launch noa_dist/train.py [--config X.yaml] [--flag value ...]`.

Parse and check everything (config, data) before the process group starts, then
build the trainer, restore a checkpoint if asked, train, and print a summary.
"""

from __future__ import annotations

import sys
from pathlib import Path

if __name__ == "__main__" and not __package__:
    # Run as a script: import the package, not its modules as top-level names.
    sys.path[0] = str(Path(__file__).resolve().parents[1])

import os
import time

from noa_dist import checkpoint, distributed, preflight, report, tracking
from noa_dist.config import Config, load_config
from noa_dist.errors import ConfigError, NoaError
from noa_dist.export import export_checkpoint
from noa_dist.rollout import bptt_warning
from noa_dist.stop import StopRequest
from noa_dist.trainer import Outcome, Trainer


def resolve_run_dir(cfg: Config, accelerator) -> Path:
    """One directory per job: --run-name, else slurm-<jobid>, else a timestamp agreed by all ranks."""
    name = cfg.checkpoint.run_name
    if name is None and "SLURM_JOB_ID" in os.environ:
        name = f"slurm-{os.environ['SLURM_JOB_ID']}"
    if name is None:
        name = distributed.broadcast_from_main(accelerator, time.strftime("noa-%Y%m%d-%H%M%S"))
    return Path(cfg.checkpoint.output_dir) / name


def _saved_run_id(path: Path | None) -> str | None:
    if path is None:
        return None
    saved = checkpoint.loads_state((path / checkpoint.TRAINER_STATE).read_text(encoding="utf-8"))
    return saved["state"].get("wandb_run_id")


def prepare(cfg: Config) -> Trainer:
    """Check data, start the process group, build the trainer, restore state, start W&B."""
    stable = (
        cfg.checkpoint.run_name or cfg.checkpoint.checkpoint_dir or "SLURM_JOB_ID" in os.environ
    )
    if cfg.checkpoint.resume == "auto" and not stable:
        raise ConfigError(
            "--resume auto needs a stable place to look: give --run-name or --checkpoint-dir"
        )
    root = preflight.check_data(cfg)
    mode = tracking.wandb_mode(cfg.tracking.wandb_mode)
    accelerator = distributed.build_accelerator(
        gradient_accumulation_steps=cfg.optim.gradient_accumulation_steps,
        mixed_precision=cfg.train.mixed_precision,
        log_with=tracking.log_with(mode),
    )
    distributed.check_world(accelerator)
    run_dir = resolve_run_dir(cfg, accelerator)
    accelerator.print(
        f"noa-dist: {accelerator.num_processes} process(es), {accelerator.distributed_type.name}, "
        f"device {accelerator.device}\nResolved configuration:\n{cfg.to_yaml()}"
    )
    if warning := bptt_warning(cfg.data.timesteps, cfg.train.bptt_window, cfg.train.tbptt_mode):
        accelerator.print(f"Warning: {warning}")
    stop = StopRequest()
    stop.install()
    trainer = Trainer(cfg, accelerator, root, run_dir, stop)
    accelerator.print(
        f"Model: U-AFNO with {trainer.n_params:,} parameters; "
        f"{len(trainer.train_data)} training windows, {trainer.steps_per_epoch} steps/epoch"
    )
    resume_path = (
        checkpoint.resolve_resume(cfg.checkpoint.resume, trainer.checkpoint_dir)
        if cfg.checkpoint.resume
        else None
    )
    if cfg.checkpoint.resume == "auto" and resume_path is None:
        accelerator.print(
            f"--resume auto: no complete checkpoint in {trainer.checkpoint_dir}; starting fresh"
        )
    run_id = tracking.start_run(
        accelerator,
        project=cfg.tracking.wandb_project,
        run_name=run_dir.name,
        run_dir=run_dir,
        config=cfg.to_dict(),
        mode=mode,
        resume_run_id=_saved_run_id(resume_path),
    )
    if resume_path is not None:
        trainer.restore(resume_path)
    elif cfg.checkpoint.init_from:
        trainer.init_weights_from(Path(cfg.checkpoint.init_from))
    trainer.state.wandb_run_id = run_id
    return trainer


def export_best(trainer: Trainer) -> None:
    """best/ -> best_model.pt: a plain fp32 state dict + config, loadable without DeepSpeed."""
    best = trainer.run_dir / "best"
    if trainer.accelerator.is_main_process and (best / "COMPLETE").exists():
        out = export_checkpoint(best, trainer.run_dir / "best_model.pt")
        trainer.accelerator.print(f"Exported the best model to {out}")


def run(cfg: Config) -> Outcome:
    trainer = prepare(cfg)
    outcome = trainer.fit()
    export_best(trainer)
    accelerator = trainer.accelerator
    report.final_summary(accelerator, outcome, trainer.run_dir, tracking.run_location(accelerator))
    tracking.finish(accelerator)
    distributed.shutdown(accelerator)
    return outcome


def main(argv: list[str] | None = None) -> int:
    try:
        outcome = run(load_config(argv))
    except NoaError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0 if outcome.stopped_by in (None, "max-steps", "early-stop", "stop-at-step") else 3


if __name__ == "__main__":
    sys.exit(main())
