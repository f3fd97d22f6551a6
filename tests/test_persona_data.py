"""data=persona: synthetic persona conversations (groundthink/data/persona.py) — their structure, determinism, the
assistant-only loss mask, bad settings, and (slow) a run through groundthink-train then groundthink-eval's persona
task. Whether training on them teaches the probe's skill is measured in experiments/persona-recall/, not here."""

from __future__ import annotations

import json
import random
import re

import pytest

from groundthink.data.errors import DataError
from groundthink.data.persona import PROBES, STATEMENT, VALUES, PersonaDataSettings, PersonaSource, persona_conversation
from groundthink.data.sources import TokenizerSettings
from groundthink.data.stream import IGNORE_INDEX
from tests.conftest import eval_metrics, run_cli, run_train


def test_a_conversation_states_a_persona_then_asks_every_question_once_answered_from_it():
    for seed in range(20):
        msgs = persona_conversation(random.Random(seed), max_filler_turns=3)
        assert msgs[0]["role"] == "persona"
        stated = msgs[0]["content"]
        pattern = re.escape(STATEMENT)
        for attr in VALUES:
            pattern = pattern.replace(re.escape("{" + attr + "}"), f"(?P<{attr}>.+?)")
        persona = re.fullmatch(pattern, stated).groupdict()
        assert all(persona[a] in values for a, values in VALUES.items())
        asked = [i for i, m in enumerate(msgs) if m["role"] == "user" and m["content"] in
                 {q for q, _, _ in PROBES.values()}]
        assert len(asked) == len(PROBES)
        by_question = {q: (a, prefix, fmt) for a, (q, prefix, fmt) in PROBES.items()}
        for i in asked:
            attr, prefix, fmt = by_question[msgs[i]["content"]]
            assert msgs[i + 1] == {"role": "assistant", "content": prefix + fmt.format(persona[attr])}
        gaps = [b - a - 2 for a, b in zip([-1, *asked], asked)]  # messages between questions (pairs of filler)
        assert all(g % 2 == 0 and 0 <= g // 2 <= 3 for g in [asked[0] - 1, *gaps[1:]])
        assert [m["role"] for m in msgs[1:]] == ["user", "assistant"] * ((len(msgs) - 1) // 2)


def test_prepare_is_deterministic_and_the_loss_is_on_assistant_answers_only():
    settings = PersonaDataSettings(conversations=40, batch_size=2, seq_len=64, val_batches=4, val_fraction=0.1)
    a = PersonaSource().prepare(settings, TokenizerSettings(), seed=3)
    b = PersonaSource().prepare(settings, TokenizerSettings(), seed=3)
    assert a.stats == b.stats and a.stats["conversations"] == {"train": 36, "val": 4}
    tok = a.tokenizer
    stream_a, stream_b = a.make_train_stream(0, 1), b.make_train_stream(0, 1)
    assistant = tok.encode("<|assistant|>")[0]
    roles = {tok.encode(r)[0] for r in ("<|persona|>", "<|user|>", "<|assistant|>", "<|system|>")}
    targets = 0
    for _ in range(12):
        batch_a, batch_b = stream_a.next_batch(64), stream_b.next_batch(64)
        assert all((batch_a[k] == batch_b[k]).all() for k in ("input_ids", "labels"))
        for ids, labels in zip(batch_a["input_ids"].tolist(), batch_a["labels"].tolist()):
            last_role = None  # a kept label continues an assistant turn: the last role token before it
            for t, (tid, label) in enumerate(zip(ids, labels)):
                last_role = tid if tid in roles else last_role
                if label != IGNORE_INDEX and last_role is not None:
                    assert last_role == assistant, f"position {t} carries loss outside an assistant turn"
                targets += label != IGNORE_INDEX
    assert 0 < targets < 12 * 2 * 64
    # every held-out conversation renders the probe's answer format
    assert all("My name is " in t and "<|persona|>Your name is " in t for t in a.val_texts)


def test_persona_data_refuses_bad_settings_with_the_fix():
    tok = TokenizerSettings()
    for bad, match in [({"role": "narrator"}, "data.role=narrator: persona or system"),
                       ({"max_filler_turns": -1}, "data.max_filler_turns=-1 must be >= 0"),
                       ({"conversations": 1}, "data.conversations=1: at least 2"),
                       ({"val_fraction": 1.0}, r"data.val_fraction=1.0 must be in \[0, 1\)")]:
        with pytest.raises(DataError, match=match):
            PersonaSource().prepare(PersonaDataSettings(**bad), tok, seed=0)
    with pytest.warns(UserWarning, match="reach no assistant token .* raise data.val_batches or data.seq_len"):
        PersonaSource().prepare(PersonaDataSettings(conversations=40, batch_size=2, seq_len=32, val_batches=1,
                                                    val_fraction=0.1), tok, seed=0)
    with pytest.raises(DataError, match="fewer than one batch needs"):
        PersonaSource().prepare(PersonaDataSettings(conversations=3, batch_size=64, seq_len=512), tok, seed=0)


@pytest.mark.slow
def test_persona_run_trains_through_the_cli_and_the_persona_task_scores_it(tmp_path):
    run_train(tmp_path, "data=persona", "model=tiny", "model.d_model=32", "trainer.max_steps=4",
              "trainer.val_every_n_steps=2", "data.conversations=60", "data.batch_size=4", "data.seq_len=64",
              "data.val_batches=4", "logger=csv", fast=False)
    (run,) = (tmp_path / "outputs" / "default").iterdir()
    summary = json.loads((run / "summary.json").read_text())
    assert summary["status"] == "completed" and "val/loss" in summary["final"]
    run_cli(tmp_path, "groundthink.evaluate", f"run={run}", "eval=persona", "eval.tasks.persona.distances=[0,32]",
            "eval.tasks.persona.personas=2", "progress=false", "wandb.mode=disabled")
    metrics = eval_metrics(run, "persona", short=True)
    assert {"acc_d0", "acc_d32", "acc_mean"} <= set(metrics) and metrics["chance"] == 0.25


def test_the_persona_probe_at_a_distance_does_not_depend_on_the_other_distances(tmp_path):
    """Each persona's filler comes from its own seeded stream, so asking for a longer distance as well leaves the
    conversation (and score) at the shorter ones unchanged."""
    import csv
    from types import SimpleNamespace

    import torch

    from groundthink.data.tokenizer import build_tokenizer
    from groundthink.evaluation.tasks.persona import PersonaSettings, PersonaTask
    from groundthink.models import HybridLM
    from groundthink.models.presets import preset

    torch.manual_seed(0)
    tok = build_tokenizer("char")
    loaded = SimpleNamespace(tokenizer=tok, model=HybridLM(preset("tiny").replace(vocab_size=tok.vocab_size)).eval())
    bar = SimpleNamespace(update=lambda n=1: None, close=lambda: None)
    rows = {}
    for name, distances in (("short", [0, 40]), ("long", [0, 40, 150])):
        settings = PersonaSettings(distances=distances, personas=2)
        PersonaTask().check(loaded, settings)
        out = tmp_path / name
        out.mkdir()
        with torch.no_grad():
            PersonaTask().run(loaded, settings, out, lambda total, desc: bar)
        rows[name] = {r["distance"]: r for r in csv.DictReader(open(out / "persona.csv"))}
    for d in ("0", "40"):
        assert rows["short"][d] == rows["long"][d]
    assert float(rows["long"]["150"]["mean_tokens_since_persona"]) >= 150
