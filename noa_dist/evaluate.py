"""Validation: full rollouts on the valid split, sharded across ranks and reduced once.

Each rank sees an equal number of batches (the eval sampler pads; padded samples are left
out of every sum), so model calls that gather parameters (ZeRO-3) never deadlock. The loss
terms come from the training loss function, on the training loss's window length. Sums stay
on the device until the single all-reduce at the end.

With `--val-rollout-steps H` (default min(32, stored frames - 1)) each validation also rolls
`--val-rollout-trajectories` validation trajectories out H steps from their first state, with
noa-eval's measurement (noa_dist/evaluation/measure.py: the same sums, baselines and
steps-to-VRMSE > 1, reduced across ranks the same way), so long-horizon degradation shows
while training: `val/rollout_vrmse_at_horizon`, `val/rollout_steps_to_vrmse_above_1`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import numpy as np
import torch
from accelerate import Accelerator
from torch.utils.data import DataLoader, Subset

from noa_dist import distributed
from noa_dist.config import Config
from noa_dist.data.dataset import WellWindowDataset
from noa_dist.data.sampler import ShardedEvalSampler
from noa_dist.data.schema import read_split_info
from noa_dist.errors import ConfigError, DataError
from noa_dist.evaluation import measure as rollout_measure
from noa_dist.evaluation.groups import ALL, Groups, trajectory_groups
from noa_dist.evaluation.summary import group_report
from noa_dist.losses import combine
from noa_dist.metrics import persistence_prediction, vrmse
from noa_dist.rollout import iter_windows, window_loss_weight
from noa_dist.step import LossFn
from noa_dist.tokenizer.evaluate import code_usage


class StoppedDuringValidation(Exception):
    """Every rank agreed to stop (a signal) before validation was over; `code` is the agreed
    stop code. Validation is redone after the resume."""

    def __init__(self, code: int) -> None:
        super().__init__(code)
        self.code = code


@dataclass
class ValResult:
    terms: dict[str, float]  # every unweighted loss term and "total", mean over samples
    vrmse_per_step: list[float]  # mean over samples and channels, per rollout step
    persistence_vrmse_per_step: list[float]
    n_samples: int
    nonfinite_samples: int = 0  # samples whose rollout went NaN/Inf (model diverged)
    example: tuple[torch.Tensor, torch.Tensor] | None = field(default=None, repr=False)
    # per tokenizer codebook, over the predicted windows (empty without a tokenizer)
    token_utilization: list[float] = field(default_factory=list)  # fraction of codes used
    token_perplexity: list[float] = field(default_factory=list)  # exp(entropy of code use)
    rollout: RolloutResult | None = None  # the long rollout (validate_rollout), if enabled

    @property
    def loss(self) -> float:
        return self.terms["total"]

    @property
    def vrmse(self) -> float:
        """VRMSE averaged over the rollout's steps: the one number a sweep ranks runs by."""
        return sum(self.vrmse_per_step) / len(self.vrmse_per_step)

    @property
    def one_step_ratio(self) -> float:
        """Model one-step VRMSE / persistence one-step VRMSE (< 1 beats persistence)."""
        return self.vrmse_per_step[0] / max(self.persistence_vrmse_per_step[0], 1e-12)


