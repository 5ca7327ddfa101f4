"""A sweep's `parameters` as rows of trainer flag values: the grid, or seeded random draws.

Grid rows follow W&B's order (parameters sorted by name, `itertools.product`, the last name
varying fastest). Random row i depends only on (seed, i), so a SLURM array task computes its
own row without the others. `bayes` needs the results of earlier runs, which an offline node
does not have: offline it is drawn like `random`.

q_uniform takes the multiples of q from min to max, max included when it is one (W&B's grid
uses `np.arange(min, max, q)` and so leaves max out; its random draw `round(x / q) * q` can
reach it). An integer q gives ints, a float q floats (32.0): the trainer reads both.
"""

from __future__ import annotations

import itertools
import math
import random
from typing import Any

from noa_dist.errors import ConfigError
from noa_dist.sweep.spec import Param, Sweep

DEFAULT_RANDOM_COUNT = 10
Row = dict[str, Any]


def grid_values(param: Param) -> list[Any]:
    """Every value a parameter takes in a grid."""
    if param.kind == "value":
        return [param.value]
    if param.kind == "values":
        return list(param.values)
    if param.kind == "int_uniform":
        return list(range(param.min, param.max + 1))
    if param.kind == "q_uniform":
        return q_values(param.min, param.max, param.q)
    raise ConfigError(f"parameters.{param.name}: {param.kind} has no grid (use values)")


def q_values(lo: float, hi: float, q: float) -> list[float | int]:
    """Multiples of q in [lo, hi], hi included (a relative 1e-9 absorbs float error)."""
    first, last = math.ceil(lo / q - 1e-9), math.floor(hi / q + 1e-9)
    if isinstance(q, int) and isinstance(lo, int) and isinstance(hi, int):
        return [k * q for k in range(first, last + 1)]
    return [float(f"{k * q:.12g}") for k in range(first, last + 1)]


def draw(param: Param, rng: random.Random) -> Any:
    """One random value of a parameter."""
    if param.kind in ("value", "values", "int_uniform", "q_uniform"):
        return rng.choice(grid_values(param))
    if param.kind == "uniform":
        return rng.uniform(param.min, param.max)
    if param.kind == "log_uniform_values":
        return math.exp(rng.uniform(math.log(param.min), math.log(param.max)))
    raise ConfigError(f"parameters.{param.name}: unknown kind {param.kind}")


def grid_rows(sweep: Sweep) -> list[Row]:
    names = list(sweep.params)
    choices = [grid_values(sweep.params[n]) for n in names]
    return [dict(zip(names, combo, strict=True)) for combo in itertools.product(*choices)]


def random_row(sweep: Sweep, index: int, seed: int) -> Row:
    """One generator per parameter (str seeds hash alike in every process): adding a
    parameter to the YAML does not change the values drawn for the others."""
    return {
        name: draw(param, random.Random(f"noa-sweep:{seed}:{index}:{name}"))
        for name, param in sweep.params.items()
    }


def row_count(sweep: Sweep, count: int | None) -> int:
    """Rows of --list: the grid's size, else --count, else run_cap, else 10."""
    if sweep.method == "grid":
        size = len(grid_rows(sweep))
        return size if count is None else min(count, size)
    return count or sweep.run_cap or DEFAULT_RANDOM_COUNT


def rows(sweep: Sweep, count: int | None = None, seed: int = 0) -> list[Row]:
    return [row(sweep, i, seed) for i in range(row_count(sweep, count))]


def row(sweep: Sweep, index: int, seed: int = 0) -> Row:
    """Row `index` (0-based) of the sweep."""
    if index < 0:
        raise ConfigError(f"--run-index {index}: must be >= 0")
    if sweep.method != "grid":
        return random_row(sweep, index, seed)
    grid = grid_rows(sweep)
    if index >= len(grid):
        raise ConfigError(
            f"--run-index {index}: {sweep.path} is a grid of {len(grid)} rows (0..{len(grid) - 1})"
        )
    return grid[index]
