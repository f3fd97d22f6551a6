"""Stateful truncated-BPTT batching: every batch lane is one continuous stream of documents.

Lane b reads documents one after another from a global queue (a seeded permutation of all documents, redrawn
every epoch). Batch i+1 of a lane continues exactly where batch i ended, so the recurrent state carried
between batches is meaningful. A document always starts at a segment start; the batch where lane b starts a
document has ``reset[b] = True`` (the model replaces that lane's state with h0). After a document's last token
the rest of the segment is padding (input ``pad_id``, label -100), and the lane takes the next document at the
next batch.

Labels are next tokens: ``labels[b, t] = input_ids[b, t + 1]`` within a segment, and the label of a segment's
last position is the first token of the same document's next segment. The last token of a document has label
-100 (nothing follows it in that document). Append an end-of-document token to each document
(`encode_documents` does, or pass ``eos_id``) so that predicting the boundary is learned.

Tokens live in one flat int32 tensor plus offsets (`TokenizedDocuments`), so ~100 MB corpora fit in memory.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from typing import Any

import numpy as np
import torch

from groundthink.data.errors import DataError

IGNORE_INDEX = -100
_STATE_VERSION = 1


class TokenizedDocuments(Sequence):
    """Documents as one flat int32 tensor `tokens` plus int64 `offsets` [n+1] (doc i = tokens[o[i]:o[i+1]]).

    Behaves like a read-only list of documents: ``len``, ``docs[i]`` (a list of ints), slicing (also with a
    step, giving a new `TokenizedDocuments`), iteration.
    """

    def __init__(self, tokens: torch.Tensor, offsets: torch.Tensor) -> None:
        if tokens.dim() != 1 or offsets.dim() != 1 or offsets.numel() < 1:
            raise ValueError("TokenizedDocuments needs 1-D tokens and 1-D offsets with at least one entry")
        self.tokens = tokens.to(torch.int32)
        self.offsets = offsets.to(torch.int64)

    @classmethod
    def from_lists(cls, docs: Iterable[Sequence[int] | np.ndarray | torch.Tensor]) -> TokenizedDocuments:
        arrays = [np.asarray(d, dtype=np.int64).reshape(-1) for d in docs]
        lengths = np.array([len(a) for a in arrays], dtype=np.int64)
        offsets = np.zeros(len(arrays) + 1, dtype=np.int64)
        np.cumsum(lengths, out=offsets[1:])
        flat = np.concatenate(arrays) if arrays else np.zeros(0, dtype=np.int64)
        if flat.size and (flat.min() < 0 or flat.max() > np.iinfo(np.int32).max):
            raise DataError("token ids must be in [0, 2**31)")
        return cls(torch.from_numpy(flat.astype(np.int32)), torch.from_numpy(offsets))

    @classmethod
    def coerce(cls, docs: Any) -> TokenizedDocuments:
        return docs if isinstance(docs, TokenizedDocuments) else cls.from_lists(docs)

    def __len__(self) -> int:
        return self.offsets.numel() - 1

    def length(self, i: int) -> int:
        return int(self.offsets[i + 1] - self.offsets[i])

    def tensor(self, i: int) -> torch.Tensor:
        """Document i as an int32 view of the flat storage (no copy)."""
        return self.tokens[int(self.offsets[i]) : int(self.offsets[i + 1])]

    def __getitem__(self, index):
        if isinstance(index, slice):
            return self.select(range(len(self))[index])
        n = len(self)
        if not -n <= index < n:
            raise IndexError(f"document index {index} out of range for {n} documents")
        return self.tensor(index % n).tolist()

    def __iter__(self) -> Iterator[list[int]]:
        for i in range(len(self)):
            yield self.tensor(i).tolist()

    def select(self, indices: Iterable[int]) -> TokenizedDocuments:
        indices = list(indices)
        pieces = [self.tensor(i) for i in indices]
        lengths = torch.tensor([p.numel() for p in pieces], dtype=torch.int64)
        offsets = torch.zeros(len(pieces) + 1, dtype=torch.int64)
        offsets[1:] = torch.cumsum(lengths, 0) if pieces else offsets[1:]
        flat = torch.cat(pieces) if pieces else torch.zeros(0, dtype=torch.int32)
        return TokenizedDocuments(flat, offsets)

    def with_boundaries(self, bos_id: int | None, eos_id: int | None) -> TokenizedDocuments:
        """A copy with `bos_id` prepended and/or `eos_id` appended to every document."""
        if bos_id is None and eos_id is None:
            return self
        extra = int(bos_id is not None) + int(eos_id is not None)
        lengths = self.offsets[1:] - self.offsets[:-1]
        new_offsets = torch.zeros_like(self.offsets)
        new_offsets[1:] = torch.cumsum(lengths + extra, 0)
        flat = torch.empty(int(new_offsets[-1]), dtype=torch.int32)
        doc_of_token = torch.repeat_interleave(torch.arange(len(self)), lengths)
        shift = new_offsets[:-1] - self.offsets[:-1] + int(bos_id is not None)
        flat[torch.arange(self.tokens.numel()) + shift[doc_of_token]] = self.tokens
        if bos_id is not None:
            flat[new_offsets[:-1]] = int(bos_id)
        if eos_id is not None:
            flat[new_offsets[1:] - 1] = int(eos_id)
        return TokenizedDocuments(flat, new_offsets)

    @property
    def num_tokens(self) -> int:
        return int(self.offsets[-1] - self.offsets[0])


def encode_documents(
    tokenizer,
    texts: Sequence[str],
    *,
    append_eos: bool = True,
    progress: bool | None = None,
    chunk: int = 512,
) -> TokenizedDocuments:
    """Encode documents into compact storage, each followed by the tokenizer's end-of-text id (`append_eos`).

    A progress bar (tqdm) is shown when `progress` is True, or by default for corpora over 5 MB of text.
    """
    texts = list(texts)
    if progress is None:
        progress = sum(len(t) for t in texts) > 5_000_000
    arrays: list[np.ndarray] = []
    eos = np.array([tokenizer.eos_id], dtype=np.int32)
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(texts), desc=f"encoding ({tokenizer.kind})", unit="doc")
    for start in range(0, len(texts), chunk):
        batch = texts[start : start + chunk]
        if tokenizer.kind == "char":
            encoded = [tokenizer.encode_array(t) for t in batch]
        else:
            encoded = [np.asarray(ids, dtype=np.int32) for ids in tokenizer.encode_batch(batch)]
        for ids in encoded:
            arrays.append(np.concatenate([ids, eos]) if append_eos else ids)
        if bar is not None:
            bar.update(len(batch))
    if bar is not None:
        bar.close()
    return TokenizedDocuments.from_lists(arrays)


class TBPTTStream:
    """B lanes of continuous document streams for truncated BPTT (see the module docstring)."""

    def __init__(
        self,
        docs_token_ids: Sequence[Sequence[int]] | TokenizedDocuments,
        batch_size: int,
        pad_id: int,
        eos_id: int | None = None,
        seed: int = 0,
        shuffle: bool = True,
        bos_id: int | None = None,
    ) -> None:
        if int(batch_size) < 1:
            raise DataError(f"data.batch_size={batch_size} must be at least 1")
        docs = TokenizedDocuments.coerce(docs_token_ids).with_boundaries(bos_id, eos_id)
        lengths = docs.offsets[1:] - docs.offsets[:-1]
        if (lengths == 0).any():
            docs = docs.select(torch.nonzero(lengths > 0).flatten().tolist())
        if len(docs) == 0:
            raise DataError("TBPTTStream got no non-empty documents; check the data source and the tokenizer")
        self.docs = docs
        self.batch_size = int(batch_size)
        self.pad_id = int(pad_id)
        self.seed = int(seed)
        self.shuffle = bool(shuffle)
        self._order_cache: tuple[int, list[int]] | None = None
        self._reset_position()

    def _reset_position(self) -> None:
        self.epoch = 0
        self.queue_pos = 0
        self.tokens_seen = 0
        self.batches = 0
        self.lane_doc = [self._next_doc() for _ in range(self.batch_size)]
        self.lane_offset = [0] * self.batch_size

    @property
    def num_documents(self) -> int:
        return len(self.docs)

    def _order(self, epoch: int) -> list[int]:
        if self._order_cache is None or self._order_cache[0] != epoch:
            n = len(self.docs)
            if self.shuffle:
                order = np.random.default_rng([self.seed, epoch]).permutation(n).tolist()
            else:
                order = list(range(n))
            self._order_cache = (epoch, order)
        return self._order_cache[1]

    def _next_doc(self) -> int:
        if self.queue_pos >= len(self.docs):
            self.epoch += 1
            self.queue_pos = 0
        doc = self._order(self.epoch)[self.queue_pos]
        self.queue_pos += 1
        return doc

    def next_batch(self, seq_len: int) -> dict[str, torch.Tensor]:
        """input_ids [B,T] long, labels [B,T] long (-100 = no target), reset [B] bool; advances every lane."""
        batch, valid = self._segments(int(seq_len), self.lane_doc, self.lane_offset, advance=self._next_doc)
        self.tokens_seen += valid
        self.batches += 1
        return batch

    def _segments(
        self, seq_len: int, lane_doc: list[int], lane_offset: list[int], advance
    ) -> tuple[dict, int]:
        if seq_len < 1:
            raise DataError(f"seq_len={seq_len} must be at least 1")
        B = len(lane_doc)
        input_ids = torch.full((B, seq_len), self.pad_id, dtype=torch.long)
        labels = torch.full((B, seq_len), IGNORE_INDEX, dtype=torch.long)
        reset = torch.zeros(B, dtype=torch.bool)
        valid = 0
        for b in range(B):
            doc = lane_doc[b]
            if doc < 0:  # an exhausted validation lane
                reset[b] = True
                continue
            tokens = self.docs.tensor(doc)
            offset = lane_offset[b]
            reset[b] = offset == 0
            n = min(seq_len, tokens.numel() - offset)
            input_ids[b, :n] = tokens[offset : offset + n]
            m = min(seq_len, tokens.numel() - offset - 1)
            if m > 0:
                labels[b, :m] = tokens[offset + 1 : offset + 1 + m]
            valid += n
            if offset + n >= tokens.numel():
                lane_doc[b] = advance()
                lane_offset[b] = 0
            else:
                lane_offset[b] = offset + n
        return {"input_ids": input_ids, "labels": labels, "reset": reset}, valid

    def validation_batches(
        self, seq_len: int, max_batches: int | None = None
    ) -> list[dict[str, torch.Tensor]]:
        """Fixed held-out batches: fresh lanes over the documents in order, each document read once.

        Lane-continuous like training; independent of (and not changing) this stream's position, so every call
        gives the same batches. Stops after `max_batches`, or when every document has been read; lanes that
        run out of documents are all padding (labels -100).
        """
        order = list(range(len(self.docs)))
        queue = iter(order)

        def advance() -> int:
            return next(queue, -1)

        lane_doc = [advance() for _ in range(self.batch_size)]
        lane_offset = [0] * self.batch_size
        out = []
        while any(d >= 0 for d in lane_doc) and (max_batches is None or len(out) < max_batches):
            batch, _ = self._segments(int(seq_len), lane_doc, lane_offset, advance)
            out.append(batch)
        return out

    def state_dict(self) -> dict[str, Any]:
        """The exact stream position as plain ints (JSON-serialisable)."""
        return {
            "version": _STATE_VERSION,
            "seed": self.seed,
            "shuffle": int(self.shuffle),
            "batch_size": self.batch_size,
            "num_documents": len(self.docs),
            "num_tokens": self.docs.num_tokens,
            "epoch": self.epoch,
            "queue_pos": self.queue_pos,
            "lane_doc": list(self.lane_doc),
            "lane_offset": list(self.lane_offset),
            "tokens_seen": self.tokens_seen,
            "batches": self.batches,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore a position from `state_dict()`: the next batch equals the saved stream's next batch."""
        try:
            expected = {
                "batch_size": self.batch_size,
                "num_documents": len(self.docs),
                "num_tokens": self.docs.num_tokens,
                "seed": self.seed,
                "shuffle": int(self.shuffle),
            }
            mismatched = {k: (int(state[k]), v) for k, v in expected.items() if int(state[k]) != v}
            lane_doc = [int(d) for d in state["lane_doc"]]
            lane_offset = [int(o) for o in state["lane_offset"]]
            epoch, queue_pos = int(state["epoch"]), int(state["queue_pos"])
        except (KeyError, TypeError, ValueError) as exc:
            raise DataError(
                f"data stream position is incomplete or corrupt ({exc!r}); it must come from "
                f"TBPTTStream.state_dict()"
            ) from exc
        if mismatched:
            detail = ", ".join(f"{k}: saved {s}, now {n}" for k, (s, n) in mismatched.items())
            raise DataError(
                f"the saved data stream position belongs to different data or settings ({detail}); "
                f"resume with the same data, tokenizer, batch_size and seed"
            )
        if len(lane_doc) != self.batch_size or len(lane_offset) != self.batch_size:
            raise DataError(f"saved stream position has {len(lane_doc)} lanes, this stream {self.batch_size}")
        for d, o in zip(lane_doc, lane_offset):
            if not 0 <= d < len(self.docs) or not 0 <= o < self.docs.length(d):
                raise DataError(f"saved stream position (document {d}, offset {o}) is outside the data")
        if not 0 <= queue_pos <= len(self.docs) or epoch < 0:
            raise DataError(
                f"saved stream position (epoch {epoch}, queue_pos {queue_pos}) is outside the data"
            )
        self.epoch, self.queue_pos = epoch, queue_pos
        self.lane_doc, self.lane_offset = lane_doc, lane_offset
        self.tokens_seen = int(state.get("tokens_seen", 0))
        self.batches = int(state.get("batches", 0))
