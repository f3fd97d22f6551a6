"""Training from token shards (`data=shards`, issue 17): the source's settings and refusals, rank-disjoint lanes, and
through the real command line a 2-process torchrun run: disjoint lanes, the one-process losses on the same global
batch, and SIGTERM + resume bit for bit from every rank's saved shard position."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import torch

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


def test_emulated_ranks_are_the_ranks_lanes_side_by_side_and_resume_exactly(shard_dir):
    from groundthink.data.errors import DataError
    from groundthink.data.sources import TokenizerSettings, prepare_data

    data = prepare_data(_settings(path=str(shard_dir), emulate_ranks=2), TokenizerSettings(), seed=5)
    stacked, ranks = data.make_train_stream(0, 1), [data.make_train_stream.make_rank_stream(r, 2) for r in (0, 1)]
    for _ in range(3):
        batch, parts = stacked.next_batch(32), [r.next_batch(32) for r in ranks]
        assert batch["input_ids"].shape == (8, 32)
        assert all(bool((batch[k] == torch.cat([p[k] for p in parts])).all()) for k in batch)
    saved = json.loads(json.dumps(stacked.state_dict()))
    after = [stacked.next_batch(32) for _ in range(2)]
    restored = data.make_train_stream(0, 1)
    restored.load_state_dict(saved)
    assert all(bool((a["input_ids"] == restored.next_batch(32)["input_ids"]).all()) for a in after)
    with pytest.raises(DataError, match="single process"):
        data.make_train_stream(0, 2)
    with pytest.raises(DataError, match="stacked ranks"):
        restored.load_state_dict(ranks[0].state_dict())


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


# The one-process reference of the torchrun test: data=shards read as 2 ranks' lanes side by side
# (data.emulate_ranks=2), the global batch of the 2-rank run. (A one-process data=shards run killed by SIGTERM and
# resumed was checked bit-exact by hand; the suite keeps the 2-rank version, which covers the same resume path per
# rank, to stay within the time budget of the slow tests.)
COMMON = ["trainer.max_steps=8", "trainer.log_every_n_steps=1", "trainer.val_every_n_steps=4",
          "logger.wandb.enabled=false", "callbacks.progress_bar=false", "callbacks.checkpoint.every_n_steps=100"]


@pytest.fixture(scope="module")
def one_process(shard_dir, tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("one")
    run_train(root, "data=shards", f"data.path={shard_dir}", "data.emulate_ranks=2", *COMMON)
    (run,) = run_dirs(root)
    return run


def _torchrun(root: Path, *overrides: str, expect_ok: bool = True):
    """`torchrun --standalone --nproc_per_node 2 -m groundthink.train` (gloo on CPU) with FAST and `overrides`."""
    import subprocess
    import sys

    from tests.conftest import FAST, cli_env

    root.mkdir(parents=True, exist_ok=True)
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           "-m", "groundthink.train", *FAST, *overrides], cwd=root, env=cli_env(root),
                          capture_output=True, text=True, timeout=600)
    assert (proc.returncode == 0) == expect_ok, f"rc {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    return proc


def _rank_positions(sidecar: Path) -> list[dict]:
    states = json.loads(sidecar.read_text())["lightning"]["rank_states"]
    return [s["data_position"]["stream"] for s in states]


@pytest.mark.slow
def test_torchrun_two_ranks_disjoint_equal_to_one_process_and_resume_exact(shard_dir, one_process, tmp_path):
    """Issue 17 acceptance: `torchrun` with 2 processes (gloo) and trainer=ddp_multinode. (a) the ranks read
    disjoint lanes: each rank's saved stream position is exactly a rank-r-of-2 ShardTBPTTStream's after 4 batches;
    (b) the losses equal one process reading both ranks' lanes side by side (data.emulate_ranks=2, the same global
    batch) to fp32 round-off; (c) SIGTERM at step 4 + resume: every rank's position is restored, and the resumed
    losses equal the uninterrupted 2-rank run's."""
    from groundthink.data.shard_stream import ShardTBPTTStream

    common = ["data=shards", f"data.path={shard_dir}", "trainer=ddp_multinode", *COMMON]
    _torchrun(tmp_path / "full", *common, "callbacks.checkpoint.every_n_steps=4")
    (full,) = run_dirs(tmp_path / "full")
    assert full.name.startswith("torchrun_") and (full / "train_rank1.log").exists()
    assert json.loads((full / "summary.json").read_text())["step"] == 8
    one = one_process

    # (a) disjoint lanes, each rank exactly where its own stream is after 4 batches
    positions = _rank_positions(full / "checkpoints/step_0000004.json")
    for rank, position in enumerate(positions):
        expected = ShardTBPTTStream(str(shard_dir), 4, split="train", seed=1234, rank=rank, world_size=2)
        for _ in range(4):
            expected.next_batch(32)
        assert position == expected.state_dict()
        assert all(d % 2 == rank for d in position["lane_doc"])
    assert not set(positions[0]["lane_doc"]) & set(positions[1]["lane_doc"])

    # (b) the 2-rank run is the one-process run on the same global batch, to fp32 round-off
    ddp, single = _losses(full), _losses(one)
    assert sorted(ddp) == sorted(single) == list(range(1, 9))
    diff = max(abs(ddp[s] - single[s]) for s in ddp)
    assert diff <= 1e-5, (diff, ddp, single)
    assert _losses(full, "val/loss") == pytest.approx(_losses(one, "val/loss"), abs=1e-5)

    # (c) SIGTERM on every rank at step 4, then resume from the checkpoint of both ranks
    _torchrun(tmp_path / "part", *common, "faults.sigterm_at_step=4", expect_ok=False)
    (part,) = run_dirs(tmp_path / "part")
    assert json.loads((part / "summary.json").read_text())["status"] == "interrupted"
    assert _rank_positions(part / "checkpoints/last.json") == positions
    _torchrun(tmp_path / "part", *common, f"resume={part}")
    resumed = _losses(part)
    assert sorted(resumed) == list(range(1, 9))
    resume_diff = max(abs(resumed[s] - ddp[s]) for s in ddp)
    print(f"torchrun vs one process: max |loss diff| {diff:.3g}; resumed vs uninterrupted: {resume_diff:.3g}")
    assert resume_diff <= 1e-6, (resumed, ddp)
    assert _losses(part, "val/loss")[8] == pytest.approx(_losses(full, "val/loss")[8], abs=1e-6)  # 4: interrupted
