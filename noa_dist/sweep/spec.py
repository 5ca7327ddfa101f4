"""The sweep YAML (`wandb sweep FILE` reads the same file), checked before anything runs.

Only what the offline expansion can honour is accepted: flat `parameters`, each a `value`,
a `values` list or one of the distributions below with numeric `min`/`max` (and `q`). Every
parameter must name a trainer flag, so a typo fails here rather than in the 12th run.
Every problem is reported at once, each naming the file and key.
"""

from __future__ import annotations

import difflib
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from noa_dist.config import FIELD_SECTION
from noa_dist.errors import ConfigError

METHODS = ("grid", "random", "bayes")
GOALS = ("minimize", "maximize")
DISTRIBUTIONS = ("uniform", "log_uniform_values", "int_uniform", "q_uniform")
GRID_DISTRIBUTIONS = ("int_uniform", "q_uniform")  # W&B's grid also takes only these
DEFAULT_COMMAND = ("${env}", "${interpreter}", "${program}", "${args}")  # wandb's default
ARG_MACROS = (
    "${args}",
    "${args_no_hyphens}",
    "${args_no_boolean_flags}",
    "${args_no_equals}",
    "${args_json}",
    "${args_json_file}",
    "${args_append_hydra}",
    "${args_override_hydra}",
)
_NUMBER_TEXT = re.compile(r"^[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?$")


@dataclass(frozen=True)
class Param:
    """One entry of `parameters`: kind is "value", "values" or a distribution name."""

    name: str
    kind: str
    value: Any = None  # kind "value"
    values: tuple = ()  # kind "values"
    min: float | int | None = None
    max: float | int | None = None
    q: float | int | None = None


@dataclass(frozen=True)
class Sweep:
    path: Path
    name: str  # the YAML's `name`, else the file's stem; groups the offline runs
    method: str
    metric: dict[str, str] | None
    params: dict[str, Param]  # sorted by name, the order W&B's search sees them in
    command: tuple[str, ...]
    program: str | None
    run_cap: int | None


