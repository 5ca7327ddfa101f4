"""`noa-train-vqvae`: train the frozen VQ-VAE tokenizer of trajectory features.

    noa-train-vqvae --dataset D --out DIR --window W [...]                 (one process)
    accelerate launch --multi_gpu --num_processes N -m noa_dist.tokenizer --dataset D ...

Steps: check flags and data (before the process group exists); features of this rank's ground-truth
windows of train and valid; normalisation fitted on train (all ranks); model built after the
process group exists; epochs with validation; codebooks checked equal across ranks; the
artifact folder written by the main process (artifact.py).
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from noa_dist import distributed, report, tracking
from noa_dist.errors import ConfigError, NoaError, OneLineErrorParser, user_message
from noa_dist.features import CATEGORIES, FeatureConfig, FeatureSpec, feature_specs
from noa_dist.models.vqvae import FeatureVQVAE, VQVAEConfig
from noa_dist.tokenizer import data
from noa_dist.tokenizer.artifact import is_artifact, write_artifact
from noa_dist.tokenizer.normalize import FeatureScaler, Normalization, fit_normalization
from noa_dist.tokenizer.spec import build_spec
from noa_dist.tokenizer.train import LoopSettings, batches_per_epoch, check_codebooks_agree, fit

log = report.log


def build_parser() -> argparse.ArgumentParser:
    p = OneLineErrorParser(
        prog="noa-train-vqvae",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    a = p.add_argument
    a("--dataset", required=True, type=Path, help="Well-format dataset root (train + valid)")
    a(
        "--out",
        required=True,
        type=Path,
        help="artifact folder to write (spec.json, model.safetensors, metrics.json)",
    )
    a(
        "--window",
        type=int,
        default=16,
        help="states per window W: the window the NOA loss sees, i.e. the trainer's --bptt-window (its --timesteps without TBPTT)",
    )
    a(
        "--window-stride",
        type=int,
        default=None,
        help="stride between window starts (default: W, non-overlapping)",
    )
    a("--n-samples", type=int, default=None, help="use only the first N training windows")
    a("--val-samples", type=int, default=None, help="use only the first N validation windows")
    a("--epochs", type=int, default=30, help="passes over the training windows")
    a("--batch-size", type=int, default=128, help="windows per process per step")
    a("--lr", type=float, default=1e-3, help="AdamW learning rate")
    a("--weight-decay", type=float, default=0.0, help="AdamW weight decay")
    a(
        "--codebook-size",
        default="64",
        help="codes per codebook: one number, or temporal,summary,initial",
    )
    a("--code-dim", type=int, default=8, help="latent dims per category (latent_dim = 3 x this)")
    a("--hidden", type=int, default=128, help="MLP width of encoders and decoder")
    a("--commitment-weight", type=float, default=0.25, help="beta on ||z_e - sg(q)||^2")
    a("--ema-decay", type=float, default=0.99, help="codebook EMA decay")
    a(
        "--dead-code-threshold",
        type=float,
        default=1.0,
        help="codes whose EMA count per global batch falls below this are re-seeded from the batch (0: never)",
    )
    a("--std-floor", type=float, default=1e-4, help="floor on a feature's std in normalisation")
    a("--clip", type=float, default=10.0, help="normalised features are clipped to +-clip")
    a("--num-workers", type=int, default=0, help="DataLoader workers while computing features")
    a("--seed", type=int, default=0, help="seed for weights and data order")
    a("--overwrite", action="store_true", help="replace an existing tokenizer at --out")
    a("--wandb-mode", default="auto", help="online | offline | disabled | auto")
    a("--wandb-project", default="noa-dist-tokenizer", help="W&B project")
    a(
        "--wandb-dir",
        type=Path,
        default=None,
        help="W&B run files (default: <out>.wandb next to --out)",
    )
    return p


def codebook_sizes(text: str) -> tuple[int, ...]:
    try:
        sizes = tuple(int(x) for x in text.split(","))
    except ValueError:
        sizes = ()
    if len(sizes) == 1:
        sizes = sizes * len(CATEGORIES)
    if len(sizes) != len(CATEGORIES) or min(sizes) < 2:
        raise ConfigError(
            f"--codebook-size {text!r}: one integer >= 2 or three ({','.join(CATEGORIES)})"
        )
    return sizes


def check_args(args: argparse.Namespace) -> list[str]:
    problems = [
        f"--{name.replace('_', '-')} {getattr(args, name)}: must be >= 1"
        for name in ("window", "epochs", "batch_size", "code_dim", "hidden")
        if getattr(args, name) < 1
    ]
    if args.out.exists() and (not args.out.is_dir() or any(args.out.iterdir())):
        if not is_artifact(args.out):
            problems.append(
                f"--out {args.out}: exists and is not a tokenizer; choose another folder"
            )
        elif not args.overwrite:
            problems.append(
                f"--out {args.out}: already holds a tokenizer; pass --overwrite to replace it"
            )
    try:
        codebook_sizes(args.codebook_size)
    except ConfigError as err:
        problems.append(str(err))
    return problems


def launch_rank() -> tuple[int, int]:
    """(rank, world size) the launcher set; a RANK without WORLD_SIZE is one process."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    return (int(os.environ.get("RANK", "0")) if world > 1 else 0), world


