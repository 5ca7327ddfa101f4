"""Generate the demo dataset: three periodic 2D PDE families mixed in one Well-format dataset.

Writes `<root>/data/{train,valid,test}/noa_pde_mix_<split>_<k:03d>.hdf5` and then
`<root>/stats.yaml` (written last: a root without it is incomplete). Every shard has the same
fields: `u` (the state, [n_traj, timesteps + 1, N, N]) and the constant conditioning fields
`forcing`, `diffusivity` (t0, [n_traj, N, N]) and `advection_velocity` (t1, [n_traj, N, N, 2]).

Each trajectory is a pure function of (seed, ic_id, realization): its parameters and initial
condition come from `SeedSequence([seed, ic_id])`, its noise from a child of it, so the bytes
written do not depend on the number of workers. Workers simulate, the parent writes.
"""

from __future__ import annotations

import itertools
import math
import multiprocessing
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tqdm import tqdm

from noa_dist.data import pde
from noa_dist.data.schema import (
    DATA_DIR,
    N_TRAJECTORIES_ATTR,
    SCALARS,
    SHARD_SUFFIXES,
    SPLITS,
    STATS_FILE,
    FieldSpec,
    Grid,
    field_spec,
    list_shards,
    open_hdf5,
    split_dir,
)
from noa_dist.data.stats import write_stats
from noa_dist.data.writer import COMPRESSIONS, ShardLayout, ShardWriter, Trajectory, grid_2d
from noa_dist.errors import ConfigError, DataError

FAMILIES = ("advection_diffusion", "allen_cahn", "navier_stokes")  # scalar `family` = index
DATASET_NAME = "noa_pde_mix"
FRAME_DT = 0.25  # time between stored frames, all families
NOISE_AMPLITUDE = 0.05  # white-noise amplitude when n_realizations > 1 (see pde.WhiteNoise)
NS_DRAG = 0.1  # linear drag of Navier-Stokes, keeps the forced flow statistically bounded

SIMULATION_PARAMETERS = (
    "family",
    "diffusivity",
    "velocity_x",
    "velocity_y",
    "epsilon",
    "viscosity",
    "forcing_amplitude",
    "forcing_wavenumber",
    "drag",
    "noise_amplitude",
)
SCALAR_NAMES = (*SIMULATION_PARAMETERS, "realization", "ic_id")
INTEGER_SCALARS = ("family", "forcing_wavenumber", "realization", "ic_id")


@dataclass(frozen=True)
class TrajectorySpec:
    """Everything a worker needs to simulate one trajectory."""

    family: str
    ic_id: int
    realization: int
    seed: int
    grid: int
    timesteps: int
    noisy: bool


def _log_uniform(rng: np.random.Generator, low: float, high: float) -> float:
    return float(np.exp(rng.uniform(np.log(low), np.log(high))))


def sample_parameters(family: str, rng: np.random.Generator) -> dict[str, float]:
    """Random PDE parameters of one (IC, params) pair; 0 for those the family does not use."""
    params = dict.fromkeys(SIMULATION_PARAMETERS, 0.0)
    params["family"] = FAMILIES.index(family)
    if family == "advection_diffusion":
        params["diffusivity"] = _log_uniform(rng, 1e-3, 2e-2)
        speed, angle = rng.uniform(0.25, 1.0), rng.uniform(0.0, 2.0 * math.pi)
        params["velocity_x"], params["velocity_y"] = (
            speed * math.cos(angle),
            speed * math.sin(angle),
        )
    elif family == "allen_cahn":
        params["epsilon"] = float(rng.uniform(0.1, 0.2))
    else:
        params["viscosity"] = _log_uniform(rng, 2e-3, 1e-2)
        params["forcing_amplitude"] = float(rng.uniform(0.5, 1.5))
        params["forcing_wavenumber"] = int(rng.integers(2, 5))
        params["drag"] = NS_DRAG
    return params


# Each family: (params, ic_rng, grid, timesteps, noise) -> (u_TXY, forcing_XY, coefficient of
# the Laplacian, advection velocity); the last three become the constant fields.
SolverResult = tuple[np.ndarray, np.ndarray, float, tuple[float, float]]
Noise = pde.WhiteNoise | None