@torch.no_grad()
def evaluate(
    accelerator: Accelerator,
    model: torch.nn.Module,
    loader,
    n_real: int,
    loss_fn: LossFn,
    weights: dict[str, float],
    describe_sample: Callable[[int], str] = str,
    window: int | None = None,
    tokenizer=None,
    stop_code: Callable[[], int] | None = None,
) -> ValResult:
    """Roll out every validation window; `n_real` = this rank's unpadded sample count.

    With `stop_code` (this rank's pending stop request, 0 for none) the ranks agree before each
    batch whether any was asked to stop, and raise StoppedDuringValidation together: a
    preemption's grace period is shorter than a long validation.

    The loss terms are computed on consecutive `window`-step pieces of the rollout (the
    training loss's windows: a tokenizer is trained on windows of that length) and averaged
    over all steps (each piece starts from the previous piece's last predicted state, so the
    rollout is the same as uncut).

    With a tokenizer, the codes of the predicted windows give each codebook's utilization
    and perplexity (how many behaviours the model's rollouts visit).

    Raises DataError on every rank when validation inputs or targets hold NaN/Inf: no metric
    means anything then (naming the samples with `describe_sample(dataset index)`).
    """
    was_training = model.training
    model.eval()
    names = list(weights)
    sums, seen, example = None, 0, None
    bad_count, bad_indices = torch.zeros((), device=accelerator.device), []
    histogram = CodeHistogram(tokenizer, accelerator.device)
    for batch in loader:
        if stop_code is not None and (
            code := distributed.max_across_ranks(accelerator, stop_code())[0]
        ):
            model.train(was_training)
            raise StoppedDuringValidation(code)  # every rank, at the same batch
        batch = distributed.batch_to_device(accelerator, batch)
        n = max(0, min(batch["u0"].shape[0], n_real - seen))  # padding rows come last
        seen += batch["u0"].shape[0]
        if n:  # a rank with only padding still runs the forward (ZeRO-3 gathers in it)
            batch = {k: v[:n] for k, v in batch.items()}
        batch_sums, pred = _batch_sums(model, batch, loss_fn, weights, names, window, histogram, n)
        contribution = batch_sums * n if n else torch.zeros_like(batch_sums)  # 0 * NaN is NaN
        sums = contribution if sums is None else sums + contribution
        bad_B = ~_finite_per_sample(batch) & (n > 0)
        bad_count += bad_B.sum()
        bad_indices.append(batch["index"].to(bad_B.device)[bad_B])
        if example is None and accelerator.is_main_process and n:
            example = (batch["target"][0].cpu(), pred[0].cpu())
    model.train(was_training)
    counts = torch.stack([torch.tensor(float(min(seen, n_real)), device=sums.device), bad_count])
    totals = distributed.sum_across_ranks(accelerator, torch.cat([sums, counts])).tolist()
    # ^ sync point: once per validation
    if totals[-1] > 0:
        _raise_bad_data(accelerator, torch.cat(bad_indices).tolist(), describe_sample)
    result = _result(totals[:-1], names, example)
    result.token_utilization, result.token_perplexity = histogram.reduce(accelerator)
    return result


def _batch_sums(model, batch, loss_fn: LossFn, weights, names, window, histogram, n_real: int):
    """Batch means [terms..., total, nonfinite fraction, vrmse_1..T, persistence_1..T], rollout."""
    u0, target = batch["u0"], batch["target"]
    cond = batch["cond"] if batch["cond"].shape[1] > 0 else None
    n_steps = target.shape[1]
    values, preds = None, []
    for piece in iter_windows(lambda u: model(u, cond), u0, n_steps, window, "all-windows"):
        terms = loss_fn(piece, batch)
        total = combine({k: terms[k] for k in names}, weights)
        row = torch.stack([*(terms[k].float() for k in names), total.float()])
        row = row * window_loss_weight(piece, n_steps, "all-windows")
        values = row if values is None else values + row
        preds.append(piece.pred_BTCHW)
        if n_real:
            histogram.add(piece)
    pred = torch.cat(preds, dim=1)
    nonfinite = (~torch.isfinite(pred).flatten(1).all(dim=1)).float().mean()
    model_vrmse = vrmse(pred, target).mean(dim=(0, 2))  # [T]
    base_vrmse = vrmse(persistence_prediction(u0, n_steps), target).mean(dim=(0, 2))
    return torch.cat([values, nonfinite.reshape(1), model_vrmse, base_vrmse]), pred


