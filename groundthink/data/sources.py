"""Data sources for training: each is a settings dataclass (the `data` config group's schema for that source) and a
`prepare` that turns it into what a run trains on, registered by name in DATA_SOURCES.

    data=embedded                    English text that ships with Python (the default; no download)
    data=file data.path=x.txt        local .txt / .jsonl / folder, through `datasets`
    data=hub data.hub_name=org/name  a Hugging Face hub dataset (needs network)
    data=mixture                     a weighted mixture of the above
    data=shards data.path=shards/x   token shards written by groundthink-tokenize (constant memory; a token-weighted
                                     mixture of shard folders with data.mixture=[{path: ..., weight: 0.6}, ...])
    data=chat data.path=chat.jsonl   chat JSONL for SFT, loss on assistant tokens only (groundthink/data/chat.py)
    data=mqar / data=passkey         recall tasks at the token level, with val/acc (groundthink/data/recall.py)

A source's `prepare(settings, tokenizer, seed=..., tokenizer_dir=..., reuse_tokenizer=...)` returns PreparedData:
the tokenizer (built, or reloaded from the run folder on resume, and saved there), the vocabulary size the model
must have, a factory for each data-parallel rank's training stream (an object with `next_batch(seq_len)`,
`state_dict()` and `load_state_dict()`, like `TBPTTStream`), the fixed validation batches, the bytes behind each
token id (for bits per byte) and the held-out texts (for gates and evaluation). Every problem is raised as a
DataError before any training starts. A new source = its settings dataclass + a class with `prepare` registered
with `@register_source`, its `conf/data/<name>.yaml` and its test.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from groundthink.data.errors import DataError


@dataclass
class TokenizerSettings:
    """The `tokenizer` config group: `kind` char (bytes + control tokens, 264 ids) or bpe (trained on the run's
    training documents); vocab_size: null for char (its size is fixed), the target size for bpe."""

    kind: str = "char"
    vocab_size: int | None = None


@dataclass
class DataSettings:
    """Settings every source shares: the batch shape, the sequence-length curriculum and validation size."""

    source: str = "embedded"
    batch_size: int = 16  # batch lanes, each a continuous stream
    seq_len: int = 128  # tokens per lane per step (the TBPTT segment)
    # Sequence-length curriculum: [[start_step, seq_len], ...], e.g. [[0, 64], [500, 128]]; empty = seq_len.
    curriculum: list[list[int]] = field(default_factory=list)
    val_batches: int = 8  # held-out batches per validation
    # One process reads the lanes of this many data-parallel ranks side by side (batch = emulate_ranks x
    # batch_size): exactly the global batch an N-rank run trains on, to check a multi-process run against one
    # process. 1 = off; only for a single-process run.
    emulate_ranks: int = 1


@dataclass
class TextDataSettings(DataSettings):
    """Text sources: documents split into train/validation by document, tokenized, streamed in lanes."""

    max_documents: int | None = None  # read at most this many documents (null = all)
    val_fraction: float = 0.05  # share of documents held out for validation


@dataclass
class FileDataSettings(TextDataSettings):
    source: str = "file"
    path: str = "???"  # a .txt/.md/.jsonl/.json file or a folder of them
    text_field: str = "text"  # the field of JSON records that holds the text (chat records: "messages")


@dataclass
class HubDataSettings(TextDataSettings):
    source: str = "hub"
    hub_name: str = "???"  # e.g. HuggingFaceFW/fineweb-edu
    text_field: str = "text"
    max_documents: int | None = 20000


@dataclass
class MixtureDataSettings(TextDataSettings):
    source: str = "mixture"
    # [{source: hub, hub_name: ..., weight: 0.6}, ...]: each entry's share of the documents is its weight
    mixture: list[dict[str, Any]] = field(default_factory=list)
    max_documents: int | None = 30000


@dataclass
class ShardsDataSettings(DataSettings):
    """Token shards (groundthink-tokenize): lanes streamed from memory-mapped files by ShardTBPTTStream, train split
    for training, the shards' own val split for validation. Give `path` (one shard folder) or `mixture` (several,
    mixed by token weight), not both; every folder must have been tokenized with the same tokenizer, which is the
    run's tokenizer (the `tokenizer` group must agree with it or is refused)."""

    source: str = "shards"
    path: str | None = None  # one shard folder
    # [{path: shards/web, weight: 0.6}, {path: shards/books, weight: 0.3}, ...]: each entry's share of the tokens
    mixture: list[dict[str, Any]] = field(default_factory=list)
    shuffle: bool = True  # documents in a seeded order per epoch (false: index order)
    val_documents: int = 256  # held-out texts decoded for gates/evaluation (val_texts); the rest stay on disk


