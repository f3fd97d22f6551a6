"""Recall tasks as training data (data=mqar, data=passkey), val/acc, the early stop, the mixers' state sizes, and
the accuracy side of groundthink-compare (higher is better, --best-of, the state-size plot).

The end-to-end tests drive groundthink-train and groundthink-eval through their command lines on a 2-layer, 32-wide
model for a few steps; the learning itself (>= 0.99 accuracy) is measured by the reduced sweep in
experiments/mqar-recall/, not here.
"""

from __future__ import annotations

import csv
import json
import math
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from groundthink.data.errors import DataError
from groundthink.data.recall import (
    MQARDataSettings,
    MQARSource,
    MQARStream,
    PasskeyDataSettings,
    PasskeySource,
)
from groundthink.data.sources import TokenizerSettings
from groundthink.models import HybridLM
from groundthink.models.presets import preset
from tests.conftest import REPO, eval_metrics, run_cli, run_train

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
SMALL = ["model=tiny", "model.d_model=32", "trainer.max_steps=6", "trainer.val_every_n_steps=3",
         "callbacks.checkpoint.every_n_steps=3", "logger=csv"]


# ----- the data ------------------------------------------------------------------------------------------------
def test_mqar_stream_resumes_exactly_and_resets_every_lane():
    s = MQARDataSettings(batch_size=4, seq_len=32, num_kv_pairs=4, vocab_size=64)
    stream = MQARStream(s, seed=3)
    first = [stream.next_batch(32) for _ in range(3)]
    saved = stream.state_dict()
    after = stream.next_batch(32)
    again = MQARStream(s, seed=3)
    again.load_state_dict(saved)
    assert torch.equal(again.next_batch(32)["input_ids"], after["input_ids"])
    assert not torch.equal(first[0]["input_ids"], first[1]["input_ids"])  # new examples every batch
    for b in first:
        assert b["reset"].all()  # every example starts from a fresh state
        assert ((b["labels"] != -100).sum(1) == 4).all()  # one query per key
        values = b["labels"][b["labels"] != -100]
        assert ((values >= 32) & (values < 64)).all()  # values live in the upper half of the vocabulary
    # the value of each query is the value paired with its key in the context
    ids, labels = first[0]["input_ids"][0], first[0]["labels"][0]
    pairs = {int(ids[2 * i]): int(ids[2 * i + 1]) for i in range(4)}
    for t in torch.nonzero(labels != -100).flatten().tolist():
        assert pairs[int(ids[t])] == int(labels[t])


def test_mqar_fixed_training_set_is_read_once_per_epoch_and_kv_curriculum_switches():
    s = MQARDataSettings(batch_size=5, seq_len=32, num_kv_pairs=4, vocab_size=64, train_examples=10,
                         kv_curriculum=[[0, 2], [2, 4]])
    stream = MQARStream(s, seed=0)
    batches = [stream.next_batch(32) for _ in range(4)]
    assert [int((b["labels"] != -100).sum(1)[0]) for b in batches] == [2, 2, 4, 4]
    epoch = torch.cat([b["input_ids"] for b in batches[2:]])  # the kv=4 set: 10 examples, each once
    assert len({tuple(row.tolist()) for row in epoch}) == 10


def test_mqar_and_passkey_refuse_impossible_settings_with_the_fix():
    tok = TokenizerSettings()
    with pytest.raises(DataError, match=r"seq_len=32 is too short for 16 kv pairs.*raise data.seq_len"):
        MQARSource().prepare(MQARDataSettings(seq_len=32, num_kv_pairs=16), tok, seed=0)
    with pytest.raises(DataError, match=r"vocab_size=16 is too small for 8 kv pairs.*at least 18"):
        MQARSource().prepare(MQARDataSettings(seq_len=64, num_kv_pairs=8, vocab_size=16), tok, seed=0)
    with pytest.raises(DataError, match="kv_curriculum ends at 2 kv pairs"):
        MQARSource().prepare(MQARDataSettings(kv_curriculum=[[0, 2]]), tok, seed=0)
    with pytest.raises(DataError, match="passkey vocab_size=12 is too small"):
        PasskeySource().prepare(PasskeyDataSettings(vocab_size=12), tok, seed=0)
    with pytest.raises(DataError, match="data.distances"):
        PasskeySource().prepare(PasskeyDataSettings(distances=[]), tok, seed=0)


