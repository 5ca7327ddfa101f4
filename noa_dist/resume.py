"""What a resumed run may change, decided before anything is loaded.

A resume restores weights, optimizer, schedule, RNG and the data order. Flags given on the
resuming command line are compared with the checkpoint's config, field by field:
- applied: hyperparameters that are safe to change mid-run and take effect explicitly (the
  checkpoint's optimizer state would otherwise silently keep the old lr: the fix that
  noa-diagnose recommends, "resume with a lower --lr", would do nothing);
- refused: fields that reshape the run (schedule length, data order, the model, precision
  under ZeRO), listed all at once before the W&B run is resumed or any state is loaded.
Everything else (logging, checkpoint cadence, workers, TBPTT window, debug) just takes the
new value; the resume summary lists it.
"""

from __future__ import annotations

from typing import Any

from noa_dist.config import Config

APPLIED = ("lr", "weight_decay")
REFUSED = {
    "epochs": "sets the schedule's length",
    "max_steps": "sets the schedule's length",
    "warmup_steps": "reshapes the learning-rate schedule",
    "lr_schedule": "reshapes the learning-rate schedule",
    "gradient_accumulation_steps": "changes the batch per optimizer step and the data order",
    "batch_size": "changes the data order",
    "n_samples": "changes the data order",
    "timesteps": "changes the samples",
    "window_stride": "changes the samples",
    "seed": "changes the data order",
    "enable_latent_loss": "adds or removes the projector's parameters and optimizer state; "
    "to start aligning from these weights use --init-from",
    "vqvae_path": "changes the tokenizer the loss was computed against",
}
IGNORED = (
    "resume",
    "init_from",
    "stop_at_step",
    "run_name",
    "output_dir",
    "checkpoint_dir",
    "run_lock_wait",
    "threads_per_process",
)


def config_changes(saved: dict[str, dict[str, Any]], cfg: Config, *, deepspeed: bool) -> dict:
    """{"applied": {name: (old, new)}, "refused": [lines], "changed": {name: (old, new)}}."""
    old = {k: v for section in saved.values() for k, v in section.items()}
    new = cfg.flat()
    diff = {k: (old[k], new[k]) for k in new if k in old and old[k] != new[k] and k not in IGNORED}
    refused = [
        f"--{k.replace('_', '-')}: checkpoint {a!r}, now {b!r} ({REFUSED[k]})"
        for k, (a, b) in diff.items()
        if k in REFUSED
    ]
    model_fields = set(saved.get("model", {}))
    refused += [
        f"--{k.replace('_', '-')}: checkpoint {a!r}, now {b!r} (changes the model)"
        for k, (a, b) in diff.items()
        if k in model_fields
    ]
    fixed = set(REFUSED) | model_fields
    if deepspeed and "mixed_precision" in diff:
        a, b = diff["mixed_precision"]
        refused.append(
            f"--mixed-precision: checkpoint {a!r}, now {b!r} (ZeRO stores its weights in it)"
        )
        fixed.add("mixed_precision")
    applied = {k: diff[k] for k in APPLIED if k in diff}
    changed = {k: v for k, v in diff.items() if k not in applied and k not in fixed}
    return {"applied": applied, "refused": refused, "changed": changed}


def refusal_message(path, refused: list[str]) -> str:
    return (
        f"--resume {path}: these flags differ from the checkpoint and cannot change mid-run:\n  "
        + "\n  ".join(refused)
        + "\nResume with the checkpoint's values, or start a new run from its weights with "
        f"--init-from {path} (fresh optimizer and schedule)"
    )


def apply_optimizer_overrides(scheduler, lr: float, weight_decay: float) -> None:
    """Set the peak lr and weight decay after the optimizer/scheduler state was loaded.

    The schedule keeps its position (warm-up, cosine); only its peak changes.
    """
    schedule = getattr(scheduler, "scheduler", scheduler)  # accelerate wraps it
    schedule.base_lrs = [lr for _ in schedule.base_lrs]
    factor = schedule.lr_lambdas[0](schedule.last_epoch)
    for group in schedule.optimizer.param_groups:
        group["initial_lr"], group["lr"], group["weight_decay"] = lr, lr * factor, weight_decay
    schedule._last_lr = [group["lr"] for group in schedule.optimizer.param_groups]


def current_lr(scheduler) -> float:
    schedule = getattr(scheduler, "scheduler", scheduler)
    return float(schedule.get_last_lr()[0])
