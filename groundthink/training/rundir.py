"""Run identifiers and run folders: `outputs/<experiment>/<YYYY-MM-DD_HH-MM-SS>_<run_id>`.

The run id is 8 hex digits from os.urandom, so jobs started in the same second (a Hydra multirun, SLURM
arrays) never share a folder; the folder is created with exist_ok=False as a second guard. `ensure_writable`
checks an output folder before any training starts, so a read-only or full disk fails in the first second, not
at the first checkpoint.
"""

from __future__ import annotations

import errno
import os
import shutil
import tempfile
from datetime import datetime
from pathlib import Path, PurePosixPath

DEFAULT_MIN_FREE_BYTES = 64 * 2**20
_PROBE_BYTES = 4096


class RunDirError(RuntimeError):
    """The output folder cannot be used; the message names the path and how to choose another one."""


def new_run_id() -> str:
    """8 lowercase hex digits from os.urandom (32 bits: ~1e-4 chance of any repeat among 1000 ids)."""
    return os.urandom(4).hex()


def make_run_dir(
    root: str | os.PathLike, experiment: str, run_id: str | None = None, now: datetime | None = None
) -> Path:
    """Create and return `<root>/<experiment>/<YYYY-MM-DD_HH-MM-SS>_<run_id>` (local time).

    `experiment` may contain '/' for nested groups but no '..' or absolute paths. Raises RunDirError when the
    folder already exists (never reuses another run's folder) or cannot be created.
    """
    parts = PurePosixPath(experiment).parts
    if not experiment or PurePosixPath(experiment).is_absolute() or ".." in parts:
        raise RunDirError(
            f"experiment name {experiment!r} must be a relative name like 'ablate_gamma' "
            "(no '..', not absolute)"
        )
    run_id = run_id or new_run_id()
    stamp = (now or datetime.now()).strftime("%Y-%m-%d_%H-%M-%S")
    run_dir = Path(root).joinpath(*parts, f"{stamp}_{run_id}")
    try:
        run_dir.parent.mkdir(parents=True, exist_ok=True)
        run_dir.mkdir(exist_ok=False)
    except FileExistsError:
        raise RunDirError(
            f"run folder {run_dir} already exists; refusing to write into another run's folder "
            "(use a new run id, or resume=<that folder> to continue it)"
        ) from None
    except OSError as exc:
        raise RunDirError(_unwritable_message(Path(root), exc)) from exc
    return run_dir


def _unwritable_message(directory: Path, exc: OSError) -> str:
    reason = {
        errno.EROFS: "the file system is read-only",
        errno.ENOSPC: "the disk is full",
        errno.EDQUOT: "the disk quota is exceeded",
        errno.EACCES: "permission denied",
        errno.EPERM: "operation not permitted",
    }.get(exc.errno, exc.strerror or type(exc).__name__)
    return (
        f"output folder {directory} is not writable: {reason} ({exc}). Choose a writable location with "
        "paths.output_root=/path/with/space (or GROUNDTHINK_OUTPUT_ROOT=...)."
    )


def ensure_writable(directory: str | os.PathLike, min_free_bytes: int = DEFAULT_MIN_FREE_BYTES) -> Path:
    """Create `directory` if needed and prove it takes a real write (probe file written, fsynced, removed).

    Raises RunDirError naming the path when it is read-only, not a folder, not permitted, or has less than
    `min_free_bytes` free.
    """
    directory = Path(directory)
    if directory.exists() and not directory.is_dir():
        raise RunDirError(
            f"output folder {directory} exists but is not a folder. Choose another location with "
            "paths.output_root=/path/with/space."
        )
    try:
        directory.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".groundthink-write-probe-", dir=directory)
        try:
            os.write(fd, b"\0" * _PROBE_BYTES)
            os.fsync(fd)
        finally:
            os.close(fd)
            os.unlink(probe)
    except OSError as exc:
        raise RunDirError(_unwritable_message(directory, exc)) from exc
    free = shutil.disk_usage(directory).free
    if free < min_free_bytes:
        raise RunDirError(
            f"output folder {directory} has only {free / 2**20:.1f} MiB free (at least "
            f"{min_free_bytes / 2**20:.0f} MiB is needed for checkpoints and logs). Free space or choose "
            "another location with paths.output_root=/path/with/space."
        )
    return directory
