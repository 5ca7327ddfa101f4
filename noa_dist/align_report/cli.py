"""`noa-align-report` command line: arguments, the sharded measurement, outputs, exit codes.

Exit code 0: the report was made (whatever its verdict); 2: bad input (one `error: ...`
line). Every rank measures its shard; the sums meet in one all-reduce; rank 0 alone prints
and writes files.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from torch.utils.data import DataLoader

from noa_dist import distributed
from noa_dist.align_report import summary, verdict
from noa_dist.align_report.inputs import Inputs, load_inputs
from noa_dist.align_report.measure import Reduced, measure, reduce
from noa_dist.align_report.plot import write_figure
from noa_dist.align_report.render import render, to_json
from noa_dist.atomic import atomic_write_text, describe_error
from noa_dist.data.sampler import ShardedEvalSampler
from noa_dist.errors import NoaError, OneLineErrorParser
from noa_dist.tokenizer.spec import POLICIES


def build_parser() -> argparse.ArgumentParser:
    p = OneLineErrorParser(
        prog="noa-align-report",
        description="Latent alignment diagnostics of a NOA checkpoint against its frozen VQ-VAE "
        "tokenizer over a whole split: reconstruction, codebook use, token agreement, cosine "
        "similarities, temporal consistency, with a verdict per section.",
    )
    p.add_argument(
        "--checkpoint",
        required=True,
        help="step-XXXXXXXX folder (DDP or ZeRO), best/ folder or noa-export .pt",
    )
    p.add_argument("--vqvae-path", help="tokenizer folder (default: the checkpoint's)")
    p.add_argument("--vqvae-feature-policy", choices=POLICIES, help="default: the checkpoint's")
    p.add_argument("--dataset", help="dataset root (default: the checkpoint's)")
    p.add_argument("--split", default="valid", help="split to report on (default valid)")
    p.add_argument(
        "--n-samples",
        type=int,
        help="trajectories, spread evenly over the split (default: all of them)",
    )
    p.add_argument(
        "--timesteps",
        type=int,
        help="rollout length T, a multiple of the tokenizer's window (default: the checkpoint's)",
    )
    p.add_argument(
        "--batch-size",
        type=int,
        help="trajectories per forward per process (default: the checkpoint's)",
    )
    p.add_argument(
        "--json", metavar="OUT.json", help="write the report as JSON ('-': to stdout, no text)"
    )
    p.add_argument("--figure", metavar="OUT.png", help="write the report's figure")
    return p


def align_report(accelerator, inputs: Inputs) -> dict:
    """Measure this rank's shard, reduce over all ranks, summarise and judge (every rank)."""
    sampler = ShardedEvalSampler(
        len(inputs.dataset), num_replicas=accelerator.num_processes, rank=accelerator.process_index
    )
    loader = DataLoader(inputs.dataset, sampler=sampler, batch_size=inputs.batch_size)
    device = accelerator.device
    sums = measure(
        inputs.model.to(device),
        inputs.tokenizer.to(device),
        loader,
        sampler.n_real,
        timesteps=inputs.timesteps,
        latent_sample_steps=inputs.cfg.align.latent_sample_steps,
        device=device,
    )
    reduced = reduce(sums, lambda t: distributed.sum_across_ranks(accelerator, t.to(device)).cpu())
    return build_report(inputs, reduced, accelerator.num_processes)


def build_report(inputs: Inputs, r: Reduced, world_size: int) -> dict:
    """The report dict (the --json object): numbers, then a verdict per section and overall."""
    trajectories = float(r.sums["trajectories"])
    windows = inputs.windows_per_trajectory
    n = trajectories * windows
    codebooks = summary.codebooks(r, n)
    for row in codebooks:
        row["verdict"] = verdict.codebook_verdict(row)
    report = {
        "checkpoint": str(inputs.checkpoint),
        "format": inputs.kind,
        "tokenizer": str(inputs.vqvae_path),
        "dataset": str(inputs.root),
        "split": inputs.split,
        "settings": {
            "timesteps": inputs.timesteps,
            "window_length": inputs.tokenizer.window_length,
            "windows_per_trajectory": windows,
            "batch_size": inputs.batch_size,
            "trajectories": int(trajectories),
            "windows": int(n),
            "excluded_nonfinite": int(r.sums["excluded_nonfinite"]),
            "latent_sample_steps": inputs.cfg.align.latent_sample_steps,
            "world_size": world_size,
        },
        "reconstruction": summary.reconstruction(r),
        "token_diversity": {"codebooks": codebooks},
        "alignment": summary.cosines(r, n, projector=inputs.model.projector is not None),
        "temporal": summary.temporal(r, trajectories, windows),
    }
    report["reconstruction"]["verdict"] = verdict.reconstruction_verdict(report["reconstruction"])
    report["token_diversity"]["verdict"] = verdict.diversity_verdict(codebooks)
    report["alignment"]["verdict"] = verdict.alignment_verdict(report["alignment"])
    report["temporal"]["verdict"] = verdict.temporal_verdict(report["temporal"])
    report["verdict"] = verdict.overall_verdict({k: report[k]["verdict"] for k in verdict.SECTIONS})
    return report


def write_outputs(report: dict, args: argparse.Namespace) -> None:
    """Text (unless --json -), JSON and figure files; main process only."""
    if args.json == "-":
        print(to_json(report))
    else:
        print(render(report))
    for flag, path, write in (
        ("--json", args.json, lambda p: atomic_write_text(p, to_json(report) + "\n")),
        ("--figure", args.figure, lambda p: write_figure(report, p)),
    ):
        if path and path != "-":
            out = Path(path)
            try:
                out.parent.mkdir(parents=True, exist_ok=True)
                write(out)
            except OSError as err:
                raise NoaError(
                    f"{flag} {out}: cannot write it ({describe_error(err, out)})"
                ) from None
            if args.json != "-":
                print(f"wrote {out}")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)

    def work(accelerator, inputs: Inputs) -> None:
        report = align_report(accelerator, inputs)
        if accelerator.is_main_process:
            write_outputs(report, args)

    return distributed.run_tool(lambda: load_inputs(args), work)


if __name__ == "__main__":
    sys.exit(main())
