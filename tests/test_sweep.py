"""noa-sweep: the sweep YAML checked and expanded offline, rendered exactly like `wandb agent`
(against wandb's own code), the agent's argv parsed by the trainer, one row run for real."""

from __future__ import annotations

import json
import math
import subprocess
import sys
import types
from pathlib import Path

import pytest
import yaml
from trainrun import REPO, TINY_MODEL, env_for_test, free_port

from noa_dist import run_status, tracking, train
from noa_dist.config import load_config
from noa_dist.errors import ConfigError
from noa_dist.sweep import cli, expand, launch, summary
from noa_dist.sweep.render import arg_macros, render_args, render_command
from noa_dist.sweep.spec import load_sweep

SHIPPED = REPO / "configs" / "sweeps" / "lambda_latent.yaml"


def write_sweep(tmp_path: Path, **sweep) -> Path:
    body = {"method": "grid", "metric": {"name": "val/vrmse", "goal": "minimize"}, **sweep}
    body.setdefault("program", "noa_dist/train.py")
    body.setdefault("command", ["${env}", "${interpreter}", "${program}", "${args}"])
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump(body, sort_keys=False))
    return path


# ----------------------------------------------------------------- the shipped config
def test_the_shipped_sweep_lists_rows_the_trainer_accepts(capsys, monkeypatch):
    sweep = load_sweep(SHIPPED)
    assert sweep.metric == {"name": "val/vrmse", "goal": "minimize"}
    assert sweep.params["lambda_latent"].kind == "log_uniform_values"
    monkeypatch.setenv("NOA_DATASET", "/data/well")
    monkeypatch.setenv("NOA_VQVAE", "/tok")
    assert cli.main([str(SHIPPED), "--list", "--count", "5"]) == 0
    rows = capsys.readouterr().out.strip().splitlines()
    assert [line.split("\t")[0] for line in rows] == ["0", "1", "2", "3", "4"]
    assert all(line.split("\t")[1].startswith("--enable_latent_loss=True ") for line in rows)
    assert cli.main([str(SHIPPED), "--list", "--count", "5", "--command"]) == 0
    for line in capsys.readouterr().out.strip().splitlines():
        argv = line.split("\t")[1].split()
        cfg = load_config(argv[argv.index(sweep.program) + 1 :])
        assert 0.01 <= cfg.align.lambda_latent <= 1.0
        assert cfg.align.enable_latent_loss is True and cfg.align.vqvae_path == "/tok"


def test_the_trainer_logs_the_metric_the_shipped_sweep_optimises():
    """The sweep's metric must be a key the trainer really logs (trainer._log_validation)."""
    source = (REPO / "noa_dist" / "trainer.py").read_text()
    assert f'"{load_sweep(SHIPPED).metric["name"]}": val.vrmse' in source


# ----------------------------------------------------------------- expansion
def test_grid_rows_follow_wandbs_order_with_inclusive_int_and_q_bounds(tmp_path):
    sweep = load_sweep(
        write_sweep(
            tmp_path,
            parameters={
                "lambda_latent": {"values": [0.1, 1.0]},
                "batch_size": {"distribution": "q_uniform", "min": 16, "max": 48, "q": 16},
                "epochs": {"distribution": "int_uniform", "min": 1, "max": 2},
                "seed": {"value": 7},
            },
        )
    )
    rows = expand.rows(sweep)
    assert len(rows) == 2 * 3 * 2
    assert list(rows[0]) == ["batch_size", "epochs", "lambda_latent", "seed"]  # sorted names
    assert rows[0] == {"batch_size": 16, "epochs": 1, "lambda_latent": 0.1, "seed": 7}
    assert rows[1]["lambda_latent"] == 1.0  # the last name varies fastest
    assert {r["batch_size"] for r in rows} == {16, 32, 48}  # max included
    assert {r["epochs"] for r in rows} == {1, 2}
    with pytest.raises(ConfigError, match="grid of 12 rows"):
        expand.row(sweep, 12)


