"""The `chat` data source (supervised fine-tuning): chat JSONL conversations, loss on assistant tokens only.

    groundthink-train stage=sft init_from=outputs/tiny/<run> data.path=generated/chat.jsonl

Input: a .jsonl/.json file or a folder of them; each record is ``{"messages": [{"role": ..., "content": ...},
...]}`` (what groundthink-datagen writes; ShareGPT-style ``{"from", "value"}`` turns and the role aliases of
`corpus.render_chat` are accepted, other fields of a record are ignored).

Rendering is `corpus.render_chat`'s: ``<|role|>content<|end|>`` per turn, turns joined by a newline, then the
end-of-text token. Each turn is tokenized on its own (prefix ``"\\n"`` + role token, then content + ``<|end|>``), so
every token knows the turn it came from.

The loss mask: a token is a *target* (carries loss) only if it is an assistant turn's content or that turn's
``<|end|>`` token. Role tokens, the newlines between turns, system/user/persona turns and the final end-of-text
token are context only: the label that would predict them is -100 (`IGNORE_INDEX`), so the training loss and
``val/loss`` are the mean negative log-likelihood of assistant tokens (assistant-token loss).

Each conversation is one document of the TBPTT stream: it starts a lane's segment with a fresh (or learned h0)
state and is carried across segments until it ends; conversations longer than ``max_tokens`` (default 4096) are
truncated to that many tokens (the count is logged and stored in summary.json). Held-out conversations
(``val_fraction``, by conversation) give the validation batches. groundthink-eval's `lm` task on an SFT run reads the
same held-out conversations (`ChatSource.documents`, split alike) but scores every token, so its `loss_carried` is
not the run's assistant-only val/loss (its `val_loss_abs_diff` is not a load check for chat runs).
"""

from __future__ import annotations

import json
import logging
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from groundthink.data.errors import DataError
from groundthink.data.sources import (
    DataSettings,
    DataSource,
    PreparedData,
    TokenizerSettings,
    _check_positive,
    register_source,
)
from groundthink.data.stream import IGNORE_INDEX, TBPTTStream, TokenizedDocuments

log = logging.getLogger("groundthink")
ROLES = ("system", "user", "assistant", "persona")


@dataclass
class ChatDataSettings(DataSettings):
    source: str = "chat"
    path: str = "???"  # a chat .jsonl/.json file or a folder of them
    max_tokens: int = 4096  # a conversation longer than this is truncated to its first max_tokens tokens
    max_documents: int | None = None  # read at most this many conversations (null = all)
    val_fraction: float = 0.1  # share of conversations held out (assistant-token val/loss)
    batch_size: int = 8
    seq_len: int = 256


def read_conversations(path: str | Path, limit: int | None = None) -> list[list[dict[str, Any]]]:
    """The `messages` lists of every record in a chat .jsonl/.json file or a folder of them (sorted by name)."""
    root = Path(str(path)).expanduser()
    if not root.exists():
        raise DataError(f"data.path={path}: no such file or folder (chat JSONL records {{\"messages\": [...]}})")
    files = sorted(p for p in root.rglob("*") if p.suffix in (".jsonl", ".json")) if root.is_dir() else [root]
    if not files:
        raise DataError(f"data.path={path}: the folder holds no .jsonl/.json files")
    out: list[list[dict[str, Any]]] = []
    for file in files:
        text = file.read_text(encoding="utf-8")
        try:
            if file.suffix == ".json" and text.lstrip().startswith("["):
                records = json.loads(text)
            else:
                records = [json.loads(line) for line in text.splitlines() if line.strip()]
        except json.JSONDecodeError as exc:
            raise DataError(f"{file}: not JSON lines ({exc})") from None
        for i, rec in enumerate(records):
            msgs = rec.get("messages", rec.get("conversations")) if isinstance(rec, dict) else None
            if not isinstance(msgs, list):
                raise DataError(f"{file} record {i}: no \"messages\" list (chat records look like "
                                "{\"messages\": [{\"role\": \"user\", \"content\": \"...\"}, ...]})")
            if msgs:
                out.append(msgs)
            if limit is not None and len(out) >= limit:
                return out
    if not out:
        raise DataError(f"data.path={path}: no conversations found")
    return out


