"""W&B without surprises: pick the mode up front, never prompt, resume the same run, always finish.

`wandb_mode(configured)` resolves "auto" to "online" only when credentials exist (WANDB_API_KEY,
WANDB_IDENTITY_TOKEN_FILE, or a netrc entry for the W&B host, as wandb 0.31's own lookup) and the host answers
a TCP connect within 1 s (probed in a daemon thread so a hanging DNS lookup cannot block; cached per process).
Otherwise "offline": the run is written under `<run_dir>/wandb/offline-run-*` and can be uploaded later with
`wandb sync`. An explicit "online" that cannot work (no credentials, host unreachable) also falls back to
offline with a warning, because a training run should never die or hang for its dashboard.

`make_wandb_logger` passes `mode=` to wandb.init rather than Lightning's `offline=True` (which sets
WANDB_MODE=dryrun in os.environ for the rest of the process and so leaks into later multirun jobs), fixes the
run id (`id=run_id, resume="allow"`), so a resumed run continues the same W&B run, and keeps everything under
the run folder. `finish_wandb` closes the run with an exit code so multirun jobs each get their own, correctly
marked run.
"""

from __future__ import annotations

import logging
import netrc
import os
import socket
import sys
import threading
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

log = logging.getLogger(__name__)

MODES = ("online", "offline", "disabled")
_ALIASES = {
    "online": "online",
    "run": "online",
    "offline": "offline",
    "dryrun": "offline",
    "disabled": "disabled",
    "disable": "disabled",
}
DEFAULT_BASE_URL = "https://api.wandb.ai"
PROBE_TIMEOUT_S = 1.0
_reachable_cache: dict[tuple[str, int], bool] = {}


def _normalise(mode: Any, source: str) -> str | None:
    if mode is None:
        return None
    text = str(mode).strip().lower()
    if text in ("", "auto", "none", "null"):
        return None
    if text not in _ALIASES:
        raise ValueError(f"{source}={mode!r} is not a W&B mode; allowed: auto, online, offline, disabled")
    return _ALIASES[text]


def _base_url() -> str:
    return os.environ.get("WANDB_BASE_URL") or DEFAULT_BASE_URL


def _netrc_path() -> Path | None:
    if os.environ.get("NETRC"):
        return Path(os.environ["NETRC"]).expanduser()
    for name in ("~/.netrc", "~/_netrc"):
        p = Path(name).expanduser()
        if p.exists():
            return p
    return None


def has_credentials(base_url: str | None = None) -> bool:
    """True when wandb would find an API key without prompting (env var, identity token, or netrc)."""
    if os.environ.get("WANDB_API_KEY") or os.environ.get("WANDB_IDENTITY_TOKEN_FILE"):
        return True
    path = _netrc_path()
    if path is None:
        return False
    host = urlsplit(base_url or _base_url()).netloc
    try:
        creds = netrc.netrc(str(path)).authenticators(host)
    except (OSError, netrc.NetrcParseError):
        return False
    return bool(creds and creds[2])


def host_reachable(base_url: str | None = None, timeout_s: float = PROBE_TIMEOUT_S) -> bool:
    """TCP connect to the W&B host within `timeout_s` (DNS included, bounded by a daemon thread); cached."""
    parts = urlsplit(base_url or _base_url())
    host = parts.hostname or ""
    port = parts.port or (80 if parts.scheme == "http" else 443)
    key = (host, port)
    if key in _reachable_cache:
        return _reachable_cache[key]
    result: list[bool] = []

    def probe() -> None:
        try:
            with socket.create_connection((host, port), timeout=timeout_s):
                result.append(True)
        except OSError:
            result.append(False)

    thread = threading.Thread(target=probe, name="wandb-reachability", daemon=True)
    thread.start()
    thread.join(timeout_s)
    ok = bool(result and result[0])
    _reachable_cache[key] = ok
    return ok


def _explicit_mode(configured: str | None) -> str | None:
    """The mode asked for by the config, else by WANDB_MODE / WANDB_DISABLED; None for auto-detection."""
    mode = _normalise(configured, "logger.wandb.mode")
    if mode is None:
        mode = _normalise(os.environ.get("WANDB_MODE"), "WANDB_MODE")
    if mode is None and os.environ.get("WANDB_DISABLED", "").strip().lower() in ("1", "true", "yes"):
        mode = "disabled"
    return mode


