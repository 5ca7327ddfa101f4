"""preflight.data_problems: every problem of the data against the config, before any rank waits."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from conftest import DEFAULT_FIELDS, TinyField, write_root

from noa_dist import preflight
from noa_dist.config import load_config
from noa_dist.errors import ConfigError


def _config(root: Path, *flags: str):
    return load_config(
        ["--dataset", str(root), "--timesteps", "4", "--encoder-levels", "1", *flags]
    )


def _edit_stats(root: Path, edit) -> Path:
    path = root / "stats.yaml"
    stats = yaml.safe_load(path.read_text())
    edit(stats)
    path.write_text(yaml.safe_dump(stats))
    return path


def test_a_fitting_dataset_passes(tiny_root):
    assert preflight.check_data(_config(tiny_root)) == tiny_root


def test_every_stats_yaml_gap_is_listed_in_one_error(tiny_root):
    def edit(stats):
        del stats["mean"]["pressure"]  # predicted, t0
        del stats["std"]["diffusivity"]  # conditioning, t0
        stats["mean"]["velocity"] = [1.0, 2.0, 3.0]  # predicted, t1: 2 components

    stats_path = _edit_stats(tiny_root, edit)
    with pytest.raises(ConfigError) as err:
        preflight.check_data(_config(tiny_root))
    lines = str(err.value).splitlines()
    assert lines[0] == "the dataset does not fit the configuration:"
    assert [line.strip() for line in lines[1:]] == [
        f"{stats_path}: mean/pressure: missing, expected 1 value(s)",
        f"{stats_path}: mean/velocity: 3 values, expected 2 (one per component)",
        f"{stats_path}: std/diffusivity: missing, expected 1 value(s)",
    ]


def test_stats_gaps_come_with_the_other_data_problems(tiny_root):
    stats_path = _edit_stats(tiny_root, lambda stats: stats.pop("std"))
    with pytest.raises(ConfigError) as err:
        preflight.check_data(_config(tiny_root, "--timesteps", "9", "--encoder-levels", "2"))
    message = str(err.value)
    assert f"{stats_path}: key 'std': missing" in message
    assert "--timesteps 9 needs 10 frames" in message
    assert "not divisible by 2**encoder_levels = 4" in message


def test_a_missing_stats_yaml_says_how_to_make_it(tiny_root):
    (tiny_root / "stats.yaml").unlink()
    problems = preflight.data_problems(_config(tiny_root), tiny_root)
    assert problems == [
        f"{tiny_root / 'stats.yaml'} is missing: compute it with `noa-data stats {tiny_root}`"
    ]


def test_a_valid_split_with_other_fields_is_a_problem(tmp_path):
    root = write_root(tmp_path / "tiny", {"train": [2]})
    write_root(tmp_path / "other", {"valid": [2]}, fields=(*DEFAULT_FIELDS, TinyField("density")))
    (tmp_path / "other" / "data" / "valid").rename(root / "data" / "valid")
    problems = preflight.data_problems(_config(root), root)
    assert any("valid disagrees with train" in p and "fields" in p for p in problems), problems
    assert any("mean/density: missing" in p for p in problems), problems
