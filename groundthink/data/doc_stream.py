"""Documents one at a time, for corpora that do not fit in memory: the sources of `load_documents`, streamed.

`DocumentSource(...).documents()` yields the same strings, in the same order, as
`groundthink.data.corpus.load_documents` with the same arguments (the equivalence is tested), but reads files
incrementally instead of materialising the corpus, so `groundthink-tokenize` runs in constant memory:

- ``embedded``: the embedded corpus (~1 MB; listed in memory, as it is small);
- ``file``: a .txt/.md/.text file, a .jsonl/.json file, or a folder of them (sorted, recursive). A text file is one
  document (or one per blank-line paragraph with ``split_paragraphs``), cut into pieces of at most ``chunk_chars``
  characters by the rule of `corpus.chunk_text` (blank line, then newline, then space, in the second half of the
  window), applied to a sliding buffer. Newlines are read as Python's universal newlines, like `datasets`' text
  loader. JSON Lines records give ``text_field`` (records without it, or with an empty one, are skipped) or, for
  chat records, the ``messages``/``conversations`` rendered by `render_chat`; a .json file holding one JSON array
  is read whole.
- ``hub``: ``datasets.load_dataset(hub_name, streaming=True)`` records, without the in-memory cap of
  `load_documents` (``max_documents`` still applies when given). Needs network.

What differs from `load_documents`: a JSON Lines file whose records mix the text field and chat fields is read
record by record (each record uses what it has), where `datasets` decides per file from its columns.
"""

from __future__ import annotations

import json
import os
import socket
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from groundthink.data.corpus import (
    DEFAULT_CHUNK_CHARS,
    JSON_SUFFIXES,
    SOURCES,
    TEXT_SUFFIXES,
    embedded_documents,
    render_chat,
)
from groundthink.data.errors import DataError

_READ_CHARS = 1 << 20
ProgressFn = Callable[[int], None]


