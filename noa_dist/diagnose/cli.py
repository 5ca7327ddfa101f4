"""`noa-diagnose` command line: arguments, the diagnosis, exit codes.

Exit code 0: healthy; 1: a problem was found; 2: bad input (one `error: ...` line). The
output and the `--json` keys are documented in `noa_dist.diagnose`.
"""

from __future__ import annotations

import argparse
import math
import shlex
import sys

import torch

from noa_dist.diagnose import report
from noa_dist.diagnose.commands import training_command
from noa_dist.diagnose.inputs import config_check, load_inputs, previous_checkpoint
from noa_dist.diagnose.probe import chain_summary, forward_summary, gradient_summary, run_probe
from noa_dist.diagnose.result import DataCheck, Diagnosis, Findings, LossSummary
from noa_dist.diagnose.verdict import verdict
from noa_dist.errors import NoaError, OneLineErrorParser


def build_parser() -> argparse.ArgumentParser:
    p = OneLineErrorParser(
        prog="noa-diagnose",
        description="Diagnose NaN/Inf or exploding gradients of a NOA checkpoint: forward, loss, "
        "backward and gradient growth through the autoregressive chain, with a verdict and fix.",
    )
    p.add_argument(
        "--checkpoint",
        required=True,
        help="step-XXXXXXXX folder (DDP or ZeRO), best/ folder or noa-export .pt",
    )
    p.add_argument("--dataset", help="dataset root (default: the one in the checkpoint's config)")
    p.add_argument(
        "--split", default="train", help="split to draw the samples from (default train)"
    )
    p.add_argument("--n-samples", type=int, default=4, help="windows to diagnose on (default 4)")
    p.add_argument("--timesteps", type=int, help="rollout length T (default: the checkpoint's)")
    p.add_argument(
        "--bptt-window",
        help="truncated BPTT window W, or 'none' for full BPTT (default: the checkpoint's)",
    )
    p.add_argument(
        "--tbptt-mode", choices=("last", "all-windows"), help="default: the checkpoint's"
    )
    p.add_argument(
        "--batch-size",
        type=int,
        help="samples per forward (default: the checkpoint's, at most --n-samples)",
    )
    p.add_argument(
        "--json", action="store_true", help="print one JSON object instead of the report"
    )
    p.add_argument("--device", default="cpu", help="torch device (default cpu)")
    return p


def diagnose(args: argparse.Namespace) -> Diagnosis:
    """Load, measure, summarise, judge: everything the report shows."""
    inputs = load_inputs(args)
    s = inputs.settings
    torch.manual_seed(inputs.cfg.train.seed)
    probe = run_probe(
        inputs.model,
        inputs.dataset,
        bptt_window=s.bptt_window,
        tbptt_mode=s.tbptt_mode,
        batch_size=s.batch_size,
        device=torch.device(args.device),
        progress=not args.json and sys.stderr.isatty(),
    )
    findings = Findings(
        checkpoint=str(inputs.checkpoint),
        format=inputs.kind,
        dataset=str(inputs.root),
        split=args.split,
        device=args.device,
        settings=s,
        trained_with=inputs.trained_with(),
        config_check=config_check(s, inputs.cfg),
        data=DataCheck(probe.bad_samples),
        forward=forward_summary(probe),
        loss=LossSummary(probe.loss, math.isfinite(probe.loss)),
        gradients=gradient_summary(probe),
        chain=chain_summary(probe, s),
        training_command=shlex.join(training_command(inputs.checkpoint, inputs.kind, inputs.cfg)),
        previous_checkpoint=previous_checkpoint(inputs.checkpoint, inputs.kind),
    )
    return Diagnosis(findings, verdict(findings))


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        result = diagnose(args)
    except NoaError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(report.to_json(result) if args.json else report.render(result))
    return result.exit_code


if __name__ == "__main__":
    sys.exit(main())
