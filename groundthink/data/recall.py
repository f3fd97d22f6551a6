"""Recall tasks as training data: `data=mqar` and `data=passkey` (token level, no tokenizer).

    groundthink-train data=mqar model.pattern=A data.num_kv_pairs=4 data.seq_len=64
    groundthink-train data=passkey data.distances=[64,256] data.seq_len=64

Both sources turn the generators of groundthink/data/synthetic.py into a run's training stream and validation
batches; the model's vocabulary is `data.vocab_size` (token ids are the task's own, there is no text and no
tokenizer). Validation reports `val/acc` besides `val/loss`: the share of labelled positions (MQAR queries, passkey
digits) where the argmax of the next-token logits is the label, and `callbacks.early_stop.target` can end a run
when it reaches a target.

**mqar** (multi-query associative recall, Zoology): every example is one `seq_len`-token sequence read from a fresh
state (each batch resets every lane), with `num_kv_pairs` key-value pairs and each key queried once. Training
examples: with `train_examples` null (the default) every batch is new (batch i generated from seed (data seed, i)),
else a fixed set of that many examples read in a seeded order, reshuffled every epoch (Zoology's setting). The
sequence length of a batch is the step's `data.seq_len` (so `data.curriculum` works), and `kv_curriculum`
([[start_batch, kv_pairs], ...]) trains on fewer pairs first. Validation: `val_batches` x `batch_size` held-out
examples at the final kv pairs, from a seed of their own (groundthink-eval's `mqar` task draws yet another).

**passkey** (token level, model_anchors §5.2): `filler KEY d1..dL filler*distance QUERY d1..dL`, one example per
document, each document `seq_len` x k tokens long (the smallest k that fits; the rest is a random filler prefix),
read in TBPTT segments of `seq_len` with carried state, so a distance beyond the segment is only solvable through
the state. Examples are spread evenly over `distances`. Labels: the answer digits only.

Resume: the stream's position is a few integers (batch count, or epoch and offset), saved in every checkpoint.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
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
from groundthink.data.stream import TokenizedDocuments
from groundthink.data.synthetic import IGNORE_INDEX, PasskeyTokens, mqar, passkey

TOKEN_LEVEL_SOURCES = ("mqar", "passkey")  # sources whose runs have no tokenizer (groundthink.load returns None)
_VAL_SEED_OFFSET = 1_000_003  # validation examples come from seed + this, training from the run's seed


@dataclass
class MQARDataSettings(DataSettings):
    source: str = "mqar"
    batch_size: int = 64
    seq_len: int = 64  # tokens per example (>= 4 x num_kv_pairs)
    num_kv_pairs: int = 4
    vocab_size: int = 256  # the model's vocabulary: keys from [1, V/2), values from [V/2, V)
    train_examples: int | None = None  # null: fresh examples every batch; N: a fixed set of N, reshuffled per epoch
    # [[start_batch, kv_pairs], ...]: fewer pairs first (the last stage's pairs should be num_kv_pairs); empty = off
    kv_curriculum: list[list[int]] = field(default_factory=list)
    power_a: float = 0.01  # query gaps ~ gap^(power_a - 1) (Zoology's default)
    val_batches: int = 16  # held-out examples = val_batches x batch_size


@dataclass
class PasskeyDataSettings(DataSettings):
    source: str = "passkey"
    batch_size: int = 16
    seq_len: int = 64  # the TBPTT segment; distances beyond it need the carried state
    distances: list[int] = field(default_factory=lambda: [16, 64, 128])  # filler tokens between key and query
    passkey_len: int = 5  # digits
    vocab_size: int = 64  # the model's vocabulary (>= 21: control ids, 10 digits, 2 markers, filler)
    train_examples: int = 20000  # spread evenly over the distances
    val_batches: int = 4  # held-out examples = val_batches x batch_size, spread over the distances


def kv_schedule(settings: MQARDataSettings) -> list[tuple[int, int]]:
    """[(start_batch, kv_pairs), ...] sorted, starting at batch 0 (num_kv_pairs when no curriculum is given)."""
    stages = []
    for stage in settings.kv_curriculum or []:
        if len(stage) != 2 or int(stage[0]) < 0 or int(stage[1]) < 1:
            raise DataError(f"data.kv_curriculum stages are [start_batch, kv_pairs] pairs with start_batch >= 0 and "
                            f"kv_pairs >= 1, got {list(stage)}")
        stages.append((int(stage[0]), int(stage[1])))
    stages.sort()
    if not stages or stages[0][0] > 0:
        stages.insert(0, (0, stages[0][1] if stages else int(settings.num_kv_pairs)))
    return stages


def check_mqar(kv: int, seq_len: int, vocab: int, where: str) -> None:
    """The generator's own conditions, as a DataError naming the settings to change."""
    if seq_len < 4 * kv:
        raise DataError(f"{where}: seq_len={seq_len} is too short for {kv} kv pairs (needs seq_len >= 4 x kv_pairs "
                        f"= {4 * kv}); raise data.seq_len or lower data.num_kv_pairs")
    if vocab // 2 - 1 < kv or vocab - vocab // 2 < kv:
        raise DataError(f"{where}: data.vocab_size={vocab} is too small for {kv} kv pairs (keys come from "
                        f"[1, {vocab // 2}), values from [{vocab // 2}, {vocab}), each needs {kv} distinct tokens); "
                        f"raise data.vocab_size to at least {2 * kv + 2}")


