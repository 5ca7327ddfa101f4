from __future__ import annotations

import copy
import json
import logging
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState, GradientState
from safetensors.torch import load_file

from noa_dist.checkpoint import (
    COMPLETE,
    TRAINER_STATE,
    dumps_state,
    latest_checkpoint,
    load_checkpoint,
    load_model_weights,
    loads_state,
    resolve_resume,
    save_checkpoint,
    save_model_weights,
)
from noa_dist.errors import ConfigError


def reset_accelerate() -> None:
    AcceleratorState._reset_state(True)
    GradientState._reset_state()


@pytest.fixture
def accelerator():
    reset_accelerate()
    yield Accelerator(cpu=True)
    reset_accelerate()


def prepared_training(accelerator):
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 3)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0 / (1 + step))
    return accelerator.prepare(model, optimizer, scheduler)


def train(model, optimizer, scheduler, steps):
    for _ in range(steps):
        loss = model(torch.randn(8, 4)).pow(2).mean()
        loss.backward()
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad()


def assert_equal_nested(a, b):
    if isinstance(a, torch.Tensor):
        assert torch.equal(a, b)
    elif isinstance(a, dict):
        assert a.keys() == b.keys()
        for key in a:
            assert_equal_nested(a[key], b[key])
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b)
        for x, y in zip(a, b, strict=True):
            assert_equal_nested(x, y)
    else:
        assert a == b


def steps_on_disk(checkpoint_dir: Path) -> list[str]:
    return sorted(p.name for p in checkpoint_dir.iterdir())


def save_steps(accelerator, checkpoint_dir, steps, **kwargs):
    for step in steps:
        save_checkpoint(accelerator, checkpoint_dir, step, {"global_step": step}, **kwargs)


def test_resume_restores_model_optimizer_scheduler_and_rng_exactly(accelerator, tmp_path):
    model, optimizer, scheduler = prepared_training(accelerator)
    train(model, optimizer, scheduler, 3)
    path = save_checkpoint(accelerator, tmp_path, 3, {"global_step": 3, "loss": 0.25})
    expected = copy.deepcopy([model.state_dict(), optimizer.state_dict(), scheduler.state_dict()])
    rand_after_save = torch.rand(5)

    train(model, optimizer, scheduler, 2)  # move every piece of state away
    state = load_checkpoint(accelerator, latest_checkpoint(tmp_path))

    assert path == tmp_path / "step-00000003"
    assert state == {"global_step": 3, "loss": 0.25}
    assert_equal_nested(
        [model.state_dict(), optimizer.state_dict(), scheduler.state_dict()], expected
    )
    assert torch.equal(torch.rand(5), rand_after_save)


def test_latest_ignores_unfinished_and_broken_folders_with_a_logged_reason(
    accelerator, tmp_path, caplog
):
    prepared_training(accelerator)
    save_steps(accelerator, tmp_path, [1, 2])
    (tmp_path / ".step-00000009.tmp").mkdir()  # a save killed before its rename
    (tmp_path / "step-00000008").mkdir()  # no COMPLETE marker
    broken = tmp_path / "step-00000007"
    broken.mkdir()
    (broken / COMPLETE).write_text("{}")
    (broken / TRAINER_STATE).write_text("{not json")
    (tmp_path / "step-12").mkdir()  # not our naming scheme

    with caplog.at_level(logging.WARNING, logger="noa_dist.checkpoint"):
        assert latest_checkpoint(tmp_path) == tmp_path / "step-00000002"
    assert "step-00000008: no COMPLETE marker" in caplog.text
    assert "step-00000007: trainer_state.json is not readable JSON" in caplog.text
    assert ".step-00000009.tmp: leftover of an unfinished save" in caplog.text


def test_latest_of_missing_or_empty_folder_is_none(tmp_path):
    assert latest_checkpoint(tmp_path / "nope") is None
    assert latest_checkpoint(tmp_path) is None
    assert resolve_resume("auto", tmp_path) is None


def test_rotation_keeps_newest_k_and_deletes_leftovers_after_commit(accelerator, tmp_path):
    prepared_training(accelerator)
    (tmp_path / ".step-00000001.old").mkdir()
    save_steps(accelerator, tmp_path, [1, 2, 3, 4, 5], keep_last=3)
    assert steps_on_disk(tmp_path) == ["step-00000003", "step-00000004", "step-00000005"]


