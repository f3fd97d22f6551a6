"""Documents for training: the embedded stdlib corpus, local text/JSON(L) files, hub datasets, mixtures.

Every loader returns `list[str]`, one string per document, in a deterministic order, and raises `DataError`
with the path/field and a remedy before any training starts. Documents are the unit of the state reset: the
TBPTT stream starts every document on a fresh recurrent state.

Sources:
- ``"embedded"``: English text that ships with Python itself (no download): every topic of the language
  reference in ``pydoc_data.topics`` (~465 KB) plus, per module of a fixed list of pure-Python stdlib modules,
  its docstrings (module, classes, functions, in source order; ~0.6 MB). ~1.1 MB in all, ~130 documents. The
  text varies slightly between Python versions.
- ``"file"``: a .txt/.md/.text file, a .jsonl/.json file, or a directory of them (sorted, recursive), read
  with ``datasets.load_dataset("text"/"json", ...)`` so ``HF_DATASETS_OFFLINE`` is respected. A text file is
  one document (or one per blank-line paragraph with ``split_paragraphs=True``); long text documents are cut
  at paragraph/line boundaries into pieces of at most ``chunk_chars`` characters, so a single 1 MB file still
  gives many documents (lanes of a batch then read different text). JSON records give ``text_field``, or, for
  chat records, ``"messages"``/``"conversations"`` lists rendered with the role control tokens
  (`render_chat`).
- ``"hub"``: ``datasets.load_dataset(hub_name, streaming=True)``, the first ``max_documents`` records. Needs
  network: fails fast, with a pointer to the file source, when offline.
"""

from __future__ import annotations

import ast
import math
import os
import random
import socket
import sysconfig
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from groundthink.data.errors import DataError
from groundthink.data.tokenizer import END_OF_TURN_TOKEN, ROLE_TOKENS

SOURCES = ("embedded", "file", "hub")
TEXT_SUFFIXES = (".txt", ".text", ".md")
JSON_SUFFIXES = (".jsonl", ".json")
DEFAULT_CHUNK_CHARS = 20_000
DEFAULT_HUB_DOCUMENTS = 10_000
_ROLE_ALIASES = {"human": "user", "gpt": "assistant", "bot": "assistant", "model": "assistant"}

EMBEDDED_MODULES: tuple[str, ...] = (
    "abc",
    "argparse",
    "ast",
    "asyncio/events",
    "asyncio/tasks",
    "base64",
    "bisect",
    "calendar",
    "cmd",
    "codecs",
    "collections/__init__",
    "configparser",
    "contextlib",
    "copy",
    "csv",
    "dataclasses",
    "datetime",
    "_pydecimal",
    "difflib",
    "doctest",
    "email/message",
    "enum",
    "fractions",
    "functools",
    "heapq",
    "http/client",
    "inspect",
    "ipaddress",
    "json/__init__",
    "logging/__init__",
    "mailbox",
    "optparse",
    "os",
    "pathlib",
    "pdb",
    "pickle",
    "pprint",
    "queue",
    "random",
    "re/__init__",
    "selectors",
    "shlex",
    "shutil",
    "smtplib",
    "socket",
    "statistics",
    "string",
    "subprocess",
    "tarfile",
    "tempfile",
    "textwrap",
    "threading",
    "typing",
    "unittest/case",
    "urllib/parse",
    "uuid",
    "warnings",
    "zipfile",
)