class MQARStream:
    """Training batches of MQAR examples (module docstring); every lane resets every batch."""

    def __init__(self, settings: MQARDataSettings, seed: int, rank: int = 0, world: int = 1) -> None:
        self.s = settings
        self.seed, self.rank, self.world = int(seed), int(rank), int(world)
        self.schedule = kv_schedule(settings)
        self.batches = 0
        self.epoch, self.offset = 0, 0  # fixed-set mode
        self._pool: dict[tuple[int, int], dict[str, torch.Tensor]] = {}
        self._order: tuple[int, np.ndarray] | None = None

    def kv_pairs(self, batch: int) -> int:
        return [kv for start, kv in self.schedule if start <= batch][-1]

    def _fixed(self, seq_len: int, kv: int) -> dict[str, torch.Tensor]:
        key = (seq_len, kv)
        if key not in self._pool:  # the same set on every rank; rank r reads every world-th example of the order
            self._pool[key] = mqar(int(self.s.train_examples), seq_len, kv, self.s.vocab_size,
                                   power_a=self.s.power_a, seed=self.seed)
        return self._pool[key]

    def next_batch(self, seq_len: int) -> dict[str, torch.Tensor]:
        kv, B = self.kv_pairs(self.batches), int(self.s.batch_size)
        check_mqar(kv, seq_len, self.s.vocab_size, "data=mqar")
        if self.s.train_examples is None:
            data = mqar(B, seq_len, kv, self.s.vocab_size, power_a=self.s.power_a,
                        seed=int(np.random.SeedSequence([self.seed, self.rank, self.batches]).generate_state(1)[0]))
        else:
            pool, n = self._fixed(seq_len, kv), int(self.s.train_examples)
            picks = []
            while len(picks) < B:
                if self._order is None or self._order[0] != self.epoch:
                    self._order = (self.epoch, np.random.default_rng([self.seed, self.epoch]).permutation(n))
                mine = self._order[1][self.rank::self.world]
                take = min(B - len(picks), len(mine) - self.offset)
                picks.extend(mine[self.offset:self.offset + take].tolist())
                self.offset += take
                if self.offset >= len(mine):
                    self.epoch, self.offset = self.epoch + 1, 0
            index = torch.tensor(picks)
            data = {k: pool[k][index] for k in ("input_ids", "labels")}
        self.batches += 1
        return {"input_ids": data["input_ids"], "labels": data["labels"], "reset": torch.ones(B, dtype=torch.bool)}

    def state_dict(self) -> dict[str, Any]:
        return {"batches": self.batches, "epoch": self.epoch, "offset": self.offset}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.batches, self.epoch, self.offset = int(state["batches"]), int(state["epoch"]), int(state["offset"])


@dataclass
class MQARLanes:
    """`make_train_stream` of data=mqar (picklable)."""

    settings: MQARDataSettings
    seed: int

    def __call__(self, rank: int, world: int) -> MQARStream:
        return MQARStream(self.settings, self.seed, rank, world)


def _check_common(settings: DataSettings, names: tuple[str, ...]) -> None:
    for name in names:
        _check_positive(f"data.{name}", getattr(settings, name))


@register_source
class MQARSource(DataSource):
    name = "mqar"
    Settings = MQARDataSettings

    def prepare(self, settings: MQARDataSettings, tokenizer: TokenizerSettings, *, seed: int,
                tokenizer_dir: Path | None = None, reuse_tokenizer: bool = False) -> PreparedData:
        _check_common(settings, ("batch_size", "seq_len", "num_kv_pairs", "vocab_size", "val_batches"))
        if settings.train_examples is not None:
            _check_positive("data.train_examples", settings.train_examples)
        schedule = kv_schedule(settings)
        lengths = [settings.seq_len] + [int(length) for _, length in settings.curriculum or []]
        for _, kv in schedule:
            for length in lengths:
                check_mqar(kv, length, settings.vocab_size, "data=mqar")
        if schedule[-1][1] != settings.num_kv_pairs:
            raise DataError(f"data.kv_curriculum ends at {schedule[-1][1]} kv pairs but data.num_kv_pairs="
                            f"{settings.num_kv_pairs} (validation uses num_kv_pairs): end the curriculum there")
        n_val = settings.val_batches * settings.batch_size
        val = mqar(n_val, settings.seq_len, settings.num_kv_pairs, settings.vocab_size, power_a=settings.power_a,
                   seed=seed + _VAL_SEED_OFFSET)
        val_batches = [{"input_ids": val["input_ids"][i:i + settings.batch_size],
                        "labels": val["labels"][i:i + settings.batch_size],
                        "reset": torch.ones(len(val["input_ids"][i:i + settings.batch_size]), dtype=torch.bool)}
                       for i in range(0, n_val, settings.batch_size)]
        train = "fresh examples every batch" if settings.train_examples is None else \
            f"{settings.train_examples} training examples"
        curriculum = f", kv curriculum {schedule}" if len(schedule) > 1 else ""
        return PreparedData(
            tokenizer=None, vocab_size=int(settings.vocab_size), make_train_stream=MQARLanes(settings, seed),
            val_batches=val_batches, token_bytes=None, accuracy=True,
            description=f"MQAR: {settings.num_kv_pairs} kv pairs in {settings.seq_len} tokens, vocabulary "
                        f"{settings.vocab_size}, {train}{curriculum}, {n_val} held-out examples",
            stats={"task": "mqar", "num_kv_pairs": settings.num_kv_pairs, "seq_len": settings.seq_len,
                   "val_examples": n_val})