def run(args: argparse.Namespace, argv: list[str]) -> None:
    problems = check_args(args)
    if problems:
        raise ConfigError("\n".join(problems))
    mode = tracking.wandb_mode(args.wandb_mode)
    start = time.perf_counter()
    # The data is checked before the process group exists (every rank reads the same files,
    # so every rank fails alike).
    rank, world = launch_rank()
    train, valid = _open_splits(args, rank, world)
    batches_per_epoch(len(train.indices), args.batch_size)
    distributed.set_threads(None)
    accelerator = distributed.build_accelerator(
        gradient_accumulation_steps=1, mixed_precision="no", log_with=tracking.log_with(mode)
    )
    distributed.check_world(accelerator)
    if (accelerator.process_index, accelerator.num_processes) != (rank, world):
        raise RuntimeError(
            f"internal error: RANK/WORLD_SIZE {rank}/{world} but the process group says "
            f"{accelerator.process_index}/{accelerator.num_processes}"
        )
    prepared = _prepare(accelerator, args, train, valid, start)
    model_cfg = VQVAEConfig(
        input_dims=prepared.input_dims,
        codebook_sizes=codebook_sizes(args.codebook_size),
        code_dim=args.code_dim,
        hidden=args.hidden,
        decay=args.ema_decay,
        commitment_weight=args.commitment_weight,
        dead_code_threshold=args.dead_code_threshold,
    )
    torch.manual_seed(args.seed)
    model = FeatureVQVAE(model_cfg, sync_codebook=accelerator.num_processes > 1)  # after init
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=args.weight_decay)
    model, optimizer = accelerator.prepare(model, optimizer)
    run_config = {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}
    run_config["world_size"] = accelerator.num_processes
    tracking.start_run(
        accelerator,
        project=args.wandb_project,
        run_name=args.out.name,
        run_dir=args.wandb_dir or args.out.with_name(args.out.name + ".wandb"),
        config=run_config,
        mode=mode,
    )
    log.info(
        f"  model: latent_dim {model_cfg.latent_dim}, codebooks {list(model_cfg.codebook_sizes)}, "
        f"{prepared.train_x.shape[0]} training windows per process"
    )
    history = fit(
        accelerator,
        model,
        optimizer,
        prepared.train_x,
        prepared.valid_x,
        LoopSettings(args.epochs, args.batch_size, args.seed),
        lambda epoch, rec: tracking.log_metrics(accelerator, _wandb_record(rec), step=epoch),
    )
    bare = accelerator.unwrap_model(model)
    check_codebooks_agree(accelerator, bare)
    if accelerator.is_main_process:
        wall = time.perf_counter() - start
        spec = _spec(args, argv, prepared, model_cfg, run_config)
        metrics = {
            "final": history[-1]["valid"],
            "history": history,
            "wall_time_s": wall,
            "feature_time_s": prepared.seconds,
            "world_size": accelerator.num_processes,
        }
        write_artifact(args.out, spec, bare.state_dict(), metrics)
        location = tracking.run_location(accelerator)
        log.info(_final_lines(args.out, history[-1]["valid"], wall, location))
    tracking.finish(accelerator)
    distributed.shutdown(accelerator)


@dataclass(frozen=True)
class Prepared:
    """The normalised features of this rank's windows and what the spec records of them."""

    train: data.WindowSource
    valid: data.WindowSource
    specs: list[FeatureSpec]
    dt: float
    normalization: Normalization
    train_x: torch.Tensor
    valid_x: torch.Tensor
    input_dims: tuple[int, ...]
    seconds: float