def test_q_uniform_includes_max_and_a_float_q_gives_integral_floats():
    assert expand.q_values(0.0, 1.0, 0.25) == [0.0, 0.25, 0.5, 0.75, 1.0]
    assert expand.q_values(0.1, 0.3, 0.1) == [0.1, 0.2, 0.3]  # not 0.30000000000000004
    floats = expand.q_values(16, 64, 16.0)
    assert floats == [16.0, 32.0, 48.0, 64.0] and all(isinstance(v, float) for v in floats)
    assert render_args({"batch_size": floats[1]}) == ["--batch_size=32.0"]


def test_random_rows_are_seeded_in_range_and_independent_of_the_count(tmp_path):
    sweep = load_sweep(
        write_sweep(
            tmp_path,
            method="random",
            parameters={
                "lambda_latent": {"distribution": "log_uniform_values", "min": 0.01, "max": 1.0},
                "lr": {"distribution": "uniform", "min": 1.0e-4, "max": 1.0e-3},
                "batch_size": {"distribution": "q_uniform", "min": 2, "max": 8, "q": 2},
                "epochs": {"distribution": "int_uniform", "min": 1, "max": 3},
            },
        )
    )
    first = expand.rows(sweep, count=200, seed=1)
    assert first == expand.rows(sweep, count=200, seed=1)
    assert first[:5] == expand.rows(sweep, count=5, seed=1)
    assert expand.row(sweep, 17, seed=1) == first[17]  # what --run-index 17 runs
    assert first != expand.rows(sweep, count=200, seed=2)
    lam = [r["lambda_latent"] for r in first]
    assert all(0.01 <= v <= 1.0 for v in lam)
    assert sum(v < 0.1 for v in lam) > 60  # log-uniform: half the draws below 0.1
    assert {r["batch_size"] for r in first} == {2, 4, 6, 8}  # max included
    assert {r["epochs"] for r in first} == {1, 2, 3}
    assert all(1e-4 <= r["lr"] <= 1e-3 for r in first)


def test_adding_a_parameter_does_not_change_the_others_draws(tmp_path):
    lam = {"distribution": "log_uniform_values", "min": 0.01, "max": 1.0}
    one = load_sweep(write_sweep(tmp_path, method="random", parameters={"lambda_latent": lam}))
    two = load_sweep(
        write_sweep(
            tmp_path, method="random", parameters={"lambda_latent": lam, "seed": {"value": 3}}
        )
    )
    assert [r["lambda_latent"] for r in expand.rows(one, 5)] == [
        r["lambda_latent"] for r in expand.rows(two, 5)
    ]


