"""LightningDataModule over the stateful TBPTT streams of groundthink.data.

Each training batch carries the stream position *after* it was drawn (`batch["stream_position"]`), so the module
can record the position of the last batch it actually trained on: Lightning prefetches one batch ahead, and a
checkpoint must not skip that batch on resume.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import lightning as L
import torch
from torch.utils.data import DataLoader, IterableDataset

from groundthink.data.stream import TBPTTStream
from groundthink.training.schedules import Curriculum


class _StreamDataset(IterableDataset):
    def __init__(self, owner: TBPTTDataModule) -> None:
        self.owner = owner

    def __iter__(self) -> Iterator[dict[str, Any]]:
        owner = self.owner
        while True:
            step = owner.batches_drawn // owner.accumulate_grad_batches
            batch = owner.train_stream.next_batch(owner.curriculum.seq_len(step))
            owner.batches_drawn += 1
            batch["stream_position"] = owner.position()
            yield batch


class _ListDataset(torch.utils.data.Dataset):
    def __init__(self, items: list[dict[str, torch.Tensor]]) -> None:
        self.items = items

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return self.items[i]


class TBPTTDataModule(L.LightningDataModule):
    """Training lanes that continue across batches, and a fixed held-out validation set (also lane-continuous)."""

    def __init__(
        self,
        train_docs: list[list[int]],
        val_docs: list[list[int]],
        *,
        batch_size: int,
        curriculum: Curriculum,
        val_seq_len: int,
        val_batches: int,
        pad_id: int,
        seed: int,
        accumulate_grad_batches: int = 1,
    ) -> None:
        super().__init__()
        self.train_docs, self.val_docs = train_docs, val_docs
        self.batch_size = batch_size
        self.curriculum = curriculum
        self.val_seq_len = val_seq_len
        self.val_batches = val_batches
        self.pad_id = pad_id
        self.seed = seed
        self.accumulate_grad_batches = accumulate_grad_batches
        self.batches_drawn = 0
        self.train_stream: TBPTTStream | None = None
        self._pending_position: dict[str, Any] | None = None
        self._val_items: list[dict[str, torch.Tensor]] | None = None

    def setup(self, stage: str | None = None) -> None:
        if self.train_stream is not None:
            return
        rank, world = 0, 1
        if self.trainer is not None:
            rank, world = self.trainer.global_rank, self.trainer.world_size
        # Each data-parallel rank streams its own share of the documents.
        docs = self.train_docs[rank::world] if world > 1 else self.train_docs
        self.train_stream = TBPTTStream(docs, batch_size=self.batch_size, pad_id=self.pad_id, seed=self.seed + rank)
        if self._pending_position is not None:
            self.restore_position(self._pending_position)

    def position(self) -> dict[str, Any]:
        assert self.train_stream is not None
        return {"stream": self.train_stream.state_dict(), "batches_drawn": self.batches_drawn}

    def restore_position(self, position: dict[str, Any]) -> None:
        if self.train_stream is None:
            self._pending_position = position
            return
        self.train_stream.load_state_dict(position["stream"])
        self.batches_drawn = int(position["batches_drawn"])
        self._pending_position = None

    def train_dataloader(self) -> DataLoader:
        self.setup()
        return DataLoader(_StreamDataset(self), batch_size=None, num_workers=0)

    def val_dataloader(self) -> DataLoader:
        if self._val_items is None:
            val_stream = TBPTTStream(self.val_docs, batch_size=self.batch_size, pad_id=self.pad_id, seed=self.seed)
            self._val_items = list(val_stream.validation_batches(self.val_seq_len, self.val_batches))
        return DataLoader(_ListDataset(self._val_items), batch_size=None, num_workers=0)