def _open_splits(
    args: argparse.Namespace, rank: int, world: int
) -> tuple[data.WindowSource, data.WindowSource]:
    """This rank's windows of train (equal shards) and valid (all windows, once)."""

    def open_split(split: str, n_samples: int | None, equal: bool) -> data.WindowSource:
        return data.open_split(
            args.dataset, split, window=args.window, stride=args.window_stride,
            n_samples=n_samples, rank=rank, world_size=world, equal_shards=equal,
        )  # fmt: skip

    return open_split("train", args.n_samples, True), open_split("valid", args.val_samples, False)


def _prepare(
    accelerator,
    args: argparse.Namespace,
    train: data.WindowSource,
    valid: data.WindowSource,
    start: float,
) -> Prepared:
    """Compute this rank's features, fit the normalisation on the train split of all ranks
    and apply it."""
    world = accelerator.num_processes
    ds, config = train.dataset, FeatureConfig()
    specs, dt = feature_specs(ds.n_channels, args.window, config), data.frame_dt(train.dataset)
    names = [s.name for s in specs]
    log.info(
        f"noa-train-vqvae: {args.dataset}, window W={args.window}, {world} process(es); "
        f"{len(specs)} features per window ({_per_category(specs)}), channels "
        f"{list(ds.layout.predicted)}, dt={dt:g}"
    )
    raw = [
        data.extract_features(
            source,
            dt=dt,
            config=config,
            n_features=len(specs),
            num_workers=args.num_workers,
            label=source.dataset.split,
            is_main=accelerator.is_main_process,
        )  # fmt: skip
        for source in (train, valid)
    ]
    reduce = lambda t: distributed.sum_across_ranks(accelerator, t.to(accelerator.device)).cpu()  # noqa: E731
    norm = fit_normalization(
        raw[0], names, std_floor=args.std_floor, clip=args.clip, sum_across_ranks=reduce
    )
    if norm.dropped:
        log.info(
            f"  dropped {len(norm.dropped)} zero-variance feature(s): {', '.join(norm.dropped)}"
        )
    kept = norm.kept(names)
    dims = tuple(sum(1 for i in kept if specs[i].category == c) for c in CATEGORIES)
    if min(dims) < 1:
        left = dict(zip(CATEGORIES, dims, strict=True))
        raise ConfigError(f"a category has no feature left after dropping constant ones: {left}")
    scaler = FeatureScaler(norm, names)
    seconds = time.perf_counter() - start  # reading and features, from the launch
    return Prepared(train, valid, specs, dt, norm, scaler(raw[0]), scaler(raw[1]), dims, seconds)


def _spec(args, argv, prepared: Prepared, model_cfg: VQVAEConfig, run_config) -> dict:
    ds = prepared.train.dataset
    training = {
        "command": shlex.join(["noa-train-vqvae", *argv]),
        "args": run_config,
        "dataset": str(Path(args.dataset).resolve()),
        "n_train_windows": prepared.train.n_total,
        "n_valid_windows": prepared.valid.n_total,
    }
    return build_spec(
        specs=prepared.specs,
        window_length=args.window,
        dt=prepared.dt,
        channel_names=list(ds.layout.predicted),
        channel_stats={
            "mean": ds.norm.mean_predicted.tolist(),
            "std": ds.norm.std_predicted.tolist(),
        },
        grid=ds.spatial_shape,
        feature_config=FeatureConfig(),
        normalization=prepared.normalization,
        model=model_cfg,
        training=training,
    )


def _per_category(specs) -> str:
    return ", ".join(f"{c} {sum(s.category == c for s in specs)}" for c in CATEGORIES)


def _wandb_record(record: dict) -> dict[str, float]:
    from noa_dist.tokenizer.evaluate import flat_metrics

    train = {f"train/{k}": v for k, v in record["train"].items()}
    return {**train, **flat_metrics(record["valid"], "valid"), "epoch_seconds": record["seconds"]}


def _final_lines(out: Path, final: dict, wall: float, wandb_location: str | None) -> str:
    used = ", ".join(f"{c} {100 * m['utilization']:.1f}%" for c, m in final.items())
    ev = ", ".join(f"{c} {m['explained_variance']:.3f}" for c, m in final.items())
    return (
        f"Tokenizer written to {out} in {wall:.0f}s\n  valid codebook utilization: {used}\n"
        f"  valid explained variance: {ev}\n  W&B run: {wandb_location or 'disabled'}"
    )


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    report.setup_logging(is_main=launch_rank()[0] == 0)
    try:
        run(build_parser().parse_args(argv), argv)
    except NoaError as exc:
        print(f"error: {user_message(exc)}", file=sys.stderr)
        return 2
    return 0
