"""Token shards (groundthink/data/shards.py, shard_stream.py, doc_stream.py, tokenize_cli.py).

- the streamed documents equal `load_documents`' (text with CRLF/unicode, chunking, paragraphs, JSON Lines, chat);
- the shards hold exactly `encode_documents` of the training documents, split by the recorded per-document draw;
- `ShardTBPTTStream` gives the same batches as `TBPTTStream` on the same documents (epochs, ragged lengths,
  validation), and `state_dict`/`load_state_dict` restore the position exactly (and refuse another position);
- data-parallel ranks read disjoint documents that together cover the corpus;
- a 60/30/10 token-weighted mixture of sources with very different document lengths is realised within 1 point
  over 10^6 tokens (where a per-document draw would be far off);
- tokenizer fingerprints: a different tokenizer is refused, BPE is trained, saved and reloaded;
- re-running is idempotent, other settings are refused, and (slow, the real CLI) a tokenize run killed at the
  worst moment continues with the same command to byte-identical shards, with a progress bar with total and ETA.
"""

from __future__ import annotations

import json
import os
import pickle
import random
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from groundthink.data.corpus import load_documents
from groundthink.data.doc_stream import DocumentSource
from groundthink.data.errors import DataError
from groundthink.data.shard_stream import ShardTBPTTStream
from groundthink.data.shards import ShardSet, is_validation, tokenize_corpus
from groundthink.data.stream import TBPTTStream, TokenizedDocuments, encode_documents
from groundthink.data.tokenizer import build_tokenizer

WORDS = ["alpha", "beta", "gamma", "delta", "x" * 40, "épsilon", "日本語", "<|user|>"]


def _text(rng: random.Random, n_words: int) -> str:
    out = []
    for _ in range(n_words):
        r = rng.random()
        sep = " " if r < 0.7 else "\n" if r < 0.9 else "\n\n" if r < 0.97 else "\r\n"
        out.append(rng.choice(WORDS) + sep)
    return "".join(out)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    """A folder of text (with CRLF, leading/trailing blank lines, unicode) and JSON Lines (text and chat)."""
    root = tmp_path_factory.mktemp("corpus")
    rng = random.Random(0)
    (root / "a.txt").write_text("\n\n" + _text(rng, 6000) + "\n\n\n", newline="")
    (root / "sub").mkdir()
    (root / "sub" / "b.md").write_text(_text(rng, 800), newline="")
    with open(root / "c.jsonl", "w") as f:
        for i in range(60):
            f.write(json.dumps({"text": _text(rng, rng.randint(0, 30)), "id": i}) + "\n")
    with open(root / "sub" / "d.jsonl", "w") as f:
        for _ in range(20):
            f.write(json.dumps({"messages": [{"role": "user", "content": _text(rng, 5)},
                                             {"role": "assistant", "content": _text(rng, 9)}]}) + "\n")
    return root


@pytest.fixture(scope="module")
def shards(corpus, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("shards") / "s"
    tokenize_corpus(DocumentSource("file", path=str(corpus), chunk_chars=300), out, val_fraction=0.1, seed=7,
                    shard_tokens=3000, progress=False)
    return out


# ----- reading documents -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("kwargs", [
    {"chunk_chars": 300},
    {"chunk_chars": 47},
    {"chunk_chars": None},
    {"split_paragraphs": True, "chunk_chars": 60},
    {"chunk_chars": 1000, "max_documents": 9},
])
def test_streamed_documents_equal_load_documents(corpus, monkeypatch, kwargs):
    import groundthink.data.doc_stream as doc_stream

    monkeypatch.setattr(doc_stream, "_READ_CHARS", 97)  # tiny blocks: chunk and newline decisions cross blocks
    expected = load_documents("file", path=str(corpus), **kwargs)
    assert list(DocumentSource("file", path=str(corpus), **kwargs).documents()) == expected
    assert len(expected) > 5


