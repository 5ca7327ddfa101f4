"""Experiment tracking: W&B through HF Accelerate's tracker, on the main process only.

Every function here is called on ALL ranks; W&B work happens on the main process only,
so the trainer never branches on rank for tracking. With mode "disabled" nothing is
written anywhere and every call is a no-op.

Accelerate 1.15 facts this module relies on (site-packages/accelerate):
- `Accelerator.init_trackers` and `Accelerator.log` are decorated `@on_main_process`; on other
  ranks `accelerator.trackers` stays empty.
- `WandBTracker.start` calls `wandb.init(project=project_name, **init_kwargs["wandb"])`, then
  `store_init_configuration(config)` runs `wandb.config.update(config, allow_val_change=True)`.
- `Accelerator.log(values, step=s)` calls `run.log(values, step=s)` on every tracker.
- `Accelerator.end_training` finishes the trackers AND destroys the process group, so `finish`
  below finishes the trackers only; process-group teardown belongs to the trainer.
"""

from __future__ import annotations

import io
import netrc
import os
import secrets
import string
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

from noa_dist.errors import ConfigError

if TYPE_CHECKING:
    from accelerate import Accelerator
    from matplotlib.figure import Figure

MODES = ("online", "offline", "disabled")
"""Values `--wandb-mode` accepts besides "auto"."""

_WANDB_MODE_ALIASES = {"dryrun": "offline", "run": "online"}
_DEFAULT_BASE_URL = "https://api.wandb.ai"
_RUN_ID_CHARS = string.ascii_lowercase + string.digits


def wandb_mode(requested: str = "auto") -> str:
    """Resolve `--wandb-mode` to "online" | "offline" | "disabled".

    "auto": an explicit WANDB_MODE environment variable wins; otherwise online when W&B
    credentials exist (WANDB_API_KEY, WANDB_IDENTITY_TOKEN_FILE or a netrc entry for the
    W&B host), else offline, so a cluster node without a login still records the run.
    "online" without credentials is refused here rather than failing inside wandb.init.
    """
    if requested == "online" and not has_wandb_credentials():
        raise ConfigError(
            "--wandb-mode=online: no W&B credentials (run `wandb login` or set WANDB_API_KEY), "
            "or use --wandb-mode=offline and `wandb sync` later"
        )
    if requested in MODES:
        return requested
    if requested != "auto":
        raise ConfigError(f"--wandb-mode={requested!r}: expected one of auto, {', '.join(MODES)}")
    env_mode = os.environ.get("WANDB_MODE", "").strip().lower()
    if env_mode:
        resolved = _WANDB_MODE_ALIASES.get(env_mode, env_mode)
        if resolved not in MODES:
            raise ConfigError(f"WANDB_MODE={env_mode!r}: expected one of {', '.join(MODES)}")
        return resolved
    return "online" if has_wandb_credentials() else "offline"


def has_wandb_credentials() -> bool:
    """True if wandb would find an API key without prompting (environment or netrc)."""
    if os.environ.get("WANDB_API_KEY") or os.environ.get("WANDB_IDENTITY_TOKEN_FILE"):
        return True
    host = urlsplit(os.environ.get("WANDB_BASE_URL", _DEFAULT_BASE_URL)).netloc
    try:
        entry = netrc.netrc(_netrc_path()).authenticators(host)
    except (FileNotFoundError, netrc.NetrcParseError, OSError):
        return False
    return bool(entry and entry[2])


def _netrc_path() -> Path:
    """The netrc file wandb reads: $NETRC, else ~/.netrc (or ~/_netrc on Windows)."""
    if os.environ.get("NETRC"):
        return Path(os.environ["NETRC"]).expanduser()
    unix_netrc = Path("~/.netrc").expanduser()
    windows_netrc = Path("~/_netrc").expanduser()
    return windows_netrc if not unix_netrc.exists() and windows_netrc.exists() else unix_netrc


def log_with(mode: str) -> list[str] | None:
    """What to pass as `Accelerator(log_with=...)` for a resolved mode."""
    if mode not in MODES:
        raise ConfigError(f"wandb mode {mode!r}: expected one of {', '.join(MODES)}")
    return None if mode == "disabled" else ["wandb"]