@dataclass
class PreparedData:
    """What a run trains on (see the module docstring)."""

    tokenizer: Any  # groundthink.data.Tokenizer, or None for sources that produce token ids directly
    vocab_size: int
    make_train_stream: Callable[[int, int], Any]  # (rank, world_size) -> that rank's training stream
    val_batches: list[dict[str, Any]]
    token_bytes: Any  # float tensor [vocab]: UTF-8 bytes behind each id (0 for control ids), or None
    val_texts: list[str] = field(default_factory=list)
    description: str = ""  # one line for the run's banner, e.g. "1.07M training tokens"
    pad_id: int = 0
    stats: dict[str, Any] = field(default_factory=dict)  # source-specific counts for summary.json (chat: by role)
    accuracy: bool = False  # validation also reports val/acc (argmax accuracy at the labelled positions)


class DataSource:
    """Base of the registered sources: `name`, its `Settings` dataclass, and `prepare`."""

    name: ClassVar[str]
    Settings: ClassVar[type[DataSettings]]

    def prepare(self, settings: DataSettings, tokenizer: TokenizerSettings, *, seed: int,
                tokenizer_dir: Path | None = None, reuse_tokenizer: bool = False) -> PreparedData:
        raise NotImplementedError


DATA_SOURCES: dict[str, type[DataSource]] = {}


def register_source(cls: type[DataSource]) -> type[DataSource]:
    DATA_SOURCES[cls.name] = cls
    return cls


def prepare_data(settings: DataSettings, tokenizer: TokenizerSettings, **kwargs: Any) -> PreparedData:
    """Dispatch to the source named by `settings.source` (see DataSource.prepare for the keyword arguments)."""
    if settings.source not in DATA_SOURCES:
        raise DataError(f"data.source={settings.source!r} is not a data source; registered: {sorted(DATA_SOURCES)}")
    _check_positive("data.emulate_ranks", settings.emulate_ranks)
    data = DATA_SOURCES[settings.source]().prepare(settings, tokenizer, **kwargs)
    if settings.emulate_ranks > 1:
        data.make_train_stream = StackedLanes(data.make_train_stream, settings.emulate_ranks)
        data.description += f", read as {settings.emulate_ranks} ranks' lanes side by side (data.emulate_ranks)"
    return data


