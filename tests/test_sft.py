"""SFT (issue 15): the assistant-only loss mask, data=chat, init_from= (strict, with lineage), exact resume, and the
pretrain -> datagen -> SFT -> eval chain through the real CLIs."""

from __future__ import annotations

import csv
import json
import math
import random
from pathlib import Path

import pytest
import torch

from tests._trained_run import trained_tiny_run
from tests.conftest import eval_metrics, run_cli, run_dirs, run_train

WORDS = ["red", "blue", "green", "cat", "dog", "sun", "moon", "tree"]


def write_chat(path: Path, n: int = 40, seed: int = 0) -> Path:
    """n short echo conversations (system, user, assistant), as groundthink-datagen writes them."""
    rng = random.Random(seed)
    with open(path, "w", encoding="utf-8") as f:
        for _ in range(n):
            w = rng.choice(WORDS)
            msgs = [{"role": "system", "content": "Echo."}, {"role": "user", "content": f"say {w}"},
                    {"role": "assistant", "content": f"{w} {w} {w}."}]
            f.write(json.dumps({"messages": msgs, "id": w}) + "\n")
    return path


def _losses(run: Path, column: str = "train/loss") -> dict[int, float]:
    with open(run / "metrics.csv") as f:
        return {int(r["step"]): float(r[column]) for r in csv.DictReader(f) if r.get(column)}


# ----- the loss mask (in process, fast) --------------------------------------------------------------------------
def _tiny_module():
    from groundthink.models import HybridLM, ModelConfig
    from groundthink.training.module import LMTrainingModule
    from groundthink.training.settings import OptimSettings

    torch.manual_seed(0)
    cfg = ModelConfig.from_dict(dict(vocab_size=264, d_model=32, n_layers=1, pattern="H", ffn_mult=2.0))
    return LMTrainingModule(HybridLM(cfg), optim=OptimSettings(), max_steps=1, token_bytes=None)


def _stream(conversations):
    from groundthink.data.chat import MaskedTBPTTStream, encode_conversations
    from groundthink.data.tokenizer import build_tokenizer

    tok = build_tokenizer("char")
    docs, targets, counts, truncated = encode_conversations(tok, conversations, max_tokens=4096)
    return tok, MaskedTBPTTStream(docs, targets, batch_size=1, pad_id=tok.pad_id, shuffle=False), counts


def test_labels_are_the_assistant_turns_only_by_hand():
    conv = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]
    tok, stream, counts = _stream([conv])
    batch = stream.next_batch(32)
    ids = tok.encode("<|user|>hi<|end|>\n<|assistant|>yo<|end|>") + [tok.eos_id]
    assert batch["input_ids"][0, :len(ids)].tolist() == ids and bool(batch["reset"][0])
    a = ids.index(tok.role_id("assistant"))
    expected = [-100] * 32
    expected[a:a + 3] = ids[a + 1:a + 4]  # <|assistant|> -> y, y -> o, o -> <|end|>; nothing else is a target
    assert batch["labels"][0].tolist() == expected
    assert counts["assistant"] == 3 and counts["user"] == 3 and counts["template"] == 4  # 2 role, "\n", eos


