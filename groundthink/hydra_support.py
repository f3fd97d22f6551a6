"""What GroundThink's Hydra entry points share: run-folder resolvers, the job a task function runs as, resuming a
run's saved config, and checks of the command line that must happen before Hydra creates any folder.

Only entry points import this module (it imports Hydra).
"""

from __future__ import annotations

import os
import re
import sys
import tempfile
import time
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from groundthink.training.errors import UserError
from groundthink.training.rundir import (
    RunDirError,
    ensure_writable,
    launch_key,
    launch_run_name,
    launched_rank,
    new_run_id,
)

_PROCESS_RUN_ID = new_run_id()
_PROCESS_TIME = datetime.now().strftime("%Y-%m-%d_%H-%M-%S")
# Keys whose changes a resumed run refuses (they decide what the saved run is) or ignores (where it lives).
_RESUME_IGNORED = ("paths.output_root",)


def _run_dir_resolver(root: str, name: str, resume: Any) -> str:
    """hydra.run.dir: a fresh unique folder, or the folder of the run being resumed."""
    if resume not in (None, "null", "None", ""):
        return str(resume)
    if launched_rank()[1] > 1 and launch_key() is not None:  # torchrun / srun: every rank must name the same folder
        return f"{root}/{name}/{launch_run_name(launch_key())}"
    return f"{root}/{name}/{_PROCESS_TIME}_{_PROCESS_RUN_ID}"


def override_slug(override_dirname: str) -> str:
    """A job folder name from its overrides (the job number in front keeps it unique); long ones are cut at a
    whole override and end in '...' (the full list is in the job's .hydra/overrides.yaml). Only characters that
    need no quoting in a shell are kept."""
    slug = re.sub(r"[^A-Za-z0-9_.=,+-]+", "-", override_dirname).strip("-") or "base"
    if len(slug) > 80:
        head = slug[:77]
        slug = (head.rsplit(",", 1)[0] if "," in head else head) + "..."
    return slug


def register_resolvers() -> None:
    if not OmegaConf.has_resolver("gt_run_dir"):
        OmegaConf.register_new_resolver("gt_run_dir", _run_dir_resolver)
    if not OmegaConf.has_resolver("gt_override_slug"):
        OmegaConf.register_new_resolver("gt_override_slug", override_slug)


@dataclass
class Job:
    """The Hydra job a task function runs as."""

    run_dir: Path
    multirun: bool
    overrides: list[str]
    group: str  # the W&B group: the run's name, or <name>-<sweep folder> in a multirun
    started: float  # when this job began: the command for a single run, the job's launch in a multirun


def process_started() -> float | None:
    """When this process was started (on the time.time() clock, to ~10 ms): from /proc/self/stat on Linux, else
    psutil's create_time if psutil is installed; None when neither can tell."""
    try:
        with open("/proc/self/stat", "rb") as f:
            after_name = f.read().rsplit(b")", 1)[1].split()  # the name field may hold spaces and parentheses
        ticks = int(after_name[19])  # field 22, starttime: clock ticks from boot to the process's start
        age = time.clock_gettime(time.CLOCK_BOOTTIME) - ticks / os.sysconf("SC_CLK_TCK")
        if age >= 0:
            return time.time() - age
    except (OSError, ValueError, IndexError, AttributeError):
        pass
    try:
        import psutil
    except ImportError:
        return None
    try:
        return float(psutil.Process().create_time())
    except Exception:  # noqa: BLE001 - best effort: the caller falls back to its own clock
        return None


def command_started() -> float:
    """When this command started: the process's start, else when it first imported groundthink (before any heavy
    import), so a single run's "command to first step" includes Python's start-up and every import."""
    import groundthink

    return process_started() or groundthink._IMPORTED_AT


def current_job(name: str) -> Job:
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    hydra_cfg = HydraConfig.get()
    multirun = hydra_cfg.mode == RunMode.MULTIRUN
    group = f"{name}-{Path(str(hydra_cfg.sweep.dir)).name}" if multirun else name
    started = time.time() if multirun else float(os.environ.get("GROUNDTHINK_T0", time.time()))
    return Job(Path(hydra_cfg.runtime.output_dir), multirun, list(hydra_cfg.overrides.task), group, started)


def resume_config(cfg: DictConfig, job: Job) -> DictConfig:
    """The saved config of the run being resumed, with this command's other field overrides applied on top."""
    run_dir = job.run_dir
    saved_path = run_dir / "config.yaml"
    if not saved_path.is_file():
        raise UserError(f"resume={cfg.resume}: no config.yaml in that folder, so it is not a GroundThink run folder. "
                        "Pass the folder printed at the end of a run (outputs/<name>/<date>_<time>_<id>).")
    saved = OmegaConf.load(saved_path)
    original = set()
    if (run_dir / ".hydra" / "overrides.yaml").is_file():
        original = set(OmegaConf.load(run_dir / ".hydra" / "overrides.yaml"))
    for override in (o for o in job.overrides if not o.startswith("resume=") and o not in original):
        key, _, value = override.partition("=")
        if key.startswith("hydra.") or key in _RESUME_IGNORED:
            continue
        if "." not in key.lstrip("+~"):
            raise UserError(f"resume: the override '{override}' changes a config group; a resumed run keeps the "
                            "groups it was started with. Start a new run instead, or override individual fields "
                            "(e.g. trainer.max_steps=...).")
        import yaml

        OmegaConf.update(saved, key.lstrip("+"), yaml.safe_load(value) if value != "" else None, force_add=True)
    saved.resume = str(run_dir)
    return saved