def encode_conversation(tok: Any, messages: list[dict[str, Any]], where: str = "chat record"
                        ) -> tuple[list[int], list[int], list[str]]:
    """(token ids, target flags, role of each token) of one rendered conversation (see the module docstring).

    The ids equal `tok.encode(render_chat(messages))` + [eos] for the char tokenizer; a BPE tokenizes each turn
    separately (merges never cross a turn boundary)."""
    from groundthink.data.corpus import _ROLE_ALIASES, render_chat
    from groundthink.data.tokenizer import END_OF_TURN_TOKEN, ROLE_TOKENS

    ids: list[int] = []
    targets: list[int] = []
    roles: list[str] = []
    for i, msg in enumerate(messages):
        render_chat([msg], where=where)  # validates role and content, with the record named in the error
        role = msg.get("role", msg.get("from"))
        role = _ROLE_ALIASES.get(role, role)
        content = msg.get("content", msg.get("value"))
        head = tok.encode(("\n" if i else "") + ROLE_TOKENS[role])
        body = tok.encode(content + END_OF_TURN_TOKEN)
        ids += head + body
        targets += [0] * len(head) + [int(role == "assistant")] * len(body)
        roles += ["template"] * len(head) + [role] * len(body)
    ids.append(tok.eos_id)
    targets.append(0)
    roles.append("template")
    return ids, targets, roles


class MaskedTBPTTStream(TBPTTStream):
    """A TBPTTStream whose labels are -100 wherever the target token is not flagged in `targets` (same layout as
    the documents). Positions, lanes, resets, state_dict/load_state_dict: exactly TBPTTStream's."""

    def __init__(self, docs: TokenizedDocuments, targets: TokenizedDocuments, **kwargs: Any) -> None:
        super().__init__(docs, **kwargs)
        if self.docs.num_tokens != docs.num_tokens or targets.num_tokens != docs.num_tokens:
            raise DataError("MaskedTBPTTStream: documents must be non-empty and the targets must match them")
        self.targets = targets

    def _segments(self, seq_len: int, lane_doc: list[int], lane_offset: list[int], advance) -> tuple[dict, int]:
        before = list(zip(lane_doc, lane_offset))
        batch, valid = super()._segments(seq_len, lane_doc, lane_offset, advance)
        labels = batch["labels"]
        for b, (doc, offset) in enumerate(before):
            if doc < 0:
                continue
            m = min(seq_len, self.docs.length(doc) - offset - 1)
            if m > 0:
                keep = self.targets.tensor(doc)[offset + 1: offset + 1 + m].bool()
                labels[b, :m][~keep] = IGNORE_INDEX
        return batch, valid


@dataclass
class ChatLanes:
    """`make_train_stream` of the chat source (picklable): rank r of w streams conversations i % w == r."""

    docs: TokenizedDocuments
    targets: TokenizedDocuments
    batch_size: int
    pad_id: int
    seed: int

    def __call__(self, rank: int, world: int) -> MaskedTBPTTStream:
        docs, targets = (self.docs[rank::world], self.targets[rank::world]) if world > 1 else (self.docs, self.targets)
        return MaskedTBPTTStream(docs, targets, batch_size=self.batch_size, pad_id=self.pad_id, seed=self.seed + rank)


def encode_conversations(tok: Any, conversations: list[list[dict[str, Any]]], max_tokens: int
                         ) -> tuple[TokenizedDocuments, TokenizedDocuments, dict[str, int], int]:
    """(documents, targets, tokens per role, number truncated) of the conversations, each cut at max_tokens."""
    docs, flags = [], []
    counts = {r: 0 for r in (*ROLES, "template")}
    truncated = 0
    for i, msgs in enumerate(conversations):
        ids, targets, roles = encode_conversation(tok, msgs, where=f"conversation {i}")
        if len(ids) > max_tokens:
            truncated += 1
            ids, targets, roles = ids[:max_tokens], targets[:max_tokens], roles[:max_tokens]
        for r in roles:
            counts[r] += 1
        docs.append(ids)
        flags.append(targets)
    return TokenizedDocuments.from_lists(docs), TokenizedDocuments.from_lists(flags), counts, truncated


def split_conversations(conversations: list, val_fraction: float, seed: int) -> tuple[list, list]:
    """(train, held-out) by conversation: the split `corpus.split_documents` makes of as many documents (it depends
    only on their number and the seed), so groundthink-eval's lm task, which splits `ChatSource.documents`, holds out
    the same conversations. A single conversation is all training (nothing held out)."""
    from groundthink.data.corpus import split_documents

    if len(conversations) < 2:
        return list(conversations), []
    _, val = split_documents([str(i) for i in range(len(conversations))], val_fraction, seed=seed)
    held = {int(i) for i in val}
    return ([c for i, c in enumerate(conversations) if i not in held],
            [c for i, c in enumerate(conversations) if i in held])