@dataclass
class DocumentSource:
    """One document source, described by the arguments of `load_documents` (see the module docstring)."""

    source: str = "embedded"
    path: str | None = None
    text_field: str = "text"
    hub_name: str | None = None
    hub_config: str | None = None
    hub_split: str = "train"
    split_paragraphs: bool = False
    chunk_chars: int | None = DEFAULT_CHUNK_CHARS
    max_documents: int | None = None
    _files: list[Path] | None = field(default=None, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.source not in SOURCES:
            raise DataError(f"source={self.source!r} is not a document source; allowed: {', '.join(SOURCES)}")
        if self.max_documents is not None and int(self.max_documents) < 1:
            raise DataError(f"max_documents={self.max_documents} must be a positive number of documents or null")
        if self.chunk_chars is not None and int(self.chunk_chars) < 1:
            raise DataError(f"chunk_chars={self.chunk_chars} must be a positive number of characters or null")
        if self.source == "file":
            self._files = _list_files(self.path)
        if self.source == "hub" and (not self.hub_name or self.hub_name == "???"):
            raise DataError("source=hub needs hub_name, e.g. HuggingFaceFW/fineweb-edu")

    @property
    def files(self) -> list[Path]:
        return list(self._files or [])

    def describe(self) -> dict[str, Any]:
        """What identifies the input: the settings, and for files their paths, sizes and modification times (a
        changed corpus must not be mistaken for the one a half-finished tokenize run started on)."""
        out: dict[str, Any] = {
            "source": self.source,
            "text_field": self.text_field,
            "split_paragraphs": bool(self.split_paragraphs),
            "chunk_chars": self.chunk_chars,
            "max_documents": self.max_documents,
        }
        if self.source == "file":
            out["path"] = str(Path(self.path).expanduser().resolve())
            out["files"] = [
                {"path": str(f.resolve()), "bytes": f.stat().st_size, "mtime_ns": f.stat().st_mtime_ns}
                for f in self.files
            ]
        if self.source == "hub":
            out.update(hub_name=self.hub_name, hub_config=self.hub_config, hub_split=self.hub_split)
        return out

    def total_bytes(self) -> int | None:
        """Input size for a progress bar (files only; None when unknown)."""
        return sum(f.stat().st_size for f in self.files) if self.source == "file" else None

    def documents(self, progress: ProgressFn | None = None) -> Iterator[str]:
        """The documents in order; `progress(n)` is called with the input bytes read since the last call."""
        produced = 0
        for doc in self._documents(progress or (lambda n: None)):
            yield doc
            produced += 1
            if self.max_documents is not None and produced >= int(self.max_documents):
                return

    def _documents(self, progress: ProgressFn) -> Iterator[str]:
        if self.source == "embedded":
            yield from embedded_documents()
        elif self.source == "hub":
            yield from self._hub_documents()
        else:
            for file in self.files:
                if file.suffix.lower() in TEXT_SUFFIXES:
                    yield from _text_file_documents(file, self.split_paragraphs, self.chunk_chars, progress)
                else:
                    yield from _json_file_documents(file, self.text_field, progress)

    def _hub_documents(self) -> Iterator[str]:
        reason = _offline_reason()
        if reason:
            raise DataError(
                f"hub_name={self.hub_name}: hub datasets need network access, and {reason}. Save the data as .txt "
                f"or .jsonl elsewhere and tokenize that file instead"
            )
        import datasets

        try:
            stream = datasets.load_dataset(self.hub_name, self.hub_config, split=self.hub_split, streaming=True)
            for i, record in enumerate(stream):
                text = _record_text(record, self.text_field, f"{self.hub_name} record {i}")
                if text is not None and text.strip():
                    yield text
        except DataError:
            raise
        except Exception as exc:
            raise DataError(
                f"hub_name={self.hub_name} (config={self.hub_config}, split={self.hub_split}) could not be "
                f"streamed ({type(exc).__name__}: {exc})"
            ) from exc


def _offline_reason() -> str | None:
    """Why the hub cannot be reached (fails in seconds, where `datasets` would retry for a minute), or None."""
    for var in ("HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE"):
        if os.environ.get(var, "").strip().lower() in ("1", "true", "yes", "on"):
            return f"{var}={os.environ[var]} is set"
    host = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co")).hostname or "huggingface.co"
    try:
        socket.create_connection((host, 443), timeout=3.0).close()
    except OSError as exc:
        return f"{host}:443 is unreachable ({exc})"
    return None


def _list_files(path: str | None) -> list[Path]:
    if path is None or str(path) in ("", "???"):
        raise DataError("source=file needs a path: a .txt/.jsonl/.json file or a folder of them")
    root = Path(path).expanduser()
    allowed = TEXT_SUFFIXES + JSON_SUFFIXES
    if not root.exists():
        raise DataError(f"{root} does not exist; give a .txt/.jsonl/.json file or a folder of them")
    if root.is_dir():
        files = sorted(p for p in root.rglob("*") if p.is_file() and p.suffix.lower() in allowed)
        if not files:
            raise DataError(f"{root} is a folder with no {'/'.join(allowed)} files")
    elif root.suffix.lower() not in allowed:
        raise DataError(f"{root}: unsupported file type {root.suffix!r}; allowed: {', '.join(allowed)}")
    else:
        files = [root]
    for file in files:
        if file.stat().st_size == 0 or _is_blank(file):
            raise DataError(f"{file} is empty; put text in it (or remove it from the folder)")
    return files


def _is_blank(file: Path) -> bool:
    with file.open("rb") as f:
        while chunk := f.read(1 << 20):
            if chunk.strip():
                return False
    return True


def _record_text(record: dict[str, Any], text_field: str, where: str) -> str | None:
    if text_field in record:
        text = record[text_field]
        return text if isinstance(text, str) else None
    chat = record.get("messages", record.get("conversations"))
    if chat is not None:
        return render_chat(chat, where=where)
    return None


def _json_file_documents(file: Path, text_field: str, progress: ProgressFn) -> Iterator[str]:
    found = 0
    first_fields: list[str] | None = None
    with open(file, "rb") as f:
        head = f.read(4096).lstrip()
        f.seek(0)
        if head.startswith(b"["):  # one JSON array: read whole (JSON Lines is the format for large files)
            try:
                records = json.load(f)
            except ValueError as exc:
                raise DataError(f"{file} is not valid JSON ({exc})") from exc
            progress(file.stat().st_size)
            lines: Any = ((i, r) for i, r in enumerate(records))
        else:
            lines = _json_lines(f, file, progress)
        for i, record in lines:
            if not isinstance(record, dict):
                raise DataError(f"{file} record {i} is a {type(record).__name__}, not a JSON object")
            if first_fields is None:
                first_fields = sorted(record)
            text = _record_text(record, text_field, f"{file} record {i}")
            if text is not None and text.strip():
                found += 1
                yield text
    if not found:
        raise DataError(
            f"{file} gave no documents: no record has a non-empty text_field={text_field!r} or chat 'messages'; "
            f"its first record's fields are {first_fields}; set the text field to one of them"
        )


def _json_lines(f, file: Path, progress: ProgressFn) -> Iterator[tuple[int, Any]]:
    for i, line in enumerate(f):
        progress(len(line))
        if not line.strip():
            continue
        try:
            yield i, json.loads(line)
        except ValueError as exc:
            raise DataError(f"{file} line {i + 1} is not valid JSON ({exc}); fix or remove it") from exc


def _read_chars(f, progress: ProgressFn) -> Iterator[str]:
    """Text blocks of a file opened in text mode (universal newlines), reporting the bytes consumed."""
    position = 0
    while block := f.read(_READ_CHARS):
        now = f.buffer.tell()
        progress(now - position)
        position = now
        yield block


def _text_file_documents(
    file: Path, split_paragraphs: bool, chunk_chars: int | None, progress: ProgressFn
) -> Iterator[str]:
    try:
        with open(file, encoding="utf-8") as f:
            blocks = _read_chars(f, progress)
            texts = _paragraphs(blocks) if split_paragraphs else _whole(blocks)
            for text in texts:
                yield from _chunks(text, chunk_chars)
    except UnicodeDecodeError as exc:
        raise DataError(f"{file} is not valid UTF-8 text ({exc}); convert it to UTF-8") from exc


def _whole(blocks: Iterator[str]) -> Iterator[Iterator[str]]:
    """The whole file as one document (`text.strip("\\n")`), as a stream of blocks."""
    yield _stripped(blocks)


def _paragraphs(blocks: Iterator[str]) -> Iterator[Iterator[str]]:
    """Blank-line separated paragraphs (`text.split("\\n\\n")`, empty ones dropped), each stripped of newlines."""
    carry = ""
    for block in blocks:
        pieces = (carry + block).split("\n\n")
        carry = pieces.pop()
        for piece in pieces:
            if piece.strip("\n").strip():
                yield iter([piece.strip("\n")])
    if carry.strip("\n").strip():
        yield iter([carry.strip("\n")])


def _stripped(blocks: Iterator[str]) -> Iterator[str]:
    """`"".join(blocks).strip("\\n")` as a stream: leading newlines dropped, trailing ones held back until more
    text follows them."""
    started = False
    pending = ""
    for block in blocks:
        if not started:
            block = block.lstrip("\n")
            if not block:
                continue
            started = True
        body = block.rstrip("\n")
        if body:
            yield pending + body
            pending = block[len(body):]
        else:
            pending += block


def _chunks(blocks: Iterator[str], max_chars: int | None) -> Iterator[str]:
    """`corpus.chunk_text` over a stream of blocks (pieces of at most `max_chars`, blank ones dropped)."""
    if not max_chars:
        text = "".join(blocks)
        if text.strip():
            yield text
        return
    max_chars = int(max_chars)
    buf = ""
    for block in blocks:
        buf += block
        # A cut is decided on the first max_chars characters once more than max_chars are known; `_stripped`
        # already dropped trailing newlines, so every buffered character belongs to the document.
        while len(buf) > max_chars:
            cut = _cut(buf, max_chars)
            if buf[:cut].strip():
                yield buf[:cut]
            buf = buf[cut:]
    if buf.strip():
        yield buf


def _cut(text: str, max_chars: int) -> int:
    for sep in ("\n\n", "\n", " "):
        cut = text.rfind(sep, max_chars // 2, max_chars)
        if cut != -1:
            return cut + len(sep)
    return max_chars