# ----------------------------------------------------------------- YAML errors
@pytest.mark.parametrize(
    ("sweep", "message"),
    [
        (
            {"parameters": {"lambda_latnet": {"values": [1]}}},
            r"parameters\.lambda_latnet: not a trainer flag \(did you mean lambda_latent\?\)",
        ),
        (
            {
                "parameters": {
                    "lambda_latent": {
                        "distribution": "log_uniform_values",
                        "min": "1e-2",
                        "max": 1.0,
                    }
                }
            },
            r"parameters\.lambda_latent\.min: '1e-2' is text to YAML",
        ),
        (
            {
                "parameters": {
                    "lambda_latent": {"distribution": "log_uniform_values", "min": 0.01, "max": 1.0}
                }
            },
            r"parameters\.lambda_latent: method grid needs values, int_uniform or q_uniform",
        ),
        (
            {
                "method": "random",
                "parameters": {
                    "lambda_latent": {"distribution": "log_uniform_values", "min": 0.0, "max": 1.0}
                },
            },
            r"parameters\.lambda_latent\.min: log_uniform_values needs min > 0",
        ),
        (
            {"parameters": {"epochs": {"distribution": "int_uniform", "min": 3, "max": 3}}},
            r"parameters\.epochs: min must be < max",
        ),
        (
            {"parameters": {"lr": {"distribution": "normal"}}},
            r"parameters\.lr\.distribution: expected one of",
        ),
        (
            {"method": "hyperband", "parameters": {"lr": {"value": 1}}},
            r"method: expected one of grid, random, bayes",
        ),
        (
            {"method": "bayes", "metric": None, "parameters": {"lr": {"value": 1}}},
            r"metric: bayes needs a metric",
        ),
        (
            {"command": ["python", "train.py"], "parameters": {"lr": {"value": 1}}},
            r"command: has no \$\{args\}",
        ),
        (
            {"program": None, "parameters": {"lr": {"value": 1}}},
            r"program: the command uses \$\{program\}",
        ),
    ],
)
def test_sweep_yaml_errors_name_the_file_and_key(tmp_path, sweep, message):
    path = write_sweep(tmp_path, **sweep)
    if sweep.get("metric", 1) is None:
        raw = yaml.safe_load(path.read_text())
        del raw["metric"]
        path.write_text(yaml.safe_dump(raw))
    if "program" in sweep and sweep["program"] is None:
        raw = yaml.safe_load(path.read_text())
        del raw["program"]
        path.write_text(yaml.safe_dump(raw))
    with pytest.raises(ConfigError, match=message) as err:
        load_sweep(path)
    assert str(path) in str(err.value)


def test_every_problem_is_reported_at_once(tmp_path):
    path = write_sweep(
        tmp_path, method="nope", parameters={"foo": {"value": 1}, "lr": {"distribution": "x"}}
    )
    with pytest.raises(ConfigError) as err:
        load_sweep(path)
    assert all(s in str(err.value) for s in ("method:", "parameters.foo", "parameters.lr"))


def test_cli_prints_one_line_errors(tmp_path, capsys):
    assert cli.main([str(tmp_path / "missing.yaml"), "--list"]) == 2
    assert (
        capsys.readouterr().err.strip() == f"error: {tmp_path / 'missing.yaml'}: no such sweep file"
    )


def test_list_rejects_a_row_the_trainer_would_refuse(tmp_path, capsys):
    path = write_sweep(
        tmp_path,
        parameters={"lambda_latent": {"values": [0.1]}, "enable_latent_loss": {"value": True}},
    )
    assert cli.main([str(path), "--list"]) == 2
    assert "row 0 (--enable_latent_loss=True --lambda_latent=0.1)" in capsys.readouterr().err


# ----------------------------------------------------------------- rendering = wandb's
SAMPLE = {
    "batch_size": 32.0,
    "dataset": "/data/well root",
    "enable_latent_loss": True,
    "lambda_latent": 0.012345678901234568,
    "latent_sample_steps": -1,
    "n_samples": None,
    "resume": False,
}


def test_arg_macros_match_wandbs_create_sweep_command_args():
    from wandb.sdk.launch.sweeps.utils import create_sweep_command_args

    theirs = create_sweep_command_args({"args": {k: {"value": v} for k, v in SAMPLE.items()}})
    ours = arg_macros(SAMPLE)
    for name, value in ours.items():
        assert value == theirs[name], name


def test_envvar_macros_match_wandbs_create_sweep_command(monkeypatch):
    from wandb.sdk.launch.sweeps.utils import create_sweep_command

    monkeypatch.setenv("NOA_DATASET", "/data/x")
    monkeypatch.delenv("NOA_UNSET", raising=False)
    command = ["--dataset=${envvar:NOA_DATASET}", "${envvar:NOA_UNSET}", "${args}"]
    expected = [*create_sweep_command(list(command))[:2], "--lr=0.1"]
    assert render_command(tuple(command), {"lr": 0.1}, program=None) == expected


