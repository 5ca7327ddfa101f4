"""A row's command line, rendered the way `wandb agent` renders it (wandb 0.31).

Mirrors `wandb.sdk.launch.sweeps.utils.create_sweep_command_args` and
`wandb_agent.Agent._command_run` (tests/test_sweep.py checks both against wandb's own code):
`${args}` is `--name=value` with Python's `str(value)` (`--lambda_latent=0.01`, `--flag=True`,
`--batch_size=32.0`), parameters in the row's order; a command item that is a whole `${macro}`
is replaced by that macro's list (an unknown macro by nothing); `${envvar:NAME}` anywhere in
an item is replaced by $NAME, or by NAME itself when it is unset.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping
from typing import Any

ENVVAR = re.compile(r"\$\{envvar\:([A-Z0-9_]*)\}")  # wandb's SWEEP_COMMAND_ENV_VAR_REGEX


def arg_macros(row: Mapping[str, Any]) -> dict[str, list[str]]:
    """The `${args...}` macros of one row."""
    pairs = [(name, value) for name, value in row.items()]
    return {
        "args": [f"--{n}={v}" for n, v in pairs],
        "args_no_equals": [token for n, v in pairs for token in (f"--{n}", str(v))],
        "args_no_hyphens": [f"{n}={v}" for n, v in pairs],
        "args_no_boolean_flags": [
            f"--{n}" if isinstance(v, bool) else f"--{n}={v}"
            for n, v in pairs
            if not (isinstance(v, bool) and not v)
        ],
        "args_json": [json.dumps(dict(pairs))],
        "args_append_hydra": [f"+{n}={v}" for n, v in pairs],
        "args_override_hydra": [f"++{n}={v}" for n, v in pairs],
    }


def substitute_envvars(item: str, environ: Mapping[str, str]) -> str:
    return ENVVAR.sub(lambda m: environ.get(m.group(1), m.group(1)), item)


def unset_envvars(command: tuple[str, ...], environ: Mapping[str, str]) -> list[str]:
    """Names of `${envvar:NAME}` macros in the command that are not set (the agent would
    pass the bare name on)."""
    return sorted({m for item in command for m in ENVVAR.findall(item) if m not in environ})


def render_command(
    command: tuple[str, ...],
    row: Mapping[str, Any],
    *,
    program: str | None,
    interpreter: str = "python",
    args_json_file: str | None = None,
    environ: Mapping[str, str] | None = None,
) -> list[str]:
    """The argv the agent would run for `row`; `interpreter` and `args_json_file` are the
    agent's ("python", a file under wandb/sweep-ID/) unless given."""
    environ = os.environ if environ is None else environ
    macros: dict[str, list[str]] = {
        **arg_macros(row),
        "interpreter": [interpreter],
        "program": [program] if program is not None else [],
        "env": ["/usr/bin/env"] if os.name != "nt" else [],
        "args_json_file": [args_json_file] if args_json_file else [],
    }
    argv: list[str] = []
    for item in command:
        item = substitute_envvars(str(item), environ)
        if item.startswith("${") and item.endswith("}"):
            argv += macros.get(item[2:-1]) or []
        else:
            argv.append(item)
    return argv


def render_args(row: Mapping[str, Any]) -> list[str]:
    """`${args}` of one row."""
    return arg_macros(row)["args"]
