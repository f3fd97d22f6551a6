"""Where a run came from: code version, software versions, machine and command, as one JSON-safe dict.

One `git status --porcelain=v2 --branch` call gives the commit, the branch and the dirty flag (untracked files
such as outputs/ are ignored; GIT_OPTIONAL_LOCKS=0 so parallel jobs never fight over the index lock). When the
tree is dirty, `git diff HEAD` is hashed so two dirty runs can be told apart. Package versions come from the
installed metadata, so nothing heavy is imported. Outside a git repository, or without git, the git fields are
None; nothing here raises.
"""

from __future__ import annotations

import hashlib
import os
import platform
import shlex
import socket
import subprocess
import sys
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import Any

_GIT_TIMEOUT_S = 2.0
_PACKAGES = (
    "torch",
    "lightning",
    "hydra-core",
    "omegaconf",
    "wandb",
    "safetensors",
    "numpy",
    "datasets",
    "tokenizers",
    "flash-linear-attention",
    "mamba-ssm",
    "groundthink",
)


def _git(repo: Path, *args: str) -> str | None:
    env = {**os.environ, "GIT_OPTIONAL_LOCKS": "0", "LC_ALL": "C"}
    try:
        done = subprocess.run(
            ["git", "-C", str(repo), *args], capture_output=True, timeout=_GIT_TIMEOUT_S, env=env, check=False
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return done.stdout.decode("utf-8", "replace") if done.returncode == 0 else None


def git_info(repo_dir: str | os.PathLike) -> dict[str, Any]:
    """{"git_sha", "git_branch", "git_dirty", "git_diff_sha256"}; all None outside a repository."""
    info: dict[str, Any] = {"git_sha": None, "git_branch": None, "git_dirty": None, "git_diff_sha256": None}
    status = _git(Path(repo_dir), "status", "--porcelain=v2", "--branch", "--untracked-files=no")
    if status is None:
        return info
    dirty = False
    for line in status.splitlines():
        if line.startswith("# branch.oid "):
            oid = line.split(" ", 2)[2]
            info["git_sha"] = None if oid == "(initial)" else oid
        elif line.startswith("# branch.head "):
            head = line.split(" ", 2)[2]
            info["git_branch"] = None if head == "(detached)" else head
        elif line and not line.startswith("#"):
            dirty = True
    info["git_dirty"] = dirty
    if dirty and info["git_sha"] is not None:
        diff = _git(Path(repo_dir), "diff", "HEAD", "--no-color", "--no-ext-diff")
        if diff is not None:
            info["git_diff_sha256"] = hashlib.sha256(diff.encode()).hexdigest()
    return info


def _versions() -> dict[str, str | None]:
    out: dict[str, str | None] = {}
    for dist in _PACKAGES:
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            out[dist] = None
    return out


def _accelerator() -> dict[str, Any]:
    info: dict[str, Any] = {"cuda": None, "cudnn": None, "gpu_name": None, "gpu_count": 0}
    torch = sys.modules.get("torch")
    if torch is None:
        try:
            import torch
        except ImportError:
            return info
    info["cuda"] = torch.version.cuda
    try:
        if torch.cuda.is_available():
            info["gpu_count"] = torch.cuda.device_count()
            info["gpu_name"] = torch.cuda.get_device_name(0)
            info["cudnn"] = torch.backends.cudnn.version()
    except Exception:  # noqa: BLE001 - a broken driver must not stop a run from recording its provenance
        pass
    return info


def default_repo_dir() -> Path:
    """The checkout this package was imported from (…/groundthink/training -> repository root)."""
    return Path(__file__).resolve().parents[2]


def collect_provenance(repo_dir: str | os.PathLike | None = None) -> dict[str, Any]:
    """Git state of `repo_dir` (default: GroundThink's own checkout), versions, machine, command, UTC time."""
    versions = _versions()
    return {
        **git_info(repo_dir if repo_dir is not None else default_repo_dir()),
        "python": platform.python_version(),
        "torch": versions["torch"],
        **_accelerator(),
        "lightning": versions["lightning"],
        "hydra": versions["hydra-core"],
        "wandb": versions["wandb"],
        "packages": versions,
        "hostname": socket.gethostname(),
        "platform": platform.platform(),
        "command": shlex.join([sys.executable, *sys.argv]),
        "cwd": os.getcwd(),
        "timestamp_utc": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
