"""Import a legacy `torch.save` checkpoint as a GroundThink safetensors checkpoint, never running pickle.

    python -m groundthink.convert_legacy OLD.pt OUT_DIR [--name NAME]

The file is opened with `torch.load(..., weights_only=True)`, which only rebuilds tensors and plain containers
and refuses any other Python object. Accepted layouts: a raw state dict, or a dict holding one under "model",
"state_dict", "model_state_dict" or "module". Common wrapper prefixes ("module.", "model.", "_orig_mod.") that
every key shares are stripped; the weights are written under "model." with a sidecar that records
`converted_from` (path, sha256, bytes), the stripped prefixes, plain JSON extras of the old file (step, epoch,
args...) and provenance. The result holds weights only: it can be evaluated, not resumed.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import pickle
import re
import sys
from pathlib import Path
from typing import Any

import torch

from groundthink.training.checkpoint import CheckpointError, save_checkpoint
from groundthink.training.provenance import collect_provenance

STATE_DICT_KEYS = ("model", "state_dict", "model_state_dict", "module")
STRIP_PREFIXES = ("module.", "model.", "_orig_mod.")


class LegacyConversionError(CheckpointError):
    """The legacy file cannot be converted safely; the message says why and what to do."""


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def _is_state_dict(obj: Any) -> bool:
    return (
        isinstance(obj, dict)
        and bool(obj)
        and all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items())
    )


def _json_extras(obj: dict[str, Any], skip: str | None) -> tuple[dict[str, Any], list[str]]:
    kept, dropped = {}, []
    for k, v in obj.items():
        if k == skip:
            continue
        try:
            json.dumps(v, allow_nan=True, sort_keys=True)
        except (TypeError, ValueError):
            dropped.append(str(k))
            continue
        if isinstance(k, str):
            kept[k] = v
        else:
            dropped.append(str(k))
    return kept, dropped


def strip_common_prefixes(state: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], list[str]]:
    """Repeatedly remove a wrapper prefix shared by every key (DataParallel 'module.', Lightning 'model.',
    torch.compile '_orig_mod.'); returns (new dict, prefixes removed in order)."""
    stripped: list[str] = []
    changed = True
    while changed:
        changed = False
        for prefix in STRIP_PREFIXES:
            if state and all(k.startswith(prefix) and len(k) > len(prefix) for k in state):
                state = {k[len(prefix) :]: v for k, v in state.items()}
                stripped.append(prefix)
                changed = True
    return state, stripped


def load_legacy(path: str | Path) -> Any:
    """`torch.load(path, weights_only=True)` with an explanation when the file needs pickle."""
    path = Path(path)
    if not path.is_file():
        raise LegacyConversionError(f"legacy checkpoint {path} does not exist or is not a file")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        found = re.search(r"GLOBAL ([\w.]+)", str(exc))
        detail = (
            f"it needs the Python object {found.group(1)}" if found else str(exc).strip().splitlines()[-1]
        )
        raise LegacyConversionError(
            f"{path} contains Python objects beyond tensors and plain containers ({detail}). GroundThink "
            "refuses to load it: unpickling such a file runs code chosen by whoever wrote it. If you trust "
            "the file, re-save just its tensors where it was made, e.g. "
            "torch.save(model.state_dict(), 'weights.pt'), and convert that."
        ) from None
    except (RuntimeError, OSError, EOFError, ValueError) as exc:
        raise LegacyConversionError(f"{path} is not a readable torch.save file: {exc}") from exc


def convert_legacy_checkpoint(src: str | Path, out_dir: str | Path, name: str | None = None) -> Path:
    """Convert `src` into `<out_dir>/<name>.safetensors` + `<name>.json` (name defaults to src's stem)."""
    src = Path(src)
    obj = load_legacy(src)
    container_key = None
    if _is_state_dict(obj):
        state = obj
    elif isinstance(obj, dict):
        container_key = next((k for k in STATE_DICT_KEYS if _is_state_dict(obj.get(k))), None)
        if container_key is None:
            raise LegacyConversionError(
                f"{src} holds a dict with keys {sorted(map(str, obj))[:12]}, but none of "
                f"{list(STATE_DICT_KEYS)} is a state dict (name -> tensor) and it is not one itself."
            )
        state = obj[container_key]
    else:
        raise LegacyConversionError(
            f"{src} holds a {type(obj).__name__}, not a state dict or a dict containing one"
        )
    state, stripped = strip_common_prefixes(dict(state))
    extras, dropped = _json_extras(obj, container_key) if container_key is not None else ({}, [])
    meta = {
        "kind": "weights",
        "converted_from": {
            "path": str(src.resolve()),
            "sha256": _sha256(src),
            "bytes": src.stat().st_size,
            "container_key": container_key,
            "stripped_prefixes": stripped,
        },
        "legacy_extra": extras,
        "legacy_dropped_keys": dropped,
        "num_params": int(sum(t.numel() for t in state.values())),
        "provenance": collect_provenance(),
    }
    tensors = {f"model.{k}": v for k, v in state.items()}
    return save_checkpoint(Path(out_dir), name or src.stem, tensors, meta)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m groundthink.convert_legacy",
        description="Convert a legacy torch.save checkpoint to safetensors + sidecar "
        "(weights_only loading; pickle is never run).",
    )
    parser.add_argument("src", help="legacy .pt/.pth/.ckpt file")
    parser.add_argument("out_dir", help="folder for <name>.safetensors and <name>.json")
    parser.add_argument("--name", default=None, help="output file stem (default: the source file's stem)")
    args = parser.parse_args(argv)
    try:
        out = convert_legacy_checkpoint(args.src, args.out_dir, args.name)
    except CheckpointError as exc:
        print(f"Error: {exc}", file=sys.stderr)
        return 1
    print(f"wrote {out} and {out.with_suffix('.json')}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
