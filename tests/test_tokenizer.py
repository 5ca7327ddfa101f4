"""The tokenizer end to end: the real CLI on a tiny dataset, its artifact, load_tokenizer."""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from trainrun import REPO, make_tiny_dataset

from noa_dist import features
from noa_dist.data.dataset import WellWindowDataset
from noa_dist.errors import ConfigError
from noa_dist.features import feature_specs, trajectory_features
from noa_dist.tokenizer import FrozenTokenizer, load_tokenizer
from noa_dist.tokenizer.spec import spec_hash

pytestmark = pytest.mark.timeout(300)
WINDOW = 2
TINY_FLAGS = ["--window", str(WINDOW), "--epochs", "4", "--batch-size", "8", "--codebook-size", "8"]


def run_cli(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(REPO), WANDB_MODE="disabled", OMP_NUM_THREADS="1")
    env.pop("WORLD_SIZE", None)
    proc = subprocess.run(
        [sys.executable, "-m", "noa_dist.tokenizer", *args],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=240,
    )
    if check and proc.returncode != 0:
        raise AssertionError(
            f"noa-train-vqvae failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}"
        )
    return proc


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    return make_tiny_dataset(tmp_path_factory.mktemp("tok") / "data")


@pytest.fixture(scope="module")
def trained(dataset: Path) -> tuple[Path, str]:
    """(artifact folder, console output) of one real CLI run."""
    out = dataset.parent / "tokenizer"
    proc = run_cli(
        "--dataset", str(dataset), "--out", str(out), "--wandb-mode", "disabled", *TINY_FLAGS
    )
    return out, proc.stdout


@pytest.fixture
def artifact(trained, tmp_path: Path) -> Path:
    """A private copy of the artifact (tests may edit it)."""
    return Path(shutil.copytree(trained[0], tmp_path / "tokenizer"))


def true_windows(dataset: Path, split: str = "valid", n: int = 4):
    ds = WellWindowDataset(dataset, split, WINDOW)
    items = [ds[i] for i in range(n)]
    return torch.stack([x["target"] for x in items]), torch.stack([x["u0"] for x in items])


@pytest.mark.slow
def test_cli_writes_a_self_describing_artifact(trained, dataset):
    out, stdout = trained
    assert sorted(p.name for p in out.iterdir()) == [
        "metrics.json",
        "model.safetensors",
        "spec.json",
    ]
    assert not list(out.parent.glob(f".{out.name}.*"))  # no temporary folder left behind
    spec = json.loads((out / "spec.json").read_text())
    specs = feature_specs(1, WINDOW)
    assert spec["features"]["names"] == [s.name for s in specs]
    assert spec["features"]["categories"] == [s.category for s in specs]
    assert spec["window_length"] == WINDOW and spec["dt"] == pytest.approx(0.25)
    assert spec["channel_names"] == ["u"] and spec["grid"] == [16, 16]
    assert spec["model"]["codebook_sizes"] == [8, 8, 8]
    assert spec["model"]["latent_dim"] == 3 * spec["model"]["code_dim"]
    assert spec["spec_hash"] == spec_hash(spec)
    norm = spec["normalization"]
    assert len(norm["mean"]) == len(norm["std"]) == len(specs)
    metrics = json.loads((out / "metrics.json").read_text())
    assert len(metrics["history"]) == 4
    for category in ("temporal", "summary", "initial"):
        final = metrics["final"][category]
        assert final["n"] == 16 and final["codebook_size"] == 8
        assert 0 < final["utilization"] <= 1 and 1 <= final["perplexity"] <= 8
        assert "explained_variance" in final and "recon_mse" in final
        assert f"{category}  " in stdout or f"{category} " in stdout
    assert "codes" in stdout and "used" in stdout and "Tokenizer written to" in stdout


@pytest.mark.slow
def test_normalisation_is_fitted_on_the_train_split_only(trained, dataset):
    spec = json.loads((trained[0] / "spec.json").read_text())
    means = {}
    for split in ("train", "valid"):
        ds = WellWindowDataset(dataset, split, WINDOW)
        items = [ds[i] for i in range(len(ds))]
        vectors = trajectory_features(
            torch.stack([x["target"] for x in items]),
            torch.stack([x["u0"] for x in items]),
            dt=spec["dt"],
        ).vector_BF
        means[split] = vectors.double().mean(0)
    stored = torch.tensor(spec["normalization"]["mean"], dtype=torch.float64)
    assert torch.allclose(stored, means["train"], rtol=1e-5, atol=1e-6)
    assert not torch.allclose(stored, means["valid"], rtol=1e-3, atol=1e-4)


