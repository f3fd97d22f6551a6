"""groundthink.data: tokenizer (G0), document sources, the stateful TBPTT stream, synthetic memory tasks."""

from __future__ import annotations

import json
import random
import socket
import time

import pytest
import torch

from groundthink.data import (
    CONTROL_TOKENS,
    DataError,
    TBPTTStream,
    TokenizedDocuments,
    Tokenizer,
    build_tokenizer,
    check_control_tokens,
    encode_documents,
    load_documents,
    load_mixture,
    mqar,
    passkey,
    split_documents,
)

SAMPLES = [
    "",
    "Hello, world!",
    "naïve café — 日本語 ✓ 🙂\n\n\ttabs  and  spaces ",
    "<|persona|>I am Ada.<|end|>\n<|user|>Who are you?<|end|>\n<|assistant|>Ada.<|end|><|endoftext|>",
    "almost <|user| a token, <|pad|><|pad|> twice, and <| bare",
]


@pytest.fixture(scope="module")
def embedded_docs() -> list[str]:
    return load_documents("embedded")


@pytest.fixture(scope="module")
def bpe(embedded_docs) -> Tokenizer:
    return build_tokenizer("bpe", embedded_docs, 2000)


@pytest.fixture(scope="module", params=["char", "bpe"])
def tok(request, bpe) -> Tokenizer:
    return build_tokenizer("char") if request.param == "char" else bpe


def test_eight_distinct_control_tokens():
    assert len(CONTROL_TOKENS) == 8 and len(set(CONTROL_TOKENS)) == 8
    assert {"<|pad|>", "<|endoftext|>", "<|user|>", "<|assistant|>", "<|system|>"} <= set(CONTROL_TOKENS)


def test_control_tokens_encode_as_one_id(tok):
    assert check_control_tokens(tok) == []
    assert sorted(tok.control_ids.values()) == list(range(8))
    for token, tid in tok.control_ids.items():
        assert tok.encode(token) == [tid]
        inside = tok.encode(f"The {token}middle{token} of text")
        assert inside.count(tid) == 2
        assert tok.decode(inside) == f"The {token}middle{token} of text"
    assert tok.pad_id == tok.control_ids["<|pad|>"] and tok.eos_id == tok.control_ids["<|endoftext|>"]


def test_check_control_tokens_reports_failures():
    class Broken(Tokenizer):
        def encode(self, text):
            return [1, 2] if text == "<|user|>" else super().encode(text)

    failures = check_control_tokens(Broken("char"))
    assert failures == [("<|user|>", [1, 2])]


@pytest.mark.parametrize("text", SAMPLES)
def test_round_trip(tok, text):
    ids = tok.encode(text)
    assert all(0 <= i < tok.vocab_size for i in ids)
    assert tok.decode(ids) == text
    assert tok.encode_batch([text, text]) == [ids, ids]


def test_char_tokenizer_is_bytes_plus_controls():
    char = build_tokenizer("char")
    assert char.vocab_size == 264
    assert char.encode("A") == [8 + 65]
    assert char.encode("é") == [8 + 0xC3, 8 + 0xA9]
    with pytest.raises(DataError, match="vocab_size=24000"):
        build_tokenizer("char", None, 24000)
    with pytest.raises(DataError, match="kind='wordpiece'"):
        build_tokenizer("wordpiece", ["x"], 1000)


def test_bpe_trains_fast_and_compresses(embedded_docs):
    start = time.perf_counter()
    tok = build_tokenizer("bpe", embedded_docs, 2000)
    assert time.perf_counter() - start < 15
    assert tok.vocab_size == 2000
    assert tok.bytes_per_token(embedded_docs[:20]) > 2.5
    with pytest.raises(DataError, match="too small"):
        build_tokenizer("bpe", embedded_docs, 100)


