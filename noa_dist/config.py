"""Typed training configuration: defaults < YAML file < command line.

Every field of every section is also a command-line flag with the seed's name
(`--bptt-window`), accepted with underscores too and in the `--name=value` form
that W&B sweep agents pass (`--lambda_latent=0.3`). Field names are unique
across sections so the flat flag namespace is unambiguous.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import sys
import types
import typing
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import yaml

from noa_dist.errors import ConfigError, OneLineErrorParser

log = logging.getLogger("noa_dist")  # the one output channel (report.setup_logging)


def _doc(text: str, **kwargs: Any) -> Any:
    """A dataclass field whose help text is kept next to it (shown by --help)."""
    return field(metadata={"help": text}, **kwargs)


@dataclass(frozen=True)
class DataConfig:
    dataset: str = _doc(
        "Well-format dataset root (data/{train,valid,test}/*.hdf5 + stats.yaml); 'demo' = generated demo set",
        default="demo",
    )
    demo_dir: str = _doc("where the demo dataset is generated and cached", default="data/demo")
    n_samples: int | None = _doc("use only the first N training windows", default=None)
    val_samples: int | None = _doc(
        "use only the first N validation windows (default: all)", default=None
    )
    val_rollout_steps: int | None = _doc(
        "each validation also rolls a few validation trajectories out this many steps from "
        "their first state (VRMSE at the horizon, steps to VRMSE > 1); 0: off; default: "
        "min(32, frames stored - 1)",
        default=None,
    )
    val_rollout_trajectories: int = _doc(
        "validation trajectories of that long rollout (one per demo family in turn)", default=4
    )
    timesteps: int = _doc("rollout length T (predicted steps per sample)", default=16)
    window_stride: int | None = _doc(
        "stride between window starts in a trajectory (default: timesteps)", default=None
    )
    batch_size: int = _doc("samples per process per micro-step", default=4)
    num_workers: int = _doc("DataLoader worker processes per rank", default=1)


@dataclass(frozen=True)
class ModelConfig:
    base_channels: int = _doc("U-AFNO channels at the finest level", default=32)
    encoder_levels: int = _doc("U-Net downsamplings (grid must divide by 2**levels)", default=3)
    modes: int = _doc("AFNO keeps |k_y| <= modes and k_x <= modes", default=16)
    afno_blocks: int = _doc("AFNO blocks at the bottleneck", default=4)
    afno_num_blocks: int = _doc("block-diagonal blocks of each AFNO spectral MLP", default=8)


@dataclass(frozen=True)
class OptimConfig:
    lr: float = _doc("peak learning rate (AdamW)", default=3e-4)
    weight_decay: float = _doc("AdamW weight decay", default=0.01)
    warmup_steps: int = _doc(
        "linear warm-up from lr/10 over this many optimizer steps", default=500
    )
    lr_schedule: str = _doc(
        "after warm-up: cosine (to 0 at the last step) or constant", default="cosine"
    )
    max_grad_norm: float = _doc("gradient clipping norm (its value is logged)", default=1.0)
    gradient_accumulation_steps: int = _doc("micro-steps per optimizer step", default=1)


@dataclass(frozen=True)
class TrainConfig:
    epochs: int = _doc("passes over the training split", default=10)
    max_steps: int | None = _doc(
        "end training after this many optimizer steps (sets the schedule length)", default=None
    )
    stop_at_step: int | None = _doc(
        "checkpoint and exit after this optimizer step; the schedule still spans the full run (time-boxed jobs)",
        default=None,
    )
    bptt_window: int | None = _doc(
        "truncated BPTT window W (unset: full BPTT through T)", default=None
    )
    tbptt_mode: str = _doc(
        "last: warm up T-W steps without grad, train the last W; all-windows: every window, detached between",
        default="last",
    )
    traj_loss: str = _doc(
        "L_traj: mse (mean squared error), or vrmse (squared error over the target's variance "
        "per sample, step and field: The Well's VRMSE squared; small-amplitude samples count)",
        default="mse",
    )
    seed: int = _doc("seed for weights, data order and dropout", default=0)
    mixed_precision: str | None = _doc(
        "no | bf16 | fp16 (the FFT stays fp32); unset: what `accelerate launch` says", default=None
    )
    threads_per_process: int | None = _doc(
        "CPU threads per process (torch.set_num_threads); unset: the cores this process may use "
        "/ processes on the node, unless OMP_NUM_THREADS asks for more than accelerate's 1",
        default=None,
    )
    log_every: int = _doc("print and log every N optimizer steps", default=10)
    max_consecutive_skips: int = _doc(
        "stop with a diagnosis after this many skipped steps in a row", default=50
    )
    early_stop_patience: int | None = _doc(
        "stop after N epochs without validation improvement", default=None
    )


@dataclass(frozen=True)
class CheckpointConfig:
    output_dir: str = _doc("parent of the run directory", default="runs")
    run_name: str | None = _doc(
        "run directory name (default: slurm-<jobid> or a timestamp)", default=None
    )
    checkpoint_dir: str | None = _doc(
        "checkpoint folder (default: <run dir>/checkpoints)", default=None
    )
    save_every: int = _doc("save every N optimizer steps (0: only at epoch ends)", default=200)
    keep_last: int = _doc("keep this many step checkpoints (at least 2)", default=3)
    resume: str | None = _doc(
        "'auto' (latest complete checkpoint, if any) or a checkpoint path", default=None
    )
    init_from: str | None = _doc(
        "load model weights only from this checkpoint (fine-tuning)", default=None
    )
    run_lock_wait: float = _doc(
        "seconds to wait for another job holding the run folder to end (a requeued job's "
        "previous instance still saving) before refusing to start",
        default=120.0,
    )


@dataclass(frozen=True)
class AlignConfig:
    """L = L_traj + lambda_commit * L_commit + lambda_latent * L_latent against a frozen VQ-VAE."""

    vqvae_path: str | None = _doc(
        "frozen VQ-VAE tokenizer folder (noa-train-vqvae); enables L_commit", default=None
    )
    vqvae_feature_policy: str = _doc(
        "strict: refuse a tokenizer whose feature spec differs from the extractor's; pad: "
        "zero-fill missing / drop extra features (loudly)",
        default="strict",
    )
    lambda_commit: float = _doc("weight of L_commit (VQ manifold adherence)", default=0.5)
    enable_latent_loss: bool = _doc(
        "add L_latent: the NOA bottleneck, projected, matches the tokenizer's latent",
        default=False,
    )
    lambda_latent: float = _doc("weight of L_latent", default=0.1)
    latent_sample_steps: int = _doc(
        "steps of the window whose bottleneck L_latent averages: 3 = first/middle/last, "
        "N = N evenly spaced, -1 = all",
        default=3,
    )
    latent_target: str = _doc(
        "truth: z_e of the ground-truth window (default); pred: z_e of the prediction (the "
        "prototype's moving target)",
        default="truth",
    )


@dataclass(frozen=True)
class TrackingConfig:
    wandb_mode: str = _doc(
        "online | offline | disabled | auto (online if credentials exist)", default="auto"
    )
    wandb_project: str = _doc("W&B project", default="noa-dist")


@dataclass(frozen=True)
class DebugConfig:
    debug_hang_in_save: int | None = _doc(
        "fault injection for testing atomic checkpoints: hang inside the checkpoint save of this step (until killed)",
        default=None,
    )
    debug_inject_nan: str | None = _doc(
        "fault injection for testing skip-together: RANK:STEP[:loss|grad|TERM][:micro=M][:window=K] "
        "(several separated by commas) makes that rank's loss term (or gradients) NaN at that "
        "optimizer step (all its micro-steps and windows unless given); see noa_dist/faults.py",
        default=None,
    )


@dataclass(frozen=True)
class Config:
    data: DataConfig = DataConfig()
    model: ModelConfig = ModelConfig()
    optim: OptimConfig = OptimConfig()
    train: TrainConfig = TrainConfig()
    checkpoint: CheckpointConfig = CheckpointConfig()
    align: AlignConfig = AlignConfig()
    tracking: TrackingConfig = TrackingConfig()
    debug: DebugConfig = DebugConfig()

    def to_dict(self) -> dict[str, dict[str, Any]]:
        return dataclasses.asdict(self)

    def flat(self) -> dict[str, Any]:
        return {k: v for section in self.to_dict().values() for k, v in section.items()}

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)


SECTIONS: dict[str, type] = {f.name: type(getattr(Config(), f.name)) for f in fields(Config)}
CHOICES = {
    "lr_schedule": ("cosine", "constant"),
    "tbptt_mode": ("last", "all-windows"),
    "traj_loss": ("mse", "vrmse"),
    "mixed_precision": ("no", "bf16", "fp16"),
    "wandb_mode": ("auto", "online", "offline", "disabled"),
    "vqvae_feature_policy": ("strict", "pad"),
    "latent_target": ("truth", "pred"),
}


def _field_owner() -> dict[str, str]:
    owner: dict[str, str] = {}
    for section, cls in SECTIONS.items():
        for f in fields(cls):
            assert f.name not in owner, f"duplicate config field {f.name}"
            owner[f.name] = section
    return owner


FIELD_SECTION = _field_owner()


def _base_type(annotation: Any) -> type:
    """int | None -> int; the scalar type a flag's text converts to."""
    hint = annotation if not isinstance(annotation, str) else eval(annotation, vars(typing))  # noqa: S307
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union:
        return args[0]
    return hint


