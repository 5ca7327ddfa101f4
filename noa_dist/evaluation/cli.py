"""`noa-eval` command line: arguments, the sharded rollout, the report, outputs, exit codes.

Exit code 0: the evaluation was made; 2: bad input (one `error: ...` line). Every rank rolls
out its shard of trajectories (padded to equal batches); the sums meet in one all-reduce and
the per-trajectory rows in one gather; rank 0 alone prints and writes files.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from torch.utils.data import DataLoader

from noa_dist import distributed
from noa_dist.atomic import atomic_write_text, describe_error
from noa_dist.data.sampler import ShardedEvalSampler
from noa_dist.errors import NoaError, OneLineErrorParser
from noa_dist.evaluation import plot, summary
from noa_dist.evaluation.inputs import Inputs, load_inputs
from noa_dist.evaluation.measure import METHODS, METRICS, Sums, measure, reduce
from noa_dist.evaluation.render import markdown, to_json
from noa_dist.metrics import rollout_time_windows, spectral_bin_edges


def build_parser() -> argparse.ArgumentParser:
    p = OneLineErrorParser(
        prog="noa-eval",
        description="Autoregressive rollout of a NOA checkpoint from each trajectory's first "
        "state, without teacher forcing: VRMSE, relative L2 and binned spectral errors per "
        "field and step on denormalised fields, beside persistence, linear extrapolation and "
        "the spatial mean; per demo family with its physics checks.",
    )
    p.add_argument("checkpoint", help="step-XXXXXXXX folder (DDP or ZeRO), best/ folder or .pt")
    p.add_argument("--dataset", help="Well-format dataset root (default: the checkpoint's)")
    p.add_argument("--split", default="test", help="split to evaluate (default test)")
    p.add_argument("--horizon", type=int, help="rollout steps (default: all stored ones)")
    p.add_argument(
        "--batch-size", type=int, help="trajectories per forward per process (default: ckpt's)"
    )
    p.add_argument("--out", metavar="DIR", help="write eval.json, eval.md and the figures here")
    p.add_argument(
        "--frames", type=int, default=3, help="trajectories drawn as frame figures (default 3)"
    )
    return p


def evaluate(accelerator, inputs: Inputs, n_frames: int) -> Sums:
    """This rank's shard measured, then reduced over all ranks (every rank)."""
    sampler = ShardedEvalSampler(
        len(inputs.dataset), num_replicas=accelerator.num_processes, rank=accelerator.process_index
    )
    loader = DataLoader(inputs.dataset, sampler=sampler, batch_size=inputs.batch_size)
    norm = inputs.dataset.norm
    device = accelerator.device
    sums = measure(
        inputs.model.to(device),
        loader,
        sampler.n_real,
        inputs.groups,
        (norm.mean_predicted, norm.std_predicted),
        inputs.horizon,
        device,
        n_frames=n_frames if accelerator.is_main_process else 0,
    )
    return reduce(
        sums,
        lambda t: distributed.sum_across_ranks(accelerator, t),
        lambda rows: distributed.gather_reports(accelerator, rows),
    )


def build_report(inputs: Inputs, sums: Sums, world_size: int) -> dict:
    """The report dict (eval.json): settings, then per group its numbers and physics."""
    channels = inputs.dataset.layout.predicted
    windows = rollout_time_windows(inputs.horizon)
    groups = {}
    for g, name in enumerate(inputs.groups.names):
        groups[name] = summary.group_report(sums, inputs.groups, g, channels, windows)
    for check, g in inputs.groups.physics().items():
        groups[inputs.groups.names[g]]["physics"] = {
            check: summary.physics_report(sums, inputs.groups, check, g)
        }
    return {
        "checkpoint": {"path": str(inputs.checkpoint), "format": inputs.kind, **inputs.trained},
        "dataset": {
            "root": str(inputs.root),
            "name": inputs.dataset.info.dataset_name,
            "split": inputs.split,
            "trajectories": len(inputs.dataset),
            "excluded_nonfinite_data": int(sums.excluded_nonfinite_data),
            "stored_steps": inputs.dataset.info.n_steps,
            "spatial_shape": list(inputs.dataset.spatial_shape),
            "channels": list(channels),
        },
        "settings": {
            "horizon": inputs.horizon,
            "batch_size": inputs.batch_size,
            "world_size": world_size,
            "time_windows": [list(w) for w in windows],
            "spectral_bin_edges": spectral_bin_edges(inputs.dataset.spatial_shape).tolist(),
        },
        "methods": list(METHODS),
        "metrics": list(METRICS),
        "groups": groups,
        "samples": summary.sample_rows(sums, inputs.groups),
    }


def write_outputs(report: dict, frames, out: str | None) -> None:
    """The Markdown table to stdout; with --out, eval.json, eval.md and PNGs (main process)."""
    text = markdown(report)
    print(text)
    if not out:
        return
    folder = Path(out)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        atomic_write_text(folder / "eval.json", to_json(report) + "\n")
        atomic_write_text(folder / "eval.md", text + "\n")
        written = [plot.write_vrmse_figure(report, folder / "vrmse.png")]
        written += plot.write_frame_figures(report, frames, folder)
    except OSError as err:
        raise NoaError(f"--out {folder}: cannot write it ({describe_error(err, folder)})") from None
    print(f"wrote {folder / 'eval.json'}, {folder / 'eval.md'}, {len(written)} figure(s)")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)

    def work(accelerator, inputs) -> None:
        sums = evaluate(accelerator, inputs, args.frames)
        if accelerator.is_main_process:
            report = build_report(inputs, sums, accelerator.num_processes)
            write_outputs(report, sums.frames, args.out)

    return distributed.run_tool(lambda: load_inputs(args), work)
