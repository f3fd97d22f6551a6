"""Lightning checkpoints as safetensors + a JSON sidecar, never pickle.

Lightning hands a `CheckpointIO` plugin one nested dict (model weights, optimizer and scheduler states, loop
progress, callback states, and what our module adds: carried recurrent state, data position, RNG states, run
metadata). `flatten_nested` splits it into a flat dict of tensors (for safetensors) and a JSON-safe skeleton in
which every tensor is replaced by a reference to its key; `unflatten_nested` rebuilds the identical structure.
Containers that JSON cannot express (tuples, dicts with non-string keys) are tagged so they round-trip exactly.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch
from lightning.fabric.plugins.io.checkpoint_io import CheckpointIO

from groundthink.training.checkpoint import (
    CheckpointError,
    load_checkpoint,
    remove_checkpoint,
    save_checkpoint,
)

_TENSOR, _TUPLE, _ITEMS, _FLOAT = "__tensor__", "__tuple__", "__dict_items__", "__float__"


def flatten_nested(obj: Any, prefix: str = "") -> tuple[dict[str, torch.Tensor], Any]:
    """Split a nested structure into ({key: tensor}, JSON-safe skeleton)."""
    tensors: dict[str, torch.Tensor] = {}

    def walk(x: Any, path: str) -> Any:
        if isinstance(x, torch.Tensor):
            key = path or "root"
            tensors[key] = x.detach().cpu().contiguous().clone()
            return {_TENSOR: key}
        if isinstance(x, dict):
            if all(isinstance(k, str) for k in x):
                return {k: walk(v, f"{path}.{k}" if path else k) for k, v in x.items()}
            return {_ITEMS: [[walk_key(k), walk(v, f"{path}.{k}")] for k, v in x.items()]}
        if isinstance(x, tuple):
            return {_TUPLE: [walk(v, f"{path}.{i}") for i, v in enumerate(x)]}
        if isinstance(x, list):
            return [walk(v, f"{path}.{i}") for i, v in enumerate(x)]
        if isinstance(x, float) and not math.isfinite(x):
            return {_FLOAT: repr(x)}
        if x is None or isinstance(x, (bool, int, float, str)):
            return x
        if isinstance(x, Path):
            return str(x)
        if isinstance(x, torch.dtype):
            return str(x)
        raise CheckpointError(
            f"cannot store a value of type {type(x).__name__} at '{path}' in a safetensors checkpoint: only tensors, "
            "numbers, strings, None, lists, tuples and dicts are supported (pickle is never used)."
        )

    def walk_key(k: Any) -> Any:
        if isinstance(k, (bool, int, float, str)) or k is None:
            return k
        raise CheckpointError(f"cannot store a dict key of type {type(k).__name__} at '{prefix}'")

    skeleton = walk(obj, prefix)
    return tensors, skeleton


def unflatten_nested(tensors: dict[str, torch.Tensor], skeleton: Any) -> Any:
    """Inverse of `flatten_nested`."""

    def walk(x: Any) -> Any:
        if isinstance(x, dict):
            if set(x) == {_TENSOR}:
                key = x[_TENSOR]
                if key not in tensors:
                    raise CheckpointError(f"checkpoint sidecar refers to tensor '{key}' that is not in the file")
                return tensors[key]
            if set(x) == {_TUPLE}:
                return tuple(walk(v) for v in x[_TUPLE])
            if set(x) == {_ITEMS}:
                return {k: walk(v) for k, v in x[_ITEMS]}
            if set(x) == {_FLOAT}:
                return float(x[_FLOAT])
            return {k: walk(v) for k, v in x.items()}
        if isinstance(x, list):
            return [walk(v) for v in x]
        return x

    return walk(skeleton)


class SafetensorsCheckpointIO(CheckpointIO):
    """Lightning CheckpointIO: `<name>.safetensors` + `<name>.json` (sidecar with integrity hash), atomic."""

    def __init__(self, sidecar_extra: dict[str, Any] | None = None) -> None:
        self.sidecar_extra = sidecar_extra if sidecar_extra is not None else {}

    def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options: Any | None = None) -> None:
        path = Path(path)
        tensors, skeleton = flatten_nested(checkpoint)
        meta = dict(self.sidecar_extra)
        meta.update(checkpoint.get("groundthink", {}))
        meta["lightning"] = skeleton
        save_checkpoint(path.parent, _stem(path), tensors, meta)

    def load_checkpoint(self, path, map_location: Any | None = None, weights_only: bool | None = None) -> dict:
        path = Path(path)
        tensors, meta = load_checkpoint(path.with_name(_stem(path)))
        if "lightning" not in meta:
            raise CheckpointError(
                f"{path} is a GroundThink weights file without training state (no 'lightning' section in its "
                "sidecar): it can be evaluated but not resumed."
            )
        return unflatten_nested(tensors, meta["lightning"])

    def remove_checkpoint(self, path) -> None:
        path = Path(path)
        remove_checkpoint(path.with_name(_stem(path)))


def _stem(path: Path) -> str:
    """The checkpoint name for a path Lightning chose. Ours are plain stems ('last', 'step_0000100'); Lightning's
    `ddp_spawn` launcher hands its weights back to the main process through '.temp.ckpt' in a temporary folder,
    which is stored here as 'temp_ckpt' (same folder) so that save, load and remove agree."""
    name = path.name.removesuffix(".safetensors").removesuffix(".json")
    return name.lstrip(".").replace(".", "_") or "checkpoint"