def _convert(name: str, text: Any, target: type) -> Any:
    if text is None or (isinstance(text, str) and text.lower() in ("none", "null", "")):
        return None
    if target is bool:
        if isinstance(text, bool):
            return text
        if str(text).lower() in ("1", "true", "yes", "on"):
            return True
        if str(text).lower() in ("0", "false", "no", "off"):
            return False
        raise ValueError(f"--{name}: expected true/false, got {text!r}")
    try:
        if target is int and not isinstance(text, int):
            number = float(text)  # sweep agents render int-valued parameters as "32.0"
            if not number.is_integer():
                raise ValueError
            return int(number)
        return target(text)
    except (TypeError, ValueError):
        raise ValueError(
            f"--{name.replace('_', '-')}: expected {target.__name__}, got {text!r}"
        ) from None


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineErrorParser(
        prog="noa_dist/train.py",
        description="Train NOA (U-AFNO) with truncated BPTT under Accelerate. "
        "Precedence: command line > --config YAML > defaults.",
        argument_default=argparse.SUPPRESS,
    )
    parser.add_argument("--config", help=f"YAML file with sections {'/'.join(SECTIONS)}")
    for section, cls in SECTIONS.items():
        group = parser.add_argument_group(section)
        for f in fields(cls):
            flags = {f"--{f.name.replace('_', '-')}", f"--{f.name}"}
            switch = {"nargs": "?", "const": "true"} if _base_type(f.type) is bool else {}
            group.add_argument(
                *sorted(flags),
                dest=f.name,
                metavar=f.name.upper(),
                help=f.metadata["help"],
                **switch,  # a bool flag alone means true (`--enable-latent-loss`)
            )
    return parser