class TextSource(DataSource):
    """A source of documents: split, tokenize (char or a BPE trained on the training split), stream in lanes."""

    Settings = TextDataSettings
    document_fields: ClassVar[tuple[str, ...]] = ()  # settings passed on to corpus.load_documents

    def documents(self, settings: Any) -> list[str]:
        from groundthink.data.corpus import load_documents

        extra = {name: getattr(settings, name) for name in self.document_fields}
        return load_documents(self.name, max_documents=settings.max_documents, **extra)

    def prepare(self, settings: Any, tokenizer: TokenizerSettings, *, seed: int,
                tokenizer_dir: Path | None = None, reuse_tokenizer: bool = False) -> PreparedData:
        import torch

        from groundthink.data.corpus import split_documents
        from groundthink.data.stream import TBPTTStream, encode_documents
        from groundthink.data.tokenizer import Tokenizer, build_tokenizer
        from groundthink.training.schedules import Curriculum

        curriculum = Curriculum(settings.curriculum, settings.seq_len)
        _check_positive("data.batch_size", settings.batch_size)
        _check_positive("data.val_batches", settings.val_batches)
        train_texts, val_texts = split_documents(self.documents(settings), settings.val_fraction, seed=seed)
        if reuse_tokenizer and tokenizer_dir is not None and tokenizer_dir.exists():
            tok = Tokenizer.load(tokenizer_dir)
        else:
            tok = build_tokenizer(tokenizer.kind, train_texts, tokenizer.vocab_size)
            if tokenizer_dir is not None:
                tok.save(tokenizer_dir)
        train_ids = encode_documents(tok, train_texts)
        val_ids = encode_documents(tok, val_texts) if val_texts else None
        needed = settings.batch_size * curriculum.max_seq_len
        if train_ids.num_tokens < needed:
            raise DataError(
                f"the training split holds {train_ids.num_tokens} tokens, fewer than one batch needs "
                f"(data.batch_size {settings.batch_size} x seq_len {curriculum.max_seq_len} = {needed}): training "
                "would repeat the same few tokens. Use more data, or a smaller data.batch_size / data.seq_len."
            )
        val_batches: list[dict[str, Any]] = []
        if val_ids is None:
            warnings.warn("the validation split is empty (data.val_fraction=0?): no val/loss will be logged",
                          UserWarning, stacklevel=2)
        else:
            val_stream = TBPTTStream(val_ids, batch_size=settings.batch_size, pad_id=tok.pad_id, seed=seed)
            val_batches = list(val_stream.validation_batches(settings.seq_len, settings.val_batches))
            if val_ids.num_tokens < settings.batch_size * settings.seq_len:
                warnings.warn(
                    f"the validation split holds only {val_ids.num_tokens} tokens (less than one batch of "
                    f"{settings.batch_size} x {settings.seq_len}): val/loss will be noisy; raise data.val_fraction "
                    "or add data", UserWarning, stacklevel=2)

        return PreparedData(
            tokenizer=tok,
            vocab_size=tok.vocab_size,
            make_train_stream=DocumentLanes(train_ids, settings.batch_size, tok.pad_id, seed),
            val_batches=val_batches,
            token_bytes=torch.tensor(tok.token_byte_lengths(), dtype=torch.float32),
            val_texts=val_texts,
            description=f"{train_ids.num_tokens / 1e6:.2f}M training tokens",
            pad_id=tok.pad_id,
        )


@register_source
class EmbeddedSource(TextSource):
    name = "embedded"


@register_source
class FileSource(TextSource):
    name = "file"
    Settings = FileDataSettings
    document_fields = ("path", "text_field")


@register_source
class HubSource(TextSource):
    name = "hub"
    Settings = HubDataSettings
    document_fields = ("hub_name", "text_field")


@register_source
class MixtureSource(TextSource):
    name = "mixture"
    Settings = MixtureDataSettings

    def documents(self, settings: MixtureDataSettings) -> list[str]:
        from groundthink.data.corpus import load_mixture

        specs = [(dict(entry), float(entry.get("weight", 1.0))) for entry in settings.mixture]
        return load_mixture(specs, total_docs=settings.max_documents, seed=0)