def test_passkey_documents_span_segments_and_label_only_the_answer_digits():
    s = PasskeyDataSettings(batch_size=2, seq_len=16, distances=[4, 40], passkey_len=3, vocab_size=32,
                            train_examples=4, val_batches=1)
    data = PasskeySource().prepare(s, TokenizerSettings(), seed=0)
    assert data.tokenizer is None and data.vocab_size == 32 and data.accuracy
    stream = data.make_train_stream(0, 1)
    digits = set(range(32 - 12, 32 - 2))
    labelled = 0
    lanes = [[] for _ in range(2)]
    for _ in range(12):
        b = stream.next_batch(16)
        for lane in range(2):
            if b["reset"][lane]:
                lanes[lane].append(0)
            mask = b["labels"][lane] != -100
            lanes[lane][-1] += int(mask.sum())
            assert set(b["labels"][lane][mask].tolist()) <= digits
            # a label is the next input token (within the segment)
            for t in torch.nonzero(mask[:-1]).flatten().tolist():
                assert int(b["labels"][lane][t]) == int(b["input_ids"][lane][t + 1])
            labelled += int(mask.sum())
    assert labelled > 0
    assert all(n in (0, 3) for lane in lanes for n in lane[:-1])  # 3 answer digits per finished document
    lengths = data.make_train_stream(0, 1).docs
    assert sorted({lengths.length(i) for i in range(len(lengths))}) == [16, 64]  # 4 and 40 filler -> 1 and 4 segments


def test_val_acc_is_the_argmax_accuracy_at_the_labelled_positions_by_hand():
    from groundthink.models import ModelConfig
    from groundthink.training.module import LMTrainingModule
    from groundthink.training.settings import OptimSettings

    torch.manual_seed(0)
    model = HybridLM(ModelConfig.from_dict(dict(vocab_size=64, d_model=32, n_layers=1, pattern="R", ffn_mult=2.0)))
    module = LMTrainingModule(model, optim=OptimSettings(), max_steps=1, token_bytes=None, val_accuracy=True)
    data = MQARSource().prepare(MQARDataSettings(batch_size=4, seq_len=32, num_kv_pairs=4, vocab_size=64,
                                                 val_batches=2), TokenizerSettings(), seed=0)
    metrics = module.validate(data.val_batches)
    hits = total = 0
    with torch.no_grad():
        for b in data.val_batches:  # each example from a fresh state, every position scored by hand
            for ids, labels in zip(b["input_ids"], b["labels"]):
                logits, _ = model(ids[None], model.init_state(1, ids.device))
                for t in range(32):
                    if labels[t] != -100:
                        hits += int(int(logits[0, t].argmax()) == int(labels[t]))
                        total += 1
    assert total == 2 * 4 * 4 and metrics["val/acc"] == hits / total
    assert "val/acc" not in LMTrainingModule(model, optim=OptimSettings(), max_steps=1,
                                             token_bytes=None).validate(data.val_batches)


def test_early_stop_rule_directions_and_an_unknown_metric():
    from types import SimpleNamespace

    from groundthink.training.callbacks import Validation
    from groundthink.training.settings import EarlyStopSettings

    def check(rule: EarlyStopSettings, metrics: dict, step: int = 10) -> tuple[bool, object]:
        trainer, module = SimpleNamespace(should_stop=False), SimpleNamespace(stopped_early=None)
        Validation(10, 100, [{}], early_stop=rule)._maybe_stop(trainer, module, metrics, step)
        return trainer.should_stop, module.stopped_early

    assert check(EarlyStopSettings(target=0.9), {"val/acc": 0.95}) == (
        True, {"step": 10, "metric": "val/acc", "value": 0.95, "target": 0.9})
    assert check(EarlyStopSettings(target=0.9), {"val/acc": 0.85})[0] is False
    assert check(EarlyStopSettings(metric="val/loss", target=1.0), {"val/loss": 0.9})[0] is True  # lower is better
    assert check(EarlyStopSettings(metric="val/loss", target=1.0), {"val/loss": 1.1})[0] is False
    assert check(EarlyStopSettings(target=0.9), {"val/acc": 0.95}, step=100)[0] is False  # the last step ends anyway
    assert check(EarlyStopSettings(), {"val/acc": 1.0})[0] is False  # no target: off
    with pytest.warns(UserWarning, match="early_stop.metric=val/accuracy is not a validation metric"):
        assert check(EarlyStopSettings(metric="val/accuracy", target=0.9), {"val/acc": 1.0})[0] is False
    with pytest.raises(ValueError, match="early_stop.metric='acc' is not a validation metric"):
        Validation(10, 100, [{}], early_stop=EarlyStopSettings(metric="acc"))
    with pytest.raises(ValueError, match="needs validation: set trainer.val_every_n_steps > 0"):
        Validation(0, 100, [{}], early_stop=EarlyStopSettings(target=0.9))