def _read_yaml(path: str) -> dict[str, dict[str, Any]]:
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"--config {path}: no such file")
    try:
        loaded = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"--config {path}: not valid YAML ({exc})") from None
    if not isinstance(loaded, dict):
        raise ConfigError(f"--config {path}: expected a mapping of sections {list(SECTIONS)}")
    return loaded


def _yaml_overrides(path: str, problems: list[str]) -> dict[str, Any]:
    overrides: dict[str, Any] = {}
    for section, values in _read_yaml(path).items():
        if section not in SECTIONS:
            problems.append(
                f"{path}: unknown section '{section}' (expected one of {list(SECTIONS)})"
            )
            continue
        for name, value in (values or {}).items():
            if FIELD_SECTION.get(name) != section:
                problems.append(f"{path}: unknown key '{section}.{name}'")
            else:
                overrides[name] = value
    return overrides


DEMO_PROFILE = Path(__file__).resolve().parents[1] / "configs" / "demo.yaml"


def config_file(cli: dict[str, Any]) -> str | None:
    """--config, else the demo profile when training on the (default) demo dataset."""
    if "config" in cli:
        return cli["config"]
    if cli.get("dataset", DataConfig.dataset) == "demo" and DEMO_PROFILE.is_file():
        log.info(
            f"No --config given: training on the demo dataset with the demo profile {DEMO_PROFILE}"
        )
        return str(DEMO_PROFILE)
    return None


def _attach_negative_numbers(argv: list[str]) -> list[str]:
    """`--lr -1e-3` -> `--lr=-1e-3`: argparse takes "-1e-3" for an option (it only knows
    "-1" and "-.5" as negative numbers), so validation could never say what is wrong."""
    joined: list[str] = []
    for token in argv:
        if joined and joined[-1].startswith("--") and "=" not in joined[-1] and _is_number(token):
            joined[-1] = f"{joined[-1]}={token}"
        else:
            joined.append(token)
    return joined


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return text.startswith("-")