def test_bad_inputs_are_explained(tmp_path, monkeypatch):
    with pytest.raises(DataError, match="does not exist"):
        DocumentSource("file", path=str(tmp_path / "missing.txt"))
    (tmp_path / "blank.txt").write_text("  \n\n ")
    with pytest.raises(DataError, match="is empty"):
        DocumentSource("file", path=str(tmp_path / "blank.txt"))
    (tmp_path / "x.csv").write_text("a,b")
    with pytest.raises(DataError, match="unsupported file type"):
        DocumentSource("file", path=str(tmp_path / "x.csv"))
    (tmp_path / "bad.jsonl").write_text('{"text": "fine"}\n{oops\n')
    with pytest.raises(DataError, match="line 2 is not valid JSON"):
        list(DocumentSource("file", path=str(tmp_path / "bad.jsonl")).documents())
    (tmp_path / "other.jsonl").write_text('{"body": "x"}\n')
    with pytest.raises(DataError, match=r"no record has a non-empty text_field='text'.*\['body'\]"):
        list(DocumentSource("file", path=str(tmp_path / "other.jsonl")).documents())
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    with pytest.raises(DataError, match="HF_DATASETS_OFFLINE"):
        list(DocumentSource("hub", hub_name="someone/corpus").documents())
    with pytest.raises(DataError, match=r"val_fraction=1.5"):
        tokenize_corpus(DocumentSource(), tmp_path / "o", val_fraction=1.5)
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "a.txt").write_text("some text")
    with pytest.raises(DataError, match="inside the input folder"):
        tokenize_corpus(DocumentSource("file", path=str(tmp_path / "in")), tmp_path / "in" / "shards")
    with pytest.raises(DataError, match="needs vocab_size"):
        tokenize_corpus(DocumentSource("file", path=str(tmp_path / "in")), tmp_path / "o", tokenizer="bpe")


# ----- writing -----------------------------------------------------------------------------------------------------
def test_shards_hold_the_encoded_training_documents_split_by_the_recorded_draw(corpus, shards):
    docs = load_documents("file", path=str(corpus), chunk_chars=300)
    tok = ShardSet(shards).load_tokenizer()
    for split in ("train", "val"):
        texts = [t for i, t in enumerate(docs) if is_validation(7, i, 0.1) == (split == "val")]
        expected = encode_documents(tok, texts)
        got = ShardSet(shards, split)
        assert len(got) == len(expected) > 0
        for i in range(len(got)):
            assert got.document(i).tolist() == expected[i]
        assert got.num_tokens == expected.num_tokens
    index = json.loads((shards / "index.json").read_text())
    assert len(index["splits"]["train"]["shards"]) > 3  # several shard files, documents never split across them
    assert index["settings"]["val_fraction"] == 0.1 and index["settings"]["seed"] == 7
    assert index["tokenizer"]["fingerprint"] == tok.fingerprint and index["dtype"] == "<u2"
    ShardSet(shards).verify()


def test_second_run_is_a_no_op_and_other_settings_are_refused(corpus, shards):
    source = DocumentSource("file", path=str(corpus), chunk_chars=300)
    before = {p: p.stat().st_mtime_ns for p in shards.rglob("*") if p.is_file()}
    result = tokenize_corpus(source, shards, val_fraction=0.1, seed=7, shard_tokens=3000, progress=False)
    assert result.skipped and {p: p.stat().st_mtime_ns for p in shards.rglob("*") if p.is_file()} == before
    with pytest.raises(DataError, match=r"other settings \(seed: 7 there, 8 now"):
        tokenize_corpus(source, shards, val_fraction=0.1, seed=8, shard_tokens=3000, progress=False)


def test_bpe_is_trained_saved_and_checked(corpus, tmp_path):
    out = tmp_path / "bpe"
    tokenize_corpus(DocumentSource("file", path=str(corpus), chunk_chars=300), out, tokenizer="bpe", vocab_size=400,
                    progress=False)
    shard_set = ShardSet(out)
    tok = shard_set.load_tokenizer()
    assert tok.kind == "bpe" and shard_set.dtype == np.dtype("<u2")
    first = shard_set.document(0)
    assert first[-1] == tok.eos_id and tok.encode(tok.decode(first[:-1].tolist())) == first[:-1].tolist()
    with pytest.raises(DataError, match="another tokenizer"):
        ShardSet(out, tokenizer=build_tokenizer("char"))
    with pytest.raises(DataError, match="another tokenizer"):
        ShardTBPTTStream(str(out), 2, tokenizer=build_tokenizer("char"))


def test_unfinished_folder_says_to_rerun(tmp_path):
    (tmp_path / "progress.json").write_text("{}")
    with pytest.raises(DataError, match="run the same groundthink-tokenize command again"):
        ShardSet(tmp_path)
    with pytest.raises(DataError, match="not a token shard folder"):
        ShardSet(tmp_path / "nothing")


