"""W&B tracking through Accelerate, read back from real offline runs.

The W&B scenarios run in a child process (`python tests/test_tracking.py <scenario> <dir>`)
so wandb's and accelerate's process-global state never leaks into other tests; the run
files they leave behind are then read with wandb's own reader (`wandb_read.py`, built on
`wandb leet inspect --json`).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import wandb_read

from noa_dist import tracking
from noa_dist.errors import ConfigError, DataError

LONG_TEXT = "x" * 70_000  # a config record spanning three 32 KiB log blocks
_WANDB_ENV = (
    "WANDB_MODE",
    "WANDB_API_KEY",
    "WANDB_IDENTITY_TOKEN_FILE",
    "WANDB_BASE_URL",
    "WANDB_RUN_ID",
)


# ----------------------------------------------------------------- child-process scenarios


def _scenario_offline_then_resume(out: Path) -> dict:
    """Segment 1 logs steps 0/10/20 + a figure; segment 2 resumes the id at step 20 and logs
    30/40 (offline, resume_step does not rewind: see tracking.start_run)."""
    from accelerate import Accelerator

    from noa_dist import plots

    config = {"lr": 1e-3, "model": {"width": 32}, "long_text": LONG_TEXT}
    acc = Accelerator(log_with=tracking.log_with("offline"), cpu=True)
    kwargs = {"project": "noa-test", "run_dir": out / "run", "config": config, "mode": "offline"}
    run_id = tracking.start_run(acc, run_name="segment-1", resume_run_id=None, **kwargs)
    for step in (0, 10, 20):
        tracking.log_metrics(acc, {"train/loss": 1.0 / (step + 1), "train/lr": 0.1}, step=step)
    import torch

    truth_TCHW = torch.randn(4, 1, 8, 8)
    pyplot_loaded = "matplotlib.pyplot" in sys.modules  # plots.py must not need it
    rollout = plots.rollout_figure(truth_TCHW, truth_TCHW + 0.1)
    tracking.log_figures(acc, {"val/rollout": rollout}, step=20)
    import matplotlib.pyplot as plt

    pyplot_fig = plt.figure()  # pyplot keeps its figures alive until closed
    tracking.log_figures(acc, {"val/pyplot": pyplot_fig}, step=20)
    location = tracking.run_location(acc)
    tracking.finish(acc)
    tracking.finish(acc)  # idempotent

    resumed = Accelerator(log_with=tracking.log_with("offline"), cpu=True)
    resumed_id = tracking.start_run(
        resumed, run_name="segment-2", resume_run_id=run_id, resume_step=20, **kwargs
    )
    for step in (30, 40):
        tracking.log_metrics(resumed, {"train/loss": 1.0 / (step + 1)}, step=step)
    tracking.finish(resumed)
    return {
        "run_id": run_id,
        "resumed_id": resumed_id,
        "location": location,
        "location_after_finish": tracking.run_location(acc),
        "pyplot_loaded_before_logging": pyplot_loaded,
        "pyplot_figure_still_open": plt.fignum_exists(pyplot_fig.number),
    }


def _scenario_disabled(out: Path) -> dict:
    """mode "disabled": every call is a no-op; a wandb mode without log_with is refused."""
    from accelerate import Accelerator

    from noa_dist import plots

    acc = Accelerator(log_with=tracking.log_with("disabled"), cpu=True)
    kwargs = {"project": "noa-test", "run_name": "off", "run_dir": out / "run", "config": {"a": 1}}
    run_id = tracking.start_run(acc, mode="disabled", resume_run_id=None, **kwargs)
    tracking.log_metrics(acc, {"train/loss": 1.0}, step=1)
    tracking.log_figures(acc, {"val/vrmse": plots.vrmse_figure([0.1], [0.2])}, step=1)
    location = tracking.run_location(acc)
    tracking.finish(acc)
    try:
        tracking.start_run(acc, mode="offline", resume_run_id=None, **kwargs)
        refused = ""
    except ConfigError as err:
        refused = str(err)
    return {"run_id": run_id, "location": location, "refused": refused}


def _scenario_two_ranks(out: Path) -> dict:
    """Under `accelerate launch --num_processes 2`: only rank 0 creates and writes a run."""
    from accelerate import Accelerator

    from noa_dist import plots

    acc = Accelerator(log_with=tracking.log_with("offline"), cpu=True)
    run_id = tracking.start_run(
        acc, project="noa-test", run_name="ddp", run_dir=out / "run", config={"world": 2},
        mode="offline", resume_run_id=None,
    )  # fmt: skip
    tracking.log_metrics(acc, {"train/loss": 0.5 + acc.process_index}, step=3)
    tracking.log_figures(acc, {"val/vrmse": plots.vrmse_figure([0.1], [0.2])}, step=3)
    location = tracking.run_location(acc)
    tracking.finish(acc)
    acc.wait_for_everyone()
    return {
        "rank": acc.process_index,
        "world": acc.num_processes,
        "run_id": run_id,
        "location": location,
    }


def _scenario_single_process(out: Path) -> dict:
    """Both single-process scenarios in one child: wandb's service starts only once."""
    return {
        "offline": _scenario_offline_then_resume(out / "offline"),
        "disabled": _scenario_disabled(out / "disabled"),
    }


