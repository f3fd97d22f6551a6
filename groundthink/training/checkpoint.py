"""Safetensors checkpoints with a JSON sidecar: atomic saves, verified loads, rotation, never pickle.

A checkpoint named `<name>` is two files in one folder:

    <name>.safetensors   the tensors, flat `{key: Tensor}`; its header's `__metadata__` repeats the format
                         version and the sidecar's meta (so the weights file describes itself)
    <name>.json          the sidecar: `format`, `format_version`, `saved_utc`, `integrity` = {file, bytes,
                         sha256 of the .safetensors file, meta_sha256 of the canonical meta JSON}, then the
                         caller's meta keys at top level (step, run_id, config, provenance, ...)

Training checkpoints (groundthink/training/lightning_io.py) store Lightning's whole checkpoint dict: its tensors
flattened under their dotted paths (model weights under "state_dict.model.", optimizer moments under
"optimizer_states.", the carried recurrent state under "carried_state.", RNG states under "rng."), and its
structure as JSON in the sidecar's "lightning" entry.

Saving writes both files to temporary names in the same folder, fsyncs them, then renames them over the final
names, tensors first and the sidecar last; if the second rename fails, the previous tensors file is put back,
so a failed save leaves the previous checkpoint of that name intact. Loading verifies the sidecar, the byte
size, the sha256 and the safetensors header before it returns anything.
"""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import math
import os
import random
import re
import secrets
import shutil
import time
from collections.abc import Mapping
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load as safetensors_load
from safetensors.torch import save_file

log = logging.getLogger(__name__)

FORMAT = "groundthink-checkpoint"
FORMAT_VERSION = 1
SIDECAR_RESERVED = ("format", "format_version", "saved_utc", "integrity")
_STEP_RE = re.compile(r"^step_(\d+)\.safetensors$")
_TMP_MARK = ".tmp-"
_STALE_TMP_S = 3600.0
_CHUNK = 1 << 20


class CheckpointError(RuntimeError):
    """A checkpoint cannot be written or read; the message says which file, what is wrong and what to do."""


def save_checkpoint(
    directory: str | os.PathLike, name: str, tensors: Mapping[str, torch.Tensor], meta: Mapping[str, Any]
) -> Path:
    """Atomically write `<directory>/<name>.safetensors` and its sidecar `<name>.json`; returns the first.

    `meta` must be JSON-serialisable with string keys and must not use the sidecar's own keys
    (format, format_version, saved_utc, integrity). Raises CheckpointError on any OSError (read-only folder,
    disk full, ...); the previous checkpoint under `name` is then unchanged.
    """
    directory = Path(directory)
    final_tensors = directory / f"{name}.safetensors"
    final_sidecar = directory / f"{name}.json"
    if not name or "/" in name or name.startswith("."):
        raise ValueError(f"checkpoint name {name!r} must be a plain file stem like 'last' or 'step_0000100'")
    clash = [k for k in SIDECAR_RESERVED if k in meta]
    if clash:
        raise ValueError(f"checkpoint meta uses reserved sidecar key(s) {clash}; rename them")
    meta_text = _to_json(dict(meta), what=f"meta for {final_tensors}")
    meta_sha = _meta_sha256(json.loads(meta_text))
    prepared = _prepare_tensors(tensors)
    header = {
        "format": FORMAT,
        "format_version": str(FORMAT_VERSION),
        "meta_sha256": meta_sha,
        "meta": meta_text,
        "key_order": json.dumps(list(prepared)),
    }

    token = secrets.token_hex(4)
    tmp_tensors = directory / f".{name}.safetensors{_TMP_MARK}{token}"
    tmp_sidecar = directory / f".{name}.json{_TMP_MARK}{token}"
    backup = directory / f".{name}.safetensors.prev{_TMP_MARK}{token}"
    try:
        directory.mkdir(parents=True, exist_ok=True)
        try:
            save_file(prepared, str(tmp_tensors), metadata=header)
        except SafetensorError as exc:
            code = re.search(r"os error (\d+)", str(exc))
            raise OSError(int(code.group(1)) if code else errno.EIO, str(exc)) from exc
        size, sha = _fsync_and_hash(tmp_tensors)
        sidecar = {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "saved_utc": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "integrity": {"file": final_tensors.name, "bytes": size, "sha256": sha, "meta_sha256": meta_sha},
            **json.loads(meta_text),
        }
        _write_text_synced(tmp_sidecar, json.dumps(sidecar, indent=1, sort_keys=False) + "\n")
        have_backup = False
        if final_tensors.exists():
            try:
                os.link(final_tensors, backup)
                have_backup = True
            except OSError:
                have_backup = False
        os.replace(tmp_tensors, final_tensors)
        try:
            os.replace(tmp_sidecar, final_sidecar)
        except BaseException:
            if have_backup:
                os.replace(backup, final_tensors)
            else:
                _unlink_quietly(final_tensors)
            raise
        _fsync_dir(directory)
    except OSError as exc:
        raise CheckpointError(_write_error_message(final_tensors, exc)) from exc
    finally:
        for p in (tmp_tensors, tmp_sidecar, backup):
            _unlink_quietly(p)
    return final_tensors


