"""A trained GroundThink run as an in-process backend: `groundthink.load(run)` + the generation engine.

Completion mode feeds the prompt as plain text (the guard refuses any control token in it). Chat mode renders the
messages the way the SFT data is rendered (`groundthink.data.render_chat`: `<|role|>content<|end|>` per turn,
turns joined by a newline), opens the assistant turn with `<|assistant|>` and stops at `<|end|>`: the model's own
chat format, used only when the pipeline asks for chat (`pipeline.format=chat`).
"""

from __future__ import annotations

from typing import Any

from groundthink.datagen.backends.base import RequestRejected
from groundthink.datagen.backends.inprocess import InProcessBackend, fatal_load_error, set_threads
from groundthink.datagen.guard import groundthink_guard


class GroundThinkBackend(InProcessBackend):
    name = "groundthink"
    supports_chat = True

    def __init__(self, *, run: str, device: str = "cpu", dtype: str | None = None, num_threads: int | None = None,
                 sentinels: list[str], sentinel_tokens: int = 16, guard_enabled: bool = True,
                 prefill_chunk: int = 512) -> None:
        import torch

        import groundthink
        from groundthink.generation import GenerationEngine, GroundThinkLM

        set_threads(num_threads)
        try:
            loaded = groundthink.load(run, device=device, dtype=getattr(torch, dtype) if dtype else None)
        except (groundthink.LoadError, AttributeError) as exc:
            raise fatal_load_error(f"backend.run={run}", exc) from None
        if loaded.tokenizer is None:
            raise fatal_load_error(f"backend.run={run}", ValueError("the run has no tokenizer, so it cannot read text"))
        self.loaded = loaded
        self.run = str(run)
        engine = GenerationEngine(GroundThinkLM(loaded.model, loaded.tokenizer, prefill_chunk=prefill_chunk))
        super().__init__(engine, groundthink_guard(loaded.tokenizer), sentinels=sentinels,
                         sentinel_tokens=sentinel_tokens, guard_enabled=guard_enabled)

    def describe(self) -> dict[str, Any]:
        return {
            "backend": self.name,
            "model": self.loaded.run_id or self.loaded.checkpoint.name,
            "run": self.run,
            "checkpoint": str(self.loaded.checkpoint),
            "checkpoint_sha256": self.loaded.checkpoint_sha256,
            "step": self.loaded.step,
            "tokenizer": self.loaded.tokenizer.kind,
            "tokenizer_fingerprint": self.loaded.tokenizer.fingerprint,
            "params": self.loaded.model.num_params(),
        }

    def chat_ids(self, messages) -> tuple[list[int], tuple[int, ...]]:
        from groundthink.data.corpus import render_chat
        from groundthink.data.errors import DataError
        from groundthink.data.tokenizer import END_OF_TURN_TOKEN, ROLE_TOKENS

        for i, (_, content) in enumerate(messages):
            # A control token inside a message's text would open a turn the caller did not write.
            self.guard.check_ids(self.loaded.tokenizer.encode(content), f"chat message {i}")
        try:
            text = render_chat([{"role": r, "content": c} for r, c in messages], where="chat request")
        except DataError as exc:
            raise RequestRejected(str(exc), reason="bad_request") from None
        tok = self.loaded.tokenizer
        prompt = f"{text}\n{ROLE_TOKENS['assistant']}" if text else ROLE_TOKENS["assistant"]
        return tok.encode(prompt), (tok.control_ids[END_OF_TURN_TOKEN],)
