"""Before any process group starts: find (or generate) the dataset and check it against the config.

Every rank runs this identically, so a problem stops every rank with the same
message instead of leaving some ranks waiting in a collective.
"""

from __future__ import annotations

import fcntl
import logging
import os
from pathlib import Path

from noa_dist.config import Config
from noa_dist.data.schema import (
    REQUIRED_SPLITS,
    STATS_FILE,
    DatasetInfo,
    channel_layout,
    load_stats,
    read_split_info,
    shard_difference,
    split_dir,
    stats_problems,
)
from noa_dist.errors import ConfigError, DataError

log = logging.getLogger("noa_dist")  # the one output channel (report.setup_logging)

DEMO = {"n_trajectories": 256, "grid": 64, "timesteps": 64}


def _is_generated(root: Path) -> bool:
    return (root / "stats.yaml").is_file() and (root / "data" / "valid").is_dir()


def ensure_demo_dataset(root: Path) -> Path:
    """Generate the demo dataset once; concurrent launches wait on a file lock and reuse it."""
    from noa_dist.data.generate import generate_dataset

    root.parent.mkdir(parents=True, exist_ok=True)
    with open(root.parent / f".{root.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # other local processes block here until it's written
        if not _is_generated(root):
            first = int(os.environ.get("RANK", "0")) == 0
            log.info(f"Generating the demo dataset in {root} (once; cached for later runs) ...")
            generate_dataset(
                root, **DEMO, workers=min(2, os.cpu_count() or 1), overwrite=True, progress=first
            )
    return root


def dataset_root(cfg: Config) -> Path:
    if cfg.data.dataset == "demo":
        return ensure_demo_dataset(Path(cfg.data.demo_dir))
    return Path(cfg.data.dataset)


def data_problems(cfg: Config, root: Path) -> list[str]:
    """Config against data, every problem at once: train and valid readable and alike, T fits,
    grid divisible by the U-Net's downsampling, stats.yaml complete for every channel the
    datasets normalise (else WellWindowDataset fails on it after the process group started)."""
    problems: list[str] = []
    infos: dict[str, DatasetInfo] = {}
    for split in REQUIRED_SPLITS:
        try:
            infos[split] = read_split_info(root, split)
        except DataError as exc:
            problems.append(str(exc))
            continue
        problems += _split_problems(cfg, infos[split])
    if len(infos) == len(REQUIRED_SPLITS):
        train, valid = (infos[split].shards[0] for split in REQUIRED_SPLITS)
        if difference := shard_difference(train, valid, compare_steps=False):
            problems.append(
                f"{valid.path}: valid disagrees with train ({train.path}): {difference}"
            )
    return problems + _stats_yaml_problems(root, list(infos.values()))


def _split_problems(cfg: Config, info: DatasetInfo) -> list[str]:
    """What one split cannot give the configured run: enough frames, a divisible grid."""
    problems = []
    where = split_dir(info.root, info.split)
    if cfg.data.timesteps + 1 > info.n_steps:
        problems.append(
            f"--timesteps {cfg.data.timesteps} needs {cfg.data.timesteps + 1} frames per "
            f"trajectory but {where} stores {info.n_steps}; use --timesteps <= {info.n_steps - 1}"
        )
    factor = 2**cfg.model.encoder_levels
    if any(n % factor for n in info.spatial_shape):
        problems.append(
            f"grid {tuple(info.spatial_shape)} of {where} is not divisible by "
            f"2**encoder_levels = {factor}; lower --encoder-levels"
        )
    return problems


def _stats_yaml_problems(root: Path, infos: list[DatasetInfo]) -> list[str]:
    """Every gap of stats.yaml for the predicted and conditioning fields of `infos`' splits."""
    stats_path = root / STATS_FILE
    if not stats_path.is_file():
        return [f"{stats_path} is missing: compute it with `noa-data stats {root}`"]
    try:
        stats = load_stats(root)
    except DataError as exc:
        return [str(exc)]
    fields = {f.key: f for info in infos for f in info.fields}  # valid adds none if alike
    layout = channel_layout(list(fields.values()))
    return stats_problems(stats, layout.predicted_fields + layout.conditioning_fields, stats_path)


def check_data(cfg: Config) -> Path:
    root = dataset_root(cfg)
    if not root.exists():
        raise ConfigError(f"--dataset {root}: no such directory")
    problems = data_problems(cfg, root)
    if problems:
        raise ConfigError(
            "the dataset does not fit the configuration:\n  " + "\n  ".join(dict.fromkeys(problems))
        )
    return root
