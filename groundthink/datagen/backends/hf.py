"""A Hugging Face causal LM in-process through `transformers`, in plain completion mode.

Loaded with `AutoModelForCausalLM` / `AutoTokenizer` from a local folder (or a hub name when the hub is
reachable); the tokenizer's chat template is dropped at load and recorded in provenance as having been there,
text is encoded with `add_special_tokens=False`, and the contamination guard (groundthink/datagen/guard.py)
refuses prompts holding special or chat-marker tokens and runs its sentinels before any generation.

Generation runs through GroundThink's own engine (groundthink/generation.py) with the model's key/value cache,
so temperature, top-k, top-p, stop sequences, end tokens, token counts and log-probabilities mean exactly what
they mean for the other in-process backend; `transformers.generate` is not used. Critic scores are exact
log-probabilities from a right-padded batch forward (causal attention: padding after a sequence never reaches it).
"""

from __future__ import annotations

import hashlib
import inspect
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from groundthink.datagen.backends.inprocess import InProcessBackend, fatal_load_error, set_threads
from groundthink.datagen.guard import hf_guard


class HFCausalLM:
    """LMAdapter (see groundthink/generation.py) over a transformers causal LM and its tokenizer."""

    def __init__(self, model, tokenizer, *, device=None) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.device = torch.device(device) if device is not None else next(model.parameters()).device
        self.vocab_size = int(model.get_output_embeddings().weight.shape[0])
        eos = set()
        if tokenizer.eos_token_id is not None:
            eos.add(int(tokenizer.eos_token_id))
        gen_eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
        for token_id in gen_eos if isinstance(gen_eos, (list, tuple)) else [gen_eos]:
            if token_id is not None:
                eos.add(int(token_id))
        self.eos_ids = frozenset(eos)
        # transformers renamed the cache argument (past_key_values -> cache); use whichever this version takes.
        params = inspect.signature(model.forward).parameters
        self._cache_arg = "cache" if "cache" in params else "past_key_values"
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        self.pad_id = int(pad) if pad is not None else 0

    def encode(self, text: str) -> list[int]:
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def decode(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode(list(ids), skip_special_tokens=False, clean_up_tokenization_spaces=False)

    def token_text(self, token_id: int) -> str:
        return self.decode([token_id])

    def new_cache(self):
        return None

    @torch.inference_mode()
    def forward(self, ids: Sequence[int], cache, *, all_logits: bool = False):
        tokens = torch.as_tensor(list(ids), dtype=torch.long, device=self.device)[None]
        out = self.model(input_ids=tokens, use_cache=True, **{self._cache_arg: cache})
        logits = out.logits[0].float()
        return (logits if all_logits else logits[-1]), out[self._cache_arg]

    @torch.inference_mode()
    def score_batch(self, sequences: Sequence[Sequence[int]]) -> list[torch.Tensor]:
        longest = max(len(s) for s in sequences)
        batch = torch.full((len(sequences), longest), self.pad_id, dtype=torch.long, device=self.device)
        mask = torch.zeros_like(batch)
        for row, seq in enumerate(sequences):
            batch[row, : len(seq)] = torch.as_tensor(list(seq), dtype=torch.long)
            mask[row, : len(seq)] = 1
        logp = self.model(input_ids=batch, attention_mask=mask).logits.float().log_softmax(-1)
        return [logp[row, : len(seq)] for row, seq in enumerate(sequences)]


class HFBackend(InProcessBackend):
    name = "hf"
    supports_chat = False

    def __init__(self, *, path: str, device: str = "cpu", dtype: str | None = None, num_threads: int | None = None,
                 sentinels: list[str], sentinel_tokens: int = 16, guard_enabled: bool = True,
                 local_files_only: bool = True, model=None, tokenizer=None) -> None:
        """`model` / `tokenizer`: already-built objects (tests, notebooks) instead of loading from `path`."""
        from groundthink.generation import GenerationEngine

        set_threads(num_threads)
        self.path = str(path)
        if model is None or tokenizer is None:
            model, tokenizer = _load(self.path, dtype=dtype, local_files_only=local_files_only)
        model.to(device).eval()
        self.had_chat_template = bool(getattr(tokenizer, "chat_template", None))
        # Rule 1 of the guard: nothing downstream can apply a chat template if there is none.
        tokenizer.chat_template = None
        self.model, self.tokenizer = model, tokenizer
        context = getattr(model.config, "max_position_embeddings", None) or getattr(model.config, "n_positions", None)
        engine = GenerationEngine(HFCausalLM(model, tokenizer, device=device))
        super().__init__(engine, hf_guard(tokenizer), sentinels=sentinels, sentinel_tokens=sentinel_tokens,
                         guard_enabled=guard_enabled, context_length=int(context) if context else None)

    def describe(self) -> dict[str, Any]:
        config = self.model.config.to_dict()
        return {
            "backend": self.name,
            "model": self.path,
            "model_type": config.get("model_type"),
            "config_sha256": hashlib.sha256(json.dumps(config, sort_keys=True, default=str).encode()).hexdigest(),
            "tokenizer": type(self.tokenizer).__name__,
            "chat_template_dropped": self.had_chat_template,
            "params": sum(p.numel() for p in self.model.parameters()),
            "context_length": self.context_length,
        }


def _load(path: str, *, dtype: str | None, local_files_only: bool):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if local_files_only and not Path(path).is_dir():
        raise fatal_load_error(f"backend.path={path}", FileNotFoundError(
            "no such folder; pass a local folder written by save_pretrained (model + tokenizer), or set "
            "backend.local_files_only=false to download a hub model when the hub is reachable"))
    kwargs: dict[str, Any] = {"local_files_only": local_files_only}
    if dtype:
        kwargs["dtype"] = getattr(torch, dtype)
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=local_files_only)
        model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
    except (OSError, ValueError, KeyError) as exc:
        raise fatal_load_error(f"backend.path={path}", exc) from None
    return model, tokenizer