def agent_argv(monkeypatch, tmp_path, command: list[str], program: str, row: dict) -> list[str]:
    """The argv wandb's own Agent._command_run starts for `row`, its process not started."""
    import wandb.wandb_agent as agent_module

    started = []

    def record(command, env, forward_signals):
        started.append(command)
        return types.SimpleNamespace()  # the agent stores attributes on its process

    monkeypatch.setattr(agent_module, "AgentProcess", record)
    for name in ("WANDB_RUN_ID", "WANDB_SWEEP_PARAM_PATH"):  # the agent sets them in os.environ
        monkeypatch.setenv(name, "restored-after-the-test")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    monkeypatch.setenv("WANDB_SWEEP_ID", "sw33p")
    agent = object.__new__(agent_module.Agent)
    agent._sweep_command, agent._function, agent._in_jupyter = list(command), None, False
    agent._forward_signals, agent._run_processes = False, {}
    agent._command_run(
        {"args": {k: {"value": v} for k, v in row.items()}, "program": program, "run_id": "r1"}
    )
    return started[0]


def test_the_trainer_parses_the_argv_the_wandb_agent_renders(monkeypatch, tmp_path):
    """Acceptance: wandb's agent renders a sample sweep row; our CLI parser reads every swept
    value back, `--batch_size=32.0` included."""
    sweep = load_sweep(
        write_sweep(
            tmp_path,
            command=["${env}", "${interpreter}", "${program}", "--wandb-mode=disabled", "${args}"],
            parameters={
                "batch_size": {"distribution": "q_uniform", "min": 16, "max": 64, "q": 16.0},
                "lambda_latent": {"distribution": "log_uniform_values", "min": 0.01, "max": 1.0},
                "enable_latent_loss": {"value": True},
                "vqvae_path": {"value": "/tok"},
                "latent_sample_steps": {"value": -1},
                "n_samples": {"value": None},
            },
            method="random",
        )
    )
    row = {**expand.row(sweep, 0, seed=3), "batch_size": 32.0}
    argv = agent_argv(monkeypatch, tmp_path, list(sweep.command), sweep.program, row)
    assert argv == render_command(sweep.command, row, program=sweep.program)
    assert argv[:3] == ["/usr/bin/env", "python", "noa_dist/train.py"]
    assert "--batch_size=32.0" in argv
    cfg = load_config(launch.trainer_argv(argv, sweep.program, row))
    assert cfg.data.batch_size == 32 and isinstance(cfg.data.batch_size, int)
    assert cfg.align.lambda_latent == row["lambda_latent"]
    assert cfg.align.enable_latent_loss is True
    assert cfg.align.vqvae_path == "/tok"
    assert cfg.align.latent_sample_steps == -1
    assert cfg.data.n_samples is None
    assert cfg.tracking.wandb_mode == "disabled"


def test_the_shipped_command_renders_like_the_agent(monkeypatch, tmp_path):
    sweep = load_sweep(SHIPPED)
    monkeypatch.setenv("NOA_DATASET", "/data/well")
    monkeypatch.setenv("NOA_VQVAE", "/tok")
    row = expand.row(sweep, 2)
    argv = agent_argv(monkeypatch, tmp_path, list(sweep.command), sweep.program, row)
    assert argv == render_command(sweep.command, row, program=sweep.program)
    assert argv[:5] == ["accelerate", "launch", "--config_file", "launch/ddp.yaml", sweep.program]
    cfg = load_config(launch.trainer_argv(argv, sweep.program, row))
    assert (cfg.data.dataset, cfg.align.vqvae_path, cfg.checkpoint.resume) == (
        "/data/well",
        "/tok",
        "auto",
    )