def test_keep_last_one_still_keeps_two(accelerator, tmp_path):
    prepared_training(accelerator)
    save_steps(accelerator, tmp_path, [10, 20, 30], keep_last=1)
    assert steps_on_disk(tmp_path) == ["step-00000020", "step-00000030"]


def test_protected_checkpoint_survives_rotation(accelerator, tmp_path):
    prepared_training(accelerator)
    save_steps(
        accelerator, tmp_path, [1, 2, 3, 4], keep_last=2, protect=[tmp_path / "step-00000001"]
    )
    assert steps_on_disk(tmp_path) == ["step-00000001", "step-00000003", "step-00000004"]


def test_saving_an_existing_step_replaces_it_and_drops_a_stale_tmp(accelerator, tmp_path):
    prepared_training(accelerator)
    save_checkpoint(accelerator, tmp_path, 5, {"attempt": 1})
    stale = tmp_path / ".step-00000005.tmp"
    stale.mkdir()
    (stale / "junk.bin").write_bytes(b"x")
    path = save_checkpoint(accelerator, tmp_path, 5, {"attempt": 2})
    assert load_checkpoint(accelerator, path) == {"attempt": 2}
    assert steps_on_disk(tmp_path) == ["step-00000005"]
    assert not (path / "junk.bin").exists()
    marker = json.loads((path / COMPLETE).read_text())
    assert marker["global_step"] == 5 and marker["world_size"] == 1 and "saved_at" in marker


def test_trainer_state_round_trips_non_finite_floats_as_strict_json():
    state = {
        "best": math.inf,
        "worst": -math.inf,
        "last": math.nan,
        "hist": [1, 2.5, (3, "a")],
        "nested": {"np": np.float32(0.5), "t": torch.tensor(7), "path": Path("/x/y"), "n": None},
        "ok": True,
    }
    text = dumps_state(state)
    json.loads(text, parse_constant=lambda c: pytest.fail(f"non-strict JSON constant {c}"))
    back = loads_state(text)
    assert back["best"] == math.inf and back["worst"] == -math.inf and math.isnan(back["last"])
    assert back["hist"] == [1, 2.5, [3, "a"]]
    assert back["nested"] == {"np": 0.5, "t": 7, "path": "/x/y", "n": None}
    assert back["ok"] is True


@pytest.mark.parametrize(
    "bad, message",
    [
        ({"m": {1: 2}}, r"state\['m'\]: key 1 is not a str"),
        ({"w": torch.ones(3)}, r"state\['w'\]: Tensor"),
    ],
)
def test_trainer_state_that_json_cannot_hold_is_refused_before_writing(
    accelerator, tmp_path, bad, message
):
    prepared_training(accelerator)
    with pytest.raises(TypeError, match=message):
        save_checkpoint(accelerator, tmp_path, 1, bad)
    assert not any(tmp_path.iterdir())


def test_resolve_resume_accepts_a_complete_checkpoint_and_explains_bad_paths(accelerator, tmp_path):
    prepared_training(accelerator)
    good = save_checkpoint(accelerator, tmp_path, 4, {})
    interrupted = tmp_path / "step-00000006"
    interrupted.mkdir()

    assert resolve_resume(str(good), tmp_path) == good
    assert resolve_resume("auto", tmp_path) == good
    assert resolve_resume("none", tmp_path) is None
    assert resolve_resume(None, tmp_path) is None
    with pytest.raises(
        ConfigError,
        match=r"step-00000006: no COMPLETE marker: the save was interrupted; use --resume auto",
    ):
        resolve_resume(str(interrupted), tmp_path)
    with pytest.raises(ConfigError, match=r"missing: not a folder"):
        resolve_resume(str(tmp_path / "missing"), tmp_path)
    with pytest.raises(ConfigError, match=r"folder of checkpoints, not one checkpoint"):
        resolve_resume(str(tmp_path), tmp_path)
    with pytest.raises(ConfigError, match=r"cannot load checkpoint .*step-00000006"):
        load_checkpoint(accelerator, interrupted)


