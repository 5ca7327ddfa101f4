"""`noa-diagnose`: why does training produce NaN/Inf (or huge) gradients? One command, one verdict.

    noa-diagnose --checkpoint runs/X/checkpoints/step-00000500 [--timesteps 256] [--json]

With the checkpoint's own config (dataset, T, window, mode; flags override) it runs a
training-like forward and backward on `--n-samples` windows and reports: the configuration
check, forward statistics per rollout step, the loss, gradient norms per parameter (naming
every non-finite one), the growth of the gradient back through the autoregressive chain,
and a verdict with the exact command that fixes it. Exit code 0: healthy; 1: a problem was
found; 2: bad input (one `error: ...` line).

`--json` prints one object with these keys (non-finite numbers as "nan", "inf", "-inf"):
  checkpoint, format ("step" | "zero" | "best" | "export"), dataset, split, device
  settings        {timesteps, bptt_window (null: full BPTT), tbptt_mode, batch_size, n_samples}
  trained_with    {timesteps, bptt_window, tbptt_mode, lr} from the checkpoint's config
  config_check    [{level ("problem" | "note"), message}]
  data            {nonfinite_samples: [description of each sample with NaN/Inf inputs]}
  forward         {steps: [{step, min, max, mean, std, nonfinite}] (predictions, step 1..T),
                   target: [same for the targets], nonfinite_total, first_nonfinite_step}
  loss            {traj: L_traj as training computes it, finite}
  gradients       {n_params, n_nonfinite, nonfinite_params: [names], no_grad_params: [names],
                   total_norm, norm_min, norm_p50, norm_p90, norm_p99, norm_max,
                   largest: [{name, norm}] (top 5)}
  chain           {window (steps with gradients), depths: [{depth, state_step, grad_norm,
                   chain_gain, growth}], amplification, growth_per_step,
                   extrapolated_steps, extrapolated_amplification}
                  depth k = k steps back from the end of a gradient window; grad_norm =
                  |dL/du|; chain_gain = |dL_last/du| / |dL_last/du_end| with L_last the loss
                  of the window's last step alone; growth = chain_gain ratio to depth k-1
  training_command  the training command the fixes extend (from the checkpoint)
  previous_checkpoint  the newest complete step checkpoint before this one, or null
  verdict         {status, healthy, title, reasons: [str], fixes: [{why, command}]}
  exit_code       0 or 1
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import shlex
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from noa_dist import checkpoint, diagnose_report, diagnose_verdict
from noa_dist.checkpoint import (
    checkpoint_kind,
    config_from_dict,
    load_weights,
    read_trainer_state,
    step_folder,
)
from noa_dist.config import Config
from noa_dist.data.dataset import WellWindowDataset
from noa_dist.diagnose_probe import ProbeResult, ratio, run_probe
from noa_dist.errors import ConfigError, NoaError
from noa_dist.models.build import build_model
from noa_dist.rollout import FULL_BPTT_WARN_ABOVE, bptt_warning, validate_bptt

TRAIN_LAUNCH = ["accelerate", "launch", "noa_dist/train.py"]


@dataclass(frozen=True)
class Settings:
    timesteps: int
    bptt_window: int | None
    tbptt_mode: str
    batch_size: int
    n_samples: int


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line, exit 2 (argparse prints usage + message)
        self.exit(2, f"error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(
        prog="noa-diagnose",
        description="Diagnose NaN/Inf or exploding gradients of a NOA checkpoint: forward, loss, "
        "backward and gradient growth through the autoregressive chain, with a verdict and fix.",
    )
    p.add_argument(
        "--checkpoint",
        required=True,
        help="step-XXXXXXXX folder (DDP or ZeRO), best/ folder or noa-export .pt",
    )
    p.add_argument("--dataset", help="dataset root (default: the one in the checkpoint's config)")
    p.add_argument(
        "--split", default="train", help="split to draw the samples from (default train)"
    )
    p.add_argument("--n-samples", type=int, default=4, help="windows to diagnose on (default 4)")
    p.add_argument("--timesteps", type=int, help="rollout length T (default: the checkpoint's)")
    p.add_argument(
        "--bptt-window",
        help="truncated BPTT window W, or 'none' for full BPTT (default: the checkpoint's)",
    )
    p.add_argument(
        "--tbptt-mode", choices=("last", "all-windows"), help="default: the checkpoint's"
    )
    p.add_argument(
        "--batch-size",
        type=int,
        help="samples per forward (default: the checkpoint's, at most --n-samples)",
    )
    p.add_argument(
        "--json", action="store_true", help="print one JSON object instead of the report"
    )
    p.add_argument("--device", default="cpu", help="torch device (default cpu)")
    return p


def resolve_settings(args: argparse.Namespace, cfg: Config) -> Settings:
    """Flags over the checkpoint's config; every invalid value in one ConfigError."""
    window = cfg.train.bptt_window
    problems = []
    if args.bptt_window is not None:
        try:
            window = None if args.bptt_window.lower() in ("none", "full") else int(args.bptt_window)
        except ValueError:
            problems.append(f"--bptt-window {args.bptt_window!r}: expected an integer or 'none'")
    timesteps = args.timesteps if args.timesteps is not None else cfg.data.timesteps
    mode = args.tbptt_mode or cfg.train.tbptt_mode
    batch = (
        args.batch_size
        if args.batch_size is not None
        else min(cfg.data.batch_size, max(args.n_samples, 1))
    )
    problems += [f"--n-samples {args.n_samples}: must be >= 1"] if args.n_samples < 1 else []
    problems += [f"--batch-size {batch}: must be >= 1"] if batch < 1 else []
    problems += validate_bptt(timesteps, window, mode, allow_window_above_steps=True)
    if problems:
        raise ConfigError("; ".join(problems))
    return Settings(timesteps, window, mode, batch, args.n_samples)


