"""GroundThink: configuration-driven experiments with small hybrid recurrent language models.

`groundthink.load(path)` brings a trained run back (model, tokenizer, config); see groundthink/loading.py.
"""

from __future__ import annotations

import time
from typing import Any

# When this process first imported groundthink: where the process's own start time cannot be read, a command's
# clock starts here (groundthink.hydra_support.command_started).
_IMPORTED_AT = time.time()
__version__ = "0.1.0"
__all__ = ["LoadError", "LoadedRun", "load"]


def __getattr__(name: str) -> Any:
    # Lazy, so `import groundthink` (and every CLI's start-up) does not import torch.
    if name in __all__:
        from groundthink import loading

        return getattr(loading, name)
    raise AttributeError(f"module 'groundthink' has no attribute {name!r}")
