"""The three-term loss against a frozen tokenizer: per-sample terms independent of the batch and
the process, the tokenizer unchanged by training, L_latent that tells samples apart, and the
2-process runs (DDP, ZeRO-2) with a NaN in L_commit on one rank and a bitwise resume."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest
import torch
from dist_runs import ALIGN_FLAGS, fault_run, same_floats
from trainrun import REPO, assert_same_params, env_for_test

from noa_dist.alignment import _true_latent, build_loss_fn, sampled_bottleneck
from noa_dist.config import load_config
from noa_dist.data.dataset import WellWindowDataset
from noa_dist.models.build import build_model
from noa_dist.rollout import iter_windows
from noa_dist.tokenizer import load_tokenizer

TINY = [
    "--base-channels",
    "8",
    "--encoder-levels",
    "2",
    "--afno-blocks",
    "1",
    "--afno-num-blocks",
    "4",
    "--modes",
    "4",
]


def per_sample_terms(dataset_root, tokenizer_path, indices: list[int]) -> dict[str, list[float]]:
    """Each sample's L_commit and L_latent, computed for all `indices` in ONE batch (the terms
    are means over the batch of these per-sample values)."""
    cfg = load_config(
        [
            "--dataset",
            str(dataset_root),
            "--timesteps",
            "4",
            "--bptt-window",
            "2",
            "--vqvae-path",
            str(tokenizer_path),
            *ALIGN_FLAGS,
            *TINY,
        ]
    )
    data = WellWindowDataset(dataset_root, "train", 4)
    tok = load_tokenizer(tokenizer_path, n_channels=data.n_channels)
    torch.manual_seed(0)
    model = build_model(
        cfg.model,
        in_channels=data.n_channels,
        cond_channels=data.n_cond_channels,
        latent_dim=tok.latent_dim,
    )
    with torch.no_grad():
        model.head.weight.normal_(0, 0.05)  # a model that has left persistence
    items = [data[i] for i in indices]
    batch = {
        k: torch.stack([torch.as_tensor(it[k]) for it in items]) for k in ("u0", "target", "cond")
    }
    cond = batch["cond"] if batch["cond"].shape[1] else None
    with torch.no_grad():
        window = next(iter_windows(lambda u: model(u, cond), batch["u0"], 4, 2, "all-windows"))
        z_e = tok.encode_window(window.pred_BTCHW, window.input_BCHW)
        z_q, _ = tok.quantize(z_e)
        dims = tok.commit_mask
        projected = model.projector(sampled_bottleneck(window, cfg.align.latent_sample_steps))
        target = _true_latent(tok, window, batch)
        # the loss function's batch means are means of exactly these rows
        terms = build_loss_fn(cfg, tok, model.projector)(window, batch)
    commit = ((z_e - z_q)[:, dims] ** 2).mean(dim=1)
    latent = ((projected - target) ** 2).mean(dim=1)
    assert float(terms["commit"]) == pytest.approx(float(commit.mean()), rel=1e-5)
    assert float(terms["latent"]) == pytest.approx(float(latent.mean()), rel=1e-5)
    return {"commit": commit.tolist(), "latent": latent.tolist()}


def test_a_samples_alignment_terms_are_the_same_alone_in_a_batch_and_in_another_process(
    tiny_dataset, tiny_tokenizer
):
    """No batch statistics anywhere (the prototype's features depended on the batch and rank)."""
    alone = per_sample_terms(tiny_dataset, tiny_tokenizer, [5])
    in_batch = per_sample_terms(tiny_dataset, tiny_tokenizer, [2, 5, 9, 11])
    for name in ("commit", "latent"):
        # fp32 noise of batched convolutions only (batch statistics would differ at order 1)
        assert alone[name][0] == pytest.approx(in_batch[name][1], rel=1e-4)
    script = textwrap.dedent(f"""
        import sys; sys.path.insert(0, {str(REPO / "tests")!r})
        from test_alignment import per_sample_terms
        print(per_sample_terms({str(tiny_dataset)!r}, {str(tiny_tokenizer)!r}, [7, 5])["latent"][1])
    """)
    res = subprocess.run(
        [sys.executable, "-c", script],
        cwd=REPO,
        env=env_for_test(tiny_dataset),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert res.returncode == 0, res.stderr[-3000:]
    assert float(res.stdout.split()[-1]) == pytest.approx(alone["latent"][0], rel=1e-4)


def test_l_latent_varies_across_samples(tiny_dataset, tiny_tokenizer):
    """The prototype's L_latent was ~constant (batch-normalised features): ours tells samples apart."""
    terms = per_sample_terms(tiny_dataset, tiny_tokenizer, list(range(12)))
    latent = torch.tensor(terms["latent"])
    print(f"L_latent over 12 samples: mean {latent.mean():.4f} std {latent.std():.4f}")
    assert latent.std() > 0.05 * latent.mean()


@pytest.fixture(scope="module")
def aligned(tiny_dataset, tiny_tokenizer, tmp_path_factory):
    """DDP and ZeRO-2 fault matrices with all three losses (+ a NaN in L_commit on rank 1 at
    step 3), and a DDP stop at step 5 + resume."""
    extra = ["--vqvae-path", str(tiny_tokenizer), *ALIGN_FLAGS]
    commit_nan = ["--debug-inject-nan", "1:3:commit"]
    out = tmp_path_factory.mktemp("aligned")
    first = fault_run(
        tiny_dataset, out / "pair", None, extra=[*extra, "--run-name", "p", "--stop-at-step", "5"]
    )
    return {
        "ddp": fault_run(tiny_dataset, out / "ddp", None, extra=extra),
        "commit_nan": fault_run(tiny_dataset, out / "commit", None, extra=[*extra, *commit_nan]),
        "zero2": fault_run(tiny_dataset, out / "zero2", 2, extra=extra),
        "first": first,
        "resumed": fault_run(
            tiny_dataset, out / "pair", None, extra=[*extra, "--run-name", "p", "--resume", "auto"]
        ),
    }


@pytest.mark.dist
@pytest.mark.slow
@pytest.mark.timeout(1800)
def test_ddp_and_zero2_train_with_all_three_losses_and_skip_together(aligned, tiny_tokenizer):
    ddp, zero2 = aligned["ddp"], aligned["zero2"]
    for run in (ddp, zero2):
        history = run.ranks[0]["state"]["history"]
        assert history["train_commit"] and history["train_latent"] and history["val_latent"]
        assert history["skipped"] == [2, 4, 6, 8]  # the fault matrix still skips exactly
        assert "Tokens: utilization" in run.stdout
    assert_same_params(ddp.ranks[0]["params"], ddp.ranks[1]["params"])
    assert any(k.startswith("projector.") for k in ddp.ranks[0]["params"])
    diff = max(
        (ddp.ranks[0]["params"][k] - zero2.ranks[0]["params"][k]).abs().max().item()
        for k in ddp.ranks[0]["params"]
    )
    print(f"DDP vs ZeRO-2 with three losses: max abs parameter difference {diff:.3e}")
    assert diff < 1e-3  # L_commit's nearest codes amplify DDP-vs-ZeRO rounding (measured 8e-5)
    nan = aligned["commit_nan"]
    assert nan.ranks[0]["state"]["history"]["skipped"] == [3]  # its flag replaces the matrix
    assert (
        "step 3, skipping update on all ranks: non-finite loss on rank 1 micro-step 1, window 1 of 2: commit=nan"
        in nan.stdout
    )
    # the frozen tokenizer is bitwise what it was before all that training
    from noa_dist.checkpoint import load_safetensors

    before = load_safetensors(tiny_tokenizer / "model.safetensors")
    again = load_tokenizer(tiny_tokenizer, n_channels=1).model.state_dict()
    assert all(torch.equal(before[k], again[k]) for k in before)


@pytest.mark.dist
@pytest.mark.slow
@pytest.mark.timeout(1800)
def test_stop_and_resume_with_alignment_is_bitwise_identical_projector_included(aligned):
    resumed, straight = aligned["resumed"].ranks[0], aligned["ddp"].ranks[0]
    assert aligned["first"].ranks[0]["stopped_by"] == "stop-at-step"
    assert_same_params(straight["params"], resumed["params"])
    for key in ("train_loss", "train_commit", "train_latent", "val_latent"):
        assert same_floats(resumed["state"]["history"][key], straight["state"]["history"][key]), key