def _advection_diffusion(
    p: dict, rng: np.random.Generator, n: int, steps: int, noise: Noise
) -> SolverResult:
    u0_XY = pde.gaussian_random_field(rng, n, slope=4.0)
    velocity = (p["velocity_x"], p["velocity_y"])
    u_TXY = pde.advection_diffusion(u0_XY, velocity, p["diffusivity"], FRAME_DT, steps, noise=noise)
    return u_TXY, np.zeros((n, n)), p["diffusivity"], velocity


def _allen_cahn(
    p: dict, rng: np.random.Generator, n: int, steps: int, noise: Noise
) -> SolverResult:
    u0_XY = 0.1 * pde.gaussian_random_field(rng, n, slope=2.0)
    u_TXY = pde.allen_cahn(u0_XY, p["epsilon"], FRAME_DT, steps, noise=noise)
    return u_TXY, np.zeros((n, n)), p["epsilon"] ** 2, (0.0, 0.0)


def _navier_stokes(
    p: dict, rng: np.random.Generator, n: int, steps: int, noise: Noise
) -> SolverResult:
    w0_XY = 2.0 * pde.gaussian_random_field(rng, n, slope=4.0)
    forcing_XY = pde.kolmogorov_forcing(n, p["forcing_amplitude"], int(p["forcing_wavenumber"]))
    w_TXY = pde.navier_stokes(
        w0_XY, p["viscosity"], p["drag"], forcing_XY, FRAME_DT, steps, noise=noise
    )
    return w_TXY, forcing_XY, p["viscosity"], (0.0, 0.0)


_SOLVERS: dict[str, Callable[..., SolverResult]] = {
    "advection_diffusion": _advection_diffusion,
    "allen_cahn": _allen_cahn,
    "navier_stokes": _navier_stokes,
}


def _random_streams(spec: TrajectorySpec) -> tuple[np.random.Generator, ...]:
    """Parameter, IC and noise generators; the first two are shared by all realizations."""
    params_seq, ic_seq, noise_seq = np.random.SeedSequence([spec.seed, spec.ic_id]).spawn(3)
    realization_seq = noise_seq.spawn(spec.realization + 1)[spec.realization]
    return tuple(np.random.default_rng(s) for s in (params_seq, ic_seq, realization_seq))


def simulate_trajectory(spec: TrajectorySpec) -> Trajectory:
    """Simulate one trajectory (runs in a worker process)."""
    params_rng, ic_rng, noise_rng = _random_streams(spec)
    params = sample_parameters(spec.family, params_rng)
    noise = pde.WhiteNoise(NOISE_AMPLITUDE, noise_rng) if spec.noisy else None
    params["noise_amplitude"] = NOISE_AMPLITUDE if spec.noisy else 0.0
    solve = _SOLVERS[spec.family]
    u_TXY, forcing_XY, coefficient, velocity = solve(
        params, ic_rng, spec.grid, spec.timesteps, noise
    )
    if not np.all(np.isfinite(u_TXY)):
        raise DataError(
            f"{spec.family} trajectory ic_id={spec.ic_id} became non-finite; params {params}"
        )
    n = spec.grid
    fields = {
        "u": u_TXY,
        "forcing": forcing_XY,
        "diffusivity": np.full((n, n), coefficient),
        "advection_velocity": np.broadcast_to(np.asarray(velocity), (n, n, 2)),
    }
    scalars = {**params, "realization": spec.realization, "ic_id": spec.ic_id}
    return Trajectory(fields={k: v.astype(np.float32) for k, v in fields.items()}, scalars=scalars)


def split_counts(n_items: int, fractions: Sequence[float]) -> list[int]:
    """Largest-remainder rounding; every split with a positive fraction gets >= 1 if possible."""
    raw = [f * n_items for f in fractions]
    counts = [math.floor(r) for r in raw]
    by_remainder = sorted(range(len(raw)), key=lambda i: counts[i] - raw[i])
    for i in by_remainder[: n_items - sum(counts)]:
        counts[i] += 1
    for i, fraction in enumerate(fractions):
        largest = max(range(len(counts)), key=lambda j: counts[j])
        if fraction > 0 and counts[i] == 0 and counts[largest] > 1:
            counts[largest] -= 1
            counts[i] += 1
    return counts