def test_masked_loss_is_a_hand_computation_and_user_targets_carry_no_gradient():
    conv = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "say cat"},
            {"role": "assistant", "content": "cat."}, {"role": "user", "content": "again"},
            {"role": "assistant", "content": "cat!"}]
    tok, stream, _ = _stream([conv])
    batch = stream.next_batch(48)
    module = _tiny_module()
    labels = batch["labels"]
    logits = torch.randn(1, 48, 264, requires_grad=True)
    loss, stats = module._loss(logits, labels)
    logp = torch.log_softmax(logits.detach().double(), -1)[0]
    kept = [(t, int(y)) for t, y in enumerate(labels[0].tolist()) if y != -100]
    assert len(kept) == 10  # "cat." + <|end|>, "cat!" + <|end|>: the targets of those 10 tokens
    hand = -sum(float(logp[t, y]) for t, y in kept) / len(kept)
    assert float(loss.detach()) == pytest.approx(hand, abs=1e-6) and int(stats["tokens"]) == 10
    loss.backward()
    grad_pos = logits.grad[0].abs().sum(-1)
    assert set(torch.nonzero(grad_pos).flatten().tolist()) == {t for t, _ in kept}

    # Perturb the target of a user token (the token after it in the raw stream): the gradient is unchanged.
    from groundthink.data.stream import TBPTTStream

    raw = TBPTTStream(stream.docs, batch_size=1, pad_id=tok.pad_id, shuffle=False).next_batch(48)["labels"]
    user_pos = [t for t in range(48) if raw[0, t] != -100 and labels[0, t] == -100]
    assert user_pos
    perturbed = raw.clone()
    perturbed[0, user_pos] = (perturbed[0, user_pos] + 7) % 264
    perturbed[labels == -100] = -100  # the chat source's mask, applied to the perturbed targets

    def grads(lab):
        module.model.zero_grad()
        out, _ = module.model(batch["input_ids"], module.model.init_state(1))
        module._loss(out, lab)[0].backward()
        return torch.cat([p.grad.flatten() for p in module.model.parameters() if p.grad is not None])

    assert torch.equal(grads(labels), grads(perturbed))
    assert not torch.equal(grads(labels), grads(raw))  # unmasked, the user targets would train the model


def test_chat_source_truncates_counts_and_splits_by_conversation(tmp_path):
    from groundthink.data.chat import ChatDataSettings
    from groundthink.data.sources import TokenizerSettings, prepare_data

    path = write_chat(tmp_path / "c.jsonl", n=20)
    s = ChatDataSettings(path=str(path), max_tokens=30, batch_size=2, seq_len=16, val_batches=2)
    data = prepare_data(s, TokenizerSettings(), seed=1)
    st = data.stats
    assert st["conversations"] == {"train": 18, "val": 2}
    assert st["truncated"]["train"] == 18 and st["truncated"]["val"] == 2  # each is ~40 tokens > 30
    assert sum(st["tokens_by_role"]["train"].values()) == 18 * 30
    stream = data.make_train_stream(0, 1)
    first = [stream.next_batch(16) for _ in range(3)]
    stream2 = data.make_train_stream(0, 1)
    stream2.next_batch(16)
    position = stream2.state_dict()
    stream3 = data.make_train_stream(0, 1)
    stream3.load_state_dict(position)
    again = stream3.next_batch(16)
    assert all(torch.equal(again[k], first[1][k]) for k in first[1])
    (tmp_path / "bad.jsonl").write_text('{"text": "no messages"}\n')
    from groundthink.data.errors import DataError

    with pytest.raises(DataError, match="messages"):
        prepare_data(ChatDataSettings(path=str(tmp_path / "bad.jsonl")), TokenizerSettings(), seed=1)


# ----- real CLI ----------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def parent(tmp_path_factory) -> Path:
    return trained_tiny_run(tmp_path_factory)


def parent_assistant_loss(parent: Path, chat: Path, **data) -> float:
    """The parent's held-out assistant-token loss on exactly the SFT run's validation batches (same source,
    settings and seed), read with carried state as LMTrainingModule.validate does."""
    import groundthink
    from groundthink.data.chat import ChatDataSettings
    from groundthink.data.sources import TokenizerSettings, prepare_data
    from groundthink.training.module import LMTrainingModule
    from groundthink.training.settings import OptimSettings

    run = groundthink.load(parent)
    s = ChatDataSettings(path=str(chat), **data)
    prepared = prepare_data(s, TokenizerSettings(), seed=1234, tokenizer_dir=parent / "tokenizer",
                            reuse_tokenizer=True)
    module = LMTrainingModule(run.model, optim=OptimSettings(), max_steps=1, token_bytes=prepared.token_bytes)
    with torch.no_grad():
        return module.validate(prepared.val_batches)["val/loss"]