def run_groups(run_dir: Path, argv: list[str], config_dir: str) -> list[str]:
    """The config-group choices a run was started with (its .hydra/overrides.yaml, e.g. experiment=rl_smoke,
    data=shards) that `argv` does not set: a resume composes them again, so that a field override of one of the run's
    own groups (rl.num_episodes, data.max_tokens) is a known key. The run's saved config.yaml stays what is resumed."""
    record = run_dir / ".hydra" / "overrides.yaml"
    if not record.is_file():
        return []
    set_here = {a.split("=", 1)[0].lstrip("+~") for a in argv if "=" in a and not a.startswith("-")}
    groups = []
    for override in OmegaConf.load(record):
        key, _, value = str(override).partition("=")
        if "." in key or key.startswith(("+", "~")) or key in set_here or key in ("hydra", "resume"):
            continue
        if (Path(config_dir) / key / f"{value}.yaml").is_file():
            groups.append(f"{key}={value}")
    return groups


def prepare_argv(argv: list[str], config_dir: str | None = None) -> list[str]:
    """Check and adjust the command line before Hydra creates folders: the output folder must be writable, a
    `resume=` folder must exist (then its path is quoted for Hydra's parser, so a sweep job's folder such as
    `0_model.gamma_init=0.01,seed=1` works pasted as printed), and a resumed run's Hydra record goes beside its
    original one. Raises UserError (or RunDirError) with the message to print."""
    out = []
    rank, world = launched_rank()
    resuming = any(a.startswith("resume=") and a not in ("resume=null", "resume=") for a in argv)
    if world > 1:
        explicit = any(a.startswith("hydra.run.dir=") for a in argv)
        if launch_key() is None and not (resuming or explicit):
            raise UserError(
                f"this is rank {rank} of {world} processes that all run this command line (torchrun/srun), and they "
                "must agree on one run folder: start torchrun with --standalone (one node) or --rdzv-id=<job id> "
                "(several nodes), or name the folder with hydra.run.dir=outputs/<name>/<folder>.")
        if rank > 0:  # rank 0 keeps the run's Hydra record and train.log; the others log to train_rank<r>.log
            out += ["hydra.output_subdir=null", f"hydra.job.name=train_rank{rank}"]
    for arg in argv:
        if arg.startswith("resume=") and arg not in ("resume=null", "resume="):
            path = arg.split("=", 1)[1]
            if path[:1] in ("'", '"') and path[-1:] == path[:1]:
                path = path[1:-1]
            if not Path(path).is_dir():
                raise UserError(f"resume={path}: that folder does not exist. Pass the run folder printed at the end "
                                "of a run (outputs/<name>/<date>_<time>_<id>); nothing was created.")
            arg = "resume='" + path.replace("\\", "\\\\").replace("'", "\\'") + "'"
            if rank == 0:
                out.append(f"hydra.output_subdir=.hydra/resume-{_PROCESS_TIME}")
            if config_dir is not None:
                out += run_groups(Path(path), argv, config_dir)
        out.append(arg)
    root = next((a.split("=", 1)[1] for a in argv if a.startswith("paths.output_root=")), None)
    ensure_writable(Path(root or os.environ.get("GROUNDTHINK_OUTPUT_ROOT", "outputs")))
    run_dir = next((a.split("=", 1)[1] for a in argv if a.startswith("hydra.run.dir=")), None)
    if run_dir:
        _check_creatable(Path(run_dir))
    return out


def _check_creatable(path: Path) -> None:
    """The nearest existing ancestor of `path` must take a new folder: one is made there and removed again (a
    permission check alone passes for root even where nothing can be created, as in /proc)."""
    parent = path
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    try:
        os.rmdir(tempfile.mkdtemp(prefix=".groundthink-probe-", dir=parent))
    except OSError:
        raise RunDirError(f"output folder {path} cannot be created: {parent} is not writable. Choose a writable "
                          "location with hydra.run.dir=... or paths.output_root=/path/with/space.") from None


def run_entry(hydra_entry: Any, config_dir: str) -> None:
    """Run a Hydra-decorated entry with GroundThink's command-line checks and unknown-key hints. A single run's clock
    ("command to first step" in its summary) starts when the command did (command_started), unless GROUNDTHINK_T0
    already holds a start."""
    os.environ.setdefault("GROUNDTHINK_T0", str(command_started()))
    from groundthink.cli_checks import explain_override_errors

    try:
        sys.argv[1:] = prepare_argv(sys.argv[1:], config_dir)
    except (UserError, RunDirError) as exc:
        print(f"Error: {exc}", file=sys.stderr)
        raise SystemExit(1) from None
    try:
        hydra_entry()
    except SystemExit as exc:
        if exc.code not in (0, None):
            explain_override_errors(sys.argv[1:], config_dir)
        raise
