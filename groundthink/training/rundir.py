"""Run identifiers and output folders: runs live in `outputs/<name>/<YYYY-MM-DD_HH-MM-SS>_<run_id>`
(hydra_support.py names them for Hydra).

The run id is 8 hex digits from os.urandom, so jobs started in the same second (a Hydra multirun, SLURM
arrays) never share a folder. `ensure_writable`
checks an output folder before any training starts, so a read-only or full disk fails in the first second, not
at the first checkpoint.
"""

from __future__ import annotations

import errno
import hashlib
import os
import shutil
import tempfile
from pathlib import Path

DEFAULT_MIN_FREE_BYTES = 64 * 2**20
_PROBE_BYTES = 4096


class RunDirError(RuntimeError):
    """The output folder cannot be used; the message names the path and how to choose another one."""


def new_run_id() -> str:
    """8 lowercase hex digits from os.urandom (32 bits: ~1e-4 chance of any repeat among 1000 ids)."""
    return os.urandom(4).hex()


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


def launched_rank() -> tuple[int, int]:
    """(global rank, world size) of a process that torchrun or a multi-task SLURM step started, where every rank
    runs the whole command line; (0, 1) for a plain command (ddp_spawn's workers never run the command line)."""
    env = os.environ
    if "TORCHELASTIC_RUN_ID" in env and "RANK" in env:
        return int(env["RANK"]), int(env.get("WORLD_SIZE", "1"))
    if int(env.get("SLURM_NTASKS", "1") or 1) > 1 and "SLURM_PROCID" in env:
        return int(env["SLURM_PROCID"]), int(env["SLURM_NTASKS"])
    return 0, 1


def launch_key() -> str | None:
    """What every rank of one torchrun / SLURM launch shares and no other launch has: torchrun's rendezvous id (a
    fresh uuid with --standalone, the --rdzv-id given otherwise; torchrun's default "none" is not unique) or the
    SLURM job and step ids. None when there is none."""
    env = os.environ
    if "TORCHELASTIC_RUN_ID" in env:
        run_id = env["TORCHELASTIC_RUN_ID"]
        return None if run_id in ("", "none") else f"torchrun-{run_id}"
    if "SLURM_JOB_ID" in env:
        return f"slurm-{env['SLURM_JOB_ID']}.{env.get('SLURM_STEP_ID', '0')}"
    return None


def launch_run_name(key: str) -> str:
    """The run folder name every rank of a launch computes alike: `<launcher>_<8 hex digits of the key>`."""
    kind = "slurm" + key.split(".")[0][len("slurm"):] if key.startswith("slurm") else "torchrun"
    return f"{kind}_{hashlib.sha256(key.encode()).hexdigest()[:8]}"
