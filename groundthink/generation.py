"""The generation engine: prompt ids -> streamed tokens from a carried-state language model.

    engine = GenerationEngine.from_run(groundthink.load(run_dir))
    for event in engine.stream("Once upon a time", SamplingParams(max_tokens=64, temperature=0.8, seed=1)):
        print(event.text, end="", flush=True)
    done = engine.complete("Q: 2+2?\nA:", SamplingParams(max_tokens=8, stop=("\n",), logprobs=5))
    done.text, done.finish_reason, done.prompt_tokens, done.completion_tokens, done.logprobs[0].top

What it follows: the OpenAI completions semantics (text without the stop sequence, `finish_reason` "stop" when an
end token or stop sequence ended the text and "length" when `max_tokens` did, token counts, per-token top
log-probabilities) and the sampling order of Hugging Face's `generate` (temperature, then top-k, then top-p).
Streamed text is detokenised incrementally the way vLLM and text-generation-inference do it (decode a short
window before and after the new token, emit the difference, hold back an incomplete UTF-8 character), and text
that could be the start of a stop sequence is held back until it is known not to be one.

What differs from `HybridLM.generate` (which stays the model's own minimal loop): the prompt is prefilled in
chunks of `prefill_chunk` tokens and every generated token is fed alone with the carried state, so memory stays
constant for recurrent layers (attention layers keep only their window's keys and values) whatever the length;
the engine also knows text, stop sequences, end tokens, log-probabilities and seeds. Reported log-probabilities
are those of the model's own distribution (log-softmax of the raw logits), not of the temperature-scaled or
truncated one used to sample, so a critic reads the model's belief whatever the sampling settings.

The engine talks to a model through a small adapter (`encode`, `decode`, `forward` with a cache, end ids); the
GroundThink adapter is here, a Hugging Face causal LM adapter lives with the datagen backend that uses it.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, Protocol

import torch

FINISH_STOP = "stop"
FINISH_LENGTH = "length"


class GenerationError(ValueError):
    """Bad generation input (a sampling setting out of range, an empty prompt); the message says what to change."""


@dataclass(frozen=True)
class SamplingParams:
    """How to continue a prompt. temperature 0 = greedy; top_k None and top_p 1.0 = no truncation.

    logprobs: None = none reported; n >= 0 = the chosen token's log-probability plus the n most likely
    alternatives at each step (all of them when n exceeds the vocabulary). stop: strings that end the text (not
    included in it); stop_token_ids: ids that end it (the model's end-of-text ids do too unless ignore_eos).
    """

    max_tokens: int = 256
    temperature: float = 1.0
    top_k: int | None = None
    top_p: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    logprobs: int | None = None
    ignore_eos: bool = False

    def __post_init__(self) -> None:
        # Lists from JSON or YAML become tuples, so params stay hashable and immutable.
        object.__setattr__(self, "stop", tuple(self.stop or ()))
        object.__setattr__(self, "stop_token_ids", tuple(int(i) for i in self.stop_token_ids or ()))

    def validate(self, vocab_size: int | None = None) -> SamplingParams:
        """Raise GenerationError naming the first setting out of range; returns self."""
        if not isinstance(self.max_tokens, int) or self.max_tokens < 0:
            raise GenerationError(f"max_tokens={self.max_tokens!r} must be an integer >= 0")
        if not math.isfinite(self.temperature) or self.temperature < 0:
            raise GenerationError(f"temperature={self.temperature!r} must be >= 0 (0 = greedy)")
        if self.top_k is not None and (not isinstance(self.top_k, int) or self.top_k < 1):
            raise GenerationError(f"top_k={self.top_k!r} must be an integer >= 1, or None for no limit")
        if not 0.0 < self.top_p <= 1.0:
            raise GenerationError(f"top_p={self.top_p!r} must be in (0, 1] (1 = no nucleus truncation)")
        if self.logprobs is not None and (not isinstance(self.logprobs, int) or self.logprobs < 0):
            raise GenerationError(f"logprobs={self.logprobs!r} must be an integer >= 0 (top alternatives), or None")
        if any(not isinstance(s, str) or s == "" for s in self.stop):
            raise GenerationError(f"stop={list(self.stop)!r}: every stop sequence must be a non-empty string")
        if vocab_size is not None:
            bad = [i for i in self.stop_token_ids if not 0 <= i < vocab_size]
            if bad:
                raise GenerationError(f"stop_token_ids {bad} are outside the vocabulary [0, {vocab_size})")
        return self


@dataclass(frozen=True)
class TopLogprob:
    token_id: int
    token: str
    logprob: float


@dataclass(frozen=True)
class TokenLogprob:
    """One generated token with its log-probability and the `logprobs` most likely alternatives (best first)."""

    token_id: int
    token: str
    logprob: float
    top: tuple[TopLogprob, ...] = ()


@dataclass(frozen=True)
class StreamEvent:
    """One generated token. `text` is the text that became final with it ("" while a character or a possible
    stop sequence is incomplete); joining every event's text gives the completion's text."""

    token_id: int
    text: str
    logprob: TokenLogprob | None = None


@dataclass
class Completion:
    text: str
    finish_reason: str  # "stop" | "length"
    prompt_tokens: int
    completion_tokens: int
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[TokenLogprob] | None = None
    stop_reason: str | int | None = None  # the stop sequence or end-token id that ended the text

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens


class LMAdapter(Protocol):
    """What the engine needs from a model and its tokenizer."""

    vocab_size: int
    eos_ids: frozenset[int]

    def encode(self, text: str) -> list[int]: ...

    def decode(self, ids: Sequence[int]) -> str: ...

    def token_text(self, token_id: int) -> str: ...

    def new_cache(self) -> Any: ...

    def forward(self, ids: Sequence[int], cache: Any, *, all_logits: bool = False) -> tuple[torch.Tensor, Any]:
        """Feed ids after `cache` -> (logits [V] of the last position, or [T,V] with all_logits; the new cache)."""
        ...


@torch.inference_mode()
def prefill(model, ids: Sequence[int], state, *, chunk: int = 512, all_logits: bool = False, device=None):
    """Feed one lane's ids after `state` (batch 1) in chunks of `chunk` tokens (exact: the carried state continues
    across chunks). Returns (fp32 logits of the last position [V], or of every position [T,V] with all_logits) and
    the new state."""
    device = device if device is not None else next(model.parameters()).device
    tokens = torch.as_tensor(list(ids), dtype=torch.long, device=device)[None]
    outs = []
    for start in range(0, tokens.shape[1], chunk):
        logits, state = model(tokens[:, start:start + chunk], state)
        outs.append(logits[0] if all_logits else logits[0, -1:])
    if not outs:
        raise ValueError("prefill needs at least one token")
    logits = torch.cat(outs).float()
    return (logits if all_logits else logits[-1]), state


class GroundThinkLM:
    """The adapter for a HybridLM and its GroundThink tokenizer: carried LMState as the cache.

    The prompt is fed in chunks of `prefill_chunk` tokens (the TBPTT invariance makes this exact), each generated
    token alone. `eos_ids` is the tokenizer's end-of-text id; chat turns add the end-of-turn id as a stop id.
    """

    def __init__(self, model, tokenizer, *, device=None, prefill_chunk: int = 512) -> None:
        if tokenizer is None:
            raise GenerationError(
                "this run has no tokenizer (it was trained on token-level synthetic data), so it cannot turn text "
                "into ids; generate from ids with GenerationEngine.stream(list_of_ids, ...)"
            )
        self.model = model
        self.tokenizer = tokenizer
        self.device = torch.device(device) if device is not None else next(model.parameters()).device
        self.prefill_chunk = int(prefill_chunk)
        self.vocab_size = int(model.cfg.vocab_size)
        self.eos_ids = frozenset({tokenizer.eos_id})
        self._byte_tokens = tokenizer.kind == "char"

    def encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text)

    def decode(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode(ids)

    def token_text(self, token_id: int) -> str:
        if self._byte_tokens and token_id >= len(self.tokenizer.control_ids):
            byte = token_id - len(self.tokenizer.control_ids)
            return chr(byte) if byte < 0x80 else f"bytes:\\x{byte:02x}"
        return self.tokenizer.decode([token_id])

    def new_cache(self):
        return self.model.init_state(1, self.device)

    def forward(self, ids: Sequence[int], cache, *, all_logits: bool = False):
        return prefill(self.model, ids, cache, chunk=self.prefill_chunk, all_logits=all_logits, device=self.device)

    @torch.inference_mode()
    def score_batch(self, sequences: Sequence[Sequence[int]]) -> list[torch.Tensor]:
        """Log-softmax [T,V] of every position of each sequence, in one right-padded batch.

        Right padding is exact here: every layer is causal, so positions before the padding never see it.
        """
        longest = max(len(s) for s in sequences)
        batch = torch.full((len(sequences), longest), self.tokenizer.pad_id, dtype=torch.long, device=self.device)
        for row, seq in enumerate(sequences):
            batch[row, : len(seq)] = torch.as_tensor(list(seq), dtype=torch.long)
        outs = []
        state = self.model.init_state(len(sequences), self.device)
        for start in range(0, longest, self.prefill_chunk):
            logits, state = self.model(batch[:, start:start + self.prefill_chunk], state)
            outs.append(logits.float().log_softmax(-1))
        logp = torch.cat(outs, dim=1)
        return [logp[row, : len(seq)] for row, seq in enumerate(sequences)]


class IncrementalDetokenizer:
    """Token ids -> text deltas, exact for byte-level and sentencepiece-style tokenizers.

    Keeps two offsets into the ids: text decoded from `prefix_offset` to `read_offset` is already emitted;
    decoding from `prefix_offset` to the end and taking the part after that prefix gives the new text, unless it
    ends in an incomplete character (U+FFFD), which waits for the next token. Decoding a few tokens of context
    rather than the new token alone keeps word-initial spaces right for tokenizers that drop them at the start.
    """

    def __init__(self, decode, context: Sequence[int] = ()) -> None:
        self._decode = decode
        self.ids: list[int] = list(context)
        self.prefix_offset = 0
        self.read_offset = len(self.ids)

    def add(self, token_id: int) -> str:
        self.ids.append(int(token_id))
        prefix = self._decode(self.ids[self.prefix_offset:self.read_offset])
        full = self._decode(self.ids[self.prefix_offset:])
        if len(full) > len(prefix) and not full.endswith("\ufffd"):
            self.prefix_offset, self.read_offset = self.read_offset, len(self.ids)
            return full[len(prefix):]
        return ""

    def flush(self) -> str:
        """What is still held back (an incomplete character comes out as U+FFFD)."""
        prefix = self._decode(self.ids[self.prefix_offset:self.read_offset])
        full = self._decode(self.ids[self.prefix_offset:])
        self.prefix_offset = self.read_offset = len(self.ids)
        return full[len(prefix):] if len(full) > len(prefix) else ""


def _stop_prefix_len(text: str, stops: Sequence[str]) -> int:
    """Length of the longest suffix of `text` that is a proper prefix of a stop sequence (held back)."""
    best = 0
    for stop in stops:
        for n in range(min(len(stop) - 1, len(text)), best, -1):
            if text.endswith(stop[:n]):
                best = n
                break
    return best


def _find_stop(text: str, stops: Sequence[str], start: int) -> tuple[int, str] | None:
    """(index, stop) of the earliest stop sequence that ends at or after `start`, else None."""
    found = None
    for stop in stops:
        i = text.find(stop, max(0, start - len(stop) + 1))
        if i >= 0 and (found is None or i < found[0]):
            found = (i, stop)
    return found


def sample_token(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator | None) -> int:
    """One id from logits [V] (fp32): greedy at temperature 0, else temperature -> top-k -> top-p -> sample."""
    if params.temperature == 0:
        return int(logits.argmax())
    scaled = logits / params.temperature
    if params.top_k is not None and params.top_k < scaled.shape[-1]:
        kth = scaled.topk(params.top_k).values[-1]
        scaled = scaled.masked_fill(scaled < kth, float("-inf"))
    if params.top_p < 1.0:
        probs, order = scaled.softmax(-1).sort(descending=True)
        # Drop a token when the tokens ranked above it already reach top_p; the most likely one always stays.
        drop = (probs.cumsum(-1) - probs) >= params.top_p
        scaled = scaled.scatter(-1, order, scaled.gather(-1, order).masked_fill(drop, float("-inf")))
    return int(torch.multinomial(scaled.softmax(-1), 1, generator=generator))


class GenerationStream:
    """An iterator of StreamEvent; afterwards `completion` holds the result and `cache` the model state after
    every token fed so far. The last sampled token (an end token, or the one that hit max_tokens) is in
    `completion.token_ids` but not yet in `cache`: `unfed` lists it, so a chat loop decides what to feed next and
    a plain completion never pays for a forward pass it does not use."""

    def __init__(self, engine: GenerationEngine, prompt_ids: list[int], params: SamplingParams, cache: Any) -> None:
        self._engine = engine
        self._prompt_ids = prompt_ids
        self._params = params
        self.cache = cache
        self.unfed: list[int] = []
        self.completion: Completion | None = None
        self._events = self._run()

    def __iter__(self) -> Iterator[StreamEvent]:
        return self._events

    def __next__(self) -> StreamEvent:
        return next(self._events)

    def drain(self) -> Completion:
        for _ in self._events:
            pass
        assert self.completion is not None
        return self.completion

    def _run(self) -> Iterator[StreamEvent]:
        lm, params = self._engine.lm, self._params
        generator = None
        if params.temperature > 0:
            generator = torch.Generator()
            if params.seed is not None:
                generator.manual_seed(int(params.seed))
            else:
                generator.seed()
        with self._engine.lock:
            logits, cache = lm.forward(self._prompt_ids, self.cache)
        self.cache = cache
        stop_ids = set(params.stop_token_ids) | (set() if params.ignore_eos else set(lm.eos_ids))
        detok = IncrementalDetokenizer(lm.decode, self._prompt_ids[-4:])
        text, emitted = "", 0
        token_ids: list[int] = []
        logprobs: list[TokenLogprob] | None = [] if params.logprobs is not None else None
        finish, stop_reason = FINISH_LENGTH, None
        for step in range(params.max_tokens):
            logits = logits.float().cpu()
            token = sample_token(logits, params, generator)
            token_ids.append(token)
            info = self._engine._token_logprob(logits, token, params.logprobs) if logprobs is not None else None
            if info is not None:
                logprobs.append(info)
            if token in stop_ids:
                finish, stop_reason = FINISH_STOP, token
                tail = detok.flush()
                text += tail
                cut = _find_stop(text, params.stop, emitted) if params.stop else None
                if cut is not None:
                    text, stop_reason = text[: cut[0]], cut[1]
                yield StreamEvent(token, text[emitted:], info)
                emitted = len(text)
                break
            text += detok.add(token)
            cut = _find_stop(text, params.stop, emitted) if params.stop else None
            if cut is not None:
                text = text[: cut[0]]
                finish, stop_reason = FINISH_STOP, cut[1]
                yield StreamEvent(token, text[emitted:], info)
                emitted = len(text)
                break
            safe = len(text) - (_stop_prefix_len(text, params.stop) if params.stop else 0)
            delta = text[emitted:safe] if safe > emitted else ""
            emitted = max(emitted, safe)
            if step == params.max_tokens - 1:
                # The last token: nothing can complete a stop sequence or a character any more.
                text += detok.flush()
                delta += text[emitted:]
                emitted = len(text)
                yield StreamEvent(token, delta, info)
                break
            yield StreamEvent(token, delta, info)
            with self._engine.lock:
                logits, self.cache = lm.forward([token], self.cache)
        self.unfed = token_ids[-1:]
        self.completion = Completion(
            text=text,
            finish_reason=finish,
            prompt_tokens=len(self._prompt_ids),
            completion_tokens=len(token_ids),
            token_ids=token_ids,
            logprobs=logprobs,
            stop_reason=stop_reason,
        )


class GenerationEngine:
    """Streams completions from an LMAdapter. Thread-safe: model calls are serialised by `lock`."""

    def __init__(self, lm: LMAdapter) -> None:
        self.lm = lm
        self.lock = threading.RLock()

    @classmethod
    def from_run(cls, run, *, prefill_chunk: int = 512) -> GenerationEngine:
        """An engine over a `groundthink.load(...)` result."""
        return cls(GroundThinkLM(run.model, run.tokenizer, prefill_chunk=prefill_chunk))

    @classmethod
    def for_model(cls, model, tokenizer, *, device=None, prefill_chunk: int = 512) -> GenerationEngine:
        return cls(GroundThinkLM(model, tokenizer, device=device, prefill_chunk=prefill_chunk))

    def encode_prompt(self, prompt: str | Sequence[int]) -> list[int]:
        if isinstance(prompt, str):
            ids = self.lm.encode(prompt)
        else:
            ids = [int(i) for i in prompt]
            bad = [i for i in ids if not 0 <= i < self.lm.vocab_size]
            if bad:
                raise GenerationError(f"prompt ids {bad[:5]} are outside the vocabulary [0, {self.lm.vocab_size})")
        return ids

    def stream(
        self, prompt: str | Sequence[int], params: SamplingParams | None = None, *, cache: Any = None
    ) -> GenerationStream:
        """Continue `prompt` (text or ids) after `cache` (None = a fresh stream). An empty prompt on a fresh
        stream starts from the end-of-text id, the boundary every training document follows."""
        params = (params or SamplingParams()).validate(self.lm.vocab_size)
        ids = self.encode_prompt(prompt)
        if cache is None:
            cache = self.lm.new_cache()
            if not ids:
                ids = [min(self.lm.eos_ids)]
        elif not ids:
            raise GenerationError("continuing a stream needs at least one new prompt token")
        return GenerationStream(self, ids, params, cache)

    def complete(self, prompt: str | Sequence[int], params: SamplingParams | None = None, **changes) -> Completion:
        """The whole completion at once; keyword arguments change single SamplingParams fields."""
        params = replace(params or SamplingParams(), **changes) if changes else (params or SamplingParams())
        return self.stream(prompt, params).drain()

    def _token_logprob(self, logits: torch.Tensor, token: int, top_n: int) -> TokenLogprob:
        logp = logits.log_softmax(-1)
        top: tuple[TopLogprob, ...] = ()
        if top_n:
            values, ids = logp.topk(min(top_n, logp.shape[-1]))
            top = tuple(TopLogprob(int(i), self.lm.token_text(int(i)), float(v)) for v, i in zip(values, ids))
        return TokenLogprob(token, self.lm.token_text(token), float(logp[token]), top)

    def prompt_logprobs(
        self, prompt: str | Sequence[int], top_n: int = 0
    ) -> tuple[list[int], list[TokenLogprob | None]]:
        """(ids, per-token log-probability of each prompt token given the ones before; None for the first)."""
        ids = self.encode_prompt(prompt)
        if not ids:
            return ids, []
        with self.lock:
            logits, _ = self.lm.forward(ids, self.lm.new_cache(), all_logits=True)
        out: list[TokenLogprob | None] = [None]
        for t in range(1, len(ids)):
            out.append(self._token_logprob(logits[t - 1].float().cpu(), ids[t], top_n))
        return ids, out

    def continuation_logprobs(self, prompt: str, continuations: Sequence[str]) -> list[float]:
        """Exact log P(continuation | prompt) for each continuation (chain rule over its tokens), batched."""
        return self.score_pairs([(prompt, c) for c in continuations])

    def score_pairs(self, pairs: Sequence[tuple[str | Sequence[int], str]], batch_size: int = 64) -> list[float]:
        """log P(continuation | prompt) for each (prompt, continuation), `batch_size` sequences per forward pass."""
        sequences, starts = [], []
        for prompt, continuation in pairs:
            prompt_ids = self.encode_prompt(prompt) or [min(self.lm.eos_ids)]
            cont_ids = self.lm.encode(continuation)
            if not cont_ids:
                raise GenerationError("every continuation to score must be non-empty text")
            sequences.append(prompt_ids + cont_ids)
            starts.append(len(prompt_ids))
        logps: list[torch.Tensor] = []
        with self.lock:
            for first in range(0, len(sequences), batch_size):
                chunk = sequences[first:first + batch_size]
                if hasattr(self.lm, "score_batch"):
                    logps.extend(self.lm.score_batch(chunk))
                else:
                    logps.extend(self.lm.forward(s, self.lm.new_cache(), all_logits=True)[0].float().log_softmax(-1)
                                 for s in chunk)
        scores = []
        for seq, n, logp in zip(sequences, starts, logps):
            positions = torch.arange(n - 1, len(seq) - 1)
            targets = torch.as_tensor(seq[n:], dtype=torch.long)
            scores.append(float(logp.cpu()[positions, targets].sum()))
        return scores