@dataclass(frozen=True)
class GeneratorSettings:
    """The generator's knobs (see `generate_dataset`)."""

    n_trajectories: int = 256
    grid: int = 64
    timesteps: int = 64
    families: tuple[str, ...] = FAMILIES
    split_fractions: tuple[float, ...] = (0.8, 0.1, 0.1)
    trajectories_per_shard: int = 64
    seed: int = 0
    workers: int = 2
    n_realizations: int = 1
    compression: str = "none"

    def problems(self) -> list[str]:
        """Every invalid setting, described with its value and what was expected."""
        issues = [
            f"{name}={getattr(self, name)}: expected >= {minimum}"
            for name, minimum in [
                ("n_trajectories", 1),
                ("grid", 8),
                ("timesteps", 1),
                ("trajectories_per_shard", 1),
                ("workers", 1),
                ("n_realizations", 1),
            ]
            if getattr(self, name) < minimum
        ]
        if self.n_realizations >= 1 and self.n_trajectories % self.n_realizations:
            issues.append(
                f"n_trajectories={self.n_trajectories}: expected a multiple of "
                f"n_realizations={self.n_realizations}"
            )
        families = self.families
        if not families or set(families) - set(FAMILIES) or len(set(families)) != len(families):
            issues.append(f"families={list(families)}: expected distinct names from {FAMILIES}")
        fractions = self.split_fractions
        if len(fractions) != 3 or min(fractions) < 0 or abs(sum(fractions) - 1) > 1e-6:
            issues.append(
                f"split={list(fractions)}: expected 3 non-negative fractions "
                "(train, valid, test) summing to 1"
            )
        elif fractions[0] == 0:
            issues.append("split: the train fraction must be > 0 (stats.yaml is computed on it)")
        if self.compression not in COMPRESSIONS:
            issues.append(f"compression={self.compression!r}: expected one of {COMPRESSIONS}")
        return issues


