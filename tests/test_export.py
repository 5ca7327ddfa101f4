"""noa-export and noa_dist.checkpoint's readers on checkpoints written by the real trainer.

`trained_run` (also used by test_diagnose.py) trains the tiny model for one epoch in a
subprocess once per session; the run folder is cached under pytest's base temp folder.
ZeRO-3: test_export_zero3.py.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from trainrun import (
    REPO,
    env_for_test,
    launch,
    make_tiny_dataset,
    train_flags,
    zero_launch,
)

from noa_dist.checkpoint import (
    CheckpointError,
    checkpoint_kind,
    config_from_dict,
    load_weights,
)
from noa_dist.config import Config
from noa_dist.errors import ConfigError, DataError
from noa_dist.export import export_checkpoint, load_exported, main


def train_tiny_run(base: Path) -> Path:
    """One epoch of the tiny model (T=4, window 2) in one process; returns the run folder."""
    run = base / "out" / "run"
    if (run / "best" / "COMPLETE").is_file():
        return run  # trained earlier in this session (the fixture is imported by two modules)
    dataset = make_tiny_dataset(base / "data")
    cmd = [
        sys.executable,
        str(REPO / "noa_dist" / "train.py"),
        *train_flags(dataset, base / "out", "--epochs", "1"),
    ]
    proc = subprocess.run(
        cmd, cwd=REPO, env=env_for_test(base), capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return run


@pytest.fixture(scope="session")
def trained_run(tmp_path_factory) -> Path:
    return train_tiny_run(tmp_path_factory.getbasetemp() / "noa-trained-run")


def step_checkpoint(run: Path) -> Path:
    return sorted((run / "checkpoints").glob("step-*"))[-1]


def test_export_of_a_step_checkpoint_holds_its_weights_config_and_source(trained_run, tmp_path):
    ckpt = step_checkpoint(trained_run)
    out = export_checkpoint(ckpt, tmp_path / "model.pt")
    payload = torch.load(out, weights_only=True)
    saved = load_file(ckpt / "model.safetensors")
    assert payload["model"].keys() == saved.keys()
    assert all(torch.equal(payload["model"][k], saved[k].float()) for k in saved)
    assert payload["config"] == json.loads((ckpt / "trainer_state.json").read_text())["config"]
    assert payload["source"] == str(ckpt)
    assert not list(tmp_path.glob(".*.tmp")), "the temporary file was left behind"


def test_exported_file_loads_into_a_plain_model_when_deepspeed_cannot_be_imported(
    trained_run, tmp_path
):
    out = export_checkpoint(trained_run / "best", tmp_path / "best.pt")
    script = f"""