def passkey_documents(settings: PasskeyDataSettings, n: int, seed: int) -> tuple[TokenizedDocuments,
                                                                                 TokenizedDocuments]:
    """(documents, target flags) of n passkey examples spread over the distances; flag[t] = token t is a label."""
    tokens = PasskeyTokens.for_vocab(int(settings.vocab_size))
    distances = [int(d) for d in settings.distances]
    T, L = int(settings.seq_len), int(settings.passkey_len)
    docs, flags = [], []
    for i, d in enumerate(distances):
        count = n // len(distances) + (1 if i < n % len(distances) else 0)
        if count == 0:
            continue
        core = 2 + 2 * L + d
        length = T * math.ceil((core + 1) / T)  # at least one filler token before the key
        ex = passkey(count, d, int(settings.vocab_size), passkey_len=L, seq_len=length, tokens=tokens,
                     seed=seed + 7919 * d)
        target = torch.zeros_like(ex["labels"])
        target[:, 1:] = (ex["labels"][:, :-1] != IGNORE_INDEX).long()  # the label of t is token t + 1
        docs.extend(ex["input_ids"])
        flags.extend(target)
    # interleave distances (the stream shuffles training documents; validation reads them in this order)
    order = np.random.default_rng([seed, 17]).permutation(len(docs)).tolist()
    return (TokenizedDocuments.from_lists([docs[i] for i in order]),
            TokenizedDocuments.from_lists([flags[i] for i in order]))


@register_source
class PasskeySource(DataSource):
    name = "passkey"
    Settings = PasskeyDataSettings

    def prepare(self, settings: PasskeyDataSettings, tokenizer: TokenizerSettings, *, seed: int,
                tokenizer_dir: Path | None = None, reuse_tokenizer: bool = False) -> PreparedData:
        from groundthink.data.chat import ChatLanes, MaskedTBPTTStream  # documents with target flags, in lanes

        _check_common(settings, ("batch_size", "seq_len", "passkey_len", "train_examples", "val_batches"))
        if not settings.distances or any(int(d) < 0 for d in settings.distances):
            raise DataError(f"data.distances={list(settings.distances)} must be a non-empty list of filler lengths "
                            ">= 0, e.g. [16, 64, 256]")
        if settings.curriculum:
            raise DataError("data=passkey sizes its documents by data.seq_len; data.curriculum is not supported")
        if settings.train_examples < len(settings.distances):
            raise DataError(f"data.train_examples={settings.train_examples} is fewer than one per distance "
                            f"({len(settings.distances)} distances)")
        PasskeyTokens.for_vocab(int(settings.vocab_size))  # raises a DataError naming the minimum
        docs, targets = passkey_documents(settings, settings.train_examples, seed)
        n_val = settings.val_batches * settings.batch_size
        vdocs, vtargets = passkey_documents(settings, n_val, seed + _VAL_SEED_OFFSET)
        val_stream = MaskedTBPTTStream(vdocs, vtargets, batch_size=settings.batch_size, pad_id=0, seed=seed)
        val_batches = val_stream.validation_batches(settings.seq_len)
        return PreparedData(
            tokenizer=None, vocab_size=int(settings.vocab_size),
            make_train_stream=ChatLanes(docs, targets, settings.batch_size, 0, seed),
            val_batches=val_batches, token_bytes=None, accuracy=True,
            description=f"passkey: {settings.passkey_len} digits at distances {list(settings.distances)}, "
                        f"segments of {settings.seq_len}, {settings.train_examples} training / {n_val} held-out "
                        f"examples ({docs.num_tokens / 1e6:.2f}M tokens)",
            stats={"task": "passkey", "distances": list(settings.distances), "val_examples": n_val})
