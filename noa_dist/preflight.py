"""Before any process group starts: find (or generate) the dataset and check it against the config.

Every rank runs this identically, so a problem stops every rank with the same
message instead of leaving some ranks waiting in a collective.
"""

from __future__ import annotations

import fcntl
import os
from pathlib import Path

from noa_dist.config import Config
from noa_dist.data.schema import read_split_info
from noa_dist.errors import ConfigError, DataError

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
            if first:
                print(
                    f"Generating the demo dataset in {root} (once; cached for later runs) ...",
                    flush=True,
                )
            generate_dataset(
                root, **DEMO, workers=min(2, os.cpu_count() or 1), overwrite=True, progress=first
            )
    return root


def dataset_root(cfg: Config) -> Path:
    if cfg.data.dataset == "demo":
        return ensure_demo_dataset(Path(cfg.data.demo_dir))
    return Path(cfg.data.dataset)


def data_problems(cfg: Config, root: Path) -> list[str]:
    """Config against data: splits readable, T fits, grid divisible by the U-Net's downsampling."""
    problems: list[str] = []
    for split in ("train", "valid"):
        try:
            info = read_split_info(root, split)
        except DataError as exc:
            problems.append(str(exc))
            continue
        if cfg.data.timesteps + 1 > info.n_steps:
            problems.append(
                f"--timesteps {cfg.data.timesteps} needs {cfg.data.timesteps + 1} frames per trajectory "
                f"but {root}/data/{split} stores {info.n_steps}; use --timesteps <= {info.n_steps - 1}"
            )
        factor = 2**cfg.model.encoder_levels
        bad = [n for n in info.spatial_shape if n % factor]
        if bad:
            problems.append(
                f"grid {tuple(info.spatial_shape)} of {root}/data/{split} is not divisible by "
                f"2**encoder_levels = {factor}; lower --encoder-levels"
            )
    if not (root / "stats.yaml").is_file():
        problems.append(f"{root}/stats.yaml is missing: compute it with `noa-data stats {root}`")
    return problems


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