import sys
sys.modules["deepspeed"] = None  # any `import deepspeed` now raises ImportError
import torch
from noa_dist.config import ModelConfig
from noa_dist.export import load_exported
from noa_dist.models.build import build_model
payload = torch.load({str(out)!r}, weights_only=True)
model = build_model(ModelConfig(**payload["config"]["model"]), **payload["channels"])
model.load_state_dict(payload["model"])
again, cfg = load_exported({str(out)!r})
u = torch.randn(1, payload["channels"]["in_channels"], 16, 16)
c = torch.randn(1, payload["channels"]["cond_channels"], 16, 16)
assert torch.equal(model(u, c).state, again(u, c).state)
print("loaded", cfg.model.base_channels)
"""
    proc = subprocess.run(
        [sys.executable, "-c", script],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
        env=dict(os.environ, OMP_NUM_THREADS="1"),
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "loaded 8" in proc.stdout


def test_best_folder_step_folder_and_export_give_the_same_weights(trained_run, tmp_path):
    from_best, best_config = load_weights(trained_run / "best")
    exported = export_checkpoint(trained_run / "best", tmp_path / "b.pt")
    from_export, export_config = load_weights(exported)
    assert checkpoint_kind(exported) == "export" and checkpoint_kind(trained_run / "best") == "best"
    assert export_config == best_config
    assert all(torch.equal(from_best[k], from_export[k]) for k in from_best)
    model, cfg = load_exported(exported)
    assert cfg == config_from_dict(best_config) and not model.training


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda run, tmp: tmp / "missing", "no such file or folder"),
        (lambda run, tmp: run, "a run folder; pass"),
        (
            lambda run, tmp: run / "checkpoints",
            "a folder of checkpoints; pass one of its step-XXXXXXXX folders (the latest",
        ),
        (
            lambda run, tmp: shutil.copy(run / "best" / "meta.json", tmp / "meta.json"),
            "not a .pt file",
        ),
    ],
    ids=["missing", "run-folder", "checkpoints-folder", "other-file"],
)
def test_paths_that_are_no_checkpoint_name_the_path_and_the_expected_formats(
    trained_run, tmp_path, make, message
):
    path = Path(make(trained_run, tmp_path))
    with pytest.raises(ConfigError, match="expected|pass") as err:
        load_weights(path)
    assert str(path) in str(err.value) and message in str(err.value)


def test_a_step_folder_without_its_complete_marker_is_refused(trained_run, tmp_path):
    broken = shutil.copytree(step_checkpoint(trained_run), tmp_path / "step-00000012")
    (broken / "COMPLETE").unlink()
    with pytest.raises(ConfigError, match="no COMPLETE marker"):
        load_weights(broken)


def test_a_pt_file_that_is_not_an_export_is_a_data_error(tmp_path):
    (tmp_path / "garbage.pt").write_bytes(b"not a torch file")
    torch.save({"weights": torch.zeros(2)}, tmp_path / "other.pt")
    with pytest.raises(DataError, match="cannot be read as a torch file"):
        load_weights(tmp_path / "garbage.pt")
    with pytest.raises(DataError, match="expected a noa-export file"):
        load_weights(tmp_path / "other.pt")


def test_config_round_trips_and_unknown_model_fields_are_refused():
    cfg = Config()
    assert config_from_dict(cfg.to_dict()) == cfg
    assert (
        config_from_dict({"train": {"bptt_window": 8}, "future": {"x": 1}}).train.bptt_window == 8
    )
    with pytest.raises(ConfigError, match="unknown model field"):
        config_from_dict({"model": {"n_heads": 4}})


def test_cli_reports_a_bad_checkpoint_in_one_line_and_exit_code_2(tmp_path, capsys):
    assert main([str(tmp_path / "nothing"), str(tmp_path / "out.pt")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and "nothing" in err[0]
    assert not (tmp_path / "out.pt").exists()


@pytest.mark.slow
@pytest.mark.dist
@pytest.mark.deepspeed
@pytest.mark.timeout(600)
def test_zero2_checkpoint_exports_the_same_weights_as_the_run_best_folder(tmp_path):
    """ZeRO-2 on 2 CPU ranks: the step folder holds only DeepSpeed shards (no model.safetensors)."""
    dataset = make_tiny_dataset(tmp_path / "data")
    flags = train_flags(dataset, tmp_path / "out", "--epochs", "1")
    launch(2, flags, tmp_path, script=REPO / "noa_dist" / "train.py", extra_launch=zero_launch(2))
    run = tmp_path / "out" / "run"
    ckpt = step_checkpoint(run)
    assert not (ckpt / "model.safetensors").exists() and checkpoint_kind(ckpt) == "zero"
    out = export_checkpoint(ckpt, tmp_path / "zero.pt")
    exported = torch.load(out, weights_only=True)["model"]
    best = load_file(run / "best" / "model.safetensors")  # saved at the same epoch end, gathered
    assert exported.keys() == best.keys()
    assert all(torch.equal(exported[k], best[k]) for k in best)


def test_an_unwritable_export_path_is_one_checkpoint_error(trained_run, tmp_path, capsys):
    (tmp_path / "file").write_text("")
    out = tmp_path / "file" / "model.pt"
    with pytest.raises(CheckpointError, match=rf"cannot write the export {out}: File exists"):
        export_checkpoint(trained_run / "best", out)
    assert main([str(trained_run / "best"), str(out)]) == 2
    assert capsys.readouterr().err.startswith("error: cannot write the export")
