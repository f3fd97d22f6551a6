"""The contamination guard for in-process base models driven in plain completion mode.

The previous version's worst bug was chat-template contamination of a base model: role markers and special
tokens slipped into prompts meant as plain text, so the "base model" data was generated in a chat format. The
guard makes that impossible to miss (the rules of the previous pipeline, our code):

1. No chat template: the backend drops the tokenizer's chat template at load (and records that it had one), and
   prompts are built as text by the pipeline's one prompt builder, never by `apply_chat_template`.
2. No special tokens added: text is encoded with `add_special_tokens=False`; the "delta" check at load verifies
   that the ids fed for a sentinel are exactly its plain encoding (no BOS/EOS slipped in front or behind) and
   that they decode back to the same text.
3. Token-id checks: every completion-mode prompt is encoded and refused if it holds any forbidden id (a control,
   role or special token), naming the token and where it sits.
4. Sentinel prompts at load: plain-text prompts whose encoding must pass checks 2-3, and whose greedy
   continuation must not produce a role/control token (a base model continues text; a model that answers in a
   chat format was tuned on one, or a template leaked into its training). Any failure stops the run before any
   generation.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from groundthink.datagen.backends.base import FatalBackendError, RequestRejected

# Spellings of chat/role markers used by common chat templates; a vocabulary entry matching one is forbidden in a
# completion-mode prompt even when the tokenizer does not flag it as special.
CHAT_MARKER_RE = re.compile(
    r"^(<\|[^|<>]{1,40}\|>|<start_of_turn>|<end_of_turn>|\[/?INST\]|<</?SYS>>|<\|im_(start|end)\|>|"
    r"<s>|</s>|<bos>|<eos>)$"
)


class ContaminationError(RequestRejected):
    """A completion-mode prompt that would carry a control/role/special token: this record is refused."""

    reason = "contamination"


class SentinelFailure(FatalBackendError):
    """A sentinel prompt failed at load: the run stops before any generation."""

    reason = "sentinel_failed"


@dataclass
class TokenGuard:
    """Forbidden ids (id -> token text) for completion-mode prompts, and the ids a continuation may end with."""

    forbidden: dict[int, str]
    allowed_in_output: frozenset[int] = frozenset()  # e.g. end-of-text: a normal way for a base model to stop
    checks: list[dict[str, Any]] = field(default_factory=list)

    def check_ids(self, ids: Sequence[int], where: str) -> None:
        for pos, token_id in enumerate(ids):
            if token_id in self.forbidden:
                raise ContaminationError(
                    f"{where}: the completion-mode prompt contains the control/special token "
                    f"{self.forbidden[token_id]!r} (id {token_id}) at token {pos}; base-model prompts must be plain "
                    f"text (remove the marker from the prompt or the prompt set)"
                )


def groundthink_guard(tokenizer) -> TokenGuard:
    """Every GroundThink control token is forbidden in a completion-mode prompt; end-of-text may end an output."""
    forbidden = {int(i): t for t, i in tokenizer.control_ids.items()}
    return TokenGuard(forbidden=forbidden, allowed_in_output=frozenset({tokenizer.eos_id}))


def hf_guard(tokenizer) -> TokenGuard:
    """Special ids of a Hugging Face tokenizer, its added special tokens, and vocabulary entries that look like chat
    markers; the end-of-text ids may end an output."""
    forbidden: dict[int, str] = {}
    for token_id in getattr(tokenizer, "all_special_ids", None) or []:
        forbidden[int(token_id)] = tokenizer.convert_ids_to_tokens(int(token_id))
    for token_id, added in (getattr(tokenizer, "added_tokens_decoder", None) or {}).items():
        content = getattr(added, "content", str(added))
        if getattr(added, "special", False) or CHAT_MARKER_RE.match(content):
            forbidden[int(token_id)] = content
    for content, token_id in tokenizer.get_vocab().items():
        if CHAT_MARKER_RE.match(content):
            forbidden[int(token_id)] = content
    eos = tokenizer.eos_token_id
    allowed = frozenset({int(eos)}) if eos is not None else frozenset()
    return TokenGuard(forbidden=forbidden, allowed_in_output=allowed)


def run_sentinels(
    guard: TokenGuard,
    sentinels: Sequence[str],
    *,
    encode: Callable[[str], list[int]],
    encode_plain: Callable[[str], list[int]],
    decode: Callable[[Sequence[int]], str],
    continue_greedy: Callable[[list[int]], list[int]],
) -> list[dict[str, Any]]:
    """Check each sentinel prompt; raise SentinelFailure on the first failure, else return what was checked.

    encode: how the backend encodes prompts; encode_plain: the tokenizer's plain encoding (no special tokens) that
    `encode` must equal; continue_greedy: ids -> the greedy continuation's ids.
    """
    if not sentinels:
        raise SentinelFailure("guard.sentinels is empty: the contamination guard needs at least one sentinel prompt")
    results = []
    for text in sentinels:
        ids = encode(text)
        plain = encode_plain(text)
        if ids != plain:
            raise SentinelFailure(
                f"sentinel {text!r}: the backend feeds {len(ids)} ids but the plain encoding has {len(plain)} "
                f"(first difference at {_first_diff(ids, plain)}): special tokens are being added to prompts"
            )
        if decode(ids) != text:
            raise SentinelFailure(
                f"sentinel {text!r}: its ids decode to {decode(ids)!r}, not the same text (a normalizer or an added "
                f"prefix changes prompts); this tokenizer cannot drive plain completion mode safely"
            )
        try:
            guard.check_ids(ids, f"sentinel {text!r}")
        except ContaminationError as exc:
            raise SentinelFailure(str(exc)) from None
        output = continue_greedy(ids)
        bad = [(pos, guard.forbidden[t]) for pos, t in enumerate(output)
               if t in guard.forbidden and t not in guard.allowed_in_output]
        if bad:
            pos, token = bad[0]
            raise SentinelFailure(
                f"sentinel {text!r}: the model's greedy continuation produces the role/control token {token!r} at "
                f"output token {pos}; a base model in completion mode should continue the text. This model answers "
                f"in a chat format (chat-tuned, or a template leaked into its training): use a base model"
            )
        results.append({"prompt": text, "prompt_tokens": len(ids), "continuation": decode(output), "ok": True})
    guard.checks = results
    return results


def _first_diff(a: Sequence[int], b: Sequence[int]) -> int:
    for i, (x, y) in enumerate(zip(a, b)):
        if x != y:
            return i
    return min(len(a), len(b))