SCENARIOS = {"single_process": _scenario_single_process, "two_ranks": _scenario_two_ranks}


def _child_env(wandb_dir: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in _WANDB_ENV}
    env.update(WANDB_MODE="offline", WANDB_DIR=str(wandb_dir), WANDB_SILENT="true")
    return env


def _run_scenario(name: str, out: Path, launcher: list[str] | None = None) -> list[dict]:
    out.mkdir(parents=True, exist_ok=True)
    (out / "env_wandb_dir").mkdir()
    cmd = [*(launcher or [sys.executable]), __file__, name, str(out)]
    proc = subprocess.run(
        cmd, env=_child_env(out / "env_wandb_dir"), capture_output=True, text=True, timeout=240
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    return [json.loads(p.read_text()) for p in sorted(out.glob("result-*.json"))]


# ----------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def single_process(tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("single_process")
    (result,) = _run_scenario("single_process", out)
    return {"out": out, **result}


@pytest.fixture(scope="module")
def offline(single_process) -> dict:
    out = single_process["out"] / "offline"
    segments = wandb_read.find_offline_runs(out / "run")
    return {
        "out": out,
        "env_wandb_dir": single_process["out"] / "env_wandb_dir",
        "result": single_process["offline"],
        "segments": segments,
        "runs": [wandb_read.read_run(s) for s in segments],
    }


@pytest.fixture
def clean_wandb_env(monkeypatch, tmp_path):
    for name in _WANDB_ENV:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("NETRC", str(tmp_path / "netrc"))
    return tmp_path / "netrc"


# ------------------------------------------------------------------------- mode selection


def test_online_without_credentials_is_refused_up_front(clean_wandb_env):
    with pytest.raises(ConfigError, match="--wandb-mode=online: no W&B credentials"):
        tracking.wandb_mode("online")


def test_explicit_mode_wins_over_environment(clean_wandb_env, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_API_KEY", "k" * 40)
    assert [tracking.wandb_mode(m) for m in tracking.MODES] == list(tracking.MODES)


def test_auto_mode_follows_wandb_mode_env_including_aliases(clean_wandb_env, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "disabled")
    assert tracking.wandb_mode("auto") == "disabled"
    monkeypatch.setenv("WANDB_MODE", "dryrun")
    assert tracking.wandb_mode() == "offline"


def test_auto_mode_is_offline_without_credentials(clean_wandb_env):
    assert tracking.wandb_mode("auto") == "offline"


def test_auto_mode_is_online_with_api_key_env(clean_wandb_env, monkeypatch):
    monkeypatch.setenv("WANDB_API_KEY", "k" * 40)
    assert tracking.wandb_mode("auto") == "online"


def test_auto_mode_is_online_only_with_a_netrc_entry_for_the_wandb_host(
    clean_wandb_env, monkeypatch
):
    clean_wandb_env.write_text("machine example.com login user password secret\n")
    assert tracking.wandb_mode("auto") == "offline"
    clean_wandb_env.write_text("machine api.wandb.ai login user password " + "k" * 40 + "\n")
    assert tracking.wandb_mode("auto") == "online"
    monkeypatch.setenv("WANDB_BASE_URL", "https://wandb.example.org")
    assert tracking.wandb_mode("auto") == "offline"  # the entry is for another server


def test_unknown_modes_are_rejected_by_name(clean_wandb_env, monkeypatch):
    with pytest.raises(ConfigError, match="--wandb-mode='cloud'"):
        tracking.wandb_mode("cloud")
    monkeypatch.setenv("WANDB_MODE", "sometimes")
    with pytest.raises(ConfigError, match="WANDB_MODE='sometimes'"):
        tracking.wandb_mode("auto")


def test_log_with_is_none_only_when_disabled():
    assert tracking.log_with("disabled") is None
    assert tracking.log_with("offline") == tracking.log_with("online") == ["wandb"]


def test_new_run_ids_are_fresh_base36():
    ids = {tracking.new_run_id() for _ in range(50)}
    assert len(ids) == 50
    assert all(len(i) == 8 and i.isalnum() and i.islower() for i in ids)


# ------------------------------------------------------------ a real offline run, read back


def test_offline_run_reads_back_with_its_id_config_and_history(offline):
    first = offline["runs"][0]
    assert first.run_id == offline["result"]["run_id"]
    assert (first.name, first.project) == ("segment-1", "noa-test")
    assert first.finished
    assert first.config["lr"] == 1e-3
    assert first.config["model"] == {"width": 32}
    assert first.config["long_text"] == LONG_TEXT  # reassembled across blocks
    steps, losses = first.series("train/loss")
    assert steps == [0, 10, 20]
    assert losses == pytest.approx([1.0, 1 / 11, 1 / 21])
    assert first.summary["train/loss"] == pytest.approx(1 / 21)


def test_offline_run_lands_in_run_dir_and_reports_its_location(offline):
    segment = offline["segments"][0]
    assert segment.parent == offline["out"] / "run" / "wandb"
    assert offline["result"]["location"] == str(segment)
    assert offline["result"]["location_after_finish"] == str(segment)
    assert not any(offline["env_wandb_dir"].iterdir())  # run_dir beats WANDB_DIR


def test_logged_figure_is_an_image_in_the_history_and_is_closed(offline):
    first = offline["runs"][0]
    (row,) = [r for r in first.history if "val/rollout" in r]
    image = row["val/rollout"]
    assert row["_step"] == 20
    assert image["_type"] == "image-file"
    assert (offline["segments"][0] / "files" / image["path"]).read_bytes()[:4] == b"\x89PNG"
    assert offline["result"]["pyplot_loaded_before_logging"] is False
    assert offline["result"]["pyplot_figure_still_open"] is False


def test_resume_continues_the_same_run_id_in_a_new_segment(offline):
    assert offline["result"]["resumed_id"] == offline["result"]["run_id"]
    assert len(offline["runs"]) == 2
    second = offline["runs"][1]
    assert second.run_id == offline["result"]["run_id"]
    assert second.series("train/loss")[0] == [30, 40]
    assert second.config["model"] == {"width": 32}
    assert second.branch_point is None  # offline never rewinds (wandb sync would apply it)


def test_corrupted_run_file_is_reported_with_its_path(offline, tmp_path):
    broken = tmp_path / "run-broken.wandb"
    data = bytearray(offline["runs"][0].path.read_bytes())
    data[200] ^= 0xFF
    broken.write_bytes(bytes(data))
    with pytest.raises(DataError, match=r"run-broken.wandb: .*corrupt data"):
        wandb_read.read_run(broken)


def test_torn_run_file_reads_up_to_the_tear(offline, tmp_path):
    torn = tmp_path / "run-torn.wandb"
    data = offline["runs"][0].path.read_bytes()
    torn.write_bytes(data[: len(data) - 50])
    run = wandb_read.read_run(torn)
    assert not run.finished
    assert run.config["lr"] == 1e-3


def test_non_wandb_files_and_folders_are_rejected(tmp_path):
    (tmp_path / "run-x.wandb").write_bytes(b"PK\x03\x04not a wandb log")
    with pytest.raises(DataError, match="run-x.wandb: wandb leet inspect failed: .*bad header"):
        wandb_read.read_run(tmp_path / "run-x.wandb")
    with pytest.raises(DataError, match="expected exactly one run-<id>.wandb"):
        wandb_read.read_run(tmp_path / "nothing-here")
    with pytest.raises(DataError, match="not a directory"):
        wandb_read.find_offline_runs(tmp_path / "missing")


def test_segments_started_within_one_second_sort_by_wandb_copy_number(tmp_path):
    names = ["offline-run-20260101_120000-abc-10", "offline-run-20260101_120000-abc-2",
             "offline-run-20260101_115959-abc", "offline-run-20260101_120000-abc"]  # fmt: skip
    for name in names:
        (tmp_path / "wandb" / name).mkdir(parents=True)
    found = [p.name for p in wandb_read.find_offline_runs(tmp_path)]
    assert found == [names[2], names[3], names[1], names[0]]


# --------------------------------------------------------------------- disabled, two ranks


def test_disabled_mode_writes_nothing_and_every_call_is_a_no_op(single_process):
    result = single_process["disabled"]
    assert result["run_id"] is None and result["location"] is None
    assert not (single_process["out"] / "disabled").exists()
    assert not any((single_process["out"] / "env_wandb_dir").iterdir())
    assert "needs Accelerator(log_with=tracking.log_with('offline'))" in result["refused"]


@pytest.mark.slow
@pytest.mark.dist
@pytest.mark.timeout(300)
def test_only_the_main_process_starts_and_writes_the_run(tmp_path):
    launcher = shutil.which("accelerate")
    assert launcher, "accelerate CLI not on PATH"
    cmd = [launcher, "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
           "--mixed_precision", "no", "--dynamo_backend", "no"]  # fmt: skip
    results = sorted(_run_scenario("two_ranks", tmp_path, launcher=cmd), key=lambda r: r["rank"])
    assert [r["world"] for r in results] == [2, 2]
    assert results[0]["run_id"] and results[1]["run_id"] is None
    assert results[1]["location"] is None
    (segment,) = wandb_read.find_offline_runs(tmp_path / "run")
    run = wandb_read.read_run(segment)
    assert run.run_id == results[0]["run_id"]
    assert run.series("train/loss") == ([3], [0.5])  # rank 0's value only


# ------------------------------------------------------------------ child-process entry


def _main(name: str, out: str) -> None:
    result = SCENARIOS[name](Path(out))
    rank = os.environ.get("RANK", "0")
    Path(out, f"result-{rank}.json").write_text(json.dumps(result))


if __name__ == "__main__":
    _main(sys.argv[1], sys.argv[2])