SFT = ["stage=sft", "logger=csv", "name=sft", "callbacks.progress_bar=false", "trainer.log_every_n_steps=1"]
# 8 steps, validation after 4 and 8, a short warmup: the SFT run shared by the loss, lineage and resume tests.
SFT_RUN = [*SFT, "trainer.max_steps=8", "trainer.val_every_n_steps=4", "callbacks.checkpoint.every_n_steps=100",
           "optim.lr=1e-3", "optim.warmup_steps=2"]


@pytest.fixture(scope="module")
def sft_run(parent, tmp_path_factory) -> tuple[Path, Path, list[str]]:
    root = tmp_path_factory.mktemp("sft_full")
    chat = write_chat(root / "chat.jsonl")
    args = [*SFT_RUN, f"init_from={parent}", f"data.path={chat}"]
    run_train(root, *args)
    (run,) = run_dirs(root, "sft")
    return run, chat, args


@pytest.mark.slow
def test_sft_from_the_tiny_run_lowers_heldout_assistant_loss_and_names_its_parent(parent, sft_run, tmp_path):
    run, chat, _ = sft_run
    summary = json.loads((run / "summary.json").read_text())
    sft_loss = summary["final"]["val/loss"]
    parent_loss = parent_assistant_loss(parent, chat, batch_size=4, seq_len=32, val_batches=2)
    print(f"held-out assistant-token loss: parent {parent_loss:.4f} -> SFT {sft_loss:.4f}")
    assert sft_loss < parent_loss - 0.1
    sidecar = json.loads((parent / "checkpoints" / "last.json").read_text())
    record = summary["parent"]
    assert record["run_id"] == parent.name.rsplit("_", 1)[1] and record["run_dir"] == str(parent.resolve())
    assert record["checkpoint_sha256"] == sidecar["integrity"]["sha256"] and record["step"] == 20
    child_sidecar = json.loads((run / "checkpoints" / "last.json").read_text())
    assert json.dumps(record, sort_keys=True) in json.dumps(child_sidecar, sort_keys=True)
    from groundthink.data.tokenizer import Tokenizer

    assert Tokenizer.load(run / "tokenizer").fingerprint == Tokenizer.load(parent / "tokenizer").fingerprint
    roles = summary["data_stats"]["tokens_by_role"]["train"]
    assert roles["assistant"] > 0 and roles["user"] > 0 and summary["data_stats"]["truncated"]["train"] == 0
    assert "truncated to data.max_tokens=4096: 0 train" in (run / "train.log").read_text()
    from groundthink.reporting.compare import main as compare

    assert compare([str(run), str(parent), "--out", str(tmp_path / "report"), "--no-plots"]) == 0
    rows = {r["run_id"]: r for r in csv.DictReader(open(tmp_path / "report" / "runs.csv"))}
    assert rows[summary["run_id"]]["parent"] == f"{record['run_id']}@20" and rows[record["run_id"]]["parent"] == ""


def test_init_from_mismatched_vocabulary_or_missing_parent_is_refused(tmp_path):
    from types import SimpleNamespace

    from omegaconf import OmegaConf

    from groundthink.data.sources import TokenizerSettings
    from groundthink.data.tokenizer import build_tokenizer
    from groundthink.training import lineage
    from groundthink.training.run import UserError

    with pytest.raises(UserError, match="stage=sft starts from a trained run: give init_from="):
        lineage.required(OmegaConf.create({"stage": "sft", "init_from": None}))
    assert lineage.required(OmegaConf.create({"stage": "pretrain", "init_from": None})) is None
    with pytest.raises(UserError, match="init_from=.*nowhere.*does not exist"):
        lineage.load_parent(str(tmp_path / "nowhere"), TokenizerSettings(), tmp_path / "tok", resume=False)
    fake = SimpleNamespace(tokenizer=build_tokenizer("char"))
    import groundthink.loading

    original = groundthink.loading.load
    groundthink.loading.load = lambda path: fake
    try:
        with pytest.raises(UserError, match="vocabulary mismatch: parent tokenizer char with 264 ids, this run asks "
                                            "for tokenizer.kind=bpe vocab_size=300"):
            lineage.load_parent("p", TokenizerSettings(kind="bpe", vocab_size=300), tmp_path / "tok", resume=False)
        assert not (tmp_path / "tok").exists()
        lineage.load_parent("p", TokenizerSettings(), tmp_path / "tok", resume=False)
        assert (tmp_path / "tok").is_dir()
    finally:
        groundthink.loading.load = original