def load_sweep(path: str | Path) -> Sweep:
    """Read and check a sweep YAML; one ConfigError lists every problem."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: no such sweep file")
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML ({exc})") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a mapping with method, metric, parameters, command")
    problems: list[str] = []
    method = raw.get("method")
    if method not in METHODS:
        problems.append(f"{path}: method: expected one of {', '.join(METHODS)}, got {method!r}")
    metric = _metric(path, raw.get("metric"), method, problems)
    params = _params(path, raw.get("parameters"), method, problems)
    command = _command(path, raw, problems)
    run_cap = raw.get("run_cap")
    if run_cap is not None and (not isinstance(run_cap, int) or run_cap < 1):
        problems.append(f"{path}: run_cap: expected an integer >= 1, got {run_cap!r}")
    if problems:
        raise ConfigError("invalid sweep:\n  " + "\n  ".join(problems))
    name = str(raw.get("name") or path.stem)
    return Sweep(path, name, method, metric, params, command, raw.get("program"), run_cap)


def _metric(path: Path, metric: Any, method: Any, problems: list[str]) -> dict | None:
    if metric is None:
        if method == "bayes":
            problems.append(f"{path}: metric: bayes needs a metric (name and goal)")
        return None
    if not isinstance(metric, dict) or not isinstance(metric.get("name"), str):
        problems.append(f"{path}: metric: expected a mapping with name and goal, got {metric!r}")
        return None
    goal = metric.get("goal", "minimize")
    if goal not in GOALS:
        problems.append(f"{path}: metric.goal: expected one of {', '.join(GOALS)}, got {goal!r}")
    return {"name": metric["name"], "goal": goal}


def _params(path: Path, raw: Any, method: Any, problems: list[str]) -> dict[str, Param]:
    if not isinstance(raw, dict) or not raw:
        problems.append(f"{path}: parameters: expected a non-empty mapping of trainer flags")
        return {}
    params = {}
    for name in sorted(raw):
        where = f"{path}: parameters.{name}"
        if str(name).replace("-", "_") not in FIELD_SECTION:
            close = difflib.get_close_matches(str(name), list(FIELD_SECTION), n=1)
            hint = f" (did you mean {close[0]}?)" if close else ""
            problems.append(f"{where}: not a trainer flag{hint}")
            continue
        param = _param(where, str(name), raw[name], method, problems)
        if param is not None:
            params[str(name)] = param
    return params


def _param(where: str, name: str, spec: Any, method: Any, problems: list[str]) -> Param | None:
    if not isinstance(spec, dict):
        problems.append(
            f"{where}: expected a mapping (value, values or distribution), got {spec!r}"
        )
        return None
    if "parameters" in spec:
        problems.append(f"{where}: nested parameters are not supported")
        return None
    if "value" in spec:
        return Param(name, "value", value=spec["value"])
    if "values" in spec:
        values = spec["values"]
        if not isinstance(values, list) or not values:
            problems.append(f"{where}.values: expected a non-empty list, got {values!r}")
            return None
        if "probabilities" in spec and method == "grid":
            problems.append(f"{where}.probabilities: not allowed with method grid")
        return Param(name, "values", values=tuple(values))
    dist = spec.get("distribution")
    if dist is None and "min" in spec and "max" in spec:
        ints = all(type(spec[key]) is int for key in ("min", "max"))
        dist = "int_uniform" if ints else "uniform"  # what W&B infers from the bounds
    if dist not in DISTRIBUTIONS:
        problems.append(
            f"{where}.distribution: expected one of {', '.join(DISTRIBUTIONS)} (or value/values), got {dist!r}"
        )
        return None
    if method == "grid" and dist not in GRID_DISTRIBUTIONS:
        problems.append(f"{where}: method grid needs values, int_uniform or q_uniform, not {dist}")
    bounds = {key: _number(f"{where}.{key}", spec.get(key), problems) for key in ("min", "max")}
    q = _number(f"{where}.q", spec.get("q", 1), problems) if dist == "q_uniform" else None
    lo, hi = bounds["min"], bounds["max"]
    if lo is None or hi is None:
        return None
    if not lo < hi:
        problems.append(f"{where}: min must be < max, got min {lo} and max {hi}")
    if dist == "int_uniform" and not (isinstance(lo, int) and isinstance(hi, int)):
        problems.append(f"{where}: int_uniform needs integer min and max, got {lo} and {hi}")
    if dist == "log_uniform_values" and not lo > 0:
        problems.append(f"{where}.min: log_uniform_values needs min > 0, got {lo}")
    if q is not None and not q > 0:
        problems.append(f"{where}.q: must be > 0, got {q}")
    return Param(name, dist, min=lo, max=hi, q=q)


def _number(where: str, value: Any, problems: list[str]) -> float | int | None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        if isinstance(value, str) and _NUMBER_TEXT.match(value.strip()):
            problems.append(
                f"{where}: {value!r} is text to YAML (PyYAML reads 1e-2 as a string); "
                "write it with a dot, e.g. 1.0e-2 or 0.01"
            )
        else:
            problems.append(f"{where}: expected a number, got {value!r}")
        return None
    return value


def _command(path: Path, raw: dict, problems: list[str]) -> tuple[str, ...]:
    command = raw.get("command", list(DEFAULT_COMMAND))
    if not isinstance(command, list) or not all(isinstance(c, str | int | float) for c in command):
        problems.append(f"{path}: command: expected a list of strings, got {command!r}")
        return ()
    command = tuple(str(c) for c in command)
    if not any(c in ARG_MACROS for c in command):
        problems.append(
            f"{path}: command: has no ${{args}} (or another args macro): the swept values would "
            "never reach the trainer"
        )
    if "${program}" in command and not isinstance(raw.get("program"), str):
        problems.append(f"{path}: program: the command uses ${{program}} but program is not set")
    return command