def test_exported_weights_have_canonical_keys_and_replace_the_previous_export(
    accelerator, tmp_path
):
    model, _, _ = prepared_training(accelerator)
    save_model_weights(accelerator, model, tmp_path / "best", {"step": 1, "val": math.nan})
    with torch.no_grad():
        model.weight.fill_(2.0)
    out = save_model_weights(accelerator, model, tmp_path / "best", {"step": 2, "val": 0.5})

    state, meta = load_model_weights(out)
    assert meta == {"step": 2, "val": 0.5}
    assert_equal_nested(state, dict(model.state_dict()))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["best"]
    with pytest.raises(ConfigError, match=r"cannot load weights from .*no COMPLETE marker"):
        (tmp_path / "half").mkdir()
        load_model_weights(tmp_path / "half")


CRASHING_CHILD = """
import sys, time
from pathlib import Path

import torch
from accelerate import Accelerator

from noa_dist.checkpoint import save_checkpoint


class Gate:
    '''Saved after weights, optimizer and RNG files; blocks once armed so the parent can kill.'''

    armed = False

    def state_dict(self):
        if self.armed:
            print("saving step 3", flush=True)
            time.sleep(600)
        return {}

    def load_state_dict(self, state):
        pass


accelerator = Accelerator(cpu=True)
model = accelerator.prepare(torch.nn.Linear(4, 3))
gate = Gate()
accelerator.register_for_checkpointing(gate)
for step in (1, 2, 3):
    with torch.no_grad():
        model.weight.fill_(step)
    gate.armed = step == 3
    save_checkpoint(accelerator, Path(sys.argv[1]), step, {"global_step": step}, keep_last=2)
"""


class NoState:
    def state_dict(self):
        return {}

    def load_state_dict(self, state):
        pass


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_sigkill_during_save_leaves_previous_checkpoints_loadable(tmp_path):
    script = tmp_path / "child.py"
    script.write_text(CRASHING_CHILD)
    checkpoint_dir = tmp_path / "ckpt"
    child = subprocess.Popen(
        [sys.executable, str(script), str(checkpoint_dir)], stdout=subprocess.PIPE, text=True
    )
    try:
        for line in child.stdout:
            if line.strip() == "saving step 3":
                break
        child.kill()  # SIGKILL: no cleanup handlers run
    finally:
        child.wait(timeout=30)
    assert child.returncode == -9

    partial = checkpoint_dir / ".step-00000003.tmp"
    assert (partial / "model.safetensors").exists() and not (partial / COMPLETE).exists()
    assert steps_on_disk(checkpoint_dir) == [".step-00000003.tmp", "step-00000001", "step-00000002"]
    latest = latest_checkpoint(checkpoint_dir)
    assert latest == checkpoint_dir / "step-00000002"

    reset_accelerate()
    accelerator = Accelerator(cpu=True)
    model = accelerator.prepare(torch.nn.Linear(4, 3))
    accelerator.register_for_checkpointing(NoState())
    assert load_checkpoint(accelerator, latest) == {"global_step": 2}
    assert torch.all(model.weight == 2.0)
    reset_accelerate()