def new_run_id() -> str:
    """A fresh 8-character base-36 W&B run id (wandb 0.31 has no public generate_id)."""
    return "".join(secrets.choice(_RUN_ID_CHARS) for _ in range(8))


def start_run(
    accelerator: Accelerator,
    *,
    project: str,
    run_name: str,
    run_dir: Path,
    config: Mapping[str, Any],
    mode: str,
    resume_run_id: str | None = None,
) -> str | None:
    """Start (or continue) the W&B run; call on all ranks.

    Returns the run id on the main process (store it in checkpoints and pass it back as
    `resume_run_id` so W&B continues the SAME run), None on other ranks or when disabled.
    A sweep agent's WANDB_RUN_ID is honoured when there is nothing to resume.
    Offline runs land in `<run_dir>/wandb/offline-run-<time>-<id>/`.
    """
    if mode == "disabled":
        return None
    if not any(str(t) == "wandb" for t in accelerator.log_with):
        raise ConfigError(
            f"wandb mode {mode!r} needs Accelerator(log_with=tracking.log_with({mode!r})), "
            f"got log_with={[str(t) for t in accelerator.log_with]}"
        )
    run_id = resume_run_id or os.environ.get("WANDB_RUN_ID") or new_run_id()
    if accelerator.is_main_process:
        Path(run_dir).mkdir(parents=True, exist_ok=True)
    accelerator.init_trackers(
        project,
        config=dict(config),
        init_kwargs={"wandb": _init_kwargs(run_name, Path(run_dir), mode, run_id)},
    )
    run = _main_run(accelerator)
    return None if run is None else run.id


def _init_kwargs(run_name: str, run_dir: Path, mode: str, run_id: str) -> dict[str, Any]:
    """`wandb.init` keywords: resumable fixed id, no console capture, no code upload."""
    import wandb

    settings = wandb.Settings(console="off", save_code=False, disable_code=True, quiet=True)
    return {
        "name": run_name,
        "dir": str(run_dir),
        "mode": mode,
        "id": run_id,
        "resume": "allow",
        "settings": settings,
    }


def _main_run(accelerator: Accelerator) -> Any | None:
    """The live `wandb.Run` on the main process, else None (disabled or other rank)."""
    if not accelerator.is_main_process:
        return None
    if not any(t.name == "wandb" for t in accelerator.trackers):
        return None
    return accelerator.get_tracker("wandb", unwrap=True)


def log_metrics(accelerator: Accelerator, metrics: Mapping[str, float], step: int) -> None:
    """Log scalars at `step` (values go through float(): a 0-d tensor is a sync point)."""
    if _main_run(accelerator) is None:
        return
    accelerator.log({k: float(v) for k, v in metrics.items()}, step=step)


def log_figures(accelerator: Accelerator, figures: Mapping[str, Figure], step: int) -> None:
    """Log matplotlib figures as PNG images at `step`, then close them on every rank."""
    try:
        if _main_run(accelerator) is not None:
            accelerator.log({k: _wandb_image(fig) for k, fig in figures.items()}, step=step)
    finally:
        _close(figures.values())


def _wandb_image(fig: Figure) -> Any:
    """Render to PNG ourselves: wandb.Image(fig) needs pyplot imported (wandb 0.31 calls
    `matplotlib.pyplot` in util.ensure_matplotlib_figure) and our figures avoid pyplot."""
    import wandb
    from PIL import Image

    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100)
    buffer.seek(0)
    image = Image.open(buffer)
    image.load()
    return wandb.Image(image)


def _close(figures: Any) -> None:
    """Release figures pyplot manages; figures built without pyplot need nothing."""
    plt = sys.modules.get("matplotlib.pyplot")
    if plt is not None:
        for fig in figures:
            plt.close(fig)


def finish(accelerator: Accelerator) -> None:
    """Flush and close the W&B run (main process). Idempotent.

    Unlike `accelerator.end_training()` this leaves the process group alone, so
    checkpoints and collectives may still follow.
    """
    if _main_run(accelerator) is None:
        return
    for tracker in accelerator.trackers:
        tracker.finish()


def run_location(accelerator: Accelerator) -> str | None:
    """Where to find the run: its URL online, its local directory offline (main process)."""
    run = _main_run(accelerator)
    if run is None:
        return None
    return run.sync_dir if run.offline else run.url