def load_documents(
    source: str = "embedded",
    path: str | os.PathLike | None = None,
    text_field: str = "text",
    hub_name: str | None = None,
    *,
    max_documents: int | None = None,
    split_paragraphs: bool = False,
    chunk_chars: int | None = DEFAULT_CHUNK_CHARS,
    hub_config: str | None = None,
    hub_split: str = "train",
    weight: float | None = None,
) -> list[str]:
    """The documents of one source (see the module docstring), at most `max_documents` of them.

    `weight` (a mixture entry's share) is accepted and ignored, so mixture entries can be passed whole.
    """
    if max_documents is not None and int(max_documents) < 1:
        raise DataError(f"data.max_documents={max_documents} must be a positive number of documents or null")
    if source == "embedded":
        docs = embedded_documents()
    elif source == "file":
        if path is None or str(path) in ("", "???"):
            raise DataError("data.source=file needs data.path: a .txt/.jsonl/.json file or a folder of them")
        docs = _file_documents(
            Path(path).expanduser(), text_field, split_paragraphs, chunk_chars, max_documents
        )
    elif source == "hub":
        docs = _hub_documents(
            hub_name, text_field, hub_config, hub_split, max_documents or DEFAULT_HUB_DOCUMENTS
        )
    else:
        raise DataError(
            f"data.source={source!r} is not a document source; allowed: {', '.join(SOURCES)} "
            f"(or 'mixture' through load_mixture)"
        )
    if max_documents is not None:
        docs = docs[: int(max_documents)]
    if not docs:
        where = f" at {path}" if path is not None else (f" {hub_name}" if hub_name else "")
        raise DataError(
            f"data.source={source}{where} gave no documents (every record empty?); "
            f"check the file and data.text_field={text_field!r}"
        )
    return docs


def embedded_documents() -> list[str]:
    """The embedded corpus: language-reference topics (sorted by topic) then per-module docstrings."""
    from pydoc_data.topics import topics

    docs = [topics[name].strip() for name in sorted(topics) if topics[name].strip()]
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    sources = []
    for rel in EMBEDDED_MODULES:
        file = stdlib / f"{rel}.py"
        if file.is_file():
            sources.append((rel.removesuffix("/__init__").replace("/", "."), file.read_text(encoding="utf-8")))
    return docs + _cached_docstrings(sources)


# Bump when _module_docstrings changes what it extracts (the cache key also holds the Python version and sources).
_DOCSTRINGS_FORMAT = 1


def _cached_docstrings(sources: list[tuple[str, str]]) -> list[str]:
    """The non-empty `_module_docstrings` of (module, source) pairs, in order. Parsing the ~2 MB of sources takes
    ~1 s, so the result is kept in a cache file keyed by a hash of everything it depends on (the sources
    themselves, the Python version, the extraction's format): `$GROUNDTHINK_CACHE_DIR`, else
    `$XDG_CACHE_HOME/groundthink`, else `~/.cache/groundthink`; GROUNDTHINK_CACHE_DIR="" turns it off. A missing,
    unreadable or unwritable cache only means parsing again."""
    import hashlib
    import json
    import sys
    import tempfile

    key = hashlib.sha256(repr((_DOCSTRINGS_FORMAT, sys.version, sources)).encode("utf-8", "surrogatepass"))
    folder = _cache_dir()
    path = folder / f"embedded-docstrings-{key.hexdigest()[:32]}.json" if folder is not None else None
    if path is not None:
        try:
            cached = json.loads(path.read_text(encoding="utf-8"))
            if isinstance(cached, list) and all(isinstance(t, str) for t in cached):
                return cached
        except (OSError, ValueError):
            pass
    texts = [text for text in (_module_docstrings(source, module) for module, source in sources) if text]
    if path is not None:
        tmp = None
        try:
            folder.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(prefix=".embedded-", suffix=".tmp", dir=folder)
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                json.dump(texts, f)
            os.replace(tmp, path)  # atomic: runs started together may write it at the same time
        except OSError:
            if tmp is not None:
                Path(tmp).unlink(missing_ok=True)
    return texts


def _cache_dir() -> Path | None:
    """GroundThink's cache folder (see _cached_docstrings), None when turned off."""
    given = os.environ.get("GROUNDTHINK_CACHE_DIR")
    if given is not None:
        return Path(given).expanduser() if given else None
    base = os.environ.get("XDG_CACHE_HOME")
    if not base:
        try:
            base = str(Path.home() / ".cache")
        except RuntimeError:  # no home folder to be found
            return None
    return Path(base) / "groundthink"


