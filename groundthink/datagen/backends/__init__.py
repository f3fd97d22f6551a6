"""Generation backends, registered by name (the `backend=` choice; conf/backend/<name>.yaml holds the settings).

- `openai`: any OpenAI-compatible HTTP server through the `openai` client (backends/openai_http.py);
- `groundthink`: a trained GroundThink run in-process (backends/groundthink_run.py);
- `hf`: a Hugging Face causal LM in-process, completion mode only (backends/hf.py).

Each module is imported only when its backend is chosen, so an HTTP run never imports torch or transformers.
"""

from __future__ import annotations

import importlib
from typing import Any

from groundthink.datagen.backends.base import (
    Backend,
    BackendError,
    CompletionRequest,
    CompletionResult,
    FatalBackendError,
    LabelLogprobs,
    RequestRejected,
    RetryableError,
)

BACKENDS: dict[str, str] = {
    "openai": "groundthink.datagen.backends.openai_http:OpenAIBackend",
    "groundthink": "groundthink.datagen.backends.groundthink_run:GroundThinkBackend",
    "hf": "groundthink.datagen.backends.hf:HFBackend",
}
IN_PROCESS = ("groundthink", "hf")

__all__ = [
    "BACKENDS",
    "Backend",
    "BackendError",
    "CompletionRequest",
    "CompletionResult",
    "FatalBackendError",
    "LabelLogprobs",
    "RequestRejected",
    "RetryableError",
    "build_backend",
]


def build_backend(kind: str, settings: dict[str, Any], *, guard: dict[str, Any]) -> Backend:
    """The backend `kind` built from its settings (conf/backend/<kind>.yaml minus `kind` and `name`) and, for
    in-process backends, the guard settings (enabled, sentinels, sentinel_tokens)."""
    if kind not in BACKENDS:
        raise ValueError(f"backend.kind={kind!r} is not a backend; allowed: {', '.join(BACKENDS)}")
    module_name, class_name = BACKENDS[kind].split(":")
    cls = getattr(importlib.import_module(module_name), class_name)
    kwargs = dict(settings)
    if kind in IN_PROCESS:
        kwargs.update(guard_enabled=guard["enabled"], sentinels=list(guard["sentinels"]),
                      sentinel_tokens=int(guard["sentinel_tokens"]))
    try:
        return cls(**kwargs)
    except TypeError as exc:
        raise ValueError(f"backend={kind}: {exc} (check the keys under backend: in conf/backend/{kind}.yaml)") from None
