"""Training from token shards (`data=shards`, issue 17): the source's settings and refusals, rank-disjoint lanes, and
through the real command line a run killed by SIGTERM that resumes bit for bit from the saved shard position."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

from tests.conftest import run_dirs, run_train, sample_texts


@pytest.fixture(scope="module")
def shard_dir(tmp_path_factory) -> Path:
    from groundthink.data.doc_stream import DocumentSource
    from groundthink.data.shards import tokenize_corpus

    root = tmp_path_factory.mktemp("shards")
    corpus = root / "topics.jsonl"
    corpus.write_text("".join(json.dumps({"text": t[:1500]}) + "\n" for t in sample_texts()))
    out = root / "topics"
    tokenize_corpus(DocumentSource("file", path=str(corpus)), out, val_fraction=0.1, seed=3, shard_tokens=20_000,
                    progress=False)
    return out


def _settings(**kw):
    from groundthink.data.sources import ShardsDataSettings

    return ShardsDataSettings(**{"batch_size": 4, "seq_len": 32, "val_batches": 2, **kw})


def test_prepare_streams_the_shards_and_validates_on_their_val_split(shard_dir, tmp_path):
    from groundthink.data.shard_stream import ShardTBPTTStream
    from groundthink.data.sources import TokenizerSettings, prepare_data

    data = prepare_data(_settings(path=str(shard_dir)), TokenizerSettings(), seed=5, tokenizer_dir=tmp_path / "tok")
    assert (tmp_path / "tok").is_dir() and data.tokenizer.kind == "char" and data.vocab_size == 264
    assert len(data.val_batches) == 2 and data.val_texts and "training tokens in shards" in data.description
    stream = data.make_train_stream(0, 1)
    reference = ShardTBPTTStream(str(shard_dir), 4, split="train", seed=5)
    for _ in range(3):
        a, b = stream.next_batch(32), reference.next_batch(32)
        assert all(bool((a[k] == b[k]).all()) for k in a)
    expected_val = ShardTBPTTStream(str(shard_dir), 4, split="val", shuffle=False).validation_batches(32, 2)
    assert all(bool((x["input_ids"] == y["input_ids"]).all()) for x, y in zip(data.val_batches, expected_val))


def test_ranks_get_disjoint_documents(shard_dir):
    from groundthink.data.sources import TokenizerSettings, prepare_data

    data = prepare_data(_settings(path=str(shard_dir)), TokenizerSettings(), seed=5)
    docs = []
    for rank in range(2):
        stream = data.make_train_stream(rank, 2)
        seen = set(stream.lane_doc)
        for _ in range(20):
            stream.next_batch(32)
            seen |= set(stream.lane_doc)
        assert all(d % 2 == rank for d in seen)
        docs.append(seen)
    assert not docs[0] & docs[1]


def test_mixture_of_folders_by_token_weight(shard_dir):
    from groundthink.data.sources import TokenizerSettings, prepare_data

    mix = [{"path": str(shard_dir), "weight": 0.6}, {"path": str(shard_dir), "weight": 0.4}]
    data = prepare_data(_settings(mixture=mix), TokenizerSettings(), seed=5)
    stream = data.make_train_stream(0, 1)
    assert stream.weights == pytest.approx([0.6, 0.4])


@pytest.mark.parametrize("settings, tokenizer, message", [
    ({}, {}, "exactly one of data.path"),
    ({"path": "SHARDS", "mixture": [{"path": "SHARDS"}]}, {}, "exactly one of data.path"),
    ({"mixture": [{"folder": "SHARDS"}]}, {}, "each entry is"),
    ({"path": "SHARDS"}, {"kind": "bpe", "vocab_size": 500}, "written with a char tokenizer"),
    ({"path": "SHARDS", "batch_size": 4000, "seq_len": 4000}, {}, "fewer than one batch"),
])
def test_bad_settings_and_another_tokenizer_are_refused(shard_dir, settings, tokenizer, message):
    from groundthink.data.errors import DataError
    from groundthink.data.sources import TokenizerSettings, prepare_data

    settings = {k: (str(shard_dir) if v == "SHARDS" else v) for k, v in settings.items()}
    if "mixture" in settings:
        settings["mixture"] = [{k: str(shard_dir) for k in e} for e in settings["mixture"]]
    with pytest.raises(DataError, match=message):
        prepare_data(_settings(**settings), TokenizerSettings(**tokenizer), seed=0)


def test_resume_refuses_shards_of_another_tokenizer(shard_dir, tmp_path):
    from groundthink.data.errors import DataError
    from groundthink.data.sources import TokenizerSettings, prepare_data
    from groundthink.data.tokenizer import build_tokenizer

    build_tokenizer("bpe", ["some text to train a tiny bpe on"] * 20, 300).save(tmp_path / "tok")
    with pytest.raises(DataError, match="resume with the shards"):
        prepare_data(_settings(path=str(shard_dir)), TokenizerSettings(), seed=0, tokenizer_dir=tmp_path / "tok",
                     reuse_tokenizer=True)


def _losses(run: Path, column: str = "train/loss") -> dict[int, float]:
    with open(run / "metrics.csv") as f:
        return {int(r["step"]): float(r[column]) for r in csv.DictReader(f) if r.get(column)}


@pytest.mark.slow
def test_shards_run_resumes_bit_exact_after_sigterm(shard_dir, tmp_path):
    steps = ["data=shards", f"data.path={shard_dir}", "trainer.max_steps=10", "trainer.log_every_n_steps=1",
             "trainer.val_every_n_steps=5", "callbacks.checkpoint.every_n_steps=100", "logger.wandb.enabled=false"]
    run_train(tmp_path / "a", *steps)
    (full,) = run_dirs(tmp_path / "a")
    run_train(tmp_path / "b", *steps, "faults.sigterm_at_step=4", expect_rc=143)
    (part,) = run_dirs(tmp_path / "b")
    sidecar = json.loads((part / "checkpoints/last.json").read_text())
    assert sidecar["step"] == 4 and sidecar["data_position"]["stream"]["kind"] == "token-shards"
    run_train(tmp_path / "b", *steps, f"resume={part}")
    reference, resumed = _losses(full), _losses(part)
    assert sorted(resumed) == sorted(reference) == list(range(1, 11))
    assert all(resumed[s] == reference[s] for s in reference), (resumed, reference)
    assert _losses(part, "val/loss") == _losses(full, "val/loss")