def plan_trajectories(settings: GeneratorSettings) -> dict[str, list[TrajectorySpec]]:
    """Trajectories per split. Families go round-robin within each split (so every split with
    >= len(families) ICs has all of them); all realizations of an IC stay in one split."""
    n_realizations, families = settings.n_realizations, settings.families
    counts = split_counts(settings.n_trajectories // n_realizations, settings.split_fractions)
    first_ic_ids = np.cumsum([0, *counts])
    plan: dict[str, list[TrajectorySpec]] = {}
    for split, count, first_ic in zip(SPLITS, counts, first_ic_ids, strict=False):
        plan[split] = [
            TrajectorySpec(
                family=families[i % len(families)],
                ic_id=int(first_ic + i),
                realization=r,
                seed=settings.seed,
                grid=settings.grid,
                timesteps=settings.timesteps,
                noisy=n_realizations > 1,
            )
            for i in range(count)
            for r in range(n_realizations)
        ]
    return plan


def demo_fields(grid: Grid) -> tuple[FieldSpec, ...]:
    """The state `u` and the constant fields that condition it (see the module docstring)."""
    return (
        field_spec("u", 0, grid, time_varying=True),
        field_spec("forcing", 0, grid, time_varying=False),
        field_spec("diffusivity", 0, grid, time_varying=False),
        field_spec("advection_velocity", 1, grid, time_varying=False),
    )


def build_layout(grid: int, timesteps: int, compression: str) -> ShardLayout:
    coords = pde.grid_coordinates(grid)
    time = np.arange(timesteps + 1) * FRAME_DT
    return ShardLayout(
        dataset_name=DATASET_NAME,
        fields=demo_fields(grid_2d(time, coords, coords)),
        scalar_names=SCALAR_NAMES,
        simulation_parameters=SIMULATION_PARAMETERS,
        integer_scalars=INTEGER_SCALARS,
        time=time,
        x=coords,
        y=coords,
        compression=compression,
    )


def plan_shards(
    root: Path, plan: dict[str, list[TrajectorySpec]], per_shard: int
) -> list[tuple[Path, list]]:
    shards = []
    for split, specs in plan.items():
        for k, start in enumerate(range(0, len(specs), per_shard)):
            path = split_dir(root, split) / f"{DATASET_NAME}_{split}_{k:03d}.hdf5"
            shards.append((path, specs[start : start + per_shard]))
    return shards


@contextmanager
def _simulated(specs: list[TrajectorySpec], workers: int) -> Iterator[Iterator[Trajectory]]:
    """Trajectories in `specs` order, computed in-process (workers=1) or by a spawn pool."""
    if workers <= 1:
        yield map(simulate_trajectory, specs)
        return
    with multiprocessing.get_context("spawn").Pool(workers) as pool:
        yield pool.imap(simulate_trajectory, specs, chunksize=1)


def _write_shards(
    shards: list[tuple[Path, list]], layout: ShardLayout, workers: int, progress: bool
) -> None:
    specs = [spec for _, shard_specs in shards for spec in shard_specs]
    workers = min(workers, len(specs))
    with (
        _simulated(specs, workers) as trajectories,
        tqdm(total=len(specs), desc="trajectories", unit="traj", disable=not progress) as bar,
    ):
        for path, shard_specs in shards:
            path.parent.mkdir(parents=True, exist_ok=True)
            with ShardWriter(path, layout, len(shard_specs)) as writer:
                for i, trajectory in enumerate(itertools.islice(trajectories, len(shard_specs))):
                    writer.write(i, trajectory)
                    bar.update()


def _prepare_root(root: Path, overwrite: bool) -> None:
    """Refuse to mix with an existing dataset; with overwrite, delete only what we write."""
    if root.exists() and not root.is_dir():
        raise ConfigError(f"{root}: exists and is not a directory")
    existing = [p for p in (root / DATA_DIR, root / STATS_FILE) if p.exists()]
    if existing and not overwrite:
        raise ConfigError(
            f"{root} already holds a dataset ({existing[0].name} exists); pass --overwrite to replace it"
        )
    for split in SPLITS:
        for path in split_dir(root, split).glob("*"):
            if path.suffix in (*SHARD_SUFFIXES, ".tmp"):
                path.unlink()
    (root / STATS_FILE).unlink(missing_ok=True)
    root.mkdir(parents=True, exist_ok=True)


def generate_dataset(
    root: str | Path,
    *,
    n_trajectories: int = 256,
    grid: int = 64,
    timesteps: int = 64,
    families: Sequence[str] = FAMILIES,
    split_fractions: Sequence[float] = (0.8, 0.1, 0.1),
    trajectories_per_shard: int = 64,
    seed: int = 0,
    workers: int = 2,
    n_realizations: int = 1,
    compression: str = "none",
    progress: bool = True,
    overwrite: bool = False,
) -> Path:
    """Write the dataset and its stats.yaml under `root`; return `root`.

    `n_trajectories` counts stored trajectories (n_trajectories / n_realizations distinct
    ICs); each stores `timesteps + 1` frames, the initial state included. Raises ConfigError
    listing every invalid setting, or if `root` already holds a dataset and not `overwrite`.
    """
    settings = GeneratorSettings(
        n_trajectories=n_trajectories,
        grid=grid,
        timesteps=timesteps,
        families=tuple(families),
        split_fractions=tuple(split_fractions),
        trajectories_per_shard=trajectories_per_shard,
        seed=seed,
        workers=workers,
        n_realizations=n_realizations,
        compression=compression,
    )
    if issues := settings.problems():
        raise ConfigError("invalid dataset settings:\n  " + "\n  ".join(issues))
    root = Path(root)
    _prepare_root(root, overwrite)
    for split in SPLITS:
        split_dir(root, split).mkdir(parents=True, exist_ok=True)
    shards = plan_shards(root, plan_trajectories(settings), trajectories_per_shard)
    _write_shards(shards, build_layout(grid, timesteps, compression), workers, progress)
    write_stats(root, split="train", overwrite=True, progress=progress)
    return root


def dataset_summary(root: str | Path) -> dict[str, dict[str, int]]:
    """Per split: number of shards, of trajectories, and of trajectories per family."""
    summary = {}
    for split in SPLITS:
        shards = list_shards(root, split)
        counts: Counter[str] = Counter()
        for path in shards:
            with open_hdf5(path) as f:
                counts["trajectories"] += int(f.attrs[N_TRAJECTORIES_ATTR])
                counts.update(FAMILIES[int(code)] for code in f[SCALARS]["family"][:])
        summary[split] = {"shards": len(shards), **counts}
    return summary