@register_source
class ShardsSource(DataSource):
    """Token shards (ShardsDataSettings): constant memory, token-weighted mixing, disjoint ranks, exact resume."""

    name = "shards"
    Settings = ShardsDataSettings

    def prepare(self, settings: ShardsDataSettings, tokenizer: TokenizerSettings, *, seed: int,
                tokenizer_dir: Path | None = None, reuse_tokenizer: bool = False) -> PreparedData:
        import torch

        from groundthink.data.shard_stream import ShardTBPTTStream
        from groundthink.data.tokenizer import Tokenizer
        from groundthink.training.schedules import Curriculum

        curriculum = Curriculum(settings.curriculum, settings.seq_len)
        _check_positive("data.batch_size", settings.batch_size)
        _check_positive("data.val_batches", settings.val_batches)
        sources = shard_sources(settings)
        train = ShardTBPTTStream(sources, settings.batch_size, split="train", seed=seed, shuffle=settings.shuffle)
        first = train.sets[0]
        tok = first.load_tokenizer()
        _check_tokenizer_settings(tokenizer, tok, first.path)
        if reuse_tokenizer and tokenizer_dir is not None and tokenizer_dir.exists():
            saved = Tokenizer.load(tokenizer_dir)
            if saved.fingerprint != tok.fingerprint:
                raise DataError(
                    f"the run being resumed trained with tokenizer {saved.fingerprint[:12]} ({tokenizer_dir}), but "
                    f"the shards in {first.path} were written with {tok.fingerprint[:12]}: resume with the shards "
                    "the run started from")
        elif tokenizer_dir is not None:
            tok.save(tokenizer_dir)
        num_tokens = sum(s.num_tokens for s in train.sets)
        needed = settings.batch_size * curriculum.max_seq_len
        if num_tokens < needed:
            raise DataError(
                f"the shards' training split holds {num_tokens} tokens, fewer than one batch needs (data.batch_size "
                f"{settings.batch_size} x seq_len {curriculum.max_seq_len} = {needed}); tokenize more data")
        val_batches: list[dict[str, Any]] = []
        val_texts: list[str] = []
        try:
            val = ShardTBPTTStream(sources, settings.batch_size, split="val", seed=seed, shuffle=False)
        except DataError as exc:
            warnings.warn(f"no validation split in the shards ({exc}): no val/loss will be logged", UserWarning,
                          stacklevel=2)
        else:
            val_batches = val.validation_batches(settings.seq_len, settings.val_batches)
            shown = val.sets[0]
            eos = tok.eos_id
            for i in range(min(settings.val_documents, len(shown))):
                ids = shown.read(i)
                val_texts.append(tok.decode(ids[:-1] if len(ids) and ids[-1] == eos else ids))
        names = ", ".join(f"{s.path.name} {w:.0%}" for s, w in zip(train.sets, train.weights))
        return PreparedData(
            tokenizer=tok,
            vocab_size=tok.vocab_size,
            make_train_stream=ShardLanes(sources, settings.batch_size, seed, settings.shuffle),
            val_batches=val_batches,
            token_bytes=torch.tensor(tok.token_byte_lengths(), dtype=torch.float32),
            val_texts=val_texts,
            description=f"{num_tokens / 1e6:.2f}M training tokens in shards ({names})",
            pad_id=first.pad_id,
        )


def shard_sources(settings: ShardsDataSettings) -> list[dict[str, Any]]:
    """The shard folders of `settings` as ShardTBPTTStream sources ([{path, weight}]), checked."""
    if bool(settings.path) == bool(settings.mixture):
        raise DataError("data=shards needs exactly one of data.path=<shard folder> or data.mixture=[{path: ..., "
                        f"weight: ...}}, ...] (got path={settings.path!r}, {len(settings.mixture)} mixture entries)")
    if settings.path:
        return [{"path": str(Path(settings.path).expanduser()), "weight": 1.0}]
    out = []
    for i, entry in enumerate(settings.mixture):
        entry = dict(entry)
        unknown = set(entry) - {"path", "weight"}
        if "path" not in entry or unknown:
            raise DataError(f"data.mixture[{i}]={entry}: each entry is {{path: <shard folder>, weight: <share of "
                            "tokens>}}")
        out.append({"path": str(Path(str(entry["path"])).expanduser()), "weight": entry.get("weight", 1.0)})
    return out


def tokenizer_settings_match(settings: TokenizerSettings, tok: Any) -> bool:
    """Whether the `tokenizer` group describes `tok` (its kind, and its vocabulary size when one is given): for data
    or a parent run whose tokenizer is fixed already (shards here; init_from in groundthink/training/lineage.py)."""
    return settings.kind == tok.kind and (settings.vocab_size is None or settings.vocab_size == tok.vocab_size)