def _module_docstrings(source: str, module: str) -> str:
    tree = ast.parse(source)
    parts: list[str] = []
    doc = ast.get_docstring(tree)
    if doc:
        parts.append(f"Module {module}\n\n{doc}")

    def visit(body: list[ast.stmt], prefix: str) -> None:
        for node in body:
            if isinstance(node, (ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                name = f"{prefix}{node.name}"
                doc = ast.get_docstring(node)
                if doc:
                    parts.append(f"{name}\n\n{doc}")
                if isinstance(node, ast.ClassDef):
                    visit(node.body, f"{name}.")

    visit(tree.body, f"{module}.")
    return "\n\n".join(parts)


def _file_documents(
    path: Path, text_field: str, split_paragraphs: bool, chunk_chars: int | None, max_documents: int | None
) -> list[str]:
    if not path.exists():
        raise DataError(
            f"data.path={path} does not exist; give a .txt/.jsonl/.json file or a folder of them "
            f"(or use data=embedded, which needs no file)"
        )
    if path.is_dir():
        files = sorted(
            p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in TEXT_SUFFIXES + JSON_SUFFIXES
        )
        if not files:
            raise DataError(
                f"data.path={path} is a folder with no {'/'.join(TEXT_SUFFIXES + JSON_SUFFIXES)} files"
            )
    else:
        if path.suffix.lower() not in TEXT_SUFFIXES + JSON_SUFFIXES:
            raise DataError(
                f"data.path={path}: unsupported file type {path.suffix!r}; allowed: "
                f"{', '.join(TEXT_SUFFIXES + JSON_SUFFIXES)}"
            )
        files = [path]
    docs: list[str] = []
    for file in files:
        if file.stat().st_size == 0 or _is_blank(file):
            raise DataError(f"data.path={file} is empty; put text in it (or remove it from the folder)")
        if file.suffix.lower() in TEXT_SUFFIXES:
            docs.extend(_text_file_documents(file, split_paragraphs, chunk_chars))
        else:
            docs.extend(_json_file_documents(file, text_field, max_documents))
        if max_documents is not None and len(docs) >= max_documents:
            break
    return docs


def _is_blank(file: Path) -> bool:
    with file.open("rb") as f:
        while chunk := f.read(1 << 20):
            if chunk.strip():
                return False
    return True


def _load_local_dataset(builder: str, file: Path, **kwargs: Any):
    import datasets

    datasets.disable_progress_bars()
    try:
        return datasets.load_dataset(builder, data_files=str(file), split="train", **kwargs)
    except Exception as exc:
        raise DataError(
            f"data.path={file} could not be read as {builder} ({type(exc).__name__}: {exc}); "
            f"check that the file is valid {'UTF-8 text' if builder == 'text' else 'JSON Lines'}"
        ) from exc
    finally:
        datasets.enable_progress_bars()


def _text_file_documents(file: Path, split_paragraphs: bool, chunk_chars: int | None) -> list[str]:
    ds = _load_local_dataset("text", file, sample_by="paragraph" if split_paragraphs else "document")
    docs = [t.strip("\n") for t in ds["text"] if t and t.strip()]
    if chunk_chars:
        docs = [piece for doc in docs for piece in chunk_text(doc, int(chunk_chars))]
    return docs


def chunk_text(text: str, max_chars: int) -> list[str]:
    """Cut `text` into pieces of at most `max_chars`, preferring blank lines, then newlines, then spaces."""
    if max_chars < 1:
        raise DataError(f"data.chunk_chars={max_chars} must be a positive number of characters or null")
    pieces: list[str] = []
    start = 0
    n = len(text)
    while n - start > max_chars:
        end = start + max_chars
        cut = -1
        for sep in ("\n\n", "\n", " "):
            cut = text.rfind(sep, start + max_chars // 2, end)
            if cut != -1:
                cut += len(sep)
                break
        if cut == -1:
            cut = end
        pieces.append(text[start:cut])
        start = cut
    pieces.append(text[start:])
    return [p for p in pieces if p.strip()]


def _json_file_documents(file: Path, text_field: str, max_documents: int | None) -> list[str]:
    ds = _load_local_dataset("json", file)
    columns = ds.column_names
    if text_field in columns:
        column = (
            ds[text_field]
            if max_documents is None
            else ds.select(range(min(len(ds), max_documents)))[text_field]
        )
        return [t for t in column if isinstance(t, str) and t.strip()]
    chat_field = next((c for c in ("messages", "conversations") if c in columns), None)
    if chat_field is None:
        raise DataError(
            f"data.path={file} has no field data.text_field={text_field!r} and no chat 'messages'; "
            f"its fields are {columns}; set data.text_field to one of them"
        )
    rows = (
        ds[chat_field] if max_documents is None else ds.select(range(min(len(ds), max_documents)))[chat_field]
    )
    return [doc for i, msgs in enumerate(rows) if (doc := render_chat(msgs, where=f"{file} record {i}"))]


def render_chat(messages: Sequence[Mapping[str, Any]], where: str = "chat record") -> str:
    """One conversation as text: ``<|role|>content<|end|>`` per turn, turns separated by a newline.

    Accepts {"role", "content"} and ShareGPT-style {"from", "value"} turns; roles
    system/user/assistant/persona (human/gpt/bot/model are aliases).
    """
    turns = []
    for msg in messages or []:
        role = msg.get("role", msg.get("from"))
        content = msg.get("content", msg.get("value"))
        role = _ROLE_ALIASES.get(role, role)
        if role not in ROLE_TOKENS:
            raise DataError(
                f"{where}: message role {role!r} is not one of {', '.join(ROLE_TOKENS)} "
                f"(aliases: {', '.join(_ROLE_ALIASES)})"
            )
        if not isinstance(content, str):
            raise DataError(f"{where}: message content must be a string, got {type(content).__name__}")
        turns.append(f"{ROLE_TOKENS[role]}{content}{END_OF_TURN_TOKEN}")
    return "\n".join(turns)


def _offline_reason() -> str | None:
    for var in ("HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE"):
        if os.environ.get(var, "").strip().lower() in ("1", "true", "yes", "on"):
            return f"{var}={os.environ[var]} is set"
    endpoint = os.environ.get("HF_ENDPOINT", "https://huggingface.co")
    host = urlparse(endpoint).hostname or "huggingface.co"
    try:
        socket.create_connection((host, 443), timeout=3.0).close()
    except OSError as exc:
        return f"{host}:443 is unreachable ({exc})"
    return None


def _hub_documents(
    hub_name: str | None, text_field: str, hub_config: str | None, hub_split: str, n: int
) -> list[str]:
    if not hub_name or hub_name == "???":
        raise DataError("data.source=hub needs data.hub_name, e.g. HuggingFaceFW/fineweb-edu")
    reason = _offline_reason()
    if reason:
        raise DataError(
            f"data.hub_name={hub_name}: hub datasets need network access, and {reason}. Download the "
            f"data elsewhere, save it as .txt or .jsonl, and use data=file data.path=<that file> "
            f"(or data=embedded, which needs no download)"
        )
    import datasets

    try:
        stream = datasets.load_dataset(hub_name, hub_config, split=hub_split, streaming=True)
        docs: list[str] = []
        for i, record in enumerate(stream):
            if text_field in record and isinstance(record[text_field], str):
                text = record[text_field]
            elif "messages" in record or "conversations" in record:
                text = render_chat(
                    record.get("messages") or record.get("conversations"), f"{hub_name} record {i}"
                )
            else:
                raise DataError(
                    f"data.hub_name={hub_name} records have no field data.text_field={text_field!r} "
                    f"(fields: {sorted(record)}); set data.text_field"
                )
            if text.strip():
                docs.append(text)
            if len(docs) >= n:
                break
    except DataError:
        raise
    except Exception as exc:
        raise DataError(
            f"data.hub_name={hub_name} (config={hub_config}, split={hub_split}) could not be streamed "
            f"({type(exc).__name__}: {exc})"
        ) from exc
    return docs


def load_mixture(
    specs: Sequence[tuple[str | Mapping[str, Any], float]],
    total_docs: int | None = None,
    total_chars: int | None = None,
    seed: int = 0,
) -> list[str]:
    """A weighted mixture: each (source spec, weight) contributes weight/sum(weights) of the documents.

    A spec is a source name ("embedded") or a dict of `load_documents` arguments ({"source": "hub",
    "hub_name": ...}). With `total_docs` the shares count documents, with `total_chars` characters; with
    neither, the largest mixture that repeats no document. A source with too few documents is repeated
    (reshuffled each pass). The result is shuffled with `seed`.
    """
    if not specs:
        raise DataError("data.mixture is empty; give a list of {source: ..., weight: ...} entries")
    if total_docs is not None and total_chars is not None:
        raise DataError("give load_mixture total_docs or total_chars, not both")
    weights = [float(w) for _, w in specs]
    if any(not math.isfinite(w) or w < 0 for w in weights) or sum(weights) <= 0:
        raise DataError(f"data.mixture weights {weights} must be non-negative with a positive sum")
    shares = [w / sum(weights) for w in weights]
    pools: list[list[str]] = []
    for (spec, _), share in zip(specs, shares):
        kwargs = {"source": spec} if isinstance(spec, str) else dict(spec)
        kwargs.pop("weight", None)
        if total_docs is not None and kwargs.get("source") == "hub" and kwargs.get("max_documents") is None:
            kwargs["max_documents"] = max(1, math.ceil(share * total_docs))
        pools.append(load_documents(**kwargs) if share > 0 else [])
    rng = random.Random(seed)
    if total_docs is None and total_chars is None:
        total_docs = int(min(len(p) / s for p, s in zip(pools, shares) if s > 0))
    mixed: list[str] = []
    for pool, share in zip(pools, shares):
        if share == 0:
            continue
        if total_chars is not None:
            budget = share * total_chars
            for doc in _cycle(pool, rng):
                if budget <= 0:
                    break
                mixed.append(doc)
                budget -= len(doc)
        else:
            want = max(1, round(share * total_docs))
            taken = []
            for doc in _cycle(pool, rng):
                if len(taken) == want:
                    break
                taken.append(doc)
            mixed.extend(taken)
    rng.shuffle(mixed)
    return mixed


def _cycle(pool: list[str], rng: random.Random):
    while True:
        order = list(range(len(pool)))
        rng.shuffle(order)
        for i in order:
            yield pool[i]


def split_documents(docs: Sequence[str], val_fraction: float, seed: int = 0) -> tuple[list[str], list[str]]:
    """Deterministic held-out split by document: (train, val), each in the original order.

    With >= 2 documents and val_fraction > 0 both parts are non-empty. A single document is cut at a line
    boundary: the head trains, the last `val_fraction` of it validates.
    """
    if not 0.0 <= float(val_fraction) < 1.0:
        raise DataError(f"data.val_fraction={val_fraction} must be in [0, 1)")
    docs = list(docs)
    if not docs:
        raise DataError("no documents to split into train and validation; check the data source")
    if val_fraction == 0:
        return docs, []
    if len(docs) == 1:
        text = docs[0]
        if len(text) < 2:
            raise DataError("the only document is too short to hold out validation text; add more data")
        target = max(1, min(len(text) - 1, int(len(text) * (1.0 - val_fraction))))
        cut = text.rfind("\n", target // 2, target) + 1 or target
        return [text[:cut]], [text[cut:]]
    n_val = min(len(docs) - 1, max(1, round(val_fraction * len(docs))))
    order = list(range(len(docs)))
    random.Random(seed).shuffle(order)
    val_idx = set(order[:n_val])
    train = [d for i, d in enumerate(docs) if i not in val_idx]
    val = [d for i, d in enumerate(docs) if i in val_idx]
    return train, val
