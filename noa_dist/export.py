"""`noa-export CKPT OUT.pt`: one self-contained file of fp32 weights + config, no DeepSpeed needed.

The file is `torch.save({"model": state_dict, "config": Config.to_dict(), "source": str(CKPT),
"channels": {"in_channels": C, "cond_channels": Cc}})` with canonical fp32 weights, readable
with `torch.load(OUT, weights_only=True)`; `load_exported(OUT)` returns the built model.
CKPT is any format `noa_dist.checkpoint.load_weights` reads (step folders, ZeRO-1/2/3 step
folders, best/ folders, export files); ZeRO shards are consolidated once, here.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import torch

from noa_dist.atomic import describe_error
from noa_dist.checkpoint import (
    CheckpointError,
    StateDict,
    atomic_write,
    config_from_dict,
    load_weights,
    model_channels,
    projector_dim,
)
from noa_dist.config import Config
from noa_dist.errors import ConfigError, NoaError, OneLineErrorParser
from noa_dist.models.build import build_model
from noa_dist.models.uafno import UAFNO


def export_checkpoint(ckpt: str | os.PathLike, out: str | os.PathLike) -> Path:
    """Write CKPT's weights (fp32, canonical keys) and config to OUT atomically; returns OUT.

    The weights are checked against a model built from the config before anything is written.
    Plain file I/O, no collectives: call it on the main process only (e.g. on `best/` at the
    end of training; ZeRO step folders are consolidated from their shards on disk).
    """
    ckpt, out = Path(ckpt), Path(out)
    if out.suffix != ".pt":
        raise ConfigError(f"{out}: the export file name must end in .pt")
    state_dict, config = load_weights(ckpt)
    if config is None:
        raise ConfigError(
            f"{ckpt}: holds no config, so the export could not be rebuilt into a model"
        )
    state_dict = {key: _fp32_cpu(value) for key, value in state_dict.items()}
    channels = _channels(state_dict)
    _check_loads(state_dict, config_from_dict(config), channels, ckpt)
    payload = {"model": state_dict, "config": config, "source": str(ckpt), "channels": channels}
    _write(payload, out)
    return out


def load_exported(path: str | os.PathLike) -> tuple[UAFNO, Config]:
    """(U-AFNO in eval mode with the exported weights, its Config) from a noa-export file."""
    state_dict, config = load_weights(Path(path))
    if config is None:
        raise ConfigError(f"{path}: holds no config")
    cfg = config_from_dict(config)
    model = build_model(cfg.model, **_channels(state_dict))
    model.load_state_dict(state_dict)
    return model.eval(), cfg


def _channels(state_dict: StateDict) -> dict[str, int | None]:
    """build_model's size arguments read off the weights."""
    in_channels, cond_channels = model_channels(state_dict)
    latent_dim = projector_dim(state_dict)
    return {"in_channels": in_channels, "cond_channels": cond_channels, "latent_dim": latent_dim}


def _fp32_cpu(tensor: torch.Tensor) -> torch.Tensor:
    tensor = tensor.detach().to("cpu")
    return tensor.float().contiguous() if tensor.is_floating_point() else tensor.contiguous()


def _check_loads(state_dict: StateDict, cfg: Config, channels: dict, ckpt: Path) -> None:
    model = build_model(cfg.model, **channels)
    try:
        model.load_state_dict(state_dict)
    except RuntimeError as err:
        raise ConfigError(
            f"{ckpt}: the weights do not fit the model its config describes ({err})"
        ) from None


def _write(payload: dict, out: Path) -> None:
    """torch.save through the project's atomic write; a failure names OUT and the reason."""
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(out, lambda f: torch.save(payload, f))
    except (OSError, RuntimeError) as err:  # torch.save's C++ writer raises RuntimeError
        raise CheckpointError(
            f"cannot write the export {out}: {describe_error(err, out)}"
        ) from None


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineErrorParser(
        prog="noa-export",
        description="Export a noa-dist checkpoint (step folder, ZeRO step folder, best/ folder or "
        "export .pt) to one .pt file of fp32 weights + config that loads without DeepSpeed.",
    )
    parser.add_argument("checkpoint", help="checkpoint folder or .pt file")
    parser.add_argument("out", help="output .pt file (replaced atomically)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        out = export_checkpoint(args.checkpoint, args.out)
    except NoaError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"Exported {args.checkpoint} -> {out} ({out.stat().st_size / 2**20:.1f} MiB, fp32)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