def config_check(s: Settings, cfg: Config) -> list[dict[str, str]]:
    """Problems and notes about T / W / mode, before anything is computed."""
    items = []
    full = s.bptt_window is None or s.bptt_window >= s.timesteps
    if full and s.timesteps > FULL_BPTT_WARN_ABOVE:
        items.append(
            {
                "level": "problem",
                "message": (
                    f"timesteps={s.timesteps} with full BPTT: gradients pass through {s.timesteps} "
                    f"autoregressive steps, which is what made the prototype's gradients explode; "
                    f"add --bptt-window {FULL_BPTT_WARN_ABOVE}"
                ),
            }
        )
    if s.bptt_window is not None and s.bptt_window > s.timesteps:
        items.append(
            {
                "level": "note",
                "message": (
                    f"--bptt-window {s.bptt_window} > --timesteps {s.timesteps}: the window covers the "
                    "whole rollout, i.e. full BPTT"
                ),
            }
        )
    elif (warning := bptt_warning(s.timesteps, s.bptt_window, s.tbptt_mode)) and not full:
        items.append({"level": "note", "message": warning})
    if cfg.train.mixed_precision not in (None, "no"):
        items.append(
            {
                "level": "note",
                "message": (
                    f"trained with --mixed-precision {cfg.train.mixed_precision}; diagnosed in fp32"
                ),
            }
        )
    trained = (cfg.data.timesteps, cfg.train.bptt_window, cfg.train.tbptt_mode)
    if (s.timesteps, s.bptt_window, s.tbptt_mode) != trained:
        items.append(
            {
                "level": "note",
                "message": (
                    f"diagnosing with T={s.timesteps}, W={s.bptt_window or 'none'}, mode {s.tbptt_mode}; "
                    f"the checkpoint trained with T={trained[0]}, W={trained[1] or 'none'}, mode {trained[2]}"
                ),
            }
        )
    return items