def _check_tokenizer_settings(settings: TokenizerSettings, tok: Any, where: Path) -> None:
    """The `tokenizer` group must describe the shards' tokenizer (it cannot be changed once the ids are written)."""
    if not tokenizer_settings_match(settings, tok):
        raise DataError(
            f"the shards in {where} were written with a {tok.kind} tokenizer of {tok.vocab_size} ids, but the run "
            f"asks for tokenizer.kind={settings.kind} vocab_size={settings.vocab_size}: choose the shards' tokenizer "
            f"(tokenizer={tok.kind}" + (f" tokenizer.vocab_size={tok.vocab_size}" if tok.kind == "bpe" else "")
            + ") or tokenize the corpus again with the one you want")


@dataclass
class ShardLanes:
    """`make_train_stream` of the shards source: rank r of w streams the documents i % w == r of every folder."""

    sources: list[dict[str, Any]]
    batch_size: int
    seed: int
    shuffle: bool = True

    def __call__(self, rank: int, world: int) -> Any:
        from groundthink.data.shard_stream import ShardTBPTTStream

        return ShardTBPTTStream(self.sources, self.batch_size, split="train", seed=self.seed,
                                shuffle=self.shuffle, rank=rank, world_size=world)


@dataclass
class DocumentLanes:
    """`make_train_stream` of a document source: each data-parallel rank streams its own share of the documents (a
    picklable object rather than a closure, so `ddp_spawn` can send it to the worker processes)."""

    docs: Any  # TokenizedDocuments
    batch_size: int
    pad_id: int
    seed: int

    def __call__(self, rank: int, world: int) -> Any:
        from groundthink.data.stream import TBPTTStream

        docs = self.docs[rank::world] if world > 1 else self.docs
        return TBPTTStream(docs, batch_size=self.batch_size, pad_id=self.pad_id, seed=self.seed + rank)


def _check_positive(name: str, value: Any) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise DataError(f"{name}={value!r} must be a positive integer")


@dataclass
class StackedLanes:
    """`make_train_stream` for data.emulate_ranks=N: one process reads ranks 0..N-1's streams side by side."""

    make_rank_stream: Callable[[int, int], Any]
    ranks: int

    def __call__(self, rank: int, world: int) -> Any:
        if world > 1:
            raise DataError(f"data.emulate_ranks={self.ranks} is for a single process; this run has {world} ranks "
                            "(set data.emulate_ranks=1)")
        return StackedStream([self.make_rank_stream(r, self.ranks) for r in range(self.ranks)])


class StackedStream:
    """Several ranks' training streams as one: batches concatenated along the lanes, positions saved per rank."""

    def __init__(self, streams: list[Any]) -> None:
        self.streams = streams

    def next_batch(self, seq_len: int) -> dict[str, Any]:
        import torch

        parts = [s.next_batch(seq_len) for s in self.streams]
        return {k: torch.cat([p[k] for p in parts]) for k in parts[0]}

    def state_dict(self) -> dict[str, Any]:
        return {"kind": "stacked-ranks", "ranks": [s.state_dict() for s in self.streams]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        ranks = state.get("ranks") if state.get("kind") == "stacked-ranks" else None
        if ranks is None or len(ranks) != len(self.streams):
            raise DataError(f"the saved data position is not one of {len(self.streams)} stacked ranks "
                            "(data.emulate_ranks): resume with the settings the run started with")
        for stream, position in zip(self.streams, ranks):
            stream.load_state_dict(position)


from groundthink.data import chat as _chat  # noqa: E402,F401  (registers data=chat)
from groundthink.data import persona as _persona  # noqa: E402,F401  (registers data=persona)
from groundthink.data import recall as _recall  # noqa: E402,F401  (registers data=mqar and data=passkey)
