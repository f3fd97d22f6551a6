"""Truncated-BPTT lanes streamed from token shards: `TBPTTStream`'s semantics with constant memory, token-weighted
mixing of several shard folders, and data-parallel ranks that read disjoint documents.

Lane semantics are those of `groundthink.data.stream.TBPTTStream` (its module docstring): every lane is one
continuous stream of documents; a lane that starts a document has ``reset[b] = True``; the label of a segment's last
position is the next token of the same document; a document's last token has label -100 and the rest of that
segment is padding (``pad_id``, label -100); the lane takes its next document at the next batch. A lane that
finishes a document draws the next one at once, lanes in order. With one source on one rank, shuffle and seed as
TBPTTStream, the batches are identical to `TBPTTStream(documents of the shard split, ...)` (tested): documents come
from a queue that is a seeded numpy permutation of the document numbers, redrawn every epoch.

Beyond TBPTTStream:
- Constant memory: documents are read from the shards on demand (`ShardSet`); the stream holds per source one
  int64 permutation of its document numbers and a few counters, never the tokens or per-document Python objects.
- Mixing (the plan's 60/30/10): given several shard folders with weights, each time a lane needs a document it is
  drawn from the source whose share of the tokens handed out so far is furthest below its weight (largest
  ``weight * total - assigned``), so the token shares follow the weights whatever the documents' lengths. Each
  source keeps its own queue and epochs. All sources must share one tokenizer.
- Ranks: rank r of w reads only documents ``i`` with ``i % w == r`` of every source (disjoint from every other rank,
  in every epoch), in its own seeded order. `state_dict()` is the rank's own position; each rank saves and restores
  its own.

Validation (`validation_batches`) reads every document of the split once, in index order, on every rank alike,
sources interleaved by the same token-weight rule; it does not move the training position.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch

from groundthink.data.errors import DataError
from groundthink.data.shards import ShardSet
from groundthink.data.stream import IGNORE_INDEX
from groundthink.data.tokenizer import Tokenizer

_STATE_VERSION = 1
_STATE_KIND = "token-shards"
SourceSpec = Any  # a path, a ShardSet, a (path | ShardSet, weight) pair, or {"path": ..., "weight": ...}


def _parse_sources(sources: SourceSpec | Sequence[SourceSpec], split: str,
                   tokenizer: Tokenizer | None) -> tuple[list[ShardSet], list[float]]:
    if isinstance(sources, (str, os.PathLike, ShardSet)):
        sources = [sources]
    if not isinstance(sources, Sequence) or isinstance(sources, str) or len(sources) == 0:
        raise DataError("give the stream a shard folder, or a list of {path, weight} entries (a mixture)")
    sets, weights = [], []
    for i, entry in enumerate(sources):
        if isinstance(entry, (str, os.PathLike, ShardSet)):
            source, weight = entry, 1.0
        elif isinstance(entry, dict):
            if "path" not in entry:
                raise DataError(f"mixture entry {i} ({entry}) has no 'path': give {{path: <shard folder>, weight: w}}")
            source, weight = entry["path"], entry.get("weight", 1.0)
        else:
            try:
                source, weight = entry
            except (TypeError, ValueError):
                raise DataError(f"mixture entry {i} ({entry!r}) is not a path, (path, weight) or "
                                f"{{path, weight}}") from None
        try:
            weight = float(weight)
        except (TypeError, ValueError):
            raise DataError(f"mixture entry {i}: weight {weight!r} is not a number") from None
        if not math.isfinite(weight) or weight < 0:
            raise DataError(f"mixture entry {i}: weight {weight} must be a finite number >= 0")
        shard_set = source if isinstance(source, ShardSet) and source.split == split else ShardSet(
            source.path if isinstance(source, ShardSet) else source, split)
        sets.append(shard_set)
        weights.append(weight)
    if sum(weights) <= 0:
        raise DataError(f"mixture weights {weights} must have a positive sum")
    fingerprints = {s.tokenizer_fingerprint for s in sets}
    if len(fingerprints) > 1:
        raise DataError(
            "the mixture's shard folders were tokenized with different tokenizers ("
            + ", ".join(f"{s.path}: {s.tokenizer_fingerprint[:12]}" for s in sets)
            + "); tokenize every source with the same tokenizer (groundthink-tokenize --tokenizer <folder>)"
        )
    if tokenizer is not None:
        sets[0].check_tokenizer(tokenizer)
    total = sum(weights)
    return sets, [w / total for w in weights]


def _pick(weights: list[float], assigned: list[int], available: list[bool]) -> int:
    """The source whose token share is furthest below its weight (ties: the lowest index)."""
    total = sum(a for a, ok in zip(assigned, available) if ok)
    best, best_deficit = -1, -math.inf
    for s, (w, a, ok) in enumerate(zip(weights, assigned, available)):
        if ok and w > 0:
            deficit = w * total - a
            if deficit > best_deficit:
                best, best_deficit = s, deficit
    return best


class ShardTBPTTStream:
    """B lanes of continuous document streams from token shards (see the module docstring)."""

    def __init__(
        self,
        sources: SourceSpec | Sequence[SourceSpec],
        batch_size: int,
        *,
        split: str = "train",
        seed: int = 0,
        shuffle: bool = True,
        rank: int = 0,
        world_size: int = 1,
        pad_id: int | None = None,
        tokenizer: Tokenizer | None = None,
    ) -> None:
        if int(batch_size) < 1:
            raise DataError(f"data.batch_size={batch_size} must be at least 1")
        if int(world_size) < 1 or not 0 <= int(rank) < int(world_size):
            raise DataError(f"rank={rank}, world_size={world_size}: need world_size >= 1 and 0 <= rank < world_size")
        self.sets, self.weights = _parse_sources(sources, split, tokenizer)
        self.split = split
        self.batch_size = int(batch_size)
        self.seed = int(seed)
        self.shuffle = bool(shuffle)
        self.rank, self.world_size = int(rank), int(world_size)
        self.pad_id = self.sets[0].pad_id if pad_id is None else int(pad_id)
        # Documents of this rank per source: i % world_size == rank.
        self.local_counts = [max(0, (len(s) - self.rank + self.world_size - 1) // self.world_size) for s in self.sets]
        for shard_set, n, w in zip(self.sets, self.local_counts, self.weights):
            if w > 0 and n == 0:
                raise DataError(
                    f"{shard_set.path} ({split}) has {len(shard_set)} documents: none for rank {self.rank} of "
                    f"{self.world_size}; every rank needs at least one document of every source"
                )
        self._orders: dict[int, tuple[int, np.ndarray]] = {}
        self._reset_position()

    # ----- position ----------------------------------------------------------------------------------------------
    def _reset_position(self) -> None:
        n = len(self.sets)
        self.source_epoch = [0] * n
        self.source_queue_pos = [0] * n
        self.source_assigned = [0] * n
        self.source_emitted = [0] * n
        self.tokens_seen = 0
        self.batches = 0
        self.lane_source = [0] * self.batch_size
        self.lane_doc = [0] * self.batch_size
        self.lane_offset = [0] * self.batch_size
        for b in range(self.batch_size):
            self.lane_source[b], self.lane_doc[b] = self._next_doc()

    @property
    def epoch(self) -> int:
        """Epochs completed by the first source (the only one without a mixture)."""
        return self.source_epoch[0]

    @property
    def num_documents(self) -> int:
        return sum(len(s) for s in self.sets)

    def _order(self, source: int, epoch: int) -> np.ndarray:
        cached = self._orders.get(source)
        if cached is None or cached[0] != epoch:
            n = self.local_counts[source]
            if self.shuffle:
                # One source on one rank: TBPTTStream's key, so the two streams agree document for document.
                key = [self.seed, epoch] if (source == 0 and self.world_size == 1) else [
                    self.seed, epoch, source, self.rank, self.world_size]
                order = np.random.default_rng(key).permutation(n)
            else:
                order = np.arange(n, dtype=np.int64)
            cached = (epoch, order)
            self._orders[source] = cached
        return cached[1]

    def _next_doc(self) -> tuple[int, int]:
        s = 0 if len(self.sets) == 1 else _pick(self.weights, self.source_assigned, [True] * len(self.sets))
        if self.source_queue_pos[s] >= self.local_counts[s]:
            self.source_epoch[s] += 1
            self.source_queue_pos[s] = 0
        local = int(self._order(s, self.source_epoch[s])[self.source_queue_pos[s]])
        self.source_queue_pos[s] += 1
        doc = self.rank + self.world_size * local
        self.source_assigned[s] += self.sets[s].length(doc)
        return s, doc

    # ----- batches -----------------------------------------------------------------------------------------------
    def next_batch(self, seq_len: int) -> dict[str, torch.Tensor]:
        """input_ids [B,T] long, labels [B,T] long (-100 = no target), reset [B] bool; advances every lane."""
        batch, valid = self._segments(int(seq_len), self.lane_source, self.lane_doc, self.lane_offset,
                                      self._next_doc, self.source_emitted)
        self.tokens_seen += valid
        self.batches += 1
        return batch

    def _segments(self, seq_len: int, lane_source: list[int], lane_doc: list[int], lane_offset: list[int],
                  advance: Callable[[], tuple[int, int]], emitted: list[int]) -> tuple[dict, int]:
        if seq_len < 1:
            raise DataError(f"seq_len={seq_len} must be at least 1")
        B = len(lane_doc)
        input_ids = np.full((B, seq_len), self.pad_id, dtype=np.int64)
        labels = np.full((B, seq_len), IGNORE_INDEX, dtype=np.int64)
        reset = np.zeros(B, dtype=bool)
        valid = 0
        for b in range(B):
            s, doc = lane_source[b], lane_doc[b]
            if doc < 0:  # an exhausted validation lane
                reset[b] = True
                continue
            shard_set = self.sets[s]
            length = shard_set.length(doc)
            offset = lane_offset[b]
            reset[b] = offset == 0
            n = min(seq_len, length - offset)
            tokens = shard_set.read(doc, offset, offset + min(seq_len + 1, length - offset))
            input_ids[b, :n] = tokens[:n]
            m = min(seq_len, length - offset - 1)
            if m > 0:
                labels[b, :m] = tokens[1 : 1 + m]
            valid += n
            emitted[s] += n
            if offset + n >= length:
                lane_source[b], lane_doc[b] = advance()
                lane_offset[b] = 0
            else:
                lane_offset[b] = offset + n
        out = {"input_ids": torch.from_numpy(input_ids), "labels": torch.from_numpy(labels),
               "reset": torch.from_numpy(reset)}
        return out, valid

    def validation_batches(self, seq_len: int, max_batches: int | None = None) -> list[dict[str, torch.Tensor]]:
        """Fixed held-out batches: fresh lanes over every document of the split once (see the module docstring).

        Kept in memory as a list, like TBPTTStream's: pass `max_batches` for a large split."""
        n = len(self.sets)
        next_local = [0] * n
        assigned = [0] * n

        def advance() -> tuple[int, int]:
            available = [next_local[s] < len(self.sets[s]) for s in range(n)]
            s = _pick(self.weights, assigned, available) if n > 1 else (0 if available[0] else -1)
            if s < 0:
                return 0, -1
            doc = next_local[s]
            next_local[s] += 1
            assigned[s] += self.sets[s].length(doc)
            return s, doc

        lanes = [advance() for _ in range(self.batch_size)]
        lane_source = [s for s, _ in lanes]
        lane_doc = [d for _, d in lanes]
        lane_offset = [0] * self.batch_size
        out: list[dict[str, torch.Tensor]] = []
        while any(d >= 0 for d in lane_doc) and (max_batches is None or len(out) < max_batches):
            batch, _ = self._segments(int(seq_len), lane_source, lane_doc, lane_offset, advance, [0] * n)
            out.append(batch)
        return out

    def mixture(self) -> dict[str, float]:
        """The realised token share of each source among the tokens emitted so far (path -> share)."""
        total = sum(self.source_emitted)
        return {str(s.path): (e / total if total else 0.0) for s, e in zip(self.sets, self.source_emitted)}

    # ----- saving and restoring ----------------------------------------------------------------------------------
    def _identity(self) -> dict[str, Any]:
        return {
            "kind": _STATE_KIND,
            "split": self.split,
            "datasets": [s.dataset_id for s in self.sets],
            "weights": [round(w, 12) for w in self.weights],
            "batch_size": self.batch_size,
            "seed": self.seed,
            "shuffle": int(self.shuffle),
            "rank": self.rank,
            "world_size": self.world_size,
        }

    def state_dict(self) -> dict[str, Any]:
        """This rank's exact stream position (JSON-serialisable)."""
        return {
            "version": _STATE_VERSION,
            **self._identity(),
            "source_epoch": list(self.source_epoch),
            "source_queue_pos": list(self.source_queue_pos),
            "source_assigned": list(self.source_assigned),
            "source_emitted": list(self.source_emitted),
            "lane_source": list(self.lane_source),
            "lane_doc": list(self.lane_doc),
            "lane_offset": list(self.lane_offset),
            "tokens_seen": self.tokens_seen,
            "batches": self.batches,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore a position from `state_dict()`: the next batch equals the saved stream's next batch."""
        n = len(self.sets)
        try:
            if state.get("kind") != _STATE_KIND:
                raise DataError(
                    f"the saved data position is of kind {state.get('kind')!r}, not a token-shard stream's; resume "
                    f"with the data source the run was started with"
                )
            mismatched = {k: (state[k], v) for k, v in self._identity().items() if state[k] != v}
            per_source = {k: [int(x) for x in state[k]] for k in (
                "source_epoch", "source_queue_pos", "source_assigned", "source_emitted")}
            lanes = {k: [int(x) for x in state[k]] for k in ("lane_source", "lane_doc", "lane_offset")}
        except (KeyError, TypeError, ValueError) as exc:
            raise DataError(
                f"data stream position is incomplete or corrupt ({exc!r}); it must come from "
                f"ShardTBPTTStream.state_dict()"
            ) from exc
        if mismatched:
            detail = "; ".join(f"{k}: saved {s}, now {v}" for k, (s, v) in mismatched.items())
            raise DataError(
                f"the saved data stream position belongs to different shards or settings ({detail}); resume with "
                f"the same shard folders, weights, batch_size, seed and rank/world_size"
            )
        if any(len(v) != n for v in per_source.values()) or any(len(v) != self.batch_size for v in lanes.values()):
            raise DataError(f"saved stream position has the wrong number of sources or lanes "
                            f"({n} sources, {self.batch_size} lanes here)")
        for s, d, o in zip(lanes["lane_source"], lanes["lane_doc"], lanes["lane_offset"]):
            if not 0 <= s < n or not 0 <= d < len(self.sets[s]) or d % self.world_size != self.rank \
                    or not 0 <= o < self.sets[s].length(d):
                raise DataError(f"saved stream position (source {s}, document {d}, offset {o}) is outside the data")
        for s in range(n):
            if per_source["source_epoch"][s] < 0 or not 0 <= per_source["source_queue_pos"][s] <= self.local_counts[s]:
                raise DataError(f"saved stream position of source {s} (epoch {per_source['source_epoch'][s]}, "
                                f"queue_pos {per_source['source_queue_pos'][s]}) is outside the data")
        self.source_epoch = per_source["source_epoch"]
        self.source_queue_pos = per_source["source_queue_pos"]
        self.source_assigned = per_source["source_assigned"]
        self.source_emitted = per_source["source_emitted"]
        self.lane_source, self.lane_doc, self.lane_offset = lanes["lane_source"], lanes["lane_doc"], lanes[
            "lane_offset"]
        self.tokens_seen = int(state.get("tokens_seen", 0))
        self.batches = int(state.get("batches", 0))