# ----- streaming -----------------------------------------------------------------------------------------------------
def _equal(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_stream_equals_tbptt_stream_on_the_same_documents(shards):
    train = ShardSet(shards)
    docs = TokenizedDocuments.from_lists([train.document(i) for i in range(len(train))])
    ref = TBPTTStream(docs, batch_size=5, pad_id=0, seed=3)
    got = ShardTBPTTStream(str(shards), 5, seed=3)
    i = 0
    while ref.epoch < 2:  # into the third epoch, segment lengths from 1 to longer than most documents
        seq_len = (1, 17, 64, 333)[i % 4]
        assert _equal(ref.next_batch(seq_len), got.next_batch(seq_len)), f"batch {i}"
        i += 1
        assert i < 10_000
    assert got.epoch == ref.epoch and got.tokens_seen == ref.tokens_seen
    val = ShardSet(shards, "val")
    ref_val = TBPTTStream(TokenizedDocuments.from_lists(list(val.iter_documents())), 5, pad_id=0)
    got_val = ShardTBPTTStream(str(shards), 5, split="val")
    for a, b in zip(ref_val.validation_batches(32), got_val.validation_batches(32), strict=True):
        assert _equal(a, b)
    first_two = got_val.validation_batches(32, max_batches=2)
    assert len(first_two) == 2 and all(_equal(a, b) for a, b in zip(first_two, got_val.validation_batches(32)))


def test_state_dict_restores_the_position_exactly_and_refuses_another(shards):
    stream = ShardTBPTTStream(str(shards), 4, seed=1)
    for _ in range(37):
        stream.next_batch(29)
    state = json.loads(json.dumps(stream.state_dict()))  # it travels in a JSON sidecar
    restored = ShardTBPTTStream(str(shards), 4, seed=1)
    restored.load_state_dict(state)
    for _ in range(60):
        assert _equal(stream.next_batch(23), restored.next_batch(23))
    copied = pickle.loads(pickle.dumps(stream))  # e.g. into a DataLoader worker: files reopen lazily
    assert _equal(stream.next_batch(31), copied.next_batch(31))
    for change, words in (({"batch_size": 5}, "batch_size"), ({"seed": 2}, "seed"),
                          ({"rank": 1, "world_size": 2}, "rank")):
        other = ShardTBPTTStream(str(shards), **{"batch_size": 4, "seed": 1, **change})
        with pytest.raises(DataError, match=words):
            other.load_state_dict(state)
    with pytest.raises(DataError, match="incomplete or corrupt"):
        restored.load_state_dict({k: v for k, v in state.items() if k != "lane_doc"})
    with pytest.raises(DataError, match="outside the data"):
        restored.load_state_dict({**state, "lane_offset": [10**9] * 4})
    tbptt_state = TBPTTStream([[5, 6, 7]], 4, pad_id=0).state_dict()
    with pytest.raises(DataError, match="not a token-shard stream"):
        restored.load_state_dict(tbptt_state)


def test_ranks_read_disjoint_documents_that_cover_the_corpus(shards):
    n = len(ShardSet(shards))
    seen = []
    for rank in (0, 1):
        stream = ShardTBPTTStream(str(shards), 3, seed=5, rank=rank, world_size=2)
        docs = set()
        for _ in range(300):
            docs.update((s, d) for s, d, o in zip(stream.lane_source, stream.lane_doc, stream.lane_offset) if o == 0)
            stream.next_batch(64)
        assert all(d % 2 == rank for _, d in docs)
        seen.append(docs)
    assert not seen[0] & seen[1]
    assert {d for _, d in seen[0] | seen[1]} == set(range(n))
    with pytest.raises(DataError, match="rank=2, world_size=2"):
        ShardTBPTTStream(str(shards), 3, rank=2, world_size=2)
    with pytest.raises(DataError, match="none for rank"):
        ShardTBPTTStream(str(shards), 3, split="val", rank=n, world_size=n + 1)


@pytest.fixture(scope="module")
def mixture_sources(tmp_path_factory) -> dict[str, Path]:
    """Three sources whose document lengths differ by ~10x: a per-document draw would miss the token weights."""
    root = tmp_path_factory.mktemp("mix")
    rng = random.Random(1)
    out = {}
    for name, (lo, hi, n) in {"A": (200, 2000, 150), "B": (30, 300, 400), "C": (2000, 8000, 40)}.items():
        src = root / name
        src.mkdir()
        with open(src / "docs.jsonl", "w") as f:
            for _ in range(n):
                f.write(json.dumps({"text": name.lower() * rng.randint(lo, hi)}) + "\n")
        out[name] = root / f"shards_{name}"
        tokenize_corpus(DocumentSource("file", path=str(src)), out[name], val_fraction=0.1, progress=False)
    return out


def test_token_weighted_mixture_within_one_point_over_a_million_tokens(mixture_sources):
    weights = {"A": 0.6, "B": 0.3, "C": 0.1}
    stream = ShardTBPTTStream([{"path": str(mixture_sources[k]), "weight": w} for k, w in weights.items()], 16, seed=2)
    while stream.tokens_seen < 1_000_000:
        stream.next_batch(256)
    shares = list(stream.mixture().values())
    assert max(abs(s - w) for s, w in zip(shares, weights.values())) <= 0.01, shares
    # The same tokens counted by document: far from 60/30/10, so the rule above is what balances tokens.
    docs = [e * n + q for e, n, q in zip(stream.source_epoch, stream.local_counts, stream.source_queue_pos)]
    assert abs(docs[2] / sum(docs) - 0.1) > 0.05 and abs(docs[1] / sum(docs) - 0.3) > 0.1
    # Each lane reads the source it says it reads (every source is one repeated letter, plus end-of-text).
    tok = ShardSet(mixture_sources["A"]).load_tokenizer()
    letter = [tok.encode(k.lower())[0] for k in weights]
    sources = list(stream.lane_source)
    batch = stream.next_batch(8)
    for b, s in enumerate(sources):
        assert batch["input_ids"][b, 0].item() in (letter[s], tok.eos_id)
    state = stream.state_dict()
    again = ShardTBPTTStream([(str(mixture_sources[k]), w) for k, w in weights.items()], 16, seed=2)
    again.load_state_dict(json.loads(json.dumps(state)))
    assert _equal(stream.next_batch(100), again.next_batch(100))


def test_mixture_refuses_sources_with_different_tokenizers(mixture_sources, tmp_path, corpus):
    out = tmp_path / "bpe"
    tokenize_corpus(DocumentSource("file", path=str(corpus)), out, tokenizer="bpe", vocab_size=300, progress=False)
    with pytest.raises(DataError, match="different tokenizers"):
        ShardTBPTTStream([(str(mixture_sources["A"]), 0.5), (str(out), 0.5)], 2)
    with pytest.raises(DataError, match="positive sum"):
        ShardTBPTTStream([(str(mixture_sources["A"]), 0.0)], 2)


# ----- the command line -----------------------------------------------------------------------------------------
def _cli(*args: str, cwd: Path, expect_rc: int | None = 0) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, "-m", "groundthink.data.tokenize_cli", *args], cwd=cwd,
                          capture_output=True, text=True, timeout=600, env={**os.environ, "HF_DATASETS_OFFLINE": "1"})
    if expect_rc is not None and proc.returncode != expect_rc:
        raise AssertionError(f"exit {proc.returncode}\nSTDOUT:\n{proc.stdout[-3000:]}\nSTDERR:\n{proc.stderr[-3000:]}")
    return proc


