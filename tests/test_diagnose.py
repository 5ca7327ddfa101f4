"""noa-diagnose on checkpoints of the real trainer: healthy, made to explode, made to diverge."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from importlib.metadata import entry_points
from pathlib import Path

import pytest
import torch
from test_export import step_checkpoint, train_tiny_run
from trainrun import REPO

from noa_dist import diagnose
from noa_dist.config import Config
from noa_dist.data.dataset import WellWindowDataset
from noa_dist.diagnose.cli import build_parser
from noa_dist.diagnose.cli import diagnose as run_diagnosis
from noa_dist.diagnose.commands import with_flags
from noa_dist.diagnose.inputs import config_check
from noa_dist.diagnose.probe import run_probe
from noa_dist.diagnose.result import Diagnosis, Settings
from noa_dist.diagnose.verdict import verdict
from noa_dist.export import export_checkpoint, load_exported
from noa_dist.losses import trajectory_mse

JSON_KEYS = {
    "checkpoint",
    "format",
    "dataset",
    "split",
    "device",
    "settings",
    "trained_with",
    "config_check",
    "data",
    "forward",
    "loss",
    "gradients",
    "chain",
    "training_command",
    "previous_checkpoint",
    "verdict",
    "exit_code",
}


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory) -> Path:
    """The run test_export.py trains (one per session: the folder is reused if it exists)."""
    return train_tiny_run(tmp_path_factory.getbasetemp() / "noa-trained-run")


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """The in-process diagnoses share 2 cores with other tests: no thread oversubscription."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def scaled_export(run: Path, out: Path, prefix: str, factor: float) -> Path:
    """The run's best weights with every parameter under `prefix` multiplied by `factor`."""
    path = export_checkpoint(run / "best", out)
    payload = torch.load(path, weights_only=True)
    payload["model"] = {
        k: v * factor if k.startswith(prefix) else v for k, v in payload["model"].items()
    }
    torch.save(payload, path)
    return path


@pytest.fixture(scope="module")
def exploding(trained_run, tmp_path_factory) -> Path:
    """A 100x larger output head: each step amplifies the gradient ~3x; the forward stays finite."""
    return scaled_export(trained_run, tmp_path_factory.mktemp("boom") / "boom.pt", "head.", 100.0)


def run_json(argv: list[str], capsys) -> tuple[int, dict]:
    code = diagnose.main([*argv, "--json"])
    out = capsys.readouterr().out
    return code, json.loads(
        out, parse_constant=lambda name: pytest.fail(f"non-strict JSON constant {name}")
    )


def test_healthy_checkpoint_with_its_training_window_is_healthy_and_exits_0(trained_run, capsys):
    code = diagnose.main(["--checkpoint", str(step_checkpoint(trained_run))])
    text = capsys.readouterr().out
    assert code == 0
    assert "6. Verdict: HEALTHY" in text and "[!!]" not in text
    for section in (
        "1. Configuration",
        "2. Forward pass",
        "3. Loss",
        "4. Backward pass",
        "5. Gradient growth",
    ):
        assert section in text


def test_json_has_the_documented_keys_and_reuses_the_checkpoint_settings(trained_run, capsys):
    code, result = run_json(
        ["--checkpoint", str(step_checkpoint(trained_run)), "--n-samples", "3"], capsys
    )
    assert code == result["exit_code"] == 0 and set(result) == JSON_KEYS
    assert all(key in diagnose.__doc__ for key in JSON_KEYS)
    assert result["settings"] == {
        "timesteps": 4,
        "bptt_window": 2,
        "tbptt_mode": "last",
        "batch_size": 2,
        "n_samples": 3,
    }
    assert [row["step"] for row in result["forward"]["steps"]] == [
        1,
        2,
        3,
        4,
    ]  # warm-up steps included
    assert [row["depth"] for row in result["chain"]["depths"]] == [
        0,
        1,
        2,
    ]  # the 2-step window + its input
    grads = result["gradients"]
    assert (
        grads["n_nonfinite"] == 0
        and grads["norm_min"] <= grads["norm_p50"] <= grads["norm_p99"] <= grads["norm_max"]
    )
    assert result["verdict"]["status"] == "healthy" and result["verdict"]["fixes"] == []


def test_exploding_chain_is_found_and_the_fix_adds_a_bptt_window(trained_run, exploding, capsys):
    code, result = run_json(
        ["--checkpoint", str(exploding), "--timesteps", "8", "--bptt-window", "none"], capsys
    )
    chain = result["chain"]
    assert code == 1 and result["verdict"]["status"] == "exploding_chain"
    assert chain["window"] == 8 and chain["amplification"] > 1e3
    assert all(row["growth"] > 1 for row in chain["depths"][1:]), chain["depths"]
    assert result["forward"]["nonfinite_total"] == 0
    command = result["verdict"]["fixes"][0]["command"]
    assert command.startswith("accelerate launch noa_dist/train.py") and command.endswith(
        "--timesteps 8 --bptt-window 4"
    )


