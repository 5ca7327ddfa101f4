"""The Accelerate/DeepSpeed launch configs in launch/: accelerate's own loaders accept them, and
`accelerate launch --config_file` with them really starts DDP / DeepSpeed on 2 CPU ranks."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import yaml
from accelerate.commands.config.config_args import load_config_from_file
from accelerate.commands.launch import _validate_launch_command, launch_command_parser
from accelerate.utils import DistributedType
from accelerate.utils.launch import prepare_deepspeed_cmd_env, prepare_multi_gpu_env

REPO = Path(__file__).resolve().parents[1]
LAUNCH = REPO / "launch"
EXPECTED_TYPE = {
    "single.yaml": DistributedType.NO,
    "ddp.yaml": DistributedType.MULTI_GPU,
    "multinode.yaml": DistributedType.MULTI_GPU,
    "zero1.yaml": DistributedType.DEEPSPEED,
    "zero2.yaml": DistributedType.DEEPSPEED,
    "zero3.yaml": DistributedType.DEEPSPEED,
    "zero2_offload.yaml": DistributedType.DEEPSPEED,
}
ZERO_STAGE = {"zero1.yaml": 1, "zero2.yaml": 2, "zero3.yaml": 3, "zero2_offload.yaml": 2}


def validated_launch_args(config: Path, *flags: str):
    """What `accelerate launch --config_file config [flags] script.py` resolves, as launch_command does."""
    args = launch_command_parser().parse_args(["--config_file", str(config), *flags, "script.py"])
    args, defaults, mp_from_config = _validate_launch_command(args)
    fields = list(defaults.deepspeed_config) + (["mixed_precision"] if mp_from_config else [])
    args.deepspeed_fields_from_accelerate_config = ",".join(fields)
    return args


def deepspeed_plugin_for(config: Path, monkeypatch: pytest.MonkeyPatch, cwd: Path):
    """The DeepSpeedPlugin a launched process builds from the environment accelerate gives it,
    launched from `cwd`."""
    from accelerate.utils import DeepSpeedPlugin

    monkeypatch.chdir(cwd)
    _, env = prepare_deepspeed_cmd_env(validated_launch_args(config, "--main_process_port", "0"))
    for key, value in env.items():
        if key.startswith("ACCELERATE_"):
            monkeypatch.setenv(key, value)
    return DeepSpeedPlugin()


def test_launch_folder_holds_every_documented_config():
    names = {p.name for p in LAUNCH.iterdir()}
    assert set(EXPECTED_TYPE) <= names
    assert "README.md" in names
    assert not list(LAUNCH.glob("*.json")), "DeepSpeed settings live inline in the YAMLs"


@pytest.mark.parametrize("name", sorted(EXPECTED_TYPE))
def test_accelerate_loads_each_yaml_with_the_intended_distributed_type(name):
    assert isinstance(yaml.safe_load((LAUNCH / name).read_text()), dict)
    config = load_config_from_file(str(LAUNCH / name))
    assert config.distributed_type == EXPECTED_TYPE[name]
    assert config.mixed_precision is None, "precision is the trainer's --mixed-precision flag"


@pytest.mark.parametrize("name", sorted(ZERO_STAGE))
def test_accelerate_builds_the_deepspeed_plugin_from_each_config_in_any_folder(
    name, monkeypatch, tmp_path
):
    plugin = deepspeed_plugin_for(LAUNCH / name, monkeypatch, cwd=tmp_path)
    assert plugin.zero_stage == ZERO_STAGE[name]
    assert plugin.offload_optimizer_device == ("cpu" if "offload" in name else "none")
    assert plugin.deepspeed_config["gradient_clipping"] == "auto"  # filled from --max-grad-norm


def test_a_relative_deepspeed_config_file_that_is_not_there_is_one_clear_error(
    tmp_path, monkeypatch
):
    from noa_dist import distributed
    from noa_dist.errors import ConfigError

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("ACCELERATE_DEEPSPEED_CONFIG_FILE", "launch/ds_zero2.json")
    with pytest.raises(ConfigError, match=r"'launch/ds_zero2.json' .* does not exist \(relative"):
        distributed.check_deepspeed_config_file()


def test_multinode_template_takes_slurm_values_from_the_command_line():
    slurm_filled = "--num_machines=3 --num_processes=12 --machine_rank=2 --main_process_ip=10.1.2.3"
    flags = f"{slurm_filled} --main_process_port=29555 --rdzv_backend=c10d".split()
    args = validated_launch_args(LAUNCH / "multinode.yaml", *flags)
    prepare_multi_gpu_env(args)
    assert (args.nnodes, args.nproc_per_node, args.node_rank) == ("3", "4", 2)
    assert args.rdzv_backend == "c10d" and args.rdzv_endpoint == "10.1.2.3:29555"


def test_rdzv_backend_in_a_config_file_is_ignored_so_the_command_line_must_pass_it():
    """Pins accelerate 1.15's behaviour that multinode.yaml and the README document."""
    assert load_config_from_file(str(LAUNCH / "multinode.yaml")).rdzv_backend == "c10d"
    assert validated_launch_args(LAUNCH / "multinode.yaml").rdzv_backend == "static"


