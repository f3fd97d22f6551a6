"""LightningDataModule over a source's PreparedData (groundthink/data/sources.py): each rank's training stream,
drawn batch by batch with the sequence-length curriculum, and a saved/restored stream position.

Each training batch carries the stream position *after* it was drawn (`batch["stream_position"]`), so the module
can record the position of the last batch it actually trained on: Lightning prefetches one batch ahead, and a
checkpoint must not skip that batch on resume. Validation batches are held by the Validation callback, not here.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import lightning as L
from torch.utils.data import DataLoader, IterableDataset

from groundthink.data.sources import PreparedData
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


class TBPTTDataModule(L.LightningDataModule):
    """Training lanes that continue across batches, one stream per data-parallel rank."""

    def __init__(self, data: PreparedData, *, curriculum: Curriculum, accumulate_grad_batches: int = 1) -> None:
        super().__init__()
        self.data = data
        self.curriculum = curriculum
        self.accumulate_grad_batches = accumulate_grad_batches
        self.batches_drawn = 0
        self.train_stream: Any = None
        self._pending_position: dict[str, Any] | None = None

    def setup(self, stage: str | None = None) -> None:
        if self.train_stream is not None:
            return
        rank, world = 0, 1
        if self.trainer is not None:
            rank, world = self.trainer.global_rank, self.trainer.world_size
        self.train_stream = self.data.make_train_stream(rank, world)
        if self._pending_position is not None:
            self.restore_position(self._pending_position)

    def position(self) -> dict[str, Any]:
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
