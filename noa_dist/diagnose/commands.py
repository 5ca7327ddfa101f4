"""The training command a fix extends: the checkpoint's own command line, pointed back at it.

A recommended fix is only useful as a command the user can paste, so it starts from the
arguments the run was launched with (saved in the step checkpoint) or, for a `best/`
folder or an export, from the config flags that differ from the defaults.
"""

from __future__ import annotations

from pathlib import Path

from noa_dist.checkpoint import read_trainer_state, step_folder
from noa_dist.config import Config

TRAIN_LAUNCH = ["accelerate", "launch", "noa_dist/train.py"]


def with_flags(args: list[str], flags: dict[str, str | None]) -> list[str]:
    """args without any earlier `--name X` / `--name=X` (either spelling) of `flags`, then
    `--name value` for every flag whose value is not None (None only removes it)."""
    names = {f"--{spelling}" for name in flags for spelling in (name, name.replace("-", "_"))}
    out, skip_value = [], False
    for arg in args:
        if skip_value:
            skip_value = False
            continue
        head, has_value = arg.split("=", 1)[0], "=" in arg
        if head in names:
            skip_value = not has_value
            continue
        out.append(arg)
    for name, value in flags.items():
        if value is not None:
            out += [f"--{name}", value]
    return out


def training_command(ckpt: Path, kind: str, cfg: Config) -> list[str]:
    """The run's command line (saved args or config flags), pointed at this checkpoint."""
    folder = step_folder(ckpt) if kind in ("step", "zero") else None
    saved = read_trainer_state(folder).get("args") if folder else None
    args = list(saved) if saved is not None else _config_flags(cfg)
    if folder is not None:
        return [*TRAIN_LAUNCH, *with_flags(args, {"resume": str(folder)})]
    if kind == "best":
        return [*TRAIN_LAUNCH, *with_flags(args, {"init-from": str(ckpt), "resume": None})]
    return [*TRAIN_LAUNCH, *with_flags(args, {"resume": None})]


def _config_flags(cfg: Config) -> list[str]:
    """Flags for every config value that differs from its default."""
    default, flags = Config().flat(), []
    for name, value in cfg.flat().items():
        if value != default[name]:
            flags += [f"--{name.replace('_', '-')}", "none" if value is None else str(value)]
    return flags