# ----------------------------------------------------------------- run folders
def test_an_agent_run_gets_a_folder_of_its_own(monkeypatch):
    monkeypatch.delenv("WANDB_SWEEP_ID", raising=False)
    assert tracking.agent_run_name() is None
    monkeypatch.setenv("WANDB_SWEEP_ID", "sw33p")
    monkeypatch.setenv("WANDB_RUN_ID", "abc123")
    assert tracking.agent_run_name() == "sweep-sw33p-abc123"
    monkeypatch.setenv("SLURM_JOB_ID", "77")  # one SLURM job may run several sweep runs
    cfg = load_config(["--dataset", "/data/well", "--output-dir", "out", "--resume", "auto"])
    train._check_flags(cfg)  # --resume auto has a stable folder to look in
    assert train.resolve_run_dir(cfg, accelerator=None) == Path("out/sweep-sw33p-abc123")


def test_a_row_runs_in_its_own_resumable_folder(tmp_path):
    sweep = load_sweep(
        write_sweep(tmp_path, name="lam sweep", parameters={"lr": {"values": [0.1]}})
    )
    args = launch.run_args(sweep, {"lr": 0.1}, 4, tmp_path / "runs")
    assert args == {
        "lr": 0.1,
        "run_name": "lam-sweep-004",
        "output_dir": str(tmp_path / "runs"),
        "resume": "auto",
    }
    with pytest.raises(ConfigError, match=r"parameters\.run_name: noa-sweep names each row"):
        launch.run_args(sweep, {"run_name": "x"}, 0, tmp_path)


def test_run_index_refuses_an_unset_envvar(tmp_path, monkeypatch, capsys):
    monkeypatch.delenv("NOA_DATASET", raising=False)
    path = write_sweep(
        tmp_path,
        command=["${program}", "--dataset=${envvar:NOA_DATASET}", "${args}"],
        parameters={"lr": {"values": [0.1]}},
    )
    assert cli.main([str(path), "--run-index", "0"]) == 2
    assert "uses ${envvar:NOA_DATASET} but NOA_DATASET is not set" in capsys.readouterr().err