def _finite_per_sample(batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """[B] bool: the sample's inputs and targets are all finite."""
    parts = [batch[k].flatten(1) for k in ("u0", "target", "cond") if batch[k].numel()]
    return torch.stack([torch.isfinite(p).all(dim=1) for p in parts]).all(dim=0)


def _result(totals: list[float], names: list[str], example) -> ValResult:
    *sums, count = totals
    count = max(count, 1.0)
    means = [v / count for v in sums]
    n_terms = len(names) + 1
    steps = (len(means) - n_terms - 1) // 2
    return ValResult(
        terms=dict(zip([*names, "total"], means[:n_terms], strict=True)),
        vrmse_per_step=means[n_terms + 1 : n_terms + 1 + steps],
        persistence_vrmse_per_step=means[n_terms + 1 + steps :],
        n_samples=int(count),
        nonfinite_samples=round(means[n_terms] * count),
        example=example,
    )


def _raise_bad_data(accelerator: Accelerator, local: list[int], describe: Callable) -> None:
    """Every rank raises the same DataError naming the bad samples (rare path)."""
    indices = sorted(i for rank in distributed.gather_reports(accelerator, local) for i in rank)
    shown = "; ".join(describe(int(i)) for i in indices[:5])
    more = f" (+{len(indices) - 5} more)" if len(indices) > 5 else ""
    raise DataError(
        f"the validation split holds NaN/Inf in {len(indices)} sample(s): {shown}{more}; "
        "no validation metric can be computed. Find and fix them with `noa-data check ROOT`"
    )


class CodeHistogram:
    """How often each code of each tokenizer codebook is chosen for predicted windows."""

    def __init__(self, tokenizer, device: torch.device) -> None:
        self.tokenizer = tokenizer
        sizes = tokenizer.codebook_sizes if tokenizer is not None else []
        self.counts = [torch.zeros(k, device=device) for k in sizes]

    def add(self, piece) -> None:
        if self.tokenizer is None or piece.stop - piece.start != self.tokenizer.window_length:
            return
        _, codes_BK = self.tokenizer.quantize(
            self.tokenizer.encode_window(piece.pred_BTCHW, piece.input_BCHW)
        )
        for k, counts in enumerate(self.counts):
            counts += torch.bincount(codes_BK[:, k], minlength=counts.numel()).to(counts.dtype)

    def reduce(self, accelerator: Accelerator) -> tuple[list[float], list[float]]:
        """(utilization, perplexity) per codebook over all ranks. # sync point (rare: validation)"""
        if not self.counts:
            return [], []
        flat = distributed.sum_across_ranks(accelerator, torch.cat(self.counts)).cpu()
        usage = [code_usage(c) for c in torch.split(flat, [c.numel() for c in self.counts])]
        return [u["utilization"] for u in usage], [u["perplexity"] for u in usage]


# ---------------------------------------------------------------- the long rollout

DEFAULT_ROLLOUT_STEPS = 32  # capped by the stored frames; --val-rollout-steps overrides
ROLLOUT_FRAMES = 3  # trajectories of the main process kept for the figures


@dataclass
class RolloutSet:
    """The few validation trajectories rolled out long at each validation (one window each,
    from the first stored state); this rank's shard, padded like the validation split."""

    dataset: WellWindowDataset
    loader: DataLoader
    n_real: int
    groups: Groups
    horizon: int
    trajectories: list[int]


@dataclass
class RolloutResult:
    horizon: int
    trajectories: int
    channels: tuple[str, ...]
    vrmse_per_step: dict[str, list[float | None]]  # method -> per step, mean over fields
    steps_to_vrmse_above_1: dict[str, float | None]  # method -> mean over trajectories
    frames: list[rollout_measure.Frames] = field(default_factory=list, repr=False)
    inputs: dict[int, torch.Tensor] = field(default_factory=dict, repr=False)  # traj -> u0 CHW

    def metrics(self) -> dict[str, float]:
        """The W&B / val_metrics.json keys (None, an undefined mean, becomes NaN)."""
        nan = float("nan")
        out = {"val/rollout_horizon": float(self.horizon)}
        for method, prefix in (
            ("model", "val/rollout_"),
            ("persistence", "val/rollout_persistence_"),
        ):
            at_horizon = self.vrmse_per_step[method][-1]
            steps = self.steps_to_vrmse_above_1[method]
            out[f"{prefix}vrmse_at_horizon"] = nan if at_horizon is None else at_horizon
            out[f"{prefix}steps_to_vrmse_above_1"] = nan if steps is None else steps
        return out


def rollout_set(cfg: Config, accelerator: Accelerator, root) -> RolloutSet | None:
    """The long-rollout trajectories of the valid split, or None with --val-rollout-steps 0."""
    stored = read_split_info(root, "valid").n_steps
    horizon = cfg.data.val_rollout_steps
    if horizon is None:
        horizon = min(DEFAULT_ROLLOUT_STEPS, stored - 1)
    if horizon == 0:
        return None
    if horizon > stored - 1:
        raise ConfigError(
            f"--val-rollout-steps {horizon}: the valid split of {root} stores {stored} frames "
            f"per trajectory, so a rollout from the first one has at most {stored - 1} steps"
        )
    source = WellWindowDataset(root, "valid", horizon, window_stride=stored)
    groups = trajectory_groups(source.info, source.layout.predicted)
    picked = _pick_trajectories(groups, cfg.data.val_rollout_trajectories)
    sampler = ShardedEvalSampler(
        len(picked), num_replicas=accelerator.num_processes, rank=accelerator.process_index
    )
    # its own generator: iterating must not draw from the global RNG (resumes stay bitwise)
    loader = DataLoader(
        Subset(source, picked),
        sampler=sampler,
        batch_size=cfg.data.batch_size,
        generator=torch.Generator().manual_seed(cfg.train.seed),
    )
    return RolloutSet(source, loader, sampler.n_real, groups, horizon, picked)


def _pick_trajectories(groups: Groups, n: int) -> list[int]:
    """n trajectories (all if fewer), taking each family's next one in turn (the demo's
    three families all appear); a dataset without families gives n evenly spread ones."""
    total = groups.member_NG.shape[0]
    families = [g for g, name in enumerate(groups.names) if name != ALL]
    if not families:
        return sorted(set(np.linspace(0, total - 1, min(n, total)).round().astype(int).tolist()))
    queues = [np.flatnonzero(groups.member_NG[:, g]).tolist() for g in families]
    picked: list[int] = []
    while len(picked) < n and any(queues):
        for queue in queues:
            if queue and len(picked) < n:
                picked.append(queue.pop(0))
    return sorted(picked)


@torch.no_grad()
def validate_rollout(
    accelerator: Accelerator,
    model: torch.nn.Module,
    rollout: RolloutSet,
    stop_code: Callable[[], int] | None = None,
) -> RolloutResult:
    """Roll this rank's trajectories out `rollout.horizon` steps (noa-eval's `measure`), reduce
    over the ranks (one all-reduce, one gather) and summarise; every rank returns the result,
    frames for the figures only on the main process. A stop request is agreed before each
    batch, as in `evaluate` (StoppedDuringValidation on every rank)."""
    norm = rollout.dataset.norm
    was_training = model.training
    model.eval()
    try:
        sums = rollout_measure.measure(
            model,
            _agreeing_batches(accelerator, rollout.loader, stop_code),
            rollout.n_real,
            rollout.groups,
            (norm.mean_predicted, norm.std_predicted),
            rollout.horizon,
            accelerator.device,
            n_frames=ROLLOUT_FRAMES if accelerator.is_main_process else 0,
        )
    finally:
        model.train(was_training)
        rollout.dataset.close()  # no HDF5 handle left open for a later fork
    sums = rollout_measure.reduce(
        sums,
        lambda t: distributed.sum_across_ranks(accelerator, t),
        lambda rows: distributed.gather_reports(accelerator, rows),
    )
    return _rollout_result(sums, rollout)


def _agreeing_batches(
    accelerator: Accelerator, loader: Iterable, stop_code: Callable[[], int] | None
) -> Iterable:
    for batch in loader:
        if stop_code is not None and (
            code := distributed.max_across_ranks(accelerator, stop_code())[0]
        ):
            raise StoppedDuringValidation(code)  # every rank, at the same batch
        yield batch


def _rollout_result(sums: rollout_measure.Sums, rollout: RolloutSet) -> RolloutResult:
    channels = tuple(rollout.dataset.layout.predicted)
    report = group_report(sums, rollout.groups, 0, channels, [(0, rollout.horizon)])  # "all"
    lengths = report["rollout"]["steps_to_vrmse_above_1"]
    norm = rollout.dataset.norm
    inputs = {}
    for f in sums.frames:  # the state each kept rollout started from, denormalised
        u0_CHW = rollout.dataset[f.trajectory]["u0"]
        inputs[f.trajectory] = (
            u0_CHW * torch.as_tensor(norm.std_predicted)[:, None, None]
            + (torch.as_tensor(norm.mean_predicted)[:, None, None])
        )
    rollout.dataset.close()
    return RolloutResult(
        horizon=rollout.horizon,
        trajectories=len(rollout.trajectories),
        channels=channels,
        vrmse_per_step={m: report["per_step"][m]["vrmse"]["mean"] for m in rollout_measure.METHODS},
        steps_to_vrmse_above_1={m: lengths[m]["mean"] for m in rollout_measure.METHODS},
        frames=sums.frames,
        inputs=inputs,
    )
