"""The canonical GroundThink tokenizer: UTF-8 bytes or a byte-level BPE, plus 8 control tokens.

Two kinds share one interface (`Tokenizer`):

- ``"char"``: ids 0..7 are the control tokens, id ``8 + b`` is the UTF-8 byte ``b``; vocabulary 264, no
  training, lossless for every string, no unknown tokens.
- ``"bpe"``: a byte-level BPE (GPT-2 style byte alphabet, so also lossless and without unknowns) trained with
  the Hugging Face ``tokenizers`` library on the run's training documents. The control tokens are its special
  tokens with ids 0..7. A small corpus cannot fill a large vocabulary: training stops when no pair occurs
  ``min_frequency`` times, so ``vocab_size`` is the actual size, which may be below the requested one.

In both kinds a control-token string inside text encodes as its single id (gate G0 checks this with
`check_control_tokens`), and ``decode`` writes it back as the same string.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from groundthink.data.errors import DataError

CONTROL_TOKENS: tuple[str, ...] = (
    "<|pad|>",  # 0 padding after a document's end inside a TBPTT segment (its label is -100)
    "<|endoftext|>",  # 1 end of a document: appended to every document so the model learns boundaries
    "<|bos|>",  # 2 start of a document (optional; the state reset already marks it)
    "<|system|>",  # 3 conversation role: system instructions follow
    "<|user|>",  # 4 conversation role: the user's turn follows
    "<|assistant|>",  # 5 conversation role: the assistant's turn follows
    "<|persona|>",  # 6 conversation role: the persona/identity description the assistant must keep
    "<|end|>",  # 7 end of one conversation turn
)
PAD_TOKEN, EOS_TOKEN, BOS_TOKEN = CONTROL_TOKENS[0], CONTROL_TOKENS[1], CONTROL_TOKENS[2]
ROLE_TOKENS: dict[str, str] = {
    "system": "<|system|>",
    "user": "<|user|>",
    "assistant": "<|assistant|>",
    "persona": "<|persona|>",
}
END_OF_TURN_TOKEN = "<|end|>"
TOKENIZER_KINDS = ("char", "bpe")
CHAR_VOCAB_SIZE = len(CONTROL_TOKENS) + 256
META_FILE = "tokenizer_meta.json"
BPE_FILE = "tokenizer.json"
_META_FORMAT = "groundthink-tokenizer"
_META_VERSION = 1
_CONTROL_RE = re.compile("(" + "|".join(re.escape(t) for t in CONTROL_TOKENS) + ")")


class Tokenizer:
    """Text <-> token ids. Build with `build_tokenizer`, reload with `Tokenizer.load`."""

    def __init__(self, kind: str, backend=None) -> None:
        if kind not in TOKENIZER_KINDS:
            raise DataError(
                f"tokenizer.kind={kind!r} is not a tokenizer kind; allowed: {', '.join(TOKENIZER_KINDS)}"
            )
        if kind == "bpe" and backend is None:
            raise DataError(
                "a 'bpe' Tokenizer needs a trained tokenizers.Tokenizer backend; use build_tokenizer"
            )
        self.kind = kind
        self._backend = backend
        if kind == "char":
            self.control_ids = {t: i for i, t in enumerate(CONTROL_TOKENS)}
        else:
            self.control_ids = {t: backend.token_to_id(t) for t in CONTROL_TOKENS}
            missing = [t for t, i in self.control_ids.items() if i is None]
            if missing:
                raise DataError(
                    f"the BPE tokenizer lacks the control tokens {missing}; rebuild it with build_tokenizer"
                )
        self._id_to_control = {i: t for t, i in self.control_ids.items()}

    @property
    def vocab_size(self) -> int:
        if self.kind == "char":
            return CHAR_VOCAB_SIZE
        return self._backend.get_vocab_size(with_added_tokens=True)

    @property
    def pad_id(self) -> int:
        return self.control_ids[PAD_TOKEN]

    @property
    def eos_id(self) -> int:
        return self.control_ids[EOS_TOKEN]

    @property
    def bos_id(self) -> int:
        return self.control_ids[BOS_TOKEN]

    def role_id(self, role: str) -> int:
        """Id of the control token that opens a turn of `role` (system, user, assistant, persona)."""
        if role not in ROLE_TOKENS:
            raise DataError(f"role={role!r} has no control token; allowed: {', '.join(ROLE_TOKENS)}")
        return self.control_ids[ROLE_TOKENS[role]]

    def to_str(self) -> str:
        """A canonical serialisation: equal strings mean the tokenizers encode identically."""
        body = self._backend.to_str() if self.kind == "bpe" else ""
        return json.dumps(
            {"kind": self.kind, "control_ids": self.control_ids, "backend": body}, sort_keys=True
        )

    @property
    def fingerprint(self) -> str:
        """sha256 of `to_str()`, e.g. as part of a cache key."""
        return hashlib.sha256(self.to_str().encode("utf-8")).hexdigest()

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Tokenizer) and self.to_str() == other.to_str()

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        return f"Tokenizer(kind={self.kind!r}, vocab_size={self.vocab_size})"

    def encode(self, text: str) -> list[int]:
        return self.encode_array(text).tolist() if self.kind == "char" else self._bpe_encode(text)

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        if self.kind == "char":
            return [self.encode(t) for t in texts]
        return [e.ids for e in self._backend.encode_batch(list(texts), add_special_tokens=False)]

    def encode_array(self, text: str) -> np.ndarray:
        """`encode` as an int32 array (fast path for the char kind on large corpora)."""
        if self.kind == "bpe":
            return np.asarray(self._bpe_encode(text), dtype=np.int32)
        if "<|" not in text:
            return np.frombuffer(text.encode("utf-8"), dtype=np.uint8).astype(np.int32) + len(CONTROL_TOKENS)
        pieces = []
        for i, part in enumerate(_CONTROL_RE.split(text)):
            if i % 2 == 1:
                pieces.append(np.array([self.control_ids[part]], dtype=np.int32))
            elif part:
                pieces.append(
                    np.frombuffer(part.encode("utf-8"), dtype=np.uint8).astype(np.int32) + len(CONTROL_TOKENS)
                )
        return np.concatenate(pieces) if pieces else np.zeros(0, dtype=np.int32)

    def _bpe_encode(self, text: str) -> list[int]:
        return self._backend.encode(text, add_special_tokens=False).ids

    def decode(self, ids: Iterable[int]) -> str:
        ids = [int(i) for i in ids]
        bad = [i for i in ids if not 0 <= i < self.vocab_size]
        if bad:
            raise DataError(
                f"token ids {bad[:5]} are outside this tokenizer's vocabulary [0, {self.vocab_size})"
            )
        if self.kind == "bpe":
            return self._backend.decode(ids, skip_special_tokens=False)
        out: list[str] = []
        run = bytearray()
        n_control = len(CONTROL_TOKENS)
        for i in ids:
            if i < n_control:
                if run:
                    out.append(run.decode("utf-8", errors="replace"))
                    run.clear()
                out.append(CONTROL_TOKENS[i])
            else:
                run.append(i - n_control)
        if run:
            out.append(run.decode("utf-8", errors="replace"))
        return "".join(out)

    def token_byte_lengths(self) -> list[int]:
        """UTF-8 bytes each id stands for, 0 for control tokens (`decode([i])` fails on partial characters).

        bits-per-byte of a batch = sum(token loss in nats) / (ln 2 * sum(token_byte_lengths[target ids])).
        """
        if self.kind == "char":
            return [0] * len(CONTROL_TOKENS) + [1] * 256
        control = set(self.control_ids.values())
        # Byte-level BPE spells every byte as exactly one character of its 256-character alphabet.
        return [0 if i in control else len(self._backend.id_to_token(i)) for i in range(self.vocab_size)]

    def bytes_per_token(self, texts: Iterable[str]) -> float:
        """Mean UTF-8 bytes per token over `texts` (1.0 for the char kind on text without controls)."""
        n_bytes = n_tokens = 0
        for text in texts:
            n_bytes += len(text.encode("utf-8"))
            n_tokens += len(self.encode_array(text))
        if n_tokens == 0:
            raise DataError("bytes_per_token needs at least one non-empty text")
        return n_bytes / n_tokens

    def save(self, directory: str | Path) -> Path:
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        if self.kind == "bpe":
            self._backend.save(str(directory / BPE_FILE))
        meta = {
            "format": _META_FORMAT,
            "version": _META_VERSION,
            "kind": self.kind,
            "vocab_size": self.vocab_size,
            "control_ids": self.control_ids,
            "pad_id": self.pad_id,
            "eos_id": self.eos_id,
            "fingerprint": self.fingerprint,
        }
        (directory / META_FILE).write_text(json.dumps(meta, indent=2) + "\n")
        return directory

    @classmethod
    def load(cls, directory: str | Path) -> Tokenizer:
        directory = Path(directory)
        meta_path = directory / META_FILE
        if not directory.is_dir():
            raise DataError(
                f"tokenizer directory {directory} does not exist; point to the folder that "
                f"Tokenizer.save wrote (a run's tokenizer/ folder)"
            )
        if not meta_path.is_file():
            raise DataError(
                f"{meta_path} is missing: {directory} is not a saved GroundThink tokenizer "
                f"(expected {META_FILE}, written by Tokenizer.save)"
            )
        try:
            meta = json.loads(meta_path.read_text())
            kind = meta["kind"]
            saved_ids = {str(k): int(v) for k, v in meta["control_ids"].items()}
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            raise DataError(f"{meta_path} is corrupt ({exc}); re-save the tokenizer or retrain it") from exc
        if meta.get("format") != _META_FORMAT or kind not in TOKENIZER_KINDS:
            raise DataError(
                f"{meta_path} is not a GroundThink tokenizer description "
                f"(format={meta.get('format')!r}, kind={kind!r})"
            )
        backend = None
        if kind == "bpe":
            from tokenizers import Tokenizer as HFTokenizer

            bpe_path = directory / BPE_FILE
            if not bpe_path.is_file():
                raise DataError(
                    f"{bpe_path} is missing: a 'bpe' tokenizer needs the {BPE_FILE} that Tokenizer.save "
                    f"writes next to {META_FILE}"
                )
            try:
                backend = HFTokenizer.from_file(str(bpe_path))
            except Exception as exc:
                raise DataError(
                    f"{bpe_path} could not be read ({exc}); it is corrupt: retrain the tokenizer"
                ) from exc
        tok = cls(kind, backend)
        if saved_ids != tok.control_ids:
            raise DataError(
                f"{directory}: control token ids in {META_FILE} ({saved_ids}) differ from the "
                f"tokenizer's ({tok.control_ids}); the files do not belong together"
            )
        if "vocab_size" in meta and int(meta["vocab_size"]) != tok.vocab_size:
            raise DataError(
                f"{directory}: {META_FILE} says vocab_size={meta['vocab_size']} but the tokenizer has "
                f"{tok.vocab_size}; the files do not belong together"
            )
        return tok


def build_tokenizer(
    kind: str,
    texts: Iterable[str] | None = None,
    vocab_size: int | None = None,
    *,
    min_frequency: int = 2,
) -> Tokenizer:
    """A "char" tokenizer (no training; vocab_size must be None or 264) or a BPE trained on `texts`."""
    if kind == "char":
        if vocab_size is not None and int(vocab_size) != CHAR_VOCAB_SIZE:
            raise DataError(
                f"tokenizer.vocab_size={vocab_size} with tokenizer.kind=char: the char tokenizer has a "
                f"fixed vocabulary of {CHAR_VOCAB_SIZE} (8 control tokens + 256 bytes); use "
                f"tokenizer=char or set tokenizer.vocab_size={CHAR_VOCAB_SIZE}"
            )
        return Tokenizer("char")
    if kind != "bpe":
        raise DataError(
            f"tokenizer.kind={kind!r} is not a tokenizer kind; allowed: {', '.join(TOKENIZER_KINDS)}"
        )
    if vocab_size is None or int(vocab_size) < CHAR_VOCAB_SIZE:
        raise DataError(
            f"tokenizer.vocab_size={vocab_size} is too small for a byte-level BPE: it needs at least "
            f"{CHAR_VOCAB_SIZE} (8 control tokens + 256 bytes) plus the merges, e.g. 24000"
        )
    if texts is None:
        raise DataError("training a BPE tokenizer needs texts (the training documents)")
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import decoders, models, pre_tokenizers, trainers

    backend = HFTokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=int(vocab_size),
        min_frequency=min_frequency,
        special_tokens=list(CONTROL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    seen = [0]

    def _batches():
        batch: list[str] = []
        for text in texts:
            if text:
                seen[0] += 1
                batch.append(text)
            if len(batch) == 1000:
                yield batch
                batch = []
        if batch:
            yield batch

    backend.train_from_iterator(_batches(), trainer=trainer)
    if seen[0] == 0:
        raise DataError("cannot train a BPE tokenizer: every training text is empty")
    return Tokenizer("bpe", backend)


@dataclass(frozen=True)
class ControlTokenProbe:
    """How one control token encodes: alone, and inside `text` ("Hello {token}world"), which must hold its id once
    and decode back unchanged. The rule of gate G0; `ok` is True when both hold."""

    token: str
    id: int | None
    alone: list[int]
    text: str
    in_text: list[int]
    round_trip: bool

    @property
    def alone_ok(self) -> bool:
        return self.id is not None and self.alone == [self.id]

    @property
    def in_text_ok(self) -> bool:
        return self.id is not None and self.in_text.count(self.id) == 1 and self.round_trip

    @property
    def ok(self) -> bool:
        return self.alone_ok and self.in_text_ok


def probe_control_tokens(tok: Tokenizer) -> list[ControlTokenProbe]:
    """One probe per control token, in CONTROL_TOKENS order."""
    probes = []
    for token in CONTROL_TOKENS:
        text = f"Hello {token}world"
        ids = tok.encode(text)
        probes.append(ControlTokenProbe(token, tok.control_ids.get(token), tok.encode(token), text, ids,
                                        tok.decode(ids) == text))
    return probes


def check_control_tokens(tok: Tokenizer) -> list[tuple[str, list[int]]]:
    """Control tokens that do not encode as exactly their one id, alone and inside text; [] = gate G0 passes.

    Each failure is (token, the ids it encoded to: alone if that failed, else inside "Hello {token}world").
    """
    return [(p.token, p.alone if not p.alone_ok else p.in_text) for p in probe_control_tokens(tok) if not p.ok]
