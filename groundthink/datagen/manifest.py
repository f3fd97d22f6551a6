"""manifest.json: one per datagen run folder — where the data came from and what is in the folder.

It holds the provenance of the code and machine (`groundthink.training.provenance`: git SHA, branch, dirty flag,
Python/torch/CUDA versions, host, command) plus the versions of the datagen packages, the resolved
config, the generator's identity, the contamination guard's sentinel results, counts per phase, the QC verdict,
every invocation (start, end, status, command) and the artifact list with each file's size, line count and
sha256. It is rewritten atomically at the end of every invocation; a killed invocation is missing from it until
the next one records the folder again.

No secret is ever written: configs hold only the *name* of the key's environment variable, and as a last line of
defence every string written here has the key's value (if one is set) replaced by "***".
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
from importlib import metadata
from pathlib import Path
from typing import Any

MANIFEST_FILE = "manifest.json"
CONFIG_FILE = "config.yaml"
_SKIP = {".lock", MANIFEST_FILE}
_DATAGEN_PACKAGES = ("groundthink", "openai", "tenacity", "transformers", "httpx", "httpx2", "tokenizers",
                     "hydra-core", "torch")


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def artifacts(out_dir: Path) -> list[dict[str, Any]]:
    entries = []
    for path in sorted(p for p in out_dir.rglob("*") if p.is_file()):
        rel = path.relative_to(out_dir).as_posix()
        if rel in _SKIP or rel.endswith(".tmp"):
            continue
        entry: dict[str, Any] = {"path": rel, "bytes": path.stat().st_size, "sha256": sha256_file(path)}
        if path.suffix == ".jsonl":
            with open(path, "rb") as f:
                entry["lines"] = sum(1 for _ in f)
        entries.append(entry)
    return entries


def package_versions() -> dict[str, str | None]:
    out: dict[str, str | None] = {}
    for name in _DATAGEN_PACKAGES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    return out


def scrub(value: Any, secrets: list[str]) -> Any:
    """`value` with every occurrence of each secret (non-empty, at least 4 characters) replaced by ***."""
    secrets = [s for s in secrets if s and len(s) >= 4]
    if not secrets:
        return value
    if isinstance(value, str):
        for secret in secrets:
            value = value.replace(secret, "***")
        return value
    if isinstance(value, dict):
        return {scrub(k, secrets): scrub(v, secrets) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [scrub(v, secrets) for v in value]
    return value


def load_manifest(out_dir: Path) -> dict[str, Any] | None:
    path = out_dir / MANIFEST_FILE
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except ValueError:
        return None


def write_json_atomic(path: Path, payload: Any) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        f.write(json.dumps(payload, indent=2, default=str, allow_nan=False) + "\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def provenance() -> dict[str, Any]:
    """collect_provenance() when torch is already loaded (an in-process backend: the accelerator matters);
    otherwise the same fields without importing torch (~2-5 s of start-up for an HTTP run, whose model runs on the
    server anyway)."""
    import platform
    import shlex
    import socket
    from datetime import datetime, timezone

    from groundthink.training.provenance import collect_provenance, default_repo_dir, git_info

    if "torch" in sys.modules:
        return collect_provenance()
    return {
        **git_info(default_repo_dir()),
        "python": platform.python_version(),
        "torch": None,
        "cuda": None,
        "hostname": socket.gethostname(),
        "platform": platform.platform(),
        "command": shlex.join([sys.executable, *sys.argv]),
        "cwd": os.getcwd(),
        "timestamp_utc": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }


def write_manifest(out_dir: Path, content: dict[str, Any], *, secrets: list[str]) -> Path:
    payload = {
        "format": "groundthink-datagen-manifest",
        "version": 1,
        **content,
        "provenance": {**provenance(), "datagen_packages": package_versions()},
        "artifacts": artifacts(out_dir),
    }
    path = out_dir / MANIFEST_FILE
    write_json_atomic(path, scrub(payload, secrets))
    return path