# ----- state sizes -----------------------------------------------------------------------------------------------
def test_state_sizes_match_a_hand_count():
    """d_model 64, 2 layers, the tiny preset's mixer settings; counts per layer written out by hand."""
    def sizes(pattern: str, seq_len: int | None = None) -> dict:
        return HybridLM(preset("tiny").replace(vocab_size=64, pattern=pattern)).state_sizes(seq_len)

    shift = 64  # the RWKV channel-mix FFN's token shift: one d_model vector
    rwkv = 2 * 32 * 32 + 64  # 2 heads of 32: a 32x32 WKV matrix each, plus the time-mix token shift
    mamba = 4 * 32 * 16 + 3 * (128 + 2 * 16)  # d_inner 128 = 4 heads of 32, N 16; conv tail: 3 x (x, B, C) channels
    gla = 4 * 8 * 16  # 4 heads; keys 64 x 0.5 / 4 = 8, values 64 / 4 = 16
    attention = 2 * 2 * 64 * 32 + 64  # K and V for the 64-token window, 2 heads of 32, and the window's valid flags
    assert sizes("R")["per_layer"] == [rwkv + shift] * 2
    assert sizes("M")["per_layer"] == [mamba + shift] * 2
    assert sizes("G")["per_layer"] == [gla + shift] * 2
    assert sizes("H")["per_layer"] == [rwkv + mamba + shift] * 2
    assert sizes("A")["per_layer"] == [attention + shift] * 2
    # a 16-token sequence fills only 16 window positions; the recurrent states do not depend on the length
    assert sizes("A", 16)["per_layer"] == [2 * 2 * 16 * 32 + 16 + shift] * 2
    assert sizes("R", 16)["total"] == sizes("R")["total"] == 2 * (rwkv + shift)
    assert sizes("H")["by_mixer"] == {"rwkv": 2 * rwkv, "mamba": 2 * mamba, "ffn": 2 * shift}


@pytest.mark.slow
def test_recall_sweep_cells_are_valid_and_the_generated_files_are_current():
    sys.path.insert(0, str(REPO / "sweeps"))
    try:
        import recall_grid
    finally:
        sys.path.pop(0)
    cells = recall_grid.mqar_cells()
    assert all(t >= 4 * kv for t, kv in cells) and len(cells) == 17
    for t, kv in cells:
        path = REPO / "conf" / "mqar_cell" / f"T{t}_kv{kv}.yaml"
        assert path.read_text() == recall_grid.render_cell(t, kv)
        assert yaml.safe_load(path.read_text())["data"] == {"seq_len": t, "num_kv_pairs": kv}
    cfg, n = recall_grid.state_matched("R", 16384)
    committed = yaml.safe_load((REPO / "conf" / "model" / "state" / "r_16k.yaml").read_text())
    assert committed["d_model"] == cfg.d_model and abs(n / 16384 - 1) < 0.1
    cfg, n = recall_grid.state_matched("A", 4096)
    assert abs(n / 4096 - 1) < 0.05 and cfg.mixers["attention"].window < 64


# ----- through the command lines ---------------------------------------------------------------------------------
@pytest.mark.slow
def test_mqar_run_logs_val_acc_stops_early_and_evaluates(tmp_path):
    """data=mqar through groundthink-train: val/acc in metrics.csv and summary.json (best = the highest), the early
    stop ends the run at the first validation that reaches its target and keeps a last checkpoint there, the state
    size is recorded, and groundthink-eval's mqar task scores the run (which has no tokenizer)."""
    run_train(tmp_path, "data=mqar", *SMALL, "data.batch_size=8", "data.seq_len=32", "data.vocab_size=64",
              "data.val_batches=2", "callbacks.early_stop.target=0.0", fast=False)
    (run,) = (tmp_path / "outputs" / "default").iterdir()
    summary = json.loads((run / "summary.json").read_text())
    assert summary["stopped_early"] == {"step": 3, "metric": "val/acc", "value": summary["final"]["val/acc"],
                                        "target": 0.0}
    assert summary["step"] == 3 and json.loads((run / "checkpoints" / "last.json").read_text())["step"] == 3
    rows = list(csv.DictReader(open(run / "metrics.csv")))
    accs = [float(r["val/acc"]) for r in rows if r.get("val/acc")]
    assert len(accs) == 1 and 0.0 <= accs[0] <= 1.0 and summary["best"]["val/acc"] == max(accs)
    assert summary["state_size"]["total"] == HybridLM(
        preset("tiny").replace(vocab_size=64, d_model=32)).state_size(32)
    assert not (run / "tokenizer").exists()

    import groundthink

    loaded = groundthink.load(run)
    assert loaded.tokenizer is None and loaded.model_config.vocab_size == 64
    run_cli(tmp_path, "groundthink.evaluate", f"run={run}", "eval=mqar", "eval.tasks.mqar.seq_lens=[32]",
            "eval.tasks.mqar.kv_pairs=[2,4]", "eval.tasks.mqar.examples=8", "progress=false", "wandb.mode=disabled")
    assert set(eval_metrics(run, "mqar")) >= {"eval/mqar/acc_T32_kv2", "eval/mqar/acc_T32_kv4", "eval/mqar/acc_mean"}