def test_token_byte_lengths_count_utf8_bytes(tok):
    lengths = tok.token_byte_lengths()
    assert len(lengths) == tok.vocab_size
    assert all(lengths[i] == 0 for i in tok.control_ids.values())
    text = SAMPLES[2] + SAMPLES[3]
    assert sum(lengths[i] for i in tok.encode(text)) == len(text.encode("utf-8")) - sum(
        len(t) * text.count(t) for t in CONTROL_TOKENS
    )


def test_save_load_equality(tok, tmp_path):
    tok.save(tmp_path / "tok")
    loaded = Tokenizer.load(tmp_path / "tok")
    assert loaded == tok and loaded.kind == tok.kind and loaded.vocab_size == tok.vocab_size
    assert loaded.control_ids == tok.control_ids
    for text in SAMPLES:
        assert loaded.encode(text) == tok.encode(text)
    assert (tmp_path / "tok" / "tokenizer_meta.json").is_file()
    assert (tmp_path / "tok" / "tokenizer.json").is_file() == (tok.kind == "bpe")


def test_load_errors_name_the_problem(bpe, tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        Tokenizer.load(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="tokenizer_meta.json is missing"):
        Tokenizer.load(tmp_path / "empty")
    bpe.save(tmp_path / "corrupt")
    (tmp_path / "corrupt" / "tokenizer_meta.json").write_text("{not json")
    with pytest.raises(DataError, match="corrupt"):
        Tokenizer.load(tmp_path / "corrupt")
    bpe.save(tmp_path / "nobpe")
    (tmp_path / "nobpe" / "tokenizer.json").unlink()
    with pytest.raises(DataError, match="tokenizer.json is missing"):
        Tokenizer.load(tmp_path / "nobpe")
    bpe.save(tmp_path / "badbpe")
    (tmp_path / "badbpe" / "tokenizer.json").write_text("garbage")
    with pytest.raises(DataError, match="could not be read"):
        Tokenizer.load(tmp_path / "badbpe")


def test_embedded_corpus_needs_no_network(monkeypatch):
    def no_network(*args, **kwargs):
        raise OSError("network disabled in this test")

    monkeypatch.setattr(socket.socket, "connect", no_network)
    monkeypatch.setattr(socket, "create_connection", no_network)
    docs = load_documents("embedded")
    assert len(docs) > 100 and sum(map(len, docs)) > 900_000
    assert all(d.strip() for d in docs)
    assert docs == load_documents("embedded")
    assert load_documents("embedded", max_documents=5) == docs[:5]


def test_embedded_docstrings_cache_is_exact_and_optional(tmp_path, monkeypatch):
    """Issue 18: the stdlib docstrings of data=embedded (~1 s of parsing) come from a cache file once extracted;
    cached or not, the documents are the same, and a bad cache file is only a reason to parse again."""
    from groundthink.data import corpus

    monkeypatch.setenv("GROUNDTHINK_CACHE_DIR", "")  # off: parsed every time, nothing written
    fresh = load_documents("embedded")
    monkeypatch.setenv("GROUNDTHINK_CACHE_DIR", str(tmp_path / "cache"))
    assert load_documents("embedded") == fresh  # parsed, then written
    (cached,) = (tmp_path / "cache").iterdir()
    assert cached.name.startswith("embedded-docstrings-") and cached.suffix == ".json"

    def no_parsing(*args, **kwargs):
        raise AssertionError("parsed although the cache holds the result")

    with monkeypatch.context() as m:
        m.setattr(corpus, "_module_docstrings", no_parsing)
        assert load_documents("embedded") == fresh
    cached.write_text("{not json")
    assert load_documents("embedded") == fresh  # parsed again, and the file rewritten
    texts = json.loads(cached.read_text())
    assert texts and fresh[-len(texts):] == texts
    # The key is the sources themselves: other text, another entry (no stale result).
    assert corpus._cached_docstrings([("m", '"""Doc of m."""\n')]) == ["Module m\n\nDoc of m."]
    assert corpus._cached_docstrings([("m", '"""Other doc."""\n')]) == ["Module m\n\nOther doc."]
    assert len(list((tmp_path / "cache").glob("embedded-docstrings-*.json"))) == 3
    assert not list((tmp_path / "cache").glob("*.tmp"))


def test_text_file_sources(tmp_path):
    paragraphs = [f"Paragraph {i}.\nSecond line of {i}." for i in range(6)]
    (tmp_path / "a.txt").write_text("\n\n".join(paragraphs) + "\n")
    whole = load_documents("file", path=tmp_path / "a.txt")
    assert whole == ["\n\n".join(paragraphs)]
    assert load_documents("file", path=tmp_path / "a.txt", split_paragraphs=True) == paragraphs
    pieces = load_documents("file", path=tmp_path / "a.txt", chunk_chars=70)
    assert len(pieces) > 1 and all(len(p) <= 70 for p in pieces)
    assert "".join(pieces) == whole[0]
    (tmp_path / "b.txt").write_text("Another file.\n")
    assert load_documents("file", path=tmp_path) == whole + ["Another file."]


def test_jsonl_sources(tmp_path):
    rows = [{"text": f"document {i}", "id": i} for i in range(5)]
    (tmp_path / "t.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert load_documents("file", path=tmp_path / "t.jsonl") == [r["text"] for r in rows]
    with pytest.raises(DataError, match="data.text_field='body'.*'id'"):
        load_documents("file", path=tmp_path / "t.jsonl", text_field="body")
    chat = {
        "messages": [
            {"role": "system", "content": "Be kind."},
            {"role": "user", "content": "Hi"},
            {"role": "assistant", "content": "Hello!"},
        ]
    }
    (tmp_path / "chat.jsonl").write_text(json.dumps(chat) + "\n" + json.dumps(chat) + "\n")
    docs = load_documents("file", path=tmp_path / "chat.jsonl")
    assert docs[0] == "<|system|>Be kind.<|end|>\n<|user|>Hi<|end|>\n<|assistant|>Hello!<|end|>"
    char = build_tokenizer("char")
    ids = char.encode(docs[0])
    assert ids[0] == char.control_ids["<|system|>"] and ids.count(char.control_ids["<|end|>"]) == 3


def test_missing_empty_and_unsupported_files(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    with pytest.raises(DataError, match=r"missing\.txt does not exist"):
        load_documents("file", path=tmp_path / "missing.txt")
    (tmp_path / "empty.txt").write_text("")
    with pytest.raises(DataError, match=r"empty\.txt is empty"):
        load_documents("file", path=tmp_path / "empty.txt")
    (tmp_path / "blank.jsonl").write_text("\n  \n")
    with pytest.raises(DataError, match=r"blank\.jsonl is empty"):
        load_documents("file", path=tmp_path / "blank.jsonl")
    (tmp_path / "data.csv").write_text("a,b\n")
    with pytest.raises(DataError, match="unsupported file type"):
        load_documents("file", path=tmp_path / "data.csv")
    (tmp_path / "nothing.jsonl").write_text(json.dumps({"text": "   "}) + "\n")
    with pytest.raises(DataError, match="no documents"):
        load_documents("file", path=tmp_path / "nothing.jsonl")
    with pytest.raises(DataError, match="needs data.path"):
        load_documents("file")
    with pytest.raises(DataError, match="data.source='web'"):
        load_documents("web")


def test_hub_fails_fast_offline(monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    start = time.perf_counter()
    with pytest.raises(DataError, match="need network access.*data=file"):
        load_documents("hub", hub_name="HuggingFaceFW/fineweb-edu")
    assert time.perf_counter() - start < 5


def test_mixture_weights_and_determinism(tmp_path):
    (tmp_path / "a.jsonl").write_text("".join(json.dumps({"text": f"a{i}"}) + "\n" for i in range(50)))
    (tmp_path / "b.jsonl").write_text("".join(json.dumps({"text": f"b{i}"}) + "\n" for i in range(5)))
    specs = [
        ({"source": "file", "path": str(tmp_path / "a.jsonl"), "weight": 0.75}, 0.75),
        ({"source": "file", "path": str(tmp_path / "b.jsonl")}, 0.25),
    ]
    mixed = load_mixture(specs, total_docs=40, seed=3)
    assert len(mixed) == 40
    assert sum(d.startswith("a") for d in mixed) == 30 and sum(d.startswith("b") for d in mixed) == 10
    assert mixed == load_mixture(specs, total_docs=40, seed=3)
    assert mixed != load_mixture(specs, total_docs=40, seed=4)
    assert len(load_mixture(specs, seed=0)) == 20  # no repeats: b's 5 documents are 25%
    by_chars = load_mixture(specs, total_chars=100, seed=0)
    assert sum(len(d) for d in by_chars if d.startswith("b")) >= 25


def test_split_documents():
    docs = [f"doc {i}" for i in range(40)]
    train, val = split_documents(docs, 0.1, seed=1)
    assert len(val) == 4 and sorted(train + val) == sorted(docs) and not set(train) & set(val)
    assert (train, val) == split_documents(docs, 0.1, seed=1)
    assert split_documents(docs, 0.1, seed=2) != (train, val)
    assert [len(p) for p in split_documents(["x", "y"], 0.01)] == [1, 1]
    text = "\n".join(f"line {i}" for i in range(100))
    head, tail = split_documents([text], 0.1)
    assert head[0] + tail[0] == text and tail[0] and head[0].endswith("\n")
    with pytest.raises(DataError, match="val_fraction"):
        split_documents(docs, 1.5)


PAD = 0


def _docs(n: int = 13, seed: int = 0) -> list[list[int]]:
    rng = random.Random(seed)
    return [[d * 1000 + p + 1 for p in range(rng.randint(1, 40))] for d in range(n)]


def _check_stream(docs, batches):
    """Every lane: whole documents in queue order, labels = next token of the document, resets at starts."""
    B = batches[0]["input_ids"].shape[0]
    starts = []  # (batch, lane, doc) in the order documents were started
    for b in range(B):
        current: list[int] = []
        doc = None
        for i, batch in enumerate(batches):
            row, lab, reset = (
                batch["input_ids"][b].tolist(),
                batch["labels"][b].tolist(),
                bool(batch["reset"][b]),
            )
            if row[0] == PAD:  # a validation lane that ran out of documents
                assert set(row) == {PAD} and set(lab) == {-100}
                continue
            first_doc = row[0] // 1000
            assert reset == (row[0] % 1000 == 1), "reset exactly when a document starts"
            if reset:
                assert doc is None or current == docs[doc], "the previous document was complete"
                doc, current = first_doc, []
                starts.append((i, b, doc))
            valid = [t for t in row if t != PAD]
            assert row[: len(valid)] == valid and all(t // 1000 == doc for t in valid), (
                "one document per segment"
            )
            current.extend(valid)
            assert current == docs[doc][: len(current)], "the lane continues exactly"
            nxt = batches[i + 1]["input_ids"][b].tolist() if i + 1 < len(batches) else None
            for t, label in enumerate(lab):
                if t + 1 < len(valid):
                    assert label == row[t + 1]
                elif t == len(valid) - 1 and len(current) < len(docs[doc]):
                    assert nxt is None or label == nxt[0], "last label = first token of the next segment"
                    assert label == docs[doc][len(current)]
                else:
                    assert label == -100, "no target after a document's last token or on padding"
    starts.sort()
    return [d for _, _, d in starts]


@pytest.mark.parametrize("shuffle", [True, False])
def test_stream_lane_continuity_and_queue_order(shuffle):
    docs = _docs()
    stream = TBPTTStream(docs, batch_size=3, pad_id=PAD, seed=5, shuffle=shuffle)
    batches = [stream.next_batch(8) for _ in range(60)]
    assert all(b["input_ids"].dtype == torch.long and b["input_ids"].shape == (3, 8) for b in batches)
    assert all(b["reset"].dtype == torch.bool for b in batches) and batches[0]["reset"].all()
    order = _check_stream(docs, batches)
    assert sorted(order[:13]) == list(range(13)) and sorted(order[13:26]) == list(range(13)), (
        "each epoch once"
    )
    assert (order[:13] == list(range(13))) != shuffle
    assert order[13:26] != order[:13] or not shuffle, "reshuffled per epoch"
    assert stream.tokens_seen == sum(int((b["input_ids"] != PAD).sum()) for b in batches)


def test_stream_curriculum_seq_len_changes_keep_continuity():
    docs = _docs(9, seed=2)
    stream = TBPTTStream(docs, batch_size=2, pad_id=PAD, seed=0)
    lengths = [5, 5, 16, 3, 1, 7, 32, 2] * 6
    batches = [stream.next_batch(t) for t in lengths]
    assert [b["input_ids"].shape[1] for b in batches] == lengths
    _check_stream(docs, batches)


def test_stream_state_dict_round_trip_is_bit_identical():
    docs = _docs(7, seed=3)
    lengths = [6, 4, 9] * 20

    def make():
        return TBPTTStream(docs, batch_size=3, pad_id=PAD, seed=11)

    reference = make()
    uninterrupted = [reference.next_batch(t) for t in lengths]
    for k in (0, 1, 9, 25, 50):
        interrupted = make()
        for t in lengths[:k]:
            interrupted.next_batch(t)
        state = json.loads(json.dumps(interrupted.state_dict()))
        assert all(isinstance(v, int) or all(isinstance(x, int) for x in v) for v in state.values())
        if k >= 25:
            assert state["epoch"] >= 2, "the resume points cover later epochs"
        resumed = make()
        resumed.load_state_dict(state)
        assert resumed.tokens_seen == interrupted.tokens_seen
        for expected, t in zip(uninterrupted[k : k + 10], lengths[k : k + 10]):
            got = resumed.next_batch(t)
            for key in ("input_ids", "labels", "reset"):
                assert torch.equal(expected[key], got[key])
    assert resumed.state_dict() == reference.state_dict()


def test_stream_rejects_foreign_state():
    docs = _docs(7)
    state = TBPTTStream(docs, batch_size=3, pad_id=PAD).state_dict()
    with pytest.raises(DataError, match="batch_size: saved 3, now 2"):
        TBPTTStream(docs, batch_size=2, pad_id=PAD).load_state_dict(state)
    with pytest.raises(DataError, match="num_documents"):
        TBPTTStream(docs[:-1], batch_size=3, pad_id=PAD).load_state_dict(state)
    with pytest.raises(DataError, match="corrupt"):
        TBPTTStream(docs, batch_size=3, pad_id=PAD).load_state_dict({"epoch": 0})


def test_validation_batches_fixed_and_complete():
    docs = _docs(11, seed=4)
    stream = TBPTTStream(docs, batch_size=4, pad_id=PAD, seed=0)
    stream.next_batch(5)
    before = stream.state_dict()
    first = stream.validation_batches(8, max_batches=None)
    second = stream.validation_batches(8, max_batches=None)
    assert stream.state_dict() == before
    assert len(first) == len(second)
    assert all(torch.equal(a[k], b[k]) for a, b in zip(first, second) for k in a)
    assert sum(int((b["input_ids"] != PAD).sum()) for b in first) == sum(map(len, docs)), "each document once"
    assert len(stream.validation_batches(8, max_batches=3)) == 3
    _check_stream(docs, first)


def test_stream_boundaries_and_compact_storage():
    docs = [[5, 6, 7], [8], [9, 10]]
    stream = TBPTTStream(docs, batch_size=1, pad_id=0, eos_id=1, bos_id=2, shuffle=False)
    b = stream.next_batch(6)
    assert b["input_ids"].tolist() == [[2, 5, 6, 7, 1, 0]]
    assert b["labels"].tolist() == [[5, 6, 7, 1, -100, -100]]
    stored = TokenizedDocuments.from_lists(docs)
    assert stored.tokens.dtype == torch.int32 and stored.offsets.tolist() == [0, 3, 4, 6]
    assert list(stored) == docs and stored[1] == [8] and list(stored[::2]) == [docs[0], docs[2]]
    with pytest.raises(DataError, match="no non-empty documents"):
        TBPTTStream([[], []], batch_size=2, pad_id=0)


def test_encode_documents_appends_eos(bpe):
    texts = ["first text", "<|user|>second<|end|>"]
    stored = encode_documents(bpe, texts, progress=False)
    assert len(stored) == 2
    for text, ids in zip(texts, stored):
        assert ids == bpe.encode(text) + [bpe.eos_id]
    stream = TBPTTStream(stored, batch_size=2, pad_id=bpe.pad_id, shuffle=False)
    batch = stream.next_batch(4)
    assert batch["input_ids"][0, :4].tolist() == stored[0][:4]


def test_mqar_layout_and_labels():
    V, kv, T = 128, 8, 96
    data = mqar(50, T, kv, V, seed=1)
    inputs, labels = data["input_ids"], data["labels"]
    assert inputs.shape == labels.shape == (50, T) and inputs.dtype == labels.dtype == torch.long
    assert torch.equal(data["inputs"], inputs)
    assert ((labels != -100).sum(1) == kv).all()
    assert (labels[:, : 2 * kv] == -100).all()
    for row in range(50):
        keys, values = inputs[row, 0 : 2 * kv : 2], inputs[row, 1 : 2 * kv : 2]
        assert ((keys >= 1) & (keys < V // 2)).all() and ((values >= V // 2) & (values < V)).all()
        assert len(set(keys.tolist())) == kv
        pairs = dict(zip(keys.tolist(), values.tolist()))
        positions = (labels[row] != -100).nonzero().flatten().tolist()
        assert sorted(inputs[row, positions].tolist()) == sorted(pairs), "each key is queried once"
        for p in positions:
            assert (p - 2 * kv) % 2 == 0 and labels[row, p].item() == pairs[inputs[row, p].item()]
    assert torch.equal(mqar(50, T, kv, V, seed=1)["input_ids"], inputs)
    assert not torch.equal(mqar(50, T, kv, V, seed=2)["input_ids"], inputs)
    gaps = torch.cat([(labels[r] != -100).nonzero().flatten() for r in range(50)]) - 2 * kv
    assert (gaps < 2 * 8).float().mean() > 0.25, "power-law gaps favour short distances"
    with pytest.raises(DataError, match="seq_len >= 4\\*kv"):
        mqar(2, 30, 8, V)


def test_passkey_beyond_segment():
    distance, L, segment = 300, 5, 64
    data = passkey(8, distance, vocab_size=264, passkey_len=L, prefix_len=10, seed=0)
    inputs, labels = data["input_ids"], data["labels"]
    T = 10 + 2 + 2 * L + distance
    assert inputs.shape == labels.shape == (8, T)
    needle, query = int(data["needle_start"]), int(data["query_pos"])
    assert query - needle > segment
    assert (inputs[:, needle] == 262).all() and (inputs[:, query] == 263).all()
    answer = inputs[:, needle + 1 : needle + 1 + L]
    assert torch.equal(inputs[:, query + 1 : query + 1 + L], answer)
    assert torch.equal(labels[:, query : query + L], answer)
    assert ((labels != -100).sum(1) == L).all()
    assert torch.equal(answer - 252, data["passkeys"])
    filler = torch.cat([inputs[:, :needle], inputs[:, needle + 1 + L : query]], dim=1)
    assert ((filler >= 8) & (filler < 252)).all()
    assert torch.equal(passkey(8, distance, 264, passkey_len=L, prefix_len=10, seed=0)["input_ids"], inputs)
    fixed = passkey(3, 40, 264, seq_len=128, seed=1)
    assert fixed["input_ids"].shape == (3, 128) and int(fixed["query_pos"]) == 128 - 1 - 5
    with pytest.raises(DataError, match="shorter than the task"):
        passkey(1, 200, 264, seq_len=64)