@pytest.mark.slow
def test_artifact_loads_in_a_fresh_process_and_gives_the_same_codes(trained, dataset):
    out = trained[0]
    script = textwrap.dedent(
        f"""
        import json, torch
        from noa_dist.data.dataset import WellWindowDataset
        from noa_dist.tokenizer import load_tokenizer
        tok = load_tokenizer({str(out)!r}, n_channels=1)
        ds = WellWindowDataset({str(dataset)!r}, "valid", {WINDOW})
        items = [ds[i] for i in range(4)]
        z_e = tok.encode_window(torch.stack([x["target"] for x in items]), torch.stack([x["u0"] for x in items]))
        z_q, codes = tok.quantize(z_e)
        print(json.dumps({{"latent_dim": tok.latent_dim, "codebooks": tok.codebook_sizes,
                          "window": tok.window_length, "codes": codes.tolist(), "z_e": z_e.tolist()}}))
        """
    )
    env = dict(os.environ, PYTHONPATH=str(REPO))
    proc = subprocess.run(
        [sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stderr
    fresh = json.loads(proc.stdout.strip().splitlines()[-1])
    tok = load_tokenizer(out, n_channels=1)
    states, u0 = true_windows(dataset)
    z_e = tok.encode_window(states, u0)
    assert fresh["latent_dim"] == tok.latent_dim == z_e.shape[1]
    assert fresh["codebooks"] == [8, 8, 8] and fresh["window"] == WINDOW
    assert fresh["codes"] == tok.quantize(z_e)[1].tolist()
    assert torch.allclose(torch.tensor(fresh["z_e"]), z_e, atol=1e-6)


@pytest.mark.slow
def test_a_renamed_feature_is_refused_with_the_missing_and_extra_names(artifact, monkeypatch):
    renamed = tuple("kurt" if f == "kurtosis" else f for f in features.MOMENT_FEATURES)
    monkeypatch.setattr(features, "MOMENT_FEATURES", renamed)  # the live extractor changed
    with pytest.raises(ConfigError) as err:
        load_tokenizer(artifact, n_channels=1)
    message = str(err.value)
    assert "missing from the extractor (5): temporal.c0.kurtosis.step1" in message
    assert "extra in the extractor (5): temporal.c0.kurt.step1" in message
    assert "initial.c0.kurtosis" in message and "summary.c0.kurt.mean" in message
    assert "--vqvae-feature-policy pad" in message


@pytest.mark.slow
def test_pad_policy_loads_a_mismatched_tokenizer_loudly(artifact, monkeypatch, dataset):
    renamed = tuple("kurt" if f == "kurtosis" else f for f in features.MOMENT_FEATURES)
    monkeypatch.setattr(features, "MOMENT_FEATURES", renamed)
    records: list[logging.LogRecord] = []
    handler = logging.Handler()
    handler.emit = records.append
    logging.getLogger("noa_dist").addHandler(handler)
    try:
        tok = load_tokenizer(artifact, n_channels=1, feature_policy="pad")
    finally:
        logging.getLogger("noa_dist").removeHandler(handler)
    assert any("WARNING: --vqvae-feature-policy pad" in r.getMessage() for r in records)
    states, u0 = true_windows(dataset)
    raw = tok.features(states, u0)
    missing = [i for i, n in enumerate(tok.feature_names) if "kurtosis" in n]
    stored_mean = torch.tensor(tok.spec["normalization"]["mean"])
    assert torch.equal(raw[:, missing], stored_mean[missing].expand(4, -1))
    assert torch.isfinite(tok.encode_window(states, u0)).all()


@pytest.mark.slow
def test_a_tokenizer_for_other_channels_or_an_edited_spec_is_refused(artifact):
    with pytest.raises(ConfigError, match=r"extra in the extractor \(72\): temporal\.c1\.mean"):
        load_tokenizer(artifact, n_channels=2)
    spec = json.loads((artifact / "spec.json").read_text())
    spec["normalization"]["mean"][0] += 1.0
    (artifact / "spec.json").write_text(json.dumps(spec))
    with pytest.raises(ConfigError, match="spec_hash"):
        load_tokenizer(artifact, n_channels=1)


@pytest.mark.slow
def test_gradient_flows_to_the_prediction_but_the_tokenizer_stays_bitwise_frozen(trained, dataset):
    tok = load_tokenizer(trained[0], n_channels=1)
    before = {k: v.clone() for k, v in tok.model.state_dict().items()}
    states, u0 = true_windows(dataset)
    pred = (states + 0.3 * torch.randn_like(states)).requires_grad_(True)
    optimizer = torch.optim.SGD([pred], lr=0.1)
    tok.train()  # a trainer calling train() on everything must not unfreeze it
    assert not tok.training and not tok.model.training
    with torch.autocast("cpu", dtype=torch.bfloat16):
        z_e = tok.encode_window(pred, u0)
        z_q, codes = tok.quantize(z_e)
    assert z_e.dtype == torch.float32 and z_e.requires_grad and not z_q.requires_grad
    assert codes.shape == (4, 3) and codes.dtype == torch.long
    l_commit = (z_e - z_q).square().mean()
    (l_commit + (pred - states).square().mean()).backward()
    optimizer.step()
    assert pred.grad is not None and torch.isfinite(pred.grad).all() and pred.grad.abs().sum() > 0
    assert all(p.grad is None and not p.requires_grad for p in tok.parameters())
    after = tok.model.state_dict()
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)


@pytest.mark.slow
def test_frozen_tokenizer_issues_no_collectives(trained, dataset, monkeypatch):
    def forbidden(*args, **kwargs):
        raise AssertionError("a frozen tokenizer called torch.distributed")

    for name in ("all_reduce", "all_gather", "broadcast", "barrier", "is_initialized"):
        monkeypatch.setattr(torch.distributed, name, forbidden)
    tok = load_tokenizer(trained[0], n_channels=1)
    states, u0 = true_windows(dataset)
    z_e = tok.encode_window(states.requires_grad_(True), u0)
    z_q, _ = tok.quantize(z_e)
    (z_e - z_q).square().mean().backward()
    tok.decode(z_q)


@pytest.mark.slow
def test_a_window_alone_and_in_a_batch_of_four_gets_the_same_latent(trained, dataset):
    tok = load_tokenizer(trained[0], n_channels=1)
    states, u0 = true_windows(dataset)
    z_batch = tok.encode_window(states, u0)
    codes_batch = tok.quantize(z_batch)[1]
    for b in range(4):
        z = tok.encode_window(states[b : b + 1], u0[b : b + 1])
        assert torch.equal(
            tok.features(states[b : b + 1], u0[b : b + 1]), tok.features(states, u0)[b : b + 1]
        )
        assert torch.allclose(z, z_batch[b : b + 1], atol=1e-6)  # matmul blocking: last ulp only
        assert torch.equal(tok.quantize(z)[1], codes_batch[b : b + 1])


@pytest.mark.slow
def test_a_window_of_another_length_is_refused(trained, dataset):
    tok = load_tokenizer(trained[0], n_channels=1)
    states, u0 = true_windows(dataset)
    with pytest.raises(ValueError, match="--window 3"):
        tok.encode_window(torch.cat([states, states[:, :1]], dim=1), u0)


@pytest.mark.slow
@pytest.mark.parametrize("layout", ["compiled_nested", "nested_in_checkpoint", "raw"])
def test_prototype_weight_formats_load_with_their_spec(trained, dataset, tmp_path, layout):
    reference = load_tokenizer(trained[0], n_channels=1)
    state = reference.model.state_dict()
    folder = tmp_path / layout
    folder.mkdir()
    shutil.copy(trained[0] / "spec.json", folder / "spec.json")
    if layout == "compiled_nested":
        payload = {f"_orig_mod.vqvae.{k}": v for k, v in state.items()}
    elif layout == "nested_in_checkpoint":
        weights = {f"vqvae.{k}": v for k, v in state.items()}
        payload = {
            "model_state_dict": {**weights, "projector.weight": torch.zeros(2, 2)},
            "epoch": 3,
        }
    else:
        payload = dict(state)
    torch.save(payload, folder / "vqvae_best.pt")
    states, u0 = true_windows(dataset)
    for path in (folder, folder / "vqvae_best.pt"):
        tok = load_tokenizer(path, n_channels=1)
        assert isinstance(tok, FrozenTokenizer)
        assert torch.equal(tok.encode_window(states, u0), reference.encode_window(states, u0))


@pytest.mark.slow
def test_a_weights_file_without_its_spec_is_refused(trained, tmp_path):
    torch.save(load_tokenizer(trained[0], n_channels=1).model.state_dict(), tmp_path / "vq.pt")
    with pytest.raises(ConfigError, match="no spec.json next to it"):
        load_tokenizer(tmp_path / "vq.pt", n_channels=1)


@pytest.mark.slow
def test_cli_refuses_to_overwrite_without_the_flag_or_to_replace_other_folders(trained, dataset):
    proc = run_cli("--dataset", str(dataset), "--out", str(trained[0]), *TINY_FLAGS, check=False)
    assert proc.returncode == 2 and "pass --overwrite" in proc.stderr
    proc = run_cli("--dataset", str(dataset), "--out", str(dataset), *TINY_FLAGS, check=False)
    assert proc.returncode == 2 and "is not a tokenizer" in proc.stderr
    assert (dataset / "stats.yaml").is_file()


def test_help_says_the_window_is_the_one_the_noa_loss_sees():
    text = " ".join(run_cli("--help").stdout.split())  # argparse wraps at the terminal width
    assert "the window the NOA loss sees, i.e. the trainer's --bptt-window" in text


@pytest.mark.slow
def test_fields_normalised_with_other_stats_are_refused(trained, dataset):
    tok = load_tokenizer(trained[0], n_channels=1)
    norm = WellWindowDataset(dataset, "valid", WINDOW).norm
    tok.check_channel_stats(norm.mean_predicted, norm.std_predicted, where="data")
    with pytest.raises(ConfigError, match="normalised differently"):
        tok.check_channel_stats(norm.mean_predicted, 2 * norm.std_predicted, where="data")


def test_cli_refuses_windows_the_data_cannot_hold_before_training(dataset, tmp_path):
    out = str(tmp_path / "tok")
    proc = run_cli("--dataset", str(dataset), "--out", out, "--window", "20", check=False)
    assert proc.returncode == 2 and "--window is its --timesteps" in proc.stderr
    proc = run_cli(
        "--dataset", str(dataset), "--out", out, *TINY_FLAGS[:2], "--batch-size", "99", check=False
    )
    assert proc.returncode == 2 and "each process holds only 48 training windows" in proc.stderr
    assert not Path(out).exists()