TWO_RANK_CHILD = """
import sys
from pathlib import Path

import torch
from accelerate import Accelerator, DeepSpeedPlugin
from accelerate.utils import InitProcessGroupKwargs

from noa_dist import distributed
from noa_dist.checkpoint import (
    latest_checkpoint, load_checkpoint, save_checkpoint, save_model_weights,
)

out, mode = Path(sys.argv[1]), sys.argv[2]
if mode == "zero3":
    plugin = DeepSpeedPlugin(zero_stage=3, gradient_clipping=1.0, zero3_save_16bit_model=True)
    gloo = InitProcessGroupKwargs(backend="gloo")
    accelerator = Accelerator(deepspeed_plugin=plugin, kwargs_handlers=[gloo])
else:
    accelerator = Accelerator(cpu=True)
rank = accelerator.process_index


def snapshot():
    # Full weights on the main process; ZeRO-3 gathers them, so every rank calls this.
    return {k: v.clone() for k, v in (accelerator.get_state_dict(model) or {}).items()}


def train(steps):
    for _, (x,) in zip(range(steps), loader):
        accelerator.backward(model(x).pow(2).mean())
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad()


try:
    assert accelerator.num_processes == 2, accelerator.num_processes
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 3))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0 / (1 + step))
    data = torch.utils.data.TensorDataset(torch.randn(64, 4))
    loader = torch.utils.data.DataLoader(data, batch_size=4)  # DeepSpeed reads its batch size
    model, optimizer, scheduler, loader = accelerator.prepare(model, optimizer, scheduler, loader)
    train(2)
    save_checkpoint(accelerator, out / "ckpt", 1, {"global_step": 1})
    path = save_checkpoint(accelerator, out / "ckpt", 2, {"global_step": 2})
    save_model_weights(accelerator, model, out / "final", {"global_step": 2})
    expected, rand_after_save = snapshot(), torch.rand(3)
    train(2)
    assert latest_checkpoint(out / "ckpt") == path
    assert load_checkpoint(accelerator, path) == {"global_step": 2}
    restored = snapshot()
    assert restored.keys() == expected.keys()
    assert all(torch.equal(restored[k], expected[k]) for k in expected), "weights differ"
    assert torch.equal(torch.rand(3), rand_after_save), "RNG not restored"
    (out / f"rank{rank}.txt").write_text("ok")
except BaseException as err:
    (out / f"rank{rank}.txt").write_text(f"{type(err).__name__}: {err}")
    raise
distributed.shutdown(accelerator)
distributed.exit_process(0)
"""
CANONICAL_KEYS = {"0.weight", "0.bias", "2.weight", "2.bias"}


def launch_two_ranks(tmp_path: Path, mode: str, launcher_args: list[str], env=None) -> None:
    """Run TWO_RANK_CHILD on 2 processes; fail with each rank's report if any rank failed."""
    script = tmp_path / "two_rank_child.py"
    script.write_text(TWO_RANK_CHILD)
    launch = ["accelerate", "launch", "--num_processes", "2", "--num_machines", "1"]
    launch += ["--mixed_precision", "no", "--dynamo_backend", "no", *launcher_args]
    launch += [str(script), str(tmp_path), mode]
    result = subprocess.run(launch, capture_output=True, text=True, timeout=240, env=env)
    reports = [tmp_path / f"rank{r}.txt" for r in range(2)]
    reports = [p.read_text() if p.exists() else "no report" for p in reports]
    assert reports == ["ok", "ok"], f"{reports}\n{result.stderr[-3000:]}"
    assert result.returncode == 0


@pytest.mark.slow
@pytest.mark.dist
@pytest.mark.timeout(300)
def test_two_rank_ddp_checkpoint_is_canonical_and_loads_in_one_process(tmp_path):
    launch_two_ranks(tmp_path, "ddp", ["--multi_gpu"])

    path = tmp_path / "ckpt" / "step-00000002"
    assert {"random_states_0.pkl", "random_states_1.pkl"} <= {p.name for p in path.iterdir()}
    assert set(load_file(path / "model.safetensors")) == CANONICAL_KEYS
    exported, _ = load_model_weights(tmp_path / "final")
    assert set(exported) == CANONICAL_KEYS

    reset_accelerate()
    accelerator = Accelerator(cpu=True)
    torch.manual_seed(1)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 3))
    model = accelerator.prepare(model)
    load_checkpoint(accelerator, path)
    assert_equal_nested(dict(model.state_dict()), exported)
    reset_accelerate()


@pytest.mark.slow
@pytest.mark.dist
@pytest.mark.deepspeed
@pytest.mark.timeout(300)
def test_two_rank_zero3_checkpoint_restores_exactly_and_exports_full_weights(tmp_path):
    pytest.importorskip("deepspeed")
    env = {**os.environ, "DS_ACCELERATOR": "cpu"}
    launch_two_ranks(tmp_path, "zero3", ["--use_deepspeed", "--zero_stage", "3"], env=env)

    path = tmp_path / "ckpt" / "step-00000002"
    assert (path / COMPLETE).exists() and (path / "pytorch_model").is_dir()
    exported, meta = load_model_weights(tmp_path / "final")
    assert set(exported) == CANONICAL_KEYS and meta == {"global_step": 2}
    assert exported["0.weight"].shape == (8, 4)  # gathered, not a ZeRO-3 shard