def start_service_early(configured: str | None = "auto") -> None:
    """Start W&B's service process now, in a daemon thread, unless W&B is disabled.

    wandb.init (at the first step, through Lightning's logger) otherwise starts it and waits for it. Started here,
    before Lightning is imported and the data and model are built, it comes up on the other core meanwhile, and
    wandb.init attaches to it. `wandb.setup()` is W&B's public call for this. A failure here is not reported:
    wandb.init starts the service itself and reports what goes wrong.
    """
    try:
        if _explicit_mode(configured) == "disabled":
            return
    except ValueError:
        return  # a bad mode: build_loggers reports it
    # wandb.init imports wandb.apis.public (for Launch's staged inputs) in every run. Its pydantic models read their
    # field docstrings through inspect, which scans sys.modules once per class: imported now, before Lightning
    # brings in some 2500 more modules, it costs a third of what it costs inside wandb.init.
    import wandb
    import wandb.apis.public  # noqa: F401

    def setup() -> None:
        try:
            wandb.setup()
        except Exception as exc:  # noqa: BLE001 - wandb.init reports it
            log.debug("starting the W&B service early failed: %s", exc)

    threading.Thread(target=setup, name="wandb-service-start", daemon=True).start()


def wandb_mode(configured: str | None = "auto") -> str:
    """ "online" | "offline" | "disabled".

    Precedence: an explicit config value (online/offline/disabled), then WANDB_MODE / WANDB_DISABLED from the
    environment, then auto-detection. "online" is only returned when it can work (credentials and a reachable
    host); otherwise "offline" with a warning.
    """
    mode = _explicit_mode(configured)
    explicit = mode is not None
    if mode in ("offline", "disabled"):
        return mode
    if not has_credentials():
        if explicit:
            log.warning(
                "W&B mode online was asked for, but no credentials were found (WANDB_API_KEY or "
                "`wandb login`); logging offline instead. Upload later with `wandb sync`."
            )
        return "offline"
    if not host_reachable():
        log.warning(
            "W&B host %s is not reachable within %.0f s; logging offline. Upload later with `wandb sync`.",
            _base_url(),
            PROBE_TIMEOUT_S,
        )
        return "offline"
    return "online"


def make_wandb_logger(
    run_dir: str | os.PathLike,
    project: str,
    name: str | None = None,
    group: str | None = None,
    tags: list[str] | None = None,
    job_type: str | None = None,
    config: dict[str, Any] | None = None,
    run_id: str | None = None,
    mode: str = "offline",
    entity: str | None = None,
    init_timeout_s: float = 30.0,
    silent: bool = True,
) -> Any:
    """Lightning `WandbLogger` writing under `run_dir/wandb`, continuing W&B run `run_id` if it exists."""
    import wandb
    from lightning.pytorch.loggers import WandbLogger

    mode = _normalise(mode, "mode") or wandb_mode("auto")
    if mode not in MODES:
        raise ValueError(f"mode={mode!r}: allowed {MODES}")
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    settings = wandb.Settings(
        init_timeout=float(init_timeout_s),
        silent=bool(silent),
        save_code=False,
        console="off",
    )
    logger = WandbLogger(
        name=name,
        save_dir=str(run_dir),
        id=run_id,
        project=project,
        entity=entity,
        group=group,
        tags=[str(t)[:64] for t in tags] if tags else None,
        job_type=job_type,
        config=config,
        mode=mode,
        resume="allow",
        settings=settings,
        log_model=False,
    )
    # Lightning always forwards `anonymous=None`, which current wandb answers with a deprecation warning.
    getattr(logger, "_wandb_init", {}).pop("anonymous", None)
    return logger


def finish_wandb(status_ok: bool) -> int | None:
    """Close the active W&B run (if any) with exit code 0 or 1, so a failed job shows as failed and the next
    multirun job starts a fresh run; returns the exit code it was finished with (None when there was no run or
    finishing failed). Errors while finishing are logged, never raised."""
    wandb = sys.modules.get("wandb")
    if wandb is None or getattr(wandb, "run", None) is None:
        return None
    code = 0 if status_ok else 1
    try:
        wandb.finish(exit_code=code)
    except Exception as exc:  # noqa: BLE001 - the training result must not be lost to a logging failure
        log.warning("wandb.finish failed: %s", exc)
        return None
    return code
