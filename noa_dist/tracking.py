"""Experiment tracking: W&B through HF Accelerate's tracker, on the main process only.

Every function here is called on ALL ranks; W&B work happens on the main process only,
so the trainer never branches on rank for tracking. With mode "disabled" nothing is
written anywhere and every call is a no-op.

Tracking failures never stop training: every call that talks to W&B catches what W&B
raises, prints ONE line (`Warning: W&B logging failed (<reason>); training continues without
it`) and turns tracking off for that accelerator, so later calls are no-ops and the trainer's
stop path still reaches its checkpoint. Configuration mistakes still raise ConfigError.

Signals and the W&B service (wandb 0.31, measured here; tests/test_tracking_signals.py):
- wandb starts its service `wandb-core` with `start_new_session=True`: a signal sent to the
  trainer's process group (`os.killpg`, Ctrl-C in a terminal) does not reach it.
- A signal sent to every process of the job does (SLURM signals all processes of a step on
  time limit, preemption and scancel). wandb-core calls Go's `signal.Notify(SIGINT, SIGTERM)`
  and exits at once; Notify re-enables a signal that was ignored (SIG_IGN) or blocked when
  the service was spawned, so neither keeps it alive. SIGUSR1/SIGUSR2 leave it running.
  Records the service had not yet written to the `.wandb` file die with it; writing every
  `_FLUSH_SECONDS` instead of wandb's default 15 s bounds that loss. The next call then fails
  with ConnectionResetError and tracking turns off as above.

Accelerate 1.15 facts this module relies on (site-packages/accelerate):
- `Accelerator.init_trackers` and `Accelerator.log` are decorated `@on_main_process`; on other
  ranks `accelerator.trackers` stays empty. `init_trackers` appends the tracker BEFORE
  `wandb.init` runs, so a failed start leaves a tracker without a run behind (undone here).
- `WandBTracker.start` calls `wandb.init(project=project_name, **init_kwargs["wandb"])`, then
  `store_init_configuration(config)` runs `wandb.config.update(config, allow_val_change=True)`.
- `Accelerator.log(values, step=s)` calls `run.log(values, step=s)` on every tracker.
- `Accelerator.end_training` finishes the trackers AND destroys the process group, so `finish`
  below finishes the trackers only; process-group teardown belongs to the trainer.
"""

from __future__ import annotations

import contextlib
import io
import logging
import netrc
import os
import secrets
import string
import sys
import weakref
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar
from urllib.parse import urlsplit

from noa_dist.errors import ConfigError

log = logging.getLogger("noa_dist")  # the one output channel (report.setup_logging)

if TYPE_CHECKING:
    from accelerate import Accelerator
    from matplotlib.figure import Figure

MODES = ("online", "offline", "disabled")
"""Values `--wandb-mode` accepts besides "auto"."""

_WANDB_MODE_ALIASES = {"dryrun": "offline", "run": "online"}
_DEFAULT_BASE_URL = "https://api.wandb.ai"
_RUN_ID_CHARS = string.ascii_lowercase + string.digits
_FLUSH_SECONDS = 2.0  # how often wandb-core writes the .wandb file (its default: 15 s)
T = TypeVar("T")

_failed: weakref.WeakSet[Accelerator] = weakref.WeakSet()
"""Accelerators whose tracking failed: every later call on them is a no-op."""


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


