"""Token shards: a corpus tokenized once into memory-mapped files, for corpora larger than memory.

Layout of a shard folder (written by `tokenize_corpus` / `groundthink-tokenize`)::

    index.json                    written last: format, settings, tokenizer fingerprint, splits -> shards
    tokenizer/                    the GroundThink tokenizer the ids belong to (Tokenizer.save)
    train/shard_00000.bin         token ids, little-endian uint16 (vocab <= 65536) or uint32, documents back to back
    train/shard_00000.offsets.npy int64 [n_docs + 1]: document j of the shard is tokens[o[j]:o[j+1]]
    val/shard_00000.bin ...       the held-out split, decided at tokenize time

Format choice: plain numpy files, not litdata. The TBPTT lanes (`ShardTBPTTStream`) need documents: random access
to document i, its length, and reads at arbitrary offsets inside it, with the document boundaries that drive the
state reset. A flat token file plus an offsets array per shard gives exactly that with `os.pread` and `np.load(...,
mmap_mode="r")`, no dependency and no format to learn (``np.memmap(path, "<u2")`` opens a shard). litdata's
`TokensLoader` serves fixed-size blocks of a packed stream and keeps its own chunk index and loader state; it has
no notion of documents, and its resumable position belongs to its own DataLoader, not to lanes. (The layout is the
one of Megatron's indexed datasets and nanoGPT's train.bin, with the document offsets of the former.)

Writing is crash-safe and resumable. Every document goes to train or val by a hash of (seed, document number),
so the split is decided in one streaming pass and never depends on where a run stopped. Shards are written to
temporary files and renamed when complete; after each group of complete shards `progress.json` records them and
how many input documents they hold; `index.json` is written last. Running the same command again after a kill
continues from the last recorded shards (files not recorded are deleted) and produces byte-identical shards;
running it on a finished folder does nothing. A folder made with other settings is refused (or replaced with
``overwrite``). Memory while tokenizing is one document plus the open shard's offsets.

Differences from `load_documents` + `split_documents` (the in-memory path): the validation share is a per-document
draw (expected `val_fraction`, not exactly `round(val_fraction * n)`), and BOS tokens are not supported.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
import time
from array import array
from collections import OrderedDict
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from groundthink.data.doc_stream import DocumentSource
from groundthink.data.errors import DataError
from groundthink.data.tokenizer import Tokenizer, build_tokenizer

FORMAT = "groundthink-token-shards"
FORMAT_VERSION = 1
INDEX_FILE = "index.json"
PROGRESS_FILE = "progress.json"
TOKENIZER_DIR = "tokenizer"
SPLITS = ("train", "val")
DEFAULT_SHARD_TOKENS = 1 << 26  # 64M tokens: 128 MB per uint16 shard
_TMP = ".tmp-"
_MAX_OPEN_FILES = 64
_MASK64 = (1 << 64) - 1


# ----------------------------------------------------------------------------------------------------------------
def is_validation(seed: int, doc_number: int, val_fraction: float) -> bool:
    """Whether input document `doc_number` belongs to the validation split: a splitmix64 hash of (seed, number)
    below `val_fraction` of the 64-bit range. Independent per document, so the split is decided while streaming."""
    if val_fraction <= 0:
        return False
    z = (int(seed) * 0x9E3779B97F4A7C15 + (int(doc_number) + 1) * 0xD1B54A32D192ED03) & _MASK64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
    z ^= z >> 31
    return z < int(val_fraction * 2.0**64)


def token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype("<u2") if vocab_size <= 1 << 16 else np.dtype("<u4")


def _sha256_json(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()


def _write_json_atomic(path: Path, obj: Any) -> None:
    tmp = path.with_name(f"{_TMP}{path.name}")
    with open(tmp, "w") as f:
        f.write(json.dumps(obj, indent=2, sort_keys=True) + "\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            h.update(chunk)
    return h.hexdigest()


# ----- writing ---------------------------------------------------------------------------------------------------
class _SplitWriter:
    """The open shard of one split: tokens streamed to a temporary file, offsets kept until the shard closes."""

    def __init__(self, out_dir: Path, split: str, dtype: np.dtype, next_number: int) -> None:
        self.dir = out_dir / split
        self.dir.mkdir(parents=True, exist_ok=True)
        self.split = split
        self.dtype = dtype
        self.number = next_number
        self._open()

    def _open(self) -> None:
        self.name = f"shard_{self.number:05d}"
        self.tmp_tokens = self.dir / f"{_TMP}{self.name}.bin"
        self.file = open(self.tmp_tokens, "wb")
        self.hash = hashlib.sha256()
        self.offsets = array("q", [0])

    @property
    def num_tokens(self) -> int:
        return self.offsets[-1]

    def add(self, ids: np.ndarray) -> None:
        data = ids.astype(self.dtype, copy=False).tobytes()
        self.file.write(data)
        self.hash.update(data)
        self.offsets.append(self.offsets[-1] + len(ids))

    def commit(self) -> dict[str, Any] | None:
        """Close the shard (temporary files renamed into place); its record, or None when it holds nothing."""
        self.file.flush()
        os.fsync(self.file.fileno())
        self.file.close()
        if len(self.offsets) == 1:
            self.tmp_tokens.unlink()
            self._open()
            return None
        offsets = np.frombuffer(self.offsets, dtype=np.int64)
        tmp_offsets = self.dir / f"{_TMP}{self.name}.offsets.npy"
        with open(tmp_offsets, "wb") as f:
            np.save(f, offsets)
            f.flush()
            os.fsync(f.fileno())
        record = {
            "tokens": f"{self.split}/{self.name}.bin",
            "offsets": f"{self.split}/{self.name}.offsets.npy",
            "num_documents": len(offsets) - 1,
            "num_tokens": int(offsets[-1]),
            "tokens_sha256": self.hash.hexdigest(),
            "offsets_sha256": _file_sha256(tmp_offsets),
        }
        os.replace(tmp_offsets, self.dir / f"{self.name}.offsets.npy")
        os.replace(self.tmp_tokens, self.dir / f"{self.name}.bin")
        _fsync_dir(self.dir)
        self.number += 1
        self._open()
        return record

    def abort(self) -> None:
        self.file.close()
        self.tmp_tokens.unlink(missing_ok=True)


@dataclass
class TokenizeResult:
    path: Path
    index: dict[str, Any]
    skipped: bool  # True when the folder was already complete with these settings


def tokenize_corpus(
    source: DocumentSource,
    out_dir: str | os.PathLike,
    *,
    tokenizer: str | os.PathLike | Tokenizer = "char",
    vocab_size: int | None = None,
    bpe_documents: int | None = 20_000,
    val_fraction: float = 0.05,
    seed: int = 0,
    shard_tokens: int = DEFAULT_SHARD_TOKENS,
    append_eos: bool = True,
    overwrite: bool = False,
    progress: bool = True,
    fault_exit_after_shards: int | None = None,
) -> TokenizeResult:
    """Tokenize `source` into a shard folder (see the module docstring); resumable, idempotent.

    `tokenizer`: "char", "bpe" (trained here on the first `bpe_documents` training documents with `vocab_size`), a
    saved tokenizer folder, or a Tokenizer. The tokenizer is saved in `<out_dir>/tokenizer/`.
    """
    out = Path(out_dir).expanduser()
    if not 0.0 <= float(val_fraction) < 1.0:
        raise DataError(f"val_fraction={val_fraction} must be in [0, 1)")
    if int(shard_tokens) < 1:
        raise DataError(f"shard_tokens={shard_tokens} must be a positive number of tokens")
    if source.source == "file" and Path(source.path).expanduser().is_dir():
        root = Path(source.path).expanduser().resolve()
        if out.resolve() == root or root in out.resolve().parents:
            raise DataError(f"the output folder {out} is inside the input folder {root}: its files would become "
                            f"input; write the shards elsewhere")
    tok_spec, given = _tokenizer_spec(tokenizer, vocab_size, bpe_documents)
    settings = {
        "format": FORMAT,
        "version": FORMAT_VERSION,
        "source": source.describe(),
        "tokenizer": tok_spec,
        "val_fraction": float(val_fraction),
        "seed": int(seed),
        "shard_tokens": int(shard_tokens),
        "append_eos": bool(append_eos),
    }
    settings_id = _sha256_json(settings)
    state = _prepare_out_dir(out, settings, settings_id, overwrite)
    if state == "complete":
        return TokenizeResult(out, read_index(out), skipped=True)
    resume = _read_json(out / PROGRESS_FILE) if state == "resume" else None

    tok = _resolve_tokenizer(out, given, tok_spec, source, float(val_fraction), int(seed), resume is not None,
                             progress)
    dtype = token_dtype(tok.vocab_size)
    shards: dict[str, list[dict[str, Any]]] = {s: list(resume["shards"][s]) if resume else [] for s in SPLITS}
    consumed = int(resume["documents_consumed"]) if resume else 0
    _remove_unrecorded(out, shards)
    writers = {s: _SplitWriter(out, s, dtype, len(shards[s])) for s in SPLITS}
    eos = np.array([tok.eos_id], dtype=np.int64)
    commits = 0

    bar = _progress_bar(source, progress)
    by_bytes = bar is not None and source.total_bytes() is not None
    t0 = time.time()
    try:
        doc_number = -1
        for doc_number, text in enumerate(source.documents(bar.update if by_bytes else None)):
            if bar is not None and not by_bytes:
                bar.update(1)
            if doc_number < consumed:
                continue  # recorded in shards by an earlier run
            ids = np.asarray(tok.encode_array(text), dtype=np.int64)
            if append_eos:
                ids = np.concatenate([ids, eos])
            if len(ids) == 0:
                continue
            split = "val" if is_validation(seed, doc_number, val_fraction) else "train"
            writers[split].add(ids)
            if writers[split].num_tokens >= shard_tokens:
                commits += 1
                crash = fault_exit_after_shards is not None and commits >= fault_exit_after_shards
                _commit(out, writers, shards, doc_number + 1, settings, settings_id, crash_before_record=crash)
            if bar is not None and doc_number % 64 == 0:
                bar.set_postfix_str(_postfix(shards, writers), refresh=False)
        _commit(out, writers, shards, doc_number + 1, settings, settings_id)
    except BaseException:
        for w in writers.values():
            w.abort()
        raise
    finally:
        if bar is not None:
            bar.close()
    for w in writers.values():
        w.abort()  # the empty shard each writer opened after its last commit

    for split in SPLITS:
        if split == "val" and val_fraction == 0:
            continue
        if not shards[split]:
            n = doc_number + 1
            raise DataError(
                f"tokenizing {n} documents gave an empty {split} split (val_fraction={val_fraction}, seed={seed}); "
                + ("use more documents or a larger val_fraction" if split == "val" else "lower val_fraction")
                + f"; the shards so far stay in {out} and the next run with new settings needs overwrite"
            )
    index = _index(settings, settings_id, tok, dtype, shards, source, time.time() - t0)
    _write_json_atomic(out / INDEX_FILE, index)
    (out / PROGRESS_FILE).unlink(missing_ok=True)
    _fsync_dir(out)
    return TokenizeResult(out, index, skipped=False)


def _postfix(shards: dict[str, list], writers: dict[str, _SplitWriter]) -> str:
    done = sum(r["num_tokens"] for s in SPLITS for r in shards[s])
    open_tokens = sum(w.num_tokens for w in writers.values())
    return f"{(done + open_tokens) / 1e6:.1f}M tokens, {sum(len(v) for v in shards.values())} shards"


def _progress_bar(source: DocumentSource, enabled: bool):
    if not enabled:
        return None
    from tqdm.auto import tqdm

    total = source.total_bytes()
    if total is not None:
        return tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024, desc="tokenizing", file=sys.stderr,
                    mininterval=1.0)
    return tqdm(total=source.max_documents, unit="doc", desc="tokenizing", file=sys.stderr, mininterval=1.0)


def _commit(out: Path, writers: dict[str, _SplitWriter], shards: dict[str, list], consumed: int,
            settings: dict[str, Any], settings_id: str, crash_before_record: bool = False) -> None:
    for split in SPLITS:
        record = writers[split].commit()
        if record is not None:
            shards[split].append(record)
    if crash_before_record:
        # Fault injection (tests): die like a killed process at the worst moment, with complete shard files on
        # disk that progress.json does not record yet.
        os._exit(137)
    _write_json_atomic(out / PROGRESS_FILE, {"settings_id": settings_id, "settings": settings,
                                             "documents_consumed": consumed, "shards": shards})


def _tokenizer_spec(tokenizer: Any, vocab_size: int | None, bpe_documents: int | None) -> tuple[dict, Any]:
    if isinstance(tokenizer, Tokenizer):
        return {"kind": tokenizer.kind, "fingerprint": tokenizer.fingerprint}, tokenizer
    if str(tokenizer) == "char":
        tok = build_tokenizer("char", vocab_size=vocab_size)
        return {"kind": "char", "fingerprint": tok.fingerprint}, tok
    if str(tokenizer) == "bpe":
        if vocab_size is None:
            raise DataError("tokenizer=bpe needs vocab_size (e.g. 24000); it is trained on the training documents")
        if int(vocab_size) < 264:
            raise DataError(f"vocab_size={vocab_size} is too small for a byte-level BPE (at least 264)")
        if bpe_documents is not None and int(bpe_documents) < 1:
            raise DataError(f"bpe_documents={bpe_documents} must be a positive number of documents or null (all)")
        return {"kind": "bpe", "vocab_size": int(vocab_size), "bpe_documents": bpe_documents}, None
    path = Path(tokenizer).expanduser()
    if not path.exists():
        raise DataError(
            f"tokenizer={tokenizer}: not 'char', 'bpe' or an existing folder; give a saved GroundThink tokenizer "
            f"folder (a run's tokenizer/ folder) or char / bpe"
        )
    tok = Tokenizer.load(path)
    return {"kind": tok.kind, "fingerprint": tok.fingerprint}, tok


def _resolve_tokenizer(out: Path, given: Tokenizer | None, spec: dict, source: DocumentSource,
                       val_fraction: float, seed: int, resuming: bool, progress: bool) -> Tokenizer:
    tok_dir = out / TOKENIZER_DIR
    if resuming and (tok_dir / "tokenizer_meta.json").is_file():
        tok = Tokenizer.load(tok_dir)
        if given is not None and tok != given:
            raise DataError(f"{tok_dir} is not the tokenizer this run was started with; tokenize again with overwrite")
        return tok
    if given is None:  # train a BPE on the first training documents
        texts = (t for i, t in enumerate(source.documents()) if not is_validation(seed, i, val_fraction))
        limit = spec.get("bpe_documents")
        if limit is not None:
            texts = (t for _, t in zip(range(int(limit)), texts))
        if progress:
            print(f"training a BPE tokenizer (vocab {spec['vocab_size']}) on "
                  f"{'all' if limit is None else f'the first {limit}'} training documents...", file=sys.stderr,
                  flush=True)
        given = build_tokenizer("bpe", texts, spec["vocab_size"])
    tmp = out / f"{_TMP}{TOKENIZER_DIR}"
    shutil.rmtree(tmp, ignore_errors=True)
    given.save(tmp)
    shutil.rmtree(tok_dir, ignore_errors=True)
    os.replace(tmp, tok_dir)
    return given


def _read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise DataError(f"{path} is unreadable or corrupt ({exc}); tokenize again with overwrite") from exc


def _prepare_out_dir(out: Path, settings: dict[str, Any], settings_id: str, overwrite: bool) -> str:
    """'complete' (nothing to do), 'resume' (progress.json matches) or 'fresh' (an empty folder is ready)."""
    ours = {INDEX_FILE, PROGRESS_FILE, TOKENIZER_DIR, *SPLITS}
    if overwrite and out.exists():
        for name in ours | {f"{_TMP}{n}" for n in ours}:
            target = out / name
            if target.is_dir():
                shutil.rmtree(target)
            elif target.exists():
                target.unlink()
    for name, state in ((INDEX_FILE, "complete"), (PROGRESS_FILE, "resume")):
        if (out / name).is_file():
            found = _read_json(out / name)
            saved_id = found.get("settings_id")
            if saved_id == settings_id:
                return state
            differ = _differences(found.get("settings", {}), settings)
            raise DataError(
                f"{out} holds token shards made with other settings ({differ}); use another output folder, "
                f"or pass overwrite (--overwrite) to replace them"
            )
    if out.exists():
        others = sorted(p.name for p in out.iterdir() if p.name not in ours and not p.name.startswith(_TMP))
        if others:
            raise DataError(
                f"{out} is not empty and holds no token shards ({', '.join(others[:5])}); choose an empty or new "
                f"output folder"
            )
        for split in SPLITS:  # a run killed before its first shards were recorded
            shutil.rmtree(out / split, ignore_errors=True)
    out.mkdir(parents=True, exist_ok=True)
    return "fresh"


def _differences(old: dict[str, Any], new: dict[str, Any]) -> str:
    keys = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
    if not keys:
        return "format"
    parts = []
    for k in keys[:4]:
        a, b = old.get(k), new.get(k)
        parts.append(f"{k}: {_short(a)} there, {_short(b)} now")
    return "; ".join(parts)


def _short(value: Any) -> str:
    text = json.dumps(value, sort_keys=True)
    return text if len(text) <= 80 else text[:77] + "..."


def _remove_unrecorded(out: Path, shards: dict[str, list[dict[str, Any]]]) -> None:
    """Delete shard files a killed run left that progress.json does not record; check the recorded ones."""
    for split in SPLITS:
        folder = out / split
        recorded = {Path(r[k]).name for r in shards[split] for k in ("tokens", "offsets")}
        if folder.is_dir():
            for p in folder.iterdir():
                if p.name not in recorded:
                    p.unlink()
        for r in shards[split]:
            tokens = out / r["tokens"]
            if not tokens.is_file() or not (out / r["offsets"]).is_file():
                raise DataError(f"{tokens} is recorded in {out / PROGRESS_FILE} but missing; tokenize again with "
                                f"overwrite")


def _index(settings: dict[str, Any], settings_id: str, tok: Tokenizer, dtype: np.dtype,
           shards: dict[str, list[dict[str, Any]]], source: DocumentSource, seconds: float) -> dict[str, Any]:
    content = {s: [r["tokens_sha256"] for r in shards[s]] for s in SPLITS}
    splits = {
        s: {"num_documents": sum(r["num_documents"] for r in shards[s]),
            "num_tokens": sum(r["num_tokens"] for r in shards[s]), "shards": shards[s]}
        for s in SPLITS
    }
    return {
        "format": FORMAT,
        "version": FORMAT_VERSION,
        "dataset_id": _sha256_json({"settings_id": settings_id, "tokenizer": tok.fingerprint, "content": content}),
        "settings_id": settings_id,
        "settings": settings,
        "tokenizer": {"dir": TOKENIZER_DIR, "kind": tok.kind, "vocab_size": tok.vocab_size,
                      "fingerprint": tok.fingerprint, "pad_id": tok.pad_id, "eos_id": tok.eos_id},
        "dtype": dtype.str,
        "splits": splits,
        "input_bytes": source.total_bytes(),
        "tokenize_seconds": round(seconds, 3),
    }


# ----- reading ---------------------------------------------------------------------------------------------------
def read_index(path: str | os.PathLike) -> dict[str, Any]:
    """The index of a complete shard folder, checked; a DataError that says what to do otherwise."""
    folder = Path(path).expanduser()
    index_path = folder / INDEX_FILE
    if not index_path.is_file():
        if (folder / PROGRESS_FILE).is_file():
            raise DataError(f"{folder} holds unfinished token shards (no {INDEX_FILE} yet): run the same "
                            f"groundthink-tokenize command again to finish them")
        raise DataError(f"{folder} is not a token shard folder (no {INDEX_FILE}); make one with groundthink-tokenize")
    index = _read_json(index_path)
    if index.get("format") != FORMAT or index.get("version") != FORMAT_VERSION:
        raise DataError(f"{index_path}: format {index.get('format')!r} version {index.get('version')!r} is not "
                        f"{FORMAT} version {FORMAT_VERSION}; tokenize again")
    return index


class ShardSet:
    """The documents of one split of a shard folder, read with constant memory.

    Offsets are memory-mapped; tokens are read with `os.pread` from a bounded set of open files, so resident memory
    stays flat however much of the corpus has been read (a memory map of the tokens would keep every page it
    touched resident). Pickling keeps the path and reopens files lazily.
    """

    def __init__(self, path: str | os.PathLike, split: str = "train", *, tokenizer: Tokenizer | None = None) -> None:
        if split not in SPLITS:
            raise DataError(f"split={split!r}: allowed {', '.join(SPLITS)}")
        self.path = Path(path).expanduser()
        self.index = read_index(self.path)
        self.split = split
        info = self.index["splits"][split]
        self.shards = info["shards"]
        if not self.shards:
            raise DataError(f"{self.path} has no {split} documents "
                            f"(tokenized with val_fraction={self.index['settings']['val_fraction']})")
        self.dtype = np.dtype(self.index["dtype"])
        counts = np.array([r["num_documents"] for r in self.shards], dtype=np.int64)
        self.doc_starts = np.concatenate([[0], np.cumsum(counts)])
        self.num_documents = int(self.doc_starts[-1])
        self.num_tokens = int(info["num_tokens"])
        for r in self.shards:
            size = (self.path / r["tokens"]).stat().st_size if (self.path / r["tokens"]).is_file() else -1
            if size != r["num_tokens"] * self.dtype.itemsize:
                raise DataError(f"{self.path / r['tokens']} is missing or has {size} bytes, the index records "
                                f"{r['num_tokens'] * self.dtype.itemsize}; the shards are damaged: tokenize again")
        self._offsets: list[np.ndarray | None] = [None] * len(self.shards)
        self._fds: OrderedDict[int, int] = OrderedDict()
        if tokenizer is not None:
            self.check_tokenizer(tokenizer)

    # identity
    @property
    def dataset_id(self) -> str:
        return self.index["dataset_id"]

    @property
    def tokenizer_fingerprint(self) -> str:
        return self.index["tokenizer"]["fingerprint"]

    @property
    def pad_id(self) -> int:
        return int(self.index["tokenizer"]["pad_id"])

    @property
    def eos_id(self) -> int:
        return int(self.index["tokenizer"]["eos_id"])

    def check_tokenizer(self, tokenizer: Tokenizer) -> None:
        if tokenizer.fingerprint != self.tokenizer_fingerprint:
            raise DataError(
                f"{self.path} was tokenized with another tokenizer ({self.index['tokenizer']['kind']}, fingerprint "
                f"{self.tokenizer_fingerprint[:12]}) than the one given ({tokenizer.kind}, "
                f"{tokenizer.fingerprint[:12]}); "
                f"use the shards' own tokenizer ({self.path / TOKENIZER_DIR}) or tokenize again with this one"
            )

    def load_tokenizer(self) -> Tokenizer:
        """The tokenizer saved with the shards, checked against the fingerprint in the index."""
        tok = Tokenizer.load(self.path / self.index["tokenizer"]["dir"])
        self.check_tokenizer(tok)
        return tok

    # documents
    def __len__(self) -> int:
        return self.num_documents

    def _locate(self, doc: int) -> tuple[int, int]:
        if not 0 <= doc < self.num_documents:
            raise IndexError(f"document {doc} out of range for {self.num_documents} documents")
        shard = int(np.searchsorted(self.doc_starts, doc, side="right")) - 1
        return shard, doc - int(self.doc_starts[shard])

    def _shard_offsets(self, shard: int) -> np.ndarray:
        offsets = self._offsets[shard]
        if offsets is None:
            offsets = np.load(self.path / self.shards[shard]["offsets"], mmap_mode="r")
            self._offsets[shard] = offsets
        return offsets

    def span(self, doc: int) -> tuple[int, int, int]:
        """(shard, start token, end token) of document `doc`."""
        shard, local = self._locate(doc)
        offsets = self._shard_offsets(shard)
        return shard, int(offsets[local]), int(offsets[local + 1])

    def length(self, doc: int) -> int:
        _, start, end = self.span(doc)
        return end - start

    def read(self, doc: int, start: int = 0, stop: int | None = None) -> np.ndarray:
        """Tokens [start, stop) of document `doc` as int64."""
        shard, begin, end = self.span(doc)
        stop = end - begin if stop is None else min(int(stop), end - begin)
        if stop <= start:
            return np.zeros(0, dtype=np.int64)
        item = self.dtype.itemsize
        nbytes = (stop - start) * item
        data = os.pread(self._fd(shard), nbytes, (begin + start) * item)
        if len(data) != nbytes:
            raise DataError(f"{self.path / self.shards[shard]['tokens']} is shorter than its index says; "
                            f"tokenize again")
        return np.frombuffer(data, dtype=self.dtype).astype(np.int64)

    def document(self, doc: int) -> np.ndarray:
        return self.read(doc)

    def _fd(self, shard: int) -> int:
        fd = self._fds.get(shard)
        if fd is not None:
            self._fds.move_to_end(shard)
            return fd
        if len(self._fds) >= _MAX_OPEN_FILES:
            _, old = self._fds.popitem(last=False)
            os.close(old)
        fd = os.open(self.path / self.shards[shard]["tokens"], os.O_RDONLY)
        self._fds[shard] = fd
        return fd

    def close(self) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:  # noqa: BLE001 - interpreter shutdown
            pass

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_fds"] = OrderedDict()
        state["_offsets"] = [None] * len(self.shards)
        return state

    def iter_documents(self) -> Iterator[np.ndarray]:
        for i in range(self.num_documents):
            yield self.read(i)

    def verify(self) -> None:
        """Full integrity check: every shard file's sha256 against the index (reads the whole split)."""
        for r in self.shards:
            for key in ("tokens", "offsets"):
                if _file_sha256(self.path / r[key]) != r[f"{key}_sha256"]:
                    raise DataError(f"{self.path / r[key]} does not match the sha256 in the index: it is corrupt or "
                                    f"was changed; tokenize again")