def load_config(argv: list[str] | None = None) -> Config:
    """Parse YAML + CLI into a validated Config; every problem is reported in one ConfigError."""
    argv = list(sys.argv[1:] if argv is None else argv)
    cli = vars(build_parser().parse_args(_attach_negative_numbers(argv)))
    problems: list[str] = []
    path = config_file(cli)
    cli.pop("config", None)
    merged = _yaml_overrides(path, problems) if path else {}
    merged.update(cli)
    sections: dict[str, dict[str, Any]] = {s: {} for s in SECTIONS}
    types_by_name = {f.name: _base_type(f.type) for cls in SECTIONS.values() for f in fields(cls)}
    for name, raw in merged.items():
        try:
            sections[FIELD_SECTION[name]][name] = _convert(name, raw, types_by_name[name])
        except ValueError as exc:
            problems.append(str(exc))
    if problems:
        raise ConfigError("invalid configuration:\n  " + "\n  ".join(problems))
    cfg = Config(**{s: SECTIONS[s](**values) for s, values in sections.items()})
    validate(cfg)
    return cfg


def config_problems(cfg: Config) -> list[str]:
    """Everything wrong with a config that can be told without the data."""
    from noa_dist.rollout import validate_bptt

    problems: list[str] = []
    flat = cfg.flat()
    for name, allowed in CHOICES.items():
        if flat[name] is not None and flat[name] not in allowed:
            problems.append(
                f"--{name.replace('_', '-')}: expected one of {', '.join(allowed)}, got {flat[name]!r}"
            )
    positive = [
        "timesteps",
        "batch_size",
        "base_channels",
        "encoder_levels",
        "modes",
        "afno_blocks",
        "afno_num_blocks",
        "epochs",
        "gradient_accumulation_steps",
        "log_every",
        "max_consecutive_skips",
        "val_rollout_trajectories",
    ]
    for name in positive:
        if flat[name] < 1:
            problems.append(f"--{name.replace('_', '-')}: must be >= 1, got {flat[name]}")
    for name in (
        "n_samples",
        "val_samples",
        "window_stride",
        "max_steps",
        "stop_at_step",
        "early_stop_patience",
        "threads_per_process",
    ):
        if flat[name] is not None and flat[name] < 1:
            problems.append(f"--{name.replace('_', '-')}: must be >= 1 or unset, got {flat[name]}")
    for name in ("num_workers", "warmup_steps", "save_every", "run_lock_wait"):
        if flat[name] < 0:
            problems.append(f"--{name.replace('_', '-')}: must be >= 0, got {flat[name]}")
    if flat["val_rollout_steps"] is not None and flat["val_rollout_steps"] < 0:
        problems.append(
            f"--val-rollout-steps: must be >= 0 or unset, got {flat['val_rollout_steps']}"
        )
    if not flat["lr"] > 0:
        problems.append(f"--lr: must be > 0, got {flat['lr']}")
    if not flat["max_grad_norm"] > 0:
        problems.append(f"--max-grad-norm: must be > 0, got {flat['max_grad_norm']}")
    if cfg.train.tbptt_mode in CHOICES["tbptt_mode"] and cfg.data.timesteps >= 1:
        problems += validate_bptt(cfg.data.timesteps, cfg.train.bptt_window, cfg.train.tbptt_mode)
    if cfg.debug.debug_inject_nan is not None:
        from noa_dist.faults import parse_nan_injections

        try:
            parse_nan_injections(cfg.debug.debug_inject_nan)
        except ValueError as exc:
            problems.append(str(exc))
    problems += _align_problems(cfg)
    if cfg.checkpoint.resume is not None and cfg.checkpoint.init_from is not None:
        problems.append(
            "--resume and --init-from exclude each other (resume restores everything; init-from loads weights only)"
        )
    return problems


def _align_problems(cfg: Config) -> list[str]:
    a, problems = cfg.align, []
    for name in ("lambda_commit", "lambda_latent"):
        if not getattr(a, name) >= 0:
            problems.append(f"--{name.replace('_', '-')}: must be >= 0, got {getattr(a, name)}")
    if a.latent_sample_steps == 0 or a.latent_sample_steps < -1:
        problems.append(
            f"--latent-sample-steps: expected N >= 1 or -1 (all), got {a.latent_sample_steps}"
        )
    if a.enable_latent_loss and a.vqvae_path is None:
        problems.append("--enable-latent-loss needs --vqvae-path (the tokenizer gives its target)")
    return problems


def validate(cfg: Config) -> None:
    problems = config_problems(cfg)
    if problems:
        raise ConfigError("invalid configuration:\n  " + "\n  ".join(problems))