def agent_run_name() -> str | None:
    """`sweep-<sweep id>-<run id>` under `wandb agent` (it sets WANDB_SWEEP_ID and WANDB_RUN_ID
    for each run it starts), else None: one run folder per sweep run, found again when the
    sweep reschedules a preempted run, even when one SLURM job runs several."""
    sweep, run = os.environ.get("WANDB_SWEEP_ID"), os.environ.get("WANDB_RUN_ID")
    return f"sweep-{sweep}-{run}" if sweep and run else None


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
    resume_step: int | None = None,
) -> str | None:
    """Start (or continue) the W&B run; call on all ranks.

    Returns the run id on the main process (store it in checkpoints and pass it back as
    `resume_run_id` so W&B continues the SAME run), None on other ranks or when disabled.
    The id is returned even when W&B failed to start, so a later restart still continues
    one run. A sweep agent's WANDB_RUN_ID is honoured when there is nothing to resume.
    Offline runs land in `<run_dir>/wandb/offline-run-<time>-<id>/`.

    `resume_step` is the step of the checkpoint being resumed. W&B keeps only steps above
    the last one it has, so the steps a crashed job logged after that checkpoint would hide
    the re-logged ones. Online, the run is therefore "rewound": `resume_from="<id>?_step=N"`
    makes the server drop the history after step N. Rewind is a W&B preview feature
    (docs.wandb.ai/models/runs/rewind; not on self-managed servers): when the server
    refuses it, a note is printed and the run resumes after its last step instead.
    Offline, `resume_step` is not used: each restart writes its own segment, and a rewind
    recorded offline is only applied by `wandb sync`, where a server without rewind would
    reject the whole segment (wandb-core `runupserter.InitRun`).
    """
    if mode == "disabled":
        return None
    if not any(str(t) == "wandb" for t in accelerator.log_with):
        raise ConfigError(
            f"wandb mode {mode!r} needs Accelerator(log_with=tracking.log_with({mode!r})), "
            f"got log_with={[str(t) for t in accelerator.log_with]}"
        )
    if not accelerator.is_main_process:
        return None
    run_id = resume_run_id or os.environ.get("WANDB_RUN_ID") or new_run_id()
    if accelerator in _failed:
        return run_id
    try:
        Path(run_dir).mkdir(parents=True, exist_ok=True)
        kwargs = _init_kwargs(run_name, Path(run_dir), mode, run_id)
        if resume_run_id and resume_step is not None and mode == "online":
            _start_rewound(accelerator, project, config, kwargs, resume_step)
        else:
            _init_trackers(accelerator, project, config, kwargs)
    except Exception as err:  # see _guarded for why not a narrower type
        _turn_off(accelerator, err)
    return run_id


def _start_rewound(
    accelerator: Accelerator,
    project: str,
    config: Mapping[str, Any],
    kwargs: dict[str, Any],
    step: int,
) -> None:
    """Resume at `step` with W&B's rewind; where the server refuses, resume after its last step.

    `resume` and `resume_from` are mutually exclusive in wandb.init (a settings error)."""
    rewind = {key: value for key, value in kwargs.items() if key != "resume"}
    rewind["resume_from"] = f"{kwargs['id']}?_step={step}"
    try:
        _init_trackers(accelerator, project, config, rewind)
    except Exception as err:
        log.warning(
            f"Note: W&B could not rewind run {kwargs['id']} to step {step} ({_reason(err)}); "
            f"resuming after its last logged step, so steps above {step} that W&B already has "
            "keep their old values"
        )
        _teardown_service()
        _init_trackers(accelerator, project, config, kwargs)


def _init_trackers(
    accelerator: Accelerator, project: str, config: Mapping[str, Any], kwargs: dict[str, Any]
) -> None:
    """`accelerator.init_trackers` with fresh wandb.Settings, undone on failure.

    Fresh: wandb.init writes its arguments into the Settings object it is given, so a retry
    with the same object would inherit `resume_from` (a settings error next to `resume`).
    Undone: accelerate appends the tracker before wandb.init runs, and a tracker without a
    run would break every later call."""
    before = len(accelerator.trackers)
    kwargs = {**kwargs, "settings": _settings()}
    try:
        accelerator.init_trackers(project, config=dict(config), init_kwargs={"wandb": kwargs})
    except BaseException:
        del accelerator.trackers[before:]
        raise


def _init_kwargs(run_name: str, run_dir: Path, mode: str, run_id: str) -> dict[str, Any]:
    """`wandb.init` keywords (settings are added per call): resumable fixed id."""
    return {"name": run_name, "dir": str(run_dir), "mode": mode, "id": run_id, "resume": "allow"}