@pytest.mark.slow
def test_init_from_mismatched_shape_fails_before_training_with_one_line(parent, tmp_path):
    chat = write_chat(tmp_path / "chat.jsonl", n=10)
    proc = run_train(tmp_path, *SFT, f"data.path={chat}", f"init_from={parent}", "model.n_layers=3", expect_rc=1)
    error = [line for line in proc.stderr.splitlines() if line.startswith("Error:")]
    assert len(error) == 1, proc.stderr[-2000:]
    assert "model shape mismatch" in error[0] and "n_layers: parent 2 vs this run 3" in error[0]
    assert run_dirs(tmp_path, "sft") == [] and "Epoch" not in proc.stderr


@pytest.mark.slow
def test_sft_resume_after_sigterm_is_exact(sft_run, tmp_path):
    full, _, args = sft_run
    run_train(tmp_path, *args, "faults.sigterm_at_step=4", expect_rc=None)
    (part,) = run_dirs(tmp_path, "sft")
    assert json.loads((part / "summary.json").read_text())["status"] == "interrupted"
    run_train(tmp_path, *args, f"resume={part}")
    a, b = _losses(full), _losses(part)
    assert sorted(b) == list(range(1, 9))
    diff = max(abs(a[s] - b[s]) for s in a)
    print(f"SFT resume after SIGTERM: max |train loss diff| {diff:.3g}")
    assert diff <= 1e-6
    assert _losses(part, "val/loss")[8] == pytest.approx(_losses(full, "val/loss")[8], abs=1e-6)
    assert json.loads((part / "summary.json").read_text())["parent"]["run_id"] is not None


@pytest.mark.slow
def test_chain_pretrain_datagen_sft_eval_through_the_clis(parent, tmp_path):
    """pretrain (the shared tiny run) -> groundthink-datagen with it as backend, QC'd -> SFT from it on datagen's
    data/ -> groundthink-eval on the SFT run; each step reads only the previous step's files."""
    gen = run_cli(tmp_path, "groundthink.datagen", "pipeline=responses", "prompts=demo", "backend=groundthink",
                  "backend.num_threads=1", "pipeline.max_tokens=24", "guard.sentinel_tokens=4", "name=chain",
                  f"backend.run={parent}", "count=12", expect_rc=None)
    out = tmp_path / "outputs" / "datagen" / "chain"
    # A 20-step model does not end its answers: QC runs and fails (exit 1) on length, the records are still written.
    assert gen.returncode in (0, 1) and json.loads((out / "qc_summary.json").read_text())["verdict"], gen.stderr[-3000:]
    rows = [json.loads(x) for p in sorted((out / "data").glob("*.jsonl")) for x in p.read_text().splitlines()]
    assert len(rows) >= 8 and all(r["messages"][-1]["role"] == "assistant" for r in rows)
    assert {r["generator"]["run"] for r in rows} == {str(parent)}  # the data names the run that generated it
    run_train(tmp_path, *SFT, f"init_from={parent}", f"data.path={out / 'data'}", "data.batch_size=2",
              "data.seq_len=16", "data.val_fraction=0.25", "trainer.max_steps=4", "trainer.val_every_n_steps=4")
    (sft,) = run_dirs(tmp_path, "sft")
    summary = json.loads((sft / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["parent"]["run_dir"] == str(parent.resolve())
    assert sum(summary["data_stats"]["conversations"].values()) == len(rows)
    run_cli(tmp_path, "groundthink.evaluate", f"run={sft}", "eval=lm", "eval.tasks.lm.max_tokens=64", "threads=1",
            "progress=false")
    assert math.isfinite(eval_metrics(sft, "lm")["eval/lm/loss_carried"])  # the held-out conversations, all tokens