def _write_error_message(target: Path, exc: OSError) -> str:
    reason = {
        errno.EROFS: "the file system is read-only",
        errno.ENOSPC: "the disk is full",
        errno.EDQUOT: "the disk quota is exceeded",
        errno.EACCES: "permission denied",
        errno.EPERM: "operation not permitted",
    }.get(exc.errno, exc.strerror or type(exc).__name__)
    return (
        f"could not write checkpoint {target}: {reason} ({exc}). Nothing was written under that name; the "
        f"previous checkpoint there (if any) is intact. Free space or make {target.parent} writable, or "
        "point the run elsewhere with paths.output_root=/a/writable/disk."
    )


def _prepare_tensors(tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Detached, contiguous CPU tensors, each owning its storage (safetensors refuses shared memory)."""
    out: dict[str, torch.Tensor] = {}
    seen: set[int] = set()
    for key, t in tensors.items():
        if not isinstance(key, str):
            raise ValueError(f"checkpoint tensor keys must be strings, got {key!r}")
        if not isinstance(t, torch.Tensor):
            raise ValueError(
                f"checkpoint value for '{key}' is a {type(t).__name__}, not a tensor; put it in meta"
            )
        t = t.detach().to("cpu").contiguous()
        storage = t.untyped_storage()
        if storage.data_ptr() in seen or storage.nbytes() != t.numel() * t.element_size():
            t = t.clone()
        if t.numel():
            seen.add(t.untyped_storage().data_ptr())
        out[key] = t
    return out


def _meta_sha256(meta: Mapping[str, Any]) -> str:
    """sha256 of the canonical JSON (sorted keys, no spaces) of a meta dict that came out of json.loads."""
    return hashlib.sha256(json.dumps(meta, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def _to_json(obj: Any, what: str) -> str:
    def default(x: Any) -> Any:
        if isinstance(x, os.PathLike):
            return os.fspath(x)
        if isinstance(x, np.generic):
            return x.item()
        if isinstance(x, torch.dtype):
            return str(x)
        raise TypeError(f"{type(x).__name__} is not JSON-serialisable")

    try:
        text = json.dumps(obj, separators=(",", ":"), default=default)
        return text
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{what} must be JSON with string keys (no tensors, no objects): {exc}") from exc


def _fsync_and_hash(path: Path) -> tuple[int, str]:
    h = hashlib.sha256()
    size = 0
    with open(path, "rb+") as f:
        os.fsync(f.fileno())
        while chunk := f.read(_CHUNK):
            h.update(chunk)
            size += len(chunk)
    return size, h.hexdigest()


def _write_text_synced(path: Path, text: str) -> None:
    with open(path, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())


def _fsync_dir(directory: Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _unlink_quietly(path: Path) -> None:
    try:
        path.unlink()
    except FileNotFoundError:
        pass
    except OSError as exc:
        log.warning("could not remove temporary file %s: %s", path, exc)


def _paths(path: str | os.PathLike) -> tuple[Path, Path]:
    path = Path(path)
    if path.suffix == ".json":
        path = path.with_suffix(".safetensors")
    elif path.suffix != ".safetensors":
        path = path.with_name(path.name + ".safetensors")
    return path, path.with_suffix(".json")


def _alternatives(tensors_path: Path) -> str:
    others = [p.name for p in list_checkpoints(tensors_path.parent) if p != tensors_path]
    if others:
        shown = ", ".join(others[:5]) + (" ..." if len(others) > 5 else "")
        return f"Use another checkpoint from {tensors_path.parent}: {shown}."
    return "No other checkpoint is in that folder; restart the run without resume."


def _fail(tensors_path: Path, problem: str) -> CheckpointError:
    return CheckpointError(f"checkpoint {tensors_path} is {problem}. {_alternatives(tensors_path)}")


def _read_sidecar(tensors_path: Path, sidecar_path: Path) -> dict[str, Any]:
    try:
        text = sidecar_path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise _fail(
            tensors_path,
            f"missing its sidecar {sidecar_path.name} (an interrupted save or a copied "
            "file); it cannot be verified, so it is not loaded",
        ) from None
    except OSError as exc:
        raise _fail(
            tensors_path, f"unreadable: its sidecar {sidecar_path.name} cannot be read ({exc})"
        ) from exc
    try:
        sidecar = json.loads(text)
        integrity = sidecar["integrity"]
        expected_bytes, expected_sha = int(integrity["bytes"]), str(integrity["sha256"])
        meta_sha = str(integrity["meta_sha256"])
    except (ValueError, KeyError, TypeError) as exc:
        raise _fail(
            tensors_path,
            f"unreadable: its sidecar {sidecar_path.name} is not a GroundThink sidecar "
            f"(malformed or tampered: {exc!r})",
        ) from exc
    if sidecar.get("format") != FORMAT:
        raise _fail(tensors_path, f"unreadable: sidecar format {sidecar.get('format')!r} is not {FORMAT!r}")
    version = sidecar.get("format_version")
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise _fail(
            tensors_path,
            f"unreadable: sidecar format_version {version!r} is newer than this GroundThink "
            f"supports ({FORMAT_VERSION}); upgrade GroundThink",
        )
    meta = {k: v for k, v in sidecar.items() if k not in SIDECAR_RESERVED}
    if _meta_sha256(meta) != meta_sha:
        raise _fail(
            tensors_path,
            f"tampered: its sidecar {sidecar_path.name} was edited after saving (meta hash mismatch)",
        )
    return {"meta": meta, "bytes": expected_bytes, "sha256": expected_sha, "meta_sha256": meta_sha}


def _check_bytes(tensors_path: Path, data: bytes, info: dict[str, Any]) -> None:
    if len(data) != info["bytes"]:
        kind = "truncated" if len(data) < info["bytes"] else "corrupt (longer than recorded)"
        raise _fail(tensors_path, f"{kind}: {len(data)} bytes on disk, the sidecar records {info['bytes']}")
    if hashlib.sha256(data).hexdigest() != info["sha256"]:
        raise _fail(tensors_path, "tampered or corrupt: its sha256 does not match the sidecar")


def load_checkpoint(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Verify and load `<name>.safetensors` (or its `.json`) -> (tensors, meta), else raise CheckpointError.

    `meta` is exactly the dict given to `save_checkpoint` (after a JSON round trip). Nothing is returned
    unless the sidecar, the byte size, the sha256 and the safetensors header all check out.
    """
    tensors_path, sidecar_path = _paths(path)
    if not tensors_path.exists():
        raise _fail(tensors_path, "missing (no such file)")
    info = _read_sidecar(tensors_path, sidecar_path)
    try:
        data = tensors_path.read_bytes()
    except OSError as exc:
        raise _fail(tensors_path, f"unreadable ({exc})") from exc
    _check_bytes(tensors_path, data, info)
    try:
        tensors = safetensors_load(data)
        order = json.loads(_header_metadata(data).get("key_order", "[]"))
    except (SafetensorError, ValueError, RuntimeError) as exc:
        raise _fail(tensors_path, f"unreadable: safetensors cannot parse it ({exc})") from exc
    if sorted(order) == sorted(tensors):
        tensors = {k: tensors[k] for k in order}
    return tensors, info["meta"]


def _header_metadata(data: bytes) -> dict[str, str]:
    """The `__metadata__` of a safetensors file held in memory (8-byte little-endian length, then JSON)."""
    n = int.from_bytes(data[:8], "little")
    return json.loads(data[8 : 8 + n]).get("__metadata__") or {}


def verify_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """Full integrity check without keeping the tensors; returns the meta or raises CheckpointError."""
    tensors_path, sidecar_path = _paths(path)
    if not tensors_path.exists():
        raise _fail(tensors_path, "missing (no such file)")
    info = _read_sidecar(tensors_path, sidecar_path)
    h = hashlib.sha256()
    size = 0
    try:
        with open(tensors_path, "rb") as f:
            while chunk := f.read(_CHUNK):
                h.update(chunk)
                size += len(chunk)
        if size == info["bytes"] and h.hexdigest() == info["sha256"]:
            with safe_open(str(tensors_path), framework="pt") as f:
                f.keys()
    except OSError as exc:
        raise _fail(tensors_path, f"unreadable ({exc})") from exc
    except (SafetensorError, ValueError, RuntimeError) as exc:
        raise _fail(tensors_path, f"unreadable: safetensors cannot parse it ({exc})") from exc
    if size != info["bytes"]:
        kind = "truncated" if size < info["bytes"] else "corrupt (longer than recorded)"
        raise _fail(tensors_path, f"{kind}: {size} bytes on disk, the sidecar records {info['bytes']}")
    if h.hexdigest() != info["sha256"]:
        raise _fail(tensors_path, "tampered or corrupt: its sha256 does not match the sidecar")
    return info["meta"]


def _checkpoint_dir(run_or_checkpoint_dir: str | os.PathLike) -> Path:
    d = Path(run_or_checkpoint_dir)
    return d / "checkpoints" if (d / "checkpoints").is_dir() else d


def list_checkpoints(directory: str | os.PathLike) -> list[Path]:
    """`last.safetensors` (if present) then `step_*.safetensors` newest first. Nothing is verified."""
    d = _checkpoint_dir(directory)
    if not d.is_dir():
        return []
    steps = sorted(((int(m.group(1)), p) for p in d.iterdir() if (m := _STEP_RE.match(p.name))), reverse=True)
    last = [d / "last.safetensors"] if (d / "last.safetensors").exists() else []
    return last + [p for _, p in steps]


def find_last_good_checkpoint(run_dir: str | os.PathLike) -> Path | None:
    """Newest checkpoint in `run_dir/checkpoints` (or `run_dir` itself) that verifies fully, else None.

    Candidates are ordered by step (last.safetensors by the step in its sidecar, ties go to last); a corrupt,
    truncated or half-written candidate is skipped with a warning and the next older one is tried.
    """
    candidates: list[tuple[float, int, Path]] = []
    for p in list_checkpoints(run_dir):
        m = _STEP_RE.match(p.name)
        if m:
            candidates.append((int(m.group(1)), 0, p))
        else:
            candidates.append((_sidecar_step(p.with_suffix(".json")), 1, p))
    for _, _, p in sorted(candidates, key=lambda c: (c[0], c[1]), reverse=True):
        try:
            verify_checkpoint(p)
        except CheckpointError as exc:
            log.warning("skipping checkpoint: %s", exc)
            continue
        return p
    return None


def _sidecar_step(sidecar: Path) -> float:
    """Step recorded in a sidecar, for ordering (inf when it records none, -1 when unreadable)."""
    try:
        step = json.loads(sidecar.read_text(encoding="utf-8")).get("step")
        return float(int(step)) if step is not None else math.inf
    except (OSError, ValueError, TypeError, AttributeError):
        return -1.0


def remove_checkpoint(path: str | os.PathLike) -> None:
    """Delete a checkpoint pair, sidecar first, so a crash in between never leaves a valid-looking pair."""
    tensors_path, sidecar_path = _paths(path)
    for p in (sidecar_path, tensors_path):
        try:
            p.unlink()
        except FileNotFoundError:
            pass


def remove_stale_temp_files(directory: str | os.PathLike, older_than_s: float = 0.0) -> list[Path]:
    """Delete the temporary files of saves that were killed (`.<name>.<ext>.tmp-*`) and are older than
    `older_than_s`; returns them. A run calls it with 0 when it starts or resumes: it owns its folder then."""
    d = _checkpoint_dir(directory)
    removed = []
    if not d.is_dir():
        return removed
    now = time.time()
    for p in d.iterdir():
        if p.name.startswith(".") and _TMP_MARK in p.name:
            try:
                if now - p.stat().st_mtime >= older_than_s:
                    p.unlink()
                    removed.append(p)
            except OSError:
                pass
    return removed


def link_checkpoint(directory: str | os.PathLike, source: str, target: str) -> Path:
    """Make checkpoint `target` the same as `source` without a second copy of the tensors: the tensors file is
    hard-linked (copied where the file system has no hard links) and the sidecar rewritten with its own name, each
    put in place atomically, tensors first, as save_checkpoint does."""
    d = Path(directory)
    src_tensors, src_sidecar = d / f"{source}.safetensors", d / f"{source}.json"
    dst_tensors, dst_sidecar = d / f"{target}.safetensors", d / f"{target}.json"
    token = secrets.token_hex(4)
    tmp_tensors = d / f".{target}.safetensors{_TMP_MARK}{token}"
    tmp_sidecar = d / f".{target}.json{_TMP_MARK}{token}"
    try:
        try:
            os.link(src_tensors, tmp_tensors)
        except OSError:
            shutil.copy2(src_tensors, tmp_tensors)
        sidecar = json.loads(src_sidecar.read_text(encoding="utf-8"))
        sidecar["integrity"]["file"] = dst_tensors.name
        _write_text_synced(tmp_sidecar, json.dumps(sidecar, indent=1, sort_keys=False) + "\n")
        os.replace(tmp_tensors, dst_tensors)
        os.replace(tmp_sidecar, dst_sidecar)
        _fsync_dir(d)
    except OSError as exc:
        raise CheckpointError(_write_error_message(dst_tensors, exc)) from exc
    finally:
        for p in (tmp_tensors, tmp_sidecar):
            _unlink_quietly(p)
    return dst_tensors


def rotate_checkpoints(directory: str | os.PathLike, keep: int) -> list[Path]:
    """Keep `last` and the newest `keep` step_* checkpoints (keep < 0 keeps all); returns the removed paths.

    Also removes temporary files left by saves that were killed more than an hour ago (another process may still
    be writing younger ones).
    """
    d = _checkpoint_dir(directory)
    if not d.is_dir():
        return []
    remove_stale_temp_files(d, older_than_s=_STALE_TMP_S)
    if keep < 0:
        return []
    steps = [p for p in list_checkpoints(d) if _STEP_RE.match(p.name)]
    removed = steps[keep:]
    for p in removed:
        remove_checkpoint(p)
    return removed


def capture_rng_state() -> dict[str, Any]:
    """Torch CPU/CUDA generator states (uint8 tensors) plus numpy and python `random` states (JSON lists)."""
    np_name, np_keys, np_pos, np_has_gauss, np_gauss = np.random.get_state()
    py_version, py_internal, py_gauss = random.getstate()
    return {
        "torch": torch.get_rng_state(),
        "cuda": [s.cpu() for s in torch.cuda.get_rng_state_all()] if torch.cuda.is_available() else [],
        "numpy": {
            "name": str(np_name),
            "keys": [int(k) for k in np_keys],
            "pos": int(np_pos),
            "has_gauss": int(np_has_gauss),
            "cached_gaussian": float(np_gauss),
        },
        "python": [py_version, list(py_internal), py_gauss],
    }


def restore_rng_state(rng: Mapping[str, Any]) -> None:
    """Inverse of `capture_rng_state` (accepts the lists/tuples a JSON or checkpoint round trip produces)."""
    if rng.get("torch") is not None:
        torch.set_rng_state(rng["torch"].to("cpu", torch.uint8))
    cuda_states = list(rng.get("cuda") or [])
    if cuda_states:
        if torch.cuda.is_available():
            n = min(len(cuda_states), torch.cuda.device_count())
            if n != len(cuda_states):
                log.warning(
                    "checkpoint has RNG states for %d CUDA devices, restoring %d", len(cuda_states), n
                )
            for i in range(n):
                torch.cuda.set_rng_state(cuda_states[i].to("cpu", torch.uint8), device=i)
        else:
            log.warning(
                "checkpoint has CUDA RNG states but CUDA is not available here; they are not restored"
            )
    npst = rng.get("numpy")
    if npst is not None:
        np.random.set_state(
            (
                npst["name"],
                np.asarray(npst["keys"], dtype=np.uint32),
                int(npst["pos"]),
                int(npst["has_gauss"]),
                float(npst["cached_gaussian"]),
            )
        )
    pyst = rng.get("python")
    if pyst is not None:
        version, internal, gauss = pyst
        random.setstate((int(version), tuple(int(v) for v in internal), gauss))