# ------------------------------------------------------------------ real 2-process launches
SMOKE_SCRIPT = textwrap.dedent(
    """
    import json, os, torch
    from noa_dist import distributed

    acc = distributed.build_accelerator(gradient_accumulation_steps=1, mixed_precision="no", log_with=None)
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 2)
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.1)
    distributed.configure_deepspeed(acc, micro_batch_size=2, gradient_clipping=1.0)
    model, optimizer = acc.prepare(model, optimizer)
    torch.manual_seed(acc.process_index)  # different data per rank
    acc.backward(model(torch.randn(2, 4)).square().mean())
    optimizer.step()
    optimizer.zero_grad()
    weights = [round(v, 6) for v in acc.unwrap_model(model).weight.detach().flatten().tolist()]
    stage = model.zero_optimization_stage() if hasattr(model, "zero_optimization_stage") else None
    clip = model.gradient_clipping() if hasattr(model, "gradient_clipping") else None
    bucket = model.zero_reduce_bucket_size() if hasattr(model, "zero_reduce_bucket_size") else None
    offload = model.zero_cpu_offload() if hasattr(model, "zero_cpu_offload") else None
    result = {"rank": acc.process_index, "world": acc.num_processes, "wrapper": type(model).__name__,
              "stage": stage, "clip": clip, "offload": offload, "weights": weights, "bucket": bucket}
    # one file per rank: lines printed by two ranks at once can interleave
    with open(os.path.join(os.environ["SMOKE_OUT"], f"rank{acc.process_index}.json"), "w") as f:
        json.dump(result, f)
    """
)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def smoke_launch(config: str, tmp_path: Path, timeout: float = 240) -> list[dict]:
    script = tmp_path / "smoke.py"
    script.write_text(SMOKE_SCRIPT)
    launcher = [sys.executable, "-m", "accelerate.commands.launch"]
    cmd = [
        *launcher,
        f"--config_file={LAUNCH / config}",  # from another folder, as users launch
        f"--main_process_port={free_port()}",
        str(script),
    ]
    env = dict(
        os.environ,
        OMP_NUM_THREADS="1",
        PYTHONUNBUFFERED="1",
        SMOKE_OUT=str(tmp_path),
        PYTHONPATH=str(REPO),
    )
    env.pop("WORLD_SIZE", None)
    proc = subprocess.Popen(
        cmd,
        cwd=tmp_path,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    try:
        output, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        output, _ = proc.communicate()
        raise AssertionError(f"launch timed out after {timeout}s:\n{output[-3000:]}") from None
    assert proc.returncode == 0, output[-4000:]
    results = [json.loads(p.read_text()) for p in sorted(tmp_path.glob("rank*.json"))]
    return sorted(results, key=lambda r: r["rank"])


@pytest.mark.slow
@pytest.mark.dist
@pytest.mark.timeout(300)
def test_ddp_yaml_starts_two_ranks_with_a_ddp_wrapped_model(tmp_path):
    ranks = smoke_launch("ddp.yaml", tmp_path)
    assert [r["rank"] for r in ranks] == [0, 1]
    assert all(r["world"] == 2 and r["wrapper"] == "DistributedDataParallel" for r in ranks)
    assert ranks[0]["weights"] == ranks[1]["weights"], (
        "different data, same update: gradients were averaged"
    )


@pytest.mark.slow
@pytest.mark.dist
@pytest.mark.deepspeed
@pytest.mark.timeout(300)
@pytest.mark.parametrize("config", sorted(ZERO_STAGE))
def test_every_zero_yaml_starts_two_ranks_from_another_folder_with_the_trainers_settings(
    tmp_path, config
):
    """The offload config runs the client's torch AdamW on the CPU partition
    (zero_force_ds_cpu_optimizer false): no CPU-Adam op has to be compiled."""
    ranks = smoke_launch(config, tmp_path)
    assert [r["rank"] for r in ranks] == [0, 1]
    assert all(r["world"] == 2 and r["wrapper"] == "DeepSpeedEngine" for r in ranks)
    assert all(r["stage"] == ZERO_STAGE[config] for r in ranks)
    assert all(r["offload"] is ("offload" in config) for r in ranks)
    assert all(r["clip"] == 1.0 for r in ranks), "clipping must be filled by the trainer"
    assert all(r["bucket"] == 5_000_000 for r in ranks), "DeepSpeed's 5e8 default is 2 GB"
    assert ranks[0]["weights"] == ranks[1]["weights"]


@pytest.mark.slow
@pytest.mark.dist
@pytest.mark.deepspeed
@pytest.mark.timeout(600)
def test_the_trainer_runs_under_zero3_yaml_from_another_folder_and_exports_best(
    tmp_path, tiny_dataset
):
    """The YAML sets no 16-bit gather: the trainer must, or the first best/ export crashes."""
    from trainrun import env_for_test, train_flags

    cmd = [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        f"--config_file={LAUNCH / 'zero3.yaml'}",
        f"--main_process_port={free_port()}",
        str(REPO / "noa_dist" / "train.py"),
        *train_flags(tiny_dataset, tmp_path / "runs", "--epochs", "1"),
    ]
    res = subprocess.run(
        cmd, cwd=tmp_path, env=env_for_test(tmp_path), capture_output=True, text=True, timeout=540
    )
    assert res.returncode == 0, (res.stdout + res.stderr)[-4000:]
    assert "Training finished: 6 steps" in res.stdout
    assert (tmp_path / "runs" / "run" / "best" / "model.safetensors").is_file()
