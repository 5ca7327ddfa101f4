"""Command line and YAML parsing, fault-injection specs, resume-time config changes, stop requests."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap

import pytest
import torch

from noa_dist.config import load_config
from noa_dist.errors import ConfigError
from noa_dist.faults import NanInjection, parse_nan_injections
from noa_dist.resume import apply_optimizer_overrides, config_changes, current_lr
from noa_dist.schedule import build_scheduler
from noa_dist.stop import LAUNCHER_EXITED, StopRequest, describe

BASE = ["--dataset", "/data/x"]


def test_a_negative_number_reaches_validation_which_names_the_flag():
    with pytest.raises(ConfigError, match=r"--lr: must be > 0, got -0.001"):
        load_config([*BASE, "--lr", "-1e-3"])
    assert load_config([*BASE, "--seed", "-3"]).train.seed == -3


def test_abbreviated_flags_are_refused_in_one_line(capsys):
    with pytest.raises(SystemExit) as exit_info:
        load_config([*BASE, "--tim", "4"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err == "error: unrecognized arguments: --tim 4 (see noa_dist/train.py --help)\n"


def test_int_fields_take_the_integral_floats_sweep_agents_render():
    cfg = load_config([*BASE, "--batch_size=32.0", "--bptt-window", "8.0", "--timesteps", "16"])
    assert (cfg.data.batch_size, cfg.train.bptt_window) == (32, 8)
    with pytest.raises(ConfigError, match=r"--batch-size: expected int, got '3.5'"):
        load_config([*BASE, "--batch-size", "3.5"])


def test_nan_injection_specs_target_rank_step_micro_step_window_and_term():
    assert parse_nan_injections("1:3") == [NanInjection(1, 3, "loss")]
    assert parse_nan_injections("0:5:grad:micro=2:window=1,1:5:traj") == [
        NanInjection(0, 5, "grad", micro=2, window=1),
        NanInjection(1, 5, "traj"),
    ]
    for bad in ("1", "x:3", "1:0", "1:3:micro=0", "1:3:speed=2"):
        with pytest.raises(ValueError, match="--debug-inject-nan: expected RANK:STEP"):
            parse_nan_injections(bad)
    with pytest.raises(ConfigError, match="--debug-inject-nan"):
        load_config([*BASE, "--debug-inject-nan", "1:3:micro=x"])


def _saved(**changes):
    return load_config(
        [*BASE, *[t for k, v in changes.items() for t in (f"--{k}", str(v))]]
    ).to_dict()


def test_resume_applies_a_new_lr_refuses_a_new_schedule_or_model_and_lists_the_rest():
    saved = _saved(lr=3e-4, epochs=10)
    now = load_config(
        [
            *BASE,
            "--lr",
            "1e-4",
            "--epochs",
            "20",
            "--base-channels",
            "16",
            "--bptt-window",
            "4",
            "--timesteps",
            "16",
            "--stop-at-step",
            "9",
        ]
    )
    changes = config_changes(saved, now, deepspeed=False)
    assert changes["applied"] == {"lr": (3e-4, 1e-4)}
    assert changes["changed"] == {"bptt_window": (None, 4)}  # the fix noa-diagnose recommends
    assert any(line.startswith("--epochs: checkpoint 10, now 20") for line in changes["refused"])
    assert any(
        "--base-channels" in line and "changes the model" in line for line in changes["refused"]
    )
    assert not any("stop-at-step" in line for line in changes["refused"])
    bf16 = load_config([*BASE, "--mixed-precision", "bf16"])
    assert config_changes(saved, bf16, deepspeed=False)["refused"] == []
    assert "--mixed-precision" in config_changes(saved, bf16, deepspeed=True)["refused"][0]


def test_a_new_peak_lr_keeps_the_schedule_position():
    model = torch.nn.Linear(2, 2)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.01)
    scheduler = build_scheduler(optimizer, warmup_steps=10, total_steps=100, schedule="cosine")
    for _ in range(5):
        optimizer.step()
        scheduler.step()
    factor = current_lr(scheduler) / 1e-3
    apply_optimizer_overrides(scheduler, lr=1e-4, weight_decay=0.05)
    assert current_lr(scheduler) == pytest.approx(1e-4 * factor)
    assert optimizer.param_groups[0]["lr"] == pytest.approx(1e-4 * factor)
    assert optimizer.param_groups[0]["weight_decay"] == 0.05
    optimizer.step()
    scheduler.step()
    assert current_lr(scheduler) == pytest.approx(1e-4 * (0.1 + 0.9 * 6 / 10))


def test_stop_signals_become_one_agreed_code_and_the_first_one_wins():
    stop = StopRequest()
    previous = {sig: signal.getsignal(sig) for sig in (signal.SIGUSR1, signal.SIGTERM)}
    try:
        stop.install((signal.SIGUSR1, signal.SIGTERM))
        os.kill(os.getpid(), signal.SIGUSR1)
        os.kill(os.getpid(), signal.SIGTERM)
        assert stop.code == signal.SIGUSR1 and stop.reason == "SIGUSR1"
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    assert describe(LAUNCHER_EXITED) == "launcher exited" and describe(15) == "SIGTERM"


def test_a_second_ctrl_c_exits_at_once_without_a_traceback():
    script = textwrap.dedent(
        """
        import os, signal, time
        from noa_dist.stop import StopRequest
        stop = StopRequest(); stop.install()
        os.kill(os.getpid(), signal.SIGINT)
        assert stop.reason == "SIGINT"
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(5)
        """
    )
    res = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert res.returncode == 130
    assert "Traceback" not in res.stderr and "Second Ctrl-C: exiting without saving" in res.stderr