@register_source
class ChatSource(DataSource):
    """Chat JSONL for SFT (ChatDataSettings; the module docstring)."""

    name = "chat"
    Settings = ChatDataSettings

    def conversations(self, settings: ChatDataSettings) -> list[list[dict[str, Any]]]:
        """Every conversation's messages, in order (a subclass with other conversations overrides this)."""
        return read_conversations(settings.path, settings.max_documents)

    def where(self, settings: ChatDataSettings) -> str:
        """The data as messages name it."""
        return f"data.path={settings.path}"

    def documents(self, settings: ChatDataSettings) -> list[str]:
        """The conversations rendered as text (what groundthink-eval's lm task reads; split like `prepare`)."""
        from groundthink.data.corpus import render_chat

        return [render_chat(m) for m in self.conversations(settings)]

    def prepare(self, settings: ChatDataSettings, tokenizer: TokenizerSettings, *, seed: int,
                tokenizer_dir: Path | None = None, reuse_tokenizer: bool = False) -> PreparedData:
        for name in ("batch_size", "seq_len", "val_batches", "max_tokens"):
            _check_positive(f"data.{name}", getattr(settings, name))
        if not 0.0 <= float(settings.val_fraction) < 1.0:
            raise DataError(f"data.val_fraction={settings.val_fraction} must be in [0, 1)")
        train_convs, val_convs = split_conversations(self.conversations(settings), settings.val_fraction, seed)
        return prepare_conversations(train_convs, val_convs, settings, tokenizer, seed=seed,
                                     where=self.where(settings), tokenizer_dir=tokenizer_dir,
                                     reuse_tokenizer=reuse_tokenizer)


def prepare_conversations(train_convs: list, val_convs: list, settings: Any, tokenizer: TokenizerSettings, *,
                          seed: int, where: str, tokenizer_dir: Path | None = None,
                          reuse_tokenizer: bool = False) -> PreparedData:
    """PreparedData of conversations already split into training and held-out ones: the tokenizer (trained on the
    training conversations for bpe), assistant-token targets, TBPTT lanes and validation batches. `settings` has
    batch_size, seq_len, val_batches and max_tokens; `where` names the data in messages (data.path=..., ...)."""
    from groundthink.data.corpus import render_chat
    from groundthink.data.tokenizer import Tokenizer, build_tokenizer

    val_texts = [render_chat(m) for m in val_convs]
    if reuse_tokenizer and tokenizer_dir is not None and tokenizer_dir.exists():
        tok = Tokenizer.load(tokenizer_dir)
    else:
        tok = build_tokenizer(tokenizer.kind, [render_chat(m) for m in train_convs], tokenizer.vocab_size)
        if tokenizer_dir is not None:
            tok.save(tokenizer_dir)
    docs, targets, counts, truncated = encode_conversations(tok, train_convs, settings.max_tokens)
    needed = settings.batch_size * settings.seq_len
    if docs.num_tokens < needed:
        raise DataError(f"the chat training split holds {docs.num_tokens} tokens, fewer than one batch needs "
                        f"(data.batch_size {settings.batch_size} x seq_len {settings.seq_len} = {needed})")
    if int(targets.tokens.sum()) == 0:
        raise DataError(f"{where}: no assistant tokens in the training conversations (the loss is on assistant "
                        "turns only)")
    val_batches: list[dict[str, Any]] = []
    val_counts, val_truncated = {}, 0
    if val_convs:
        vdocs, vtargets, val_counts, val_truncated = encode_conversations(tok, val_convs, settings.max_tokens)
        val_stream = MaskedTBPTTStream(vdocs, vtargets, batch_size=settings.batch_size, pad_id=tok.pad_id,
                                       seed=seed)
        val_batches = val_stream.validation_batches(settings.seq_len, settings.val_batches)
        if not any(bool((b["labels"] != IGNORE_INDEX).any()) for b in val_batches):
            warnings.warn(f"{where}: the {len(val_batches)} held-out batches of data.seq_len={settings.seq_len} reach "
                          "no assistant token (they read only the conversations' openings), so no val/loss will be "
                          "logged: raise data.val_batches or data.seq_len", UserWarning, stacklevel=2)
    else:
        warnings.warn("no held-out conversations (data.val_fraction=0?): no val/loss will be logged",
                      UserWarning, stacklevel=2)
    stats = {"conversations": {"train": len(train_convs), "val": len(val_convs)},
             "tokens_by_role": {"train": counts, "val": val_counts},
             "truncated": {"train": truncated, "val": val_truncated, "max_tokens": settings.max_tokens}}
    log.info(f"chat data {where}: {len(train_convs)} train / {len(val_convs)} held-out conversations; "
             f"train tokens by role {counts}; truncated to data.max_tokens={settings.max_tokens}: "
             f"{truncated} train, {val_truncated} held-out")
    return PreparedData(
        tokenizer=tok,
        vocab_size=tok.vocab_size,
        make_train_stream=ChatLanes(docs, targets, settings.batch_size, tok.pad_id, seed),
        val_batches=val_batches,
        token_bytes=torch.tensor(tok.token_byte_lengths(), dtype=torch.float32),
        val_texts=val_texts,
        description=f"{len(train_convs)} conversations, {docs.num_tokens / 1e6:.3f}M tokens "
                    f"({int(targets.tokens.sum())} assistant targets)",
        pad_id=tok.pad_id,
        stats=stats,
    )