def test_the_cli_prints_the_explosion_report_and_exits_1(exploding):
    cmd = [
        sys.executable,
        "-m",
        "noa_dist.diagnose",
        "--checkpoint",
        str(exploding),
        "--timesteps",
        "8",
        "--bptt-window",
        "none",
    ]
    proc = subprocess.run(
        cmd,
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
        env=dict(os.environ, OMP_NUM_THREADS="1"),
    )
    assert proc.returncode == 1, proc.stderr[-2000:]
    assert "6. Verdict: EXPLODING GRADIENTS THROUGH THE AUTOREGRESSIVE CHAIN" in proc.stdout
    assert "--bptt-window 4" in proc.stdout.split("Recommended fix")[1]


def test_diverging_forward_names_every_nonfinite_parameter_and_recommends_a_lower_lr(
    trained_run, tmp_path, capsys
):
    diverging = scaled_export(trained_run, tmp_path / "diverge.pt", "head.", 1e12)
    code = diagnose.main(
        ["--checkpoint", str(diverging), "--timesteps", "8", "--bptt-window", "none"]
    )
    text = capsys.readouterr().out
    n_params = len(list(load_exported(diverging)[0].parameters()))
    assert code == 1 and "6. Verdict: NON-FINITE FORWARD" in text
    assert f"non-finite gradients in {n_params} of {n_params} parameters (ALL of them)" in text
    assert "stem.weight" in text and "head.bias" in text
    assert "--lr 0.0001" in text.split("Recommended fix")[1]


def test_long_rollout_without_window_is_a_risky_config_fixed_by_window_32(trained_run):
    measured = run_diagnosis(build_parser().parse_args(["--checkpoint", str(trained_run / "best")]))
    settings = Settings(
        timesteps=256, bptt_window=None, tbptt_mode="last", batch_size=2, n_samples=4
    )
    findings = dataclasses.replace(
        measured.findings, settings=settings, config_check=config_check(settings, Config())
    )
    found = verdict(findings)
    assert found.status == "risky_config" and not found.healthy
    assert found.fixes[0].command.endswith("--bptt-window 32")


def test_json_is_the_typed_diagnosis(trained_run, capsys):
    """diagnose() returns typed results; --json prints exactly Diagnosis.to_dict()."""
    argv = ["--checkpoint", str(trained_run / "best"), "--n-samples", "2"]
    typed = run_diagnosis(build_parser().parse_args(argv))
    assert isinstance(typed, Diagnosis) and typed.exit_code == 0
    assert isinstance(typed.findings.chain.depths[0].grad_norm, float)
    _, printed = run_json(argv, capsys)
    assert printed == typed.to_dict()  # all finite here: no "nan" strings to map back


def test_probe_state_gradients_equal_autograd_through_a_plain_rollout(trained_run):
    model, cfg = load_exported(
        export_checkpoint(trained_run / "best", trained_run.parent / "probe.pt")
    )
    dataset = WellWindowDataset(cfg.data.dataset, "train", 3, n_samples=2)
    probe = run_probe(
        model,
        dataset,
        bptt_window=None,
        tbptt_mode="last",
        batch_size=2,
        device=torch.device("cpu"),
        progress=False,
    )
    batch = torch.utils.data.default_collate([dataset[i] for i in range(2)])
    u0 = batch["u0"].clone().requires_grad_()
    states = [u0]
    for _ in range(3):
        states.append(model(states[-1], batch["cond"]).state)
    loss = trajectory_mse(torch.stack(states[1:], dim=1), batch["target"])
    expected = [g.norm().item() for g in torch.autograd.grad(loss, states)]  # u_0 .. u_3
    measured = {row["depth"]: row["grad_norm"] for row in probe.depth.rows()}
    assert measured == pytest.approx({3 - t: expected[t] for t in range(4)}, rel=1e-4)
    assert probe.loss == pytest.approx(loss.item(), rel=1e-5)


def test_with_flags_replaces_every_spelling_of_a_flag():
    args = ["--bptt-window", "8", "--lr=1e-3", "--bptt_window=16", "--resume", "x", "--epochs", "2"]
    assert with_flags(args, {"bptt-window": "32", "resume": None}) == [
        "--lr=1e-3",
        "--epochs",
        "2",
        "--bptt-window",
        "32",
    ]


def test_bad_input_exits_2_with_one_error_line(trained_run, tmp_path, capsys):
    assert diagnose.main(["--checkpoint", str(tmp_path / "missing")]) == 2
    assert diagnose.main(["--checkpoint", str(trained_run / "best"), "--bptt-window", "abc"]) == 2
    assert diagnose.main(["--checkpoint", str(trained_run / "best"), "--timesteps", "99"]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert [line.startswith("error: ") for line in lines] == [True, True, True], lines
    assert "--bptt-window 'abc'" in lines[1] and "--timesteps 99" in lines[2]


def test_console_scripts_are_installed():
    scripts = {ep.name: ep.value for ep in entry_points(group="console_scripts")}
    assert scripts["noa-diagnose"] == "noa_dist.diagnose:main"
    assert scripts["noa-export"] == "noa_dist.export:main"