def test_run_index_leaves_a_finished_row_alone(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(REPO)
    path = write_sweep(tmp_path, name="s", parameters={"lr": {"values": [0.1]}})
    (tmp_path / "runs" / "s-000").mkdir(parents=True)
    run_status.mark(tmp_path / "runs" / "s-000", run_status.FINISHED, reason="done", step=9)
    assert cli.main([str(path), "--run-index", "0", "--runs-dir", str(tmp_path / "runs")]) == 0
    assert "already finished at step 9; nothing to do" in capsys.readouterr().out


# ----------------------------------------------------------------- summary
def fake_run(
    runs: Path, name: str, lam: float, vrmse: float, *, latent=True, marker=run_status.FINISHED
):
    folder = runs / name
    folder.mkdir(parents=True)
    metrics = {
        "val/vrmse": vrmse,
        "val/loss": 2 * vrmse,
        "val/traj": vrmse,
        "val/vrmse_ratio_step_1": 0.5,
    }
    config = {"align": {"lambda_latent": lam, "enable_latent_loss": latent}}
    run_status.write_val_metrics(folder, metrics, step=12, config=config)
    if marker:
        run_status.mark(folder, marker, reason="done", step=12)


def test_summary_tabulates_by_lambda_latent_and_plots(tmp_path, capsys):
    runs = tmp_path / "runs"
    fake_run(runs, "s-000", 0.3, 0.21)
    fake_run(runs, "s-001", 0.01, 0.25)
    fake_run(runs, "s-002", 1.0, 0.3, marker=run_status.STOPPED)
    fake_run(runs, "base", 0.1, 0.27, latent=False, marker=None)
    (runs / "empty").mkdir()
    assert cli.main([str(SHIPPED), "--summary", str(runs)]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].split()[:3] == ["run", "lambda_latent", "val"]
    names = [line.split()[0] for line in out[2:6]]
    assert names == ["s-001", "base", "s-000", "s-002"]  # sorted by lambda_latent
    assert "0.1 (off)" in out[3] and "running?" in out[3] and "STOPPED" in out[5]
    assert (runs / "lambda_latent.png").stat().st_size > 1000
    assert out[-1] == f"Plot: {runs / 'lambda_latent.png'}"


def test_summary_of_a_folder_without_runs_says_so(tmp_path):
    with pytest.raises(ConfigError, match="no run folder with val_metrics.json"):
        summary.collect(tmp_path)


# ----------------------------------------------------------------- for real
@pytest.mark.slow
@pytest.mark.dist
@pytest.mark.timeout(600)
def test_run_index_trains_a_row_offline_then_resumes_nothing_and_summarises(
    tiny_dataset, tiny_tokenizer, tmp_path
):
    """Row 1 of a 2-row grid under `accelerate launch` with 2 processes, W&B offline: the run
    finishes, W&B holds the swept values flat and the sweep's group, a second start finds it
    finished, and the summary reads it back."""
    from wandb_read import _inspect, find_offline_runs, read_run

    launch_cmd = ["${interpreter}", "-m", "accelerate.commands.launch", "--multi_gpu"]
    launch_cmd += ["--num_processes", "2", "--num_machines", "1", "--main_process_port"]
    launch_cmd += [str(free_port()), "--mixed_precision", "no", "--dynamo_backend", "no"]
    tiny = dict(zip(TINY_MODEL[::2], TINY_MODEL[1::2], strict=True))
    fixed = {
        "dataset": str(tiny_dataset),
        "vqvae_path": str(tiny_tokenizer),
        "enable_latent_loss": True,
        "timesteps": 4,
        "bptt_window": 2,
        "epochs": 1,
        "warmup_steps": 2,
        "lr": 1.0e-3,
        **{flag[2:].replace("-", "_"): int(v) for flag, v in tiny.items()},
    }
    path = write_sweep(
        tmp_path,
        name="tiny-lam",
        program=str(REPO / "noa_dist" / "train.py"),
        command=[*launch_cmd, "${program}", "${args}"],
        parameters={
            "lambda_latent": {"values": [0.05, 0.5]},
            "batch_size": {"values": [2.0]},  # the agent would pass --batch_size=2.0
            **{k: {"value": v} for k, v in fixed.items()},
        },
    )
    env = env_for_test(tmp_path)
    env.pop("WANDB_MODE")  # noa-sweep's default: offline
    sweep_cmd = [sys.executable, "-m", "noa_dist.sweep", str(path)]

    def noa_sweep(*args: str) -> str:
        res = subprocess.run(
            [*sweep_cmd, *args], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=400
        )
        assert res.returncode == 0, res.stdout[-4000:] + res.stderr[-4000:]
        return res.stdout

    out = noa_sweep("--run-index", "1")
    run_dir = tmp_path / "runs" / "sweeps" / "tiny-lam" / "tiny-lam-001"
    assert "row 1: FINISHED (done)" in out
    record = run_status.read_val_metrics(run_dir)
    assert record["config"]["align"]["lambda_latent"] == 0.5
    assert record["config"]["data"]["batch_size"] == 2
    assert math.isfinite(record["metrics"]["val/vrmse"]) and record["metrics"]["val/latent"] > 0

    (segment,) = find_offline_runs(run_dir / "wandb")
    run = read_run(segment)
    assert run.finished and run.config["lambda_latent"] == 0.5  # flat, as under the agent
    assert run.config["align"]["lambda_latent"] == 0.5
    assert run.summary["val/vrmse"] == pytest.approx(record["metrics"]["val/vrmse"])
    records = [json.loads(line) for line in _inspect(run.path).splitlines() if line.strip()]
    (header,) = [r for r in records if r["type"] == "run"]
    assert header["run"]["run_group"] == "tiny-lam"

    assert "already finished" in noa_sweep("--run-index", "1")
    table = noa_sweep("--summary", str(run_dir.parent))
    assert "tiny-lam-001" in table and "0.5" in table and "FINISHED" in table
    assert (run_dir.parent / "tiny-lam.png").is_file()