def _files(folder: Path) -> dict[str, str]:
    import hashlib

    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.mark.slow
def test_cli_killed_mid_way_continues_to_identical_shards(corpus, tmp_path):
    common = [str(corpus), "--chunk-chars", "300", "--shard-tokens", "2000", "--val-fraction", "0.1"]
    clean = _cli(*common[:1], str(tmp_path / "clean"), *common[1:], cwd=tmp_path)
    assert "100%" in clean.stderr and "B/s" in clean.stderr, "no progress bar with a total and a rate"
    assert "=== token shards written" in clean.stdout and "train" in clean.stdout
    crashed = _cli(*common[:1], str(tmp_path / "out"), *common[1:], "--fault-exit-after-shards", "3",
                   cwd=tmp_path, expect_rc=137)
    assert "Traceback" not in crashed.stderr
    out = tmp_path / "out"
    assert not (out / "index.json").exists() and (out / "progress.json").exists()
    recorded = json.loads((out / "progress.json").read_text())["shards"]["train"]
    on_disk = sorted(p.name for p in (out / "train").glob("shard_*.bin"))
    assert len(on_disk) > len(recorded)  # the killed run left a complete but unrecorded shard behind
    _cli(*common[:1], str(out), *common[1:], "--verify", cwd=tmp_path)
    clean_index = json.loads((tmp_path / "clean" / "index.json").read_text())
    index = json.loads((out / "index.json").read_text())
    for key in ("tokenize_seconds",):
        clean_index.pop(key), index.pop(key)
    assert index == clean_index
    files, clean_files = _files(out), _files(tmp_path / "clean")
    files.pop("index.json"), clean_files.pop("index.json")
    assert files == clean_files
    again = _cli(*common[:1], str(out), *common[1:], cwd=tmp_path)
    assert "already complete" in again.stdout
    refused = _cli(*common[:1], str(out), "--seed", "3", *common[1:], cwd=tmp_path, expect_rc=1)
    assert "other settings" in refused.stderr and "--overwrite" in refused.stderr and "Traceback" not in refused.stderr