def _settings() -> Any:
    """No console capture, no code upload, the `.wandb` file written every `_FLUSH_SECONDS`.

    The flush interval is a private (x_) setting of wandb 0.31; it is left out where absent."""
    import wandb

    extra = {}
    if "x_transaction_log_flush_interval" in wandb.Settings.model_fields:
        extra["x_transaction_log_flush_interval"] = _FLUSH_SECONDS
    return wandb.Settings(console="off", save_code=False, disable_code=True, quiet=True, **extra)


def _main_run(accelerator: Accelerator) -> Any | None:
    """The live `wandb.Run` on the main process, else None (disabled, failed or other rank)."""
    if not accelerator.is_main_process or accelerator in _failed:
        return None
    if not any(t.name == "wandb" for t in accelerator.trackers):
        return None
    return accelerator.get_tracker("wandb", unwrap=True)


def _guarded(accelerator: Accelerator, call: Callable[[], T]) -> T | None:
    """Run one call that talks to W&B; a failure turns tracking off instead of propagating.

    Catches Exception rather than W&B's error types: wandb 0.31 also raises plain Exception
    subclasses from its service layer (MailboxClosedError, HandleAbandonedError,
    WandbApiFailedError, AssertionError("Already torn down.")), and a service that is gone
    surfaces as ConnectionResetError. KeyboardInterrupt and SystemExit still propagate."""
    try:
        return call()
    except Exception as err:
        _turn_off(accelerator, err)
        return None


def _turn_off(accelerator: Accelerator, err: BaseException) -> None:
    """Print the one warning and make every later tracking call on `accelerator` a no-op."""
    _failed.add(accelerator)
    log.warning(f"Warning: W&B logging failed ({_reason(err)}); training continues without it")
    if isinstance(err, ConnectionError):
        _teardown_service()


def _reason(err: BaseException) -> str:
    """`Type: first line of the message`, short enough for one log line."""
    lines = str(err).strip().splitlines()
    text = f"{type(err).__name__}: {lines[0]}" if lines else type(err).__name__
    return text if len(text) <= 200 else text[:197] + "..."


def _teardown_service() -> None:
    """`wandb.teardown()`, errors ignored, so that the next wandb.init starts a new service.

    After the service died it unregisters wandb's atexit hook before it tries the dead
    socket (and fails at once); without it that hook prints a ConnectionResetError traceback
    when the trainer exits. After a failed wandb.init the service still holds the run id
    ("run ID ... is in use"), so a retry needs a new one."""
    import wandb

    with contextlib.suppress(Exception):
        wandb.teardown()


def log_metrics(accelerator: Accelerator, metrics: Mapping[str, float], step: int) -> None:
    """Log scalars at `step` (values go through float(): a 0-d tensor is a sync point)."""
    if _main_run(accelerator) is None:
        return
    values = {k: float(v) for k, v in metrics.items()}
    _guarded(accelerator, lambda: accelerator.log(values, step=step))


def log_figures(accelerator: Accelerator, figures: Mapping[str, Figure], step: int) -> None:
    """Log matplotlib figures as PNG images at `step`, then close them on every rank."""
    try:
        if _main_run(accelerator) is not None:
            _guarded(
                accelerator,
                lambda: accelerator.log(
                    {k: _wandb_image(fig) for k, fig in figures.items()}, step=step
                ),
            )
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


def finish(accelerator: Accelerator, *, preempted: bool = False) -> None:
    """Flush and close the W&B run (main process). Idempotent. `preempted`: the run stopped on
    a signal and will resume; an online sweep then hands the same run (same id, same run
    folder) to the next agent instead of counting it as done.

    Unlike `accelerator.end_training()` this leaves the process group alone, so
    checkpoints and collectives may still follow.
    """
    run = _main_run(accelerator)
    if run is None:
        return
    if preempted and os.environ.get("WANDB_SWEEP_ID") and not run.offline:
        _guarded(accelerator, run.mark_preempting)
    _guarded(accelerator, lambda: [tracker.finish() for tracker in accelerator.trackers])


def run_location(accelerator: Accelerator) -> str | None:
    """Where to find the run: its URL online, its local directory offline (main process)."""
    run = _main_run(accelerator)
    if run is None:
        return None
    return _guarded(accelerator, lambda: run.sync_dir if run.offline else run.url)