@pytest.mark.slow
def test_passkey_run_carries_state_and_evaluates_at_the_token_level(tmp_path):
    run_train(tmp_path, "data=passkey", *SMALL, "data.batch_size=4", "data.seq_len=16", "data.distances=[4,40]",
              "data.vocab_size=32", "data.train_examples=64", "data.val_batches=1", fast=False)
    (run,) = (tmp_path / "outputs" / "default").iterdir()
    summary = json.loads((run / "summary.json").read_text())
    assert summary["status"] == "completed" and "val/acc" in summary["final"]
    run_cli(tmp_path, "groundthink.evaluate", f"run={run}", "eval=passkey", "eval.tasks.passkey.distances=[4,40]",
            "eval.tasks.passkey.samples=4", "progress=false", "wandb.mode=disabled")
    metrics = eval_metrics(run, "passkey", short=True)
    assert {"acc_d4", "acc_d40", "key_acc_d40", "acc_mean"} <= set(metrics) and metrics["chance"] == 0.1
    assert all(0.0 <= metrics[k] <= 1.0 for k in ("acc_d4", "acc_d40"))


# ----- groundthink-compare with accuracies -------------------------------------------------------------------------
def _job(sweep: Path, num: int, pattern: str, kv: int, lr: str, seed: int, acc: float, state: int) -> None:
    job = sweep / f"{num}_job"
    (job / ".hydra").mkdir(parents=True)
    overrides = [f"model.pattern={pattern}", f"mqar_cell=T64_kv{kv}", f"optim.lr={lr}", f"seed={seed}"]
    (job / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump(overrides))
    model = {"pattern": pattern, **({"new_setting": 1} if seed == 2 else {})}  # seed 1 predates a new setting
    config = {"seed": seed, "model": model, "data": {"num_kv_pairs": kv}}  # num_kv_pairs follows mqar_cell
    (job / "config.yaml").write_text(yaml.safe_dump(config))
    with open(job / "metrics.csv", "w") as f:
        f.write("step,val/loss,val/acc\n")
        f.write(f"100,{4.0 - acc},{acc / 2}\n200,{3.0 - acc},{acc}\n300,{3.1 - acc},{acc - 0.01}\n")
    summary = {"status": "completed", "step": 300, "final": {}, "best": {}, "num_params": 1000, "tokens_per_s": 1.0,
               "state_size": {"total": state}}
    (job / "summary.json").write_text(json.dumps(summary))


@pytest.mark.slow
def test_compare_takes_the_best_accuracy_and_the_best_learning_rate(tmp_path, capsys):
    from groundthink.reporting.compare import main

    sweep = tmp_path / "sweep"
    rng = np.random.default_rng(0)
    truth: dict[tuple[str, int], dict[str, list[float]]] = {}
    num = 0
    for pattern, state in (("A", 16640), ("R", 4352)):
        for kv in (4, 16):
            for lr in ("1e-3", "3e-3"):
                for seed in (1, 2):
                    acc = float(rng.uniform(0.2, 0.9))
                    truth.setdefault((pattern, kv), {}).setdefault(lr, []).append(acc - 0.01)  # final = last row
                    _job(sweep, num, pattern, kv, lr, seed, acc, state)
                    num += 1
    out = tmp_path / "report"
    assert main([str(sweep), "--out", str(out), "--best-of", "optim.lr"]) == 0
    cells = {(r["model.pattern"], r["mqar_cell"]): r for r in csv.DictReader(open(out / "cells.csv"))}
    assert len(cells) == 4
    for (pattern, kv), by_lr in truth.items():
        best_lr = max(by_lr, key=lambda lr: np.mean(by_lr[lr]))
        row = cells[(pattern, f"T64_kv{kv}")]
        assert row["best_optim.lr"] == best_lr and row["n_runs"] == "2"  # the missing key did not split the seeds
        assert "num_kv_pairs" not in row["cell"] and "data.num_kv_pairs" not in row  # determined by mqar_cell
        assert math.isclose(float(row["final_val_acc_mean"]), float(np.mean(by_lr[best_lr])), rel_tol=1e-12)
        assert math.isclose(float(row["best_val_acc_mean"]), float(np.mean(by_lr[best_lr])) + 0.01, rel_tol=1e-12)
    report = (out / "report.md").read_text()
    assert "| best optim.lr |" in report and "final val/acc" in report and "state size" in report
    for name in ("val_acc.png", "val_acc_vs_state_size.png", "axis_mqar_cell.png"):
        assert (out / name).read_bytes()[:8] == PNG_MAGIC, name
    assert main([str(sweep), "--out", str(out), "--best-of", "optim.momentum"]) == 2
    assert "no cell varies optim.momentum" in capsys.readouterr().err