def dataset_root(args: argparse.Namespace, cfg: Config) -> Path:
    """--dataset, else the config's dataset (the demo set's folder for 'demo'); must exist."""
    if args.dataset:
        root, source = Path(args.dataset), "--dataset"
    elif cfg.data.dataset == "demo":  # never generate data while diagnosing
        root, source = Path(cfg.data.demo_dir), "the checkpoint's demo_dir"
    else:
        root, source = Path(cfg.data.dataset), "the checkpoint's dataset"
    if not root.is_dir():
        raise ConfigError(f"{root} ({source}): no such dataset folder; pass --dataset ROOT")
    return root


def load_model(
    state_dict: dict, cfg: Config, dataset: WellWindowDataset, ckpt: Path
) -> torch.nn.Module:
    model = build_model(
        cfg.model, in_channels=dataset.n_channels, cond_channels=dataset.n_cond_channels
    )
    try:
        model.load_state_dict(state_dict)
    except RuntimeError as err:
        raise ConfigError(
            f"{ckpt}: the weights do not fit a model for {dataset.root} ({dataset.n_channels} "
            f"channels + {dataset.n_cond_channels} conditioning) built from the checkpoint's "
            f"config; is this the dataset it was trained on? ({str(err).splitlines()[0]})"
        ) from None
    return model


def training_command(ckpt: Path, kind: str, cfg: Config) -> list[str]:
    """The run's command line (saved args or config flags), pointed at this checkpoint."""
    folder = step_folder(ckpt) if kind in ("step", "zero") else None
    saved = read_trainer_state(folder).get("args") if folder else None
    args = list(saved) if saved is not None else _config_flags(cfg)
    if folder is not None:
        return [*TRAIN_LAUNCH, *diagnose_verdict.with_flags(args, {"resume": str(folder)})]
    if kind == "best":
        return [
            *TRAIN_LAUNCH,
            *diagnose_verdict.with_flags(args, {"init-from": str(ckpt), "resume": None}),
        ]
    return [*TRAIN_LAUNCH, *diagnose_verdict.with_flags(args, {"resume": None})]


def _config_flags(cfg: Config) -> list[str]:
    """Flags for every config value that differs from its default."""
    default, flags = Config().flat(), []
    for name, value in cfg.flat().items():
        if value != default[name]:
            flags += [f"--{name.replace('_', '-')}", "none" if value is None else str(value)]
    return flags


def previous_checkpoint(ckpt: Path, kind: str) -> str | None:
    """The newest complete step checkpoint before this one (to go back to damaged weights)."""
    folder = step_folder(ckpt) if kind in ("step", "zero") else None
    if folder is None or not folder.name.startswith("step-"):
        return None
    earlier = [
        p
        for p in folder.parent.glob("step-*")
        if p.name < folder.name and (p / checkpoint.COMPLETE).is_file()
    ]
    return str(max(earlier)) if earlier else None


def gradient_summary(probe: ProbeResult) -> dict[str, Any]:
    norms = np.array(list(probe.grad_norms.values()), dtype=np.float64)
    q = {
        f"norm_{k}": float(np.percentile(norms, p, method="nearest")) if norms.size else math.nan
        for k, p in (("min", 0), ("p50", 50), ("p90", 90), ("p99", 99), ("max", 100))
    }
    largest = sorted(probe.grad_norms.items(), key=lambda kv: -kv[1])[:5]
    return {
        "n_params": len(probe.grad_norms) + len(probe.no_grad_params),
        "n_nonfinite": len(probe.nonfinite_params),
        "nonfinite_params": probe.nonfinite_params,
        "no_grad_params": probe.no_grad_params,
        "total_norm": float(np.sqrt(np.square(norms).sum())),
        **q,
        "largest": [{"name": n, "norm": v} for n, v in largest],
    }


def chain_summary(probe: ProbeResult, s: Settings) -> dict[str, Any]:
    """Gradient growth by depth; the per-step growth extrapolated to full BPTT over T steps."""
    rows = probe.depth.rows()
    single = s.tbptt_mode == "last" or s.bptt_window is None or s.bptt_window >= s.timesteps
    for prev, row in zip([None, *rows], rows, strict=False):
        row["state_step"] = s.timesteps - row["depth"] if single else None
        row["growth"] = None if prev is None else ratio(row["chain_gain"], prev["chain_gain"])
    window = rows[-1]["depth"] if rows else 0
    amplification = rows[-1]["chain_gain"] if rows else math.nan
    per_step = _power(amplification, 1 / window) if window else math.nan
    return {
        "window": window,
        "depths": rows,
        "amplification": amplification,
        "growth_per_step": per_step,
        "extrapolated_steps": s.timesteps,
        "extrapolated_amplification": _power(per_step, s.timesteps),
    }


def _power(base: float, exponent: float) -> float:
    """base ** exponent for base >= 0 that saturates at inf instead of raising OverflowError."""
    if not math.isfinite(base) or base <= 0:
        return base if base != 0 else 0.0
    log = exponent * math.log(base)
    return math.inf if log > 700 else math.exp(log)


def forward_summary(probe: ProbeResult) -> dict[str, Any]:
    steps = [{"step": t, **st.summary()} for t, st in enumerate(probe.pred, start=1)]
    target = [{"step": t, **st.summary()} for t, st in enumerate(probe.target, start=1)]
    first = next((row["step"] for row in steps if row["nonfinite"]), None)
    return {
        "steps": steps,
        "target": target,
        "nonfinite_total": sum(r["nonfinite"] for r in steps),
        "first_nonfinite_step": first,
    }


def diagnose(args: argparse.Namespace) -> dict[str, Any]:
    """Everything the report shows, as the JSON-able result (see the module docstring)."""
    ckpt = Path(args.checkpoint).expanduser()
    kind = checkpoint_kind(ckpt)
    state_dict, saved_config = load_weights(ckpt)
    if saved_config is None:
        raise ConfigError(f"{ckpt}: holds no config, so the model and data cannot be rebuilt")
    cfg = config_from_dict(saved_config)
    s = resolve_settings(args, cfg)
    root = dataset_root(args, cfg)
    dataset = WellWindowDataset(
        root, args.split, s.timesteps, n_samples=s.n_samples, window_stride=cfg.data.window_stride
    )
    model = load_model(state_dict, cfg, dataset, ckpt)
    torch.manual_seed(cfg.train.seed)
    probe = run_probe(
        model,
        dataset,
        bptt_window=s.bptt_window,
        tbptt_mode=s.tbptt_mode,
        batch_size=s.batch_size,
        device=torch.device(args.device),
        progress=not args.json and sys.stderr.isatty(),
    )
    result = {
        "checkpoint": str(ckpt),
        "format": kind,
        "dataset": str(root),
        "split": args.split,
        "device": args.device,
        "settings": dataclasses.asdict(s),
        "trained_with": {
            "timesteps": cfg.data.timesteps,
            "bptt_window": cfg.train.bptt_window,
            "tbptt_mode": cfg.train.tbptt_mode,
            "lr": cfg.optim.lr,
        },
        "config_check": config_check(s, cfg),
        "data": {"nonfinite_samples": probe.bad_samples},
        "forward": forward_summary(probe),
        "loss": {"traj": probe.loss, "finite": math.isfinite(probe.loss)},
        "gradients": gradient_summary(probe),
        "chain": chain_summary(probe, s),
        "training_command": shlex.join(training_command(ckpt, kind, cfg)),
        "previous_checkpoint": previous_checkpoint(ckpt, kind),
    }
    result["verdict"] = diagnose_verdict.verdict(result)
    result["exit_code"] = 0 if result["verdict"]["healthy"] else 1
    return result


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        result = diagnose(args)
    except NoaError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(diagnose_report.to_json(result) if args.json else diagnose_report.render(result))
    return result["exit_code"]


if __name__ == "__main__":
    sys.exit(main())
