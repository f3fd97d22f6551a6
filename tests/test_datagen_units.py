"""Units of groundthink-datagen: the exactly-once store, retries and the runner, critics, QC, prompt sets, text
checks, the contamination guard (GroundThink tokenizer and a tiny local Hugging Face model), the backends' result
parsing, and every option of its config groups composing against conf/datagen.yaml."""

from __future__ import annotations

import asyncio
import json
import math
from pathlib import Path

import pytest
import torch

from groundthink.datagen.backends.base import (
    CompletionResult,
    FatalBackendError,
    LabelLogprobs,
    RequestRejected,
    RetryableError,
    logsumexp,
)
from groundthink.datagen.critics import CriticSettings, judge
from groundthink.datagen.prompts import PromptSetError, load_prompt_set
from groundthink.datagen.qc import QCError, evaluate
from groundthink.datagen.runner import PhaseAborted, RetrySettings, Task, WaitRetryAfterOrBackoff, run_phase
from groundthink.datagen.store import RejectsLog, RunLock, ShardedStore, StoreError
from groundthink.datagen.text import clean_at_delimiters, is_repetitive, is_runaway

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# ----- store -----------------------------------------------------------------------------------------------------
def test_store_appends_reopens_and_rolls_shards(tmp_path):
    store = ShardedStore(tmp_path, "data", shard_size=3).open()
    for i in range(7):
        store.append({"id": f"r{i}", "x": i})
    store.close()
    assert [p.name for p in store.shards()] == ["data-00000.jsonl", "data-00001.jsonl", "data-00002.jsonl"]
    again = ShardedStore(tmp_path, "data", shard_size=3).open()
    assert again.done == {f"r{i}" for i in range(7)}
    again.append({"id": "r7"})
    again.append({"id": "r8"})
    again.append({"id": "r9"})
    again.close()
    sizes = [len(p.read_text().splitlines()) for p in again.shards()]
    assert sizes == [3, 3, 3, 1]
    with pytest.raises(StoreError, match="already stored"):
        ShardedStore(tmp_path, "data", shard_size=3).open().append({"id": "r3"})


@pytest.mark.parametrize("tail", [b'{"id": "r2", "x": ', b'{"id": "r2", "x": 2}', b'{"id": "r2", "x": 2\n'])
def test_torn_last_line_is_cut_and_reported(tmp_path, tail):
    path = tmp_path / "data-00000.jsonl"
    path.write_bytes(b'{"id": "r0"}\n{"id": "r1"}\n' + tail)
    store = ShardedStore(tmp_path, "data").open()
    assert store.done == {"r0", "r1"}
    assert store.repairs and store.repairs[0].torn_bytes == len(tail)
    assert path.read_bytes() == b'{"id": "r0"}\n{"id": "r1"}\n'
    store.append({"id": "r2"})
    store.close()
    assert [json.loads(line)["id"] for line in path.read_text().splitlines()] == ["r0", "r1", "r2"]


def test_corruption_in_the_middle_and_duplicates_are_refused(tmp_path):
    (tmp_path / "data-00000.jsonl").write_text('{"id": "a"}\nnot json\n{"id": "b"}\n')
    with pytest.raises(StoreError, match=r"data-00000.jsonl:2"):
        ShardedStore(tmp_path, "data").open()
    (tmp_path / "data-00000.jsonl").write_text('{"id": "a"}\n{"id": "a"}\n')
    with pytest.raises(StoreError, match="already in an earlier line"):
        ShardedStore(tmp_path, "data").open()


def test_run_lock_refuses_a_second_writer(tmp_path):
    first = RunLock(tmp_path).acquire()
    with pytest.raises(StoreError, match="another groundthink-datagen"):
        RunLock(tmp_path).acquire()
    first.release()
    RunLock(tmp_path).acquire().release()


# ----- retries and the runner -----------------------------------------------------------------------------------------
def test_retry_after_parsing():
    from groundthink.datagen.backends.openai_http import parse_retry_after

    assert parse_retry_after({"retry-after": "3"}) == 3.0
    assert parse_retry_after({"retry-after": "0.25"}) == 0.25
    assert parse_retry_after({"retry-after-ms": "1500", "retry-after": "9"}) == 1.5
    assert parse_retry_after({"retry-after": "Wed, 21 Oct 2015 07:28:00 GMT"}, now=1445412470.0) == 10.0
    assert parse_retry_after({"retry-after": "soon"}) is None and parse_retry_after({}) is None


def test_wait_honours_retry_after_else_backs_off_within_cap():
    class Outcome:
        def __init__(self, exc):
            self._exc = exc

        def exception(self):
            return self._exc

    class State:
        def __init__(self, exc, attempt):
            self.outcome, self.attempt_number = Outcome(exc), attempt

    wait = WaitRetryAfterOrBackoff(RetrySettings(initial_wait_s=0.5, max_wait_s=4.0, max_retry_after_s=30.0))
    assert wait(State(RetryableError("x", retry_after=7.0), 1)) == 7.0
    assert wait(State(RetryableError("x", retry_after=99.0), 1)) == 30.0
    waits = [wait(State(RetryableError("x"), n)) for n in range(1, 12) for _ in range(5)]
    assert all(0 <= w <= 4.0 for w in waits) and max(waits) > 0.5


def _run(tasks, work, tmp_path, **retry):
    store = ShardedStore(tmp_path / "d", "data").open()
    rejects = RejectsLog(tmp_path / "rejects.jsonl").open()
    settings = RetrySettings(initial_wait_s=0.0, max_wait_s=0.0, **retry)
    try:
        stats = asyncio.run(run_phase("p", tasks, work, store, rejects, concurrency=4, retry=settings,
                                      progress_every_s=1e9))
    finally:
        store.close()
        rejects.close()
    return stats, store, rejects


def test_runner_retries_rejects_and_skips_done(tmp_path):
    calls: dict[str, int] = {}

    async def work(task, attempts):
        async def once():
            calls[task.id] = calls.get(task.id, 0) + 1
            if task.payload == "flaky" and calls[task.id] < 3:
                raise RetryableError("try later", reason="http_500")
            if task.payload == "dead":
                raise RetryableError("never", reason="connection")
            if task.payload == "bad":
                raise RequestRejected("too long", reason="context_length")
            return {"id": task.id, "attempts": None}

        record = await attempts.call(once)
        record["attempts"] = attempts.count
        return record

    tasks = [Task("ok", "ok"), Task("flaky", "flaky"), Task("dead", "dead"), Task("bad", "bad")]
    stats, store, rejects = _run(tasks, work, tmp_path, max_attempts=4)
    assert store.done == {"ok", "flaky"} and stats.written == 2 and stats.rejected == 2
    by_id = {e["id"]: e for e in rejects.entries}
    assert by_id["dead"]["reason"] == "gave_up:connection" and by_id["dead"]["attempts"] == 4
    assert by_id["bad"]["reason"] == "context_length" and by_id["bad"]["attempts"] == 1
    records = {r["id"]: r for r in ShardedStore(tmp_path / "d", "data").open().records()}
    assert records["flaky"]["attempts"] == 3 and stats.retries == 2 + 3
    # A second run skips what is done and retries only the rejected ids.
    calls.clear()
    stats, _, _ = _run(tasks, work, tmp_path, max_attempts=4)
    assert stats.skipped == 2 and set(calls) == {"dead", "bad"}


def test_runner_stops_on_fatal_errors_and_on_failure_streaks(tmp_path):
    async def fatal(task, attempts):
        raise FatalBackendError("bad key")

    with pytest.raises(PhaseAborted, match="bad key"):
        _run([Task(f"t{i}") for i in range(5)], fatal, tmp_path / "a")

    async def always_rejected(task, attempts):
        raise RequestRejected("nope")

    with pytest.raises(PhaseAborted, match="in a row failed"):
        _run([Task(f"t{i}") for i in range(50)], always_rejected, tmp_path / "b", abort_after_failures=5)


# ----- critics ----------------------------------------------------------------------------------------------------
CRITIC = CriticSettings(spellings={"A": ["A", " A"], "B": ["B", " B"]}, min_margin=1.0).validate()


def test_critic_decision_is_the_sign_of_the_log_probability_difference():
    scores = LabelLogprobs(logp={"A": logsumexp([-0.1, -2.5]), "B": logsumexp([-3.7])},
                           found={"A": {"A": -0.1, " A": -2.5}, "B": {"B": -3.7}}, exact=False)
    verdict = judge(scores, CRITIC)
    assert verdict["decision"] == "A" and verdict["accepted"] and verdict["confident"]
    assert verdict["logp_a"] == pytest.approx(math.log(math.exp(-0.1) + math.exp(-2.5)))
    assert verdict["margin"] == pytest.approx(verdict["logp_a"] - verdict["logp_b"])
    close = judge(LabelLogprobs({"A": -1.0, "B": -1.5}, {"A": {}, "B": {}}, True), CRITIC)
    assert close["decision"] == "A" and not close["confident"] and not close["accepted"]
    b_wins = judge(LabelLogprobs({"A": -4.0, "B": -0.2}, {"A": {}, "B": {}}, True), CRITIC)
    assert b_wins["decision"] == "B" and not b_wins["accepted"]
    absent = judge(LabelLogprobs({"A": -math.inf, "B": -math.inf}, {"A": {}, "B": {}}, False), CRITIC)
    assert absent["decision"] is None and absent["logp_a"] is None and not absent["accepted"]
    json.dumps(absent, allow_nan=False)


def test_http_critic_sums_both_spellings_from_the_first_tokens_top_logprobs(monkeypatch):
    from groundthink.datagen.backends.openai_http import OpenAIBackend

    monkeypatch.delenv("NO_SUCH_KEY_VAR", raising=False)
    backend = OpenAIBackend(base_url="http://127.0.0.1:9/v1", model="m", api_key_env="NO_SUCH_KEY_VAR",
                            allow_missing_key=True)
    seen = {}

    async def fake_complete(request):
        seen["request"] = request
        return CompletionResult(text="A", finish_reason="length", input_tokens=3, output_tokens=1,
                                top_logprobs=[{" A": -0.3, "A": -2.0, " B": -1.9, "C": -4.0}])

    monkeypatch.setattr(backend, "complete", fake_complete)
    scores = asyncio.run(backend.label_logprobs("Q?\nAnswer:", CRITIC.spellings, top_logprobs=20))
    assert seen["request"].max_tokens == 1 and seen["request"].temperature == 0.0 and seen["request"].logprobs == 20
    assert scores.logp["A"] == pytest.approx(logsumexp([-0.3, -2.0]))
    assert scores.logp["B"] == pytest.approx(-1.9) and scores.found["B"] == {" B": -1.9}
    assert judge(scores, CRITIC)["decision"] == "A"


def test_missing_key_is_a_clear_error(monkeypatch):
    from groundthink.datagen.backends.openai_http import OpenAIBackend

    monkeypatch.delenv("NO_SUCH_KEY_VAR", raising=False)
    with pytest.raises(FatalBackendError, match="NO_SUCH_KEY_VAR"):
        OpenAIBackend(base_url="http://127.0.0.1:9/v1", model="m", api_key_env="NO_SUCH_KEY_VAR")


# ----- QC -----------------------------------------------------------------------------------------------------------
def _record(rid, text="A fine answer.", finish="stop", tokens=5, **extra):
    return {"id": rid, "messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": text}],
            "finish_reason": finish, "usage": {"input_tokens": 1, "output_tokens": tokens, "total_tokens": tokens + 1},
            **extra}


QC = {"normal_finish_reasons": ["stop"], "delimiters": ["Instruction:", "<|user|>"],
      "thresholds": {"records": "> 0", "invalid_json_lines": "== 0", "duplicate_ids": "== 0", "non_stop_finish": "== 0",
                     "empty_outputs": "== 0", "token_limit_rate": "< 0.10", "runaway_rate": "< 0.05",
                     "delimiter_leakage": "== 0", "median_output_tokens": "< 40"}}


def test_qc_flags_exactly_the_defective_records(tmp_path):
    records = [_record(f"r{i}") for i in range(20)]
    records[3] = _record("r3", finish="length")
    records[7] = _record("r7", text="")
    records[9] = _record("r9", text="Sure. Instruction: do more")
    records[11] = _record("r11", text="loop forever " * 40)
    path = tmp_path / "d.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records) + "{broken\n")
    summary = evaluate(path, QC)
    m = summary["metrics"]
    assert summary["verdict"] == "FAIL"
    assert m["non_stop_finish"]["ids"] == ["r3"] and m["token_limit_rate"]["ids"] == ["r3"]
    assert m["token_limit_rate"]["value"] == pytest.approx(1 / 20) and m["token_limit_rate"]["status"] == "PASS"
    assert m["empty_outputs"]["ids"] == ["r7"] and m["delimiter_leakage"]["ids"] == ["r9"]
    assert m["runaway_rate"]["ids"] == ["r11"] and m["invalid_json_lines"]["value"] == 1
    assert set(summary["failed"]) == {"non_stop_finish", "empty_outputs", "delimiter_leakage", "runaway_rate",
                                      "invalid_json_lines"}
    assert m["instruction_acceptance"]["status"] == "n/a"


def test_qc_thresholds_are_strict_where_written_strict(tmp_path):
    path = tmp_path / "d.jsonl"
    records = [_record(f"r{i}", finish="length" if i == 0 else "stop") for i in range(10)]
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    qc = {**QC, "thresholds": {"token_limit_rate": "< 0.10"}}
    summary = evaluate(path, qc)
    assert summary["metrics"]["token_limit_rate"]["value"] == 0.1 and summary["verdict"] == "FAIL"
    assert evaluate(path, {**QC, "thresholds": {"token_limit_rate": "<= 0.10"}})["verdict"] == "PASS"
    with pytest.raises(QCError, match="token_limit_rate"):
        evaluate(path, {**QC, "thresholds": {"token_limit_rate": "below ten percent"}})
    with pytest.raises(QCError, match="no such QC metric"):
        evaluate(path, {**QC, "thresholds": {"median_output_token": "< 40"}})


# ----- prompt sets and text ------------------------------------------------------------------------------------------
def test_prompt_sets_have_stable_ids_and_refuse_bad_entries(tmp_path):
    jsonl = tmp_path / "p.jsonl"
    jsonl.write_text('{"id": "x1", "text": "one"}\n{"text": "two"}\n')
    prompts = load_prompt_set({"name": "f", "path": str(jsonl)})
    assert prompts[0].id == "x1" and prompts[1].id.startswith("p-")
    txt = tmp_path / "p.txt"
    txt.write_text("zero\ntwo\n")
    assert load_prompt_set({"name": "t", "path": str(txt)})[1].id == prompts[1].id  # same text, same id
    with pytest.raises(PromptSetError, match="appears twice"):
        load_prompt_set({"name": "d", "prompts": [{"id": "a", "text": "x"}, {"id": "a", "text": "y"}]})
    with pytest.raises(PromptSetError, match="empty"):
        load_prompt_set({"name": "e", "prompts": [{"id": "a", "text": "  "}]})
    with pytest.raises(PromptSetError, match="no such file"):
        load_prompt_set({"name": "m", "path": str(tmp_path / "missing.jsonl")})


def test_cleaning_and_runaway_detection():
    assert clean_at_delimiters(" Blue.\nInstruction: next one", ["Instruction:", "Response:"]) == \
        ("Blue.", "Instruction:")
    assert clean_at_delimiters(" Fine.", ["Instruction:"]) == ("Fine.", None)
    assert is_repetitive("the same words again " * 20) and not is_repetitive("short")
    prose = ("Photosynthesis turns light, water and carbon dioxide into sugar and oxygen; plants, algae and some "
             "bacteria use it, and nearly every food chain on land starts with what it makes each sunny day.")
    assert not is_repetitive(prose * 1) and is_runaway("ok", "Instruction:") and not is_runaway(prose, None)


# ----- contamination guard -------------------------------------------------------------------------------------------
def test_groundthink_guard_refuses_control_tokens_in_completion_prompts():
    from groundthink.data import build_tokenizer
    from groundthink.datagen.guard import ContaminationError, groundthink_guard

    tok = build_tokenizer("char")
    guard = groundthink_guard(tok)
    guard.check_ids(tok.encode("Instruction: hi\nResponse:"), "ok")
    with pytest.raises(ContaminationError, match=r"'<\|user\|>' \(id 4\) at token 3"):
        guard.check_ids(tok.encode("hi <|user|> there"), "prompt p1")


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    from tests._hf_tiny import save_tiny

    return save_tiny(tmp_path_factory.mktemp("hf") / "tiny", chat_template="{{ messages }}")


SENTINELS = ["The capital of France is", "Instruction: Name three primary colours.\nResponse:"]


@pytest.mark.slow  # importing transformers alone takes several seconds on 2 shared cores
def test_hf_backend_completion_mode_guard_and_exact_critic(hf_dir):
    from groundthink.datagen.backends.base import CompletionRequest
    from groundthink.datagen.backends.hf import HFBackend
    from groundthink.datagen.guard import ContaminationError

    backend = HFBackend(path=str(hf_dir), sentinels=SENTINELS, sentinel_tokens=6)
    asyncio.run(backend.start())
    assert backend.describe()["chat_template_dropped"] is True and backend.tokenizer.chat_template is None
    assert [c["ok"] for c in backend.guard_report()["sentinels"]] == [True, True]
    done = asyncio.run(backend.complete(CompletionRequest(prompt="The quick brown", max_tokens=5, temperature=0.0,
                                                          logprobs=2)))
    assert done.output_tokens == 5 and done.finish_reason == "length" and len(done.top_logprobs) == 5
    ids = backend.tokenizer("The quick brown", add_special_tokens=False)["input_ids"]
    assert done.input_tokens == len(ids)
    with pytest.raises(ContaminationError, match="im_start"):
        asyncio.run(backend.complete(CompletionRequest(prompt="hi <|im_start|>user", max_tokens=2)))
    # The critic's log P(label) is the exact sum over spellings, from the model itself.
    prompt = "Is this good?\nAnswer:"
    scores = asyncio.run(backend.label_logprobs(prompt, CRITIC.spellings, top_logprobs=5))
    model = backend.model
    for label, forms in CRITIC.spellings.items():
        parts = []
        for form in forms:
            p_ids = backend.tokenizer(prompt, add_special_tokens=False)["input_ids"]
            f_ids = backend.tokenizer(prompt + form, add_special_tokens=False)["input_ids"]
            assert f_ids[: len(p_ids)] == p_ids
            with torch.no_grad():
                logp = model(torch.tensor([f_ids])).logits[0].float().log_softmax(-1)
            parts.append(sum(float(logp[t - 1, f_ids[t]]) for t in range(len(p_ids), len(f_ids))))
        assert scores.logp[label] == pytest.approx(logsumexp(parts), abs=1e-4)


@pytest.mark.slow
def test_hf_sentinel_failures_stop_before_generation(tmp_path):
    from groundthink.datagen.backends.hf import HFBackend
    from groundthink.datagen.guard import SentinelFailure
    from tests._hf_tiny import save_tiny

    chatty = save_tiny(tmp_path / "chatty", chat_token="<|im_start|>")
    backend = HFBackend(path=str(chatty), sentinels=SENTINELS, sentinel_tokens=4)
    with pytest.raises(SentinelFailure, match=r"greedy continuation produces the role/control token '<\|im_start\|>'"):
        asyncio.run(backend.start())
    with pytest.raises(SentinelFailure, match="contains the control/special token"):
        HFBackend(path=str(chatty), sentinels=["fine <|im_end|>"], sentinel_tokens=2)._sentinels()
    # A backend whose prompt encoding adds a token the plain encoding lacks (a BOS) fails the delta check.
    adds_bos = HFBackend(path=str(tmp_path / "chatty"), sentinels=SENTINELS, sentinel_tokens=2)
    adds_bos.encode_completion_prompt = lambda text: [0, *adds_bos.engine.lm.encode(text)]
    with pytest.raises(SentinelFailure, match="special tokens are being added"):
        adds_bos._sentinels()


# ----- configs -------------------------------------------------------------------------------------------------------
REQUIRED = {"backend=openai": ["backend.model=m"], "backend=groundthink": ["backend.run=r"],
            "backend=hf": ["backend.path=p"], "prompts=file": ["prompts.path=p.jsonl"]}
OPTIONS = [(g, p.stem) for g in ("backend", "pipeline", "prompts") for p in sorted((REPO / "conf" / g).glob("*.yaml"))]


@pytest.mark.parametrize("group,option", OPTIONS, ids=[f"{g}={o}" for g, o in OPTIONS])
def test_every_datagen_option_composes_and_resolves(group, option):
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from omegaconf import OmegaConf

    from groundthink.datagen.cli import effective_qc
    from groundthink.datagen.qc import parse_threshold

    choice = f"{group}={option}"
    overrides = [choice, *REQUIRED.get(choice, []), *(REQUIRED["backend=openai"] if group != "backend" else [])]
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        cfg = compose(config_name="datagen", overrides=overrides)
    GlobalHydra.instance().clear()
    config = OmegaConf.to_container(cfg, resolve=True, throw_on_missing=True)
    assert config["out_dir"].endswith(f"datagen/{config['name']}")
    for name, text in effective_qc(config)["thresholds"].items():
        parse_threshold(name, text)
    if group == "prompts":
        assert load_prompt_set(config["prompts"]) if option != "file" else True


def test_secrets_are_refused_on_the_command_line():
    from groundthink.datagen.cli import UserError, refuse_secret_overrides

    refuse_secret_overrides(["backend.api_key_env=MY_KEY", "pipeline.max_tokens=5", "guard.sentinel_tokens=4",
                             "backend.allow_missing_key=true", "+backend.allow_missing_key=false"])
    for bad in ("+backend.api_key=sk-123", "backend.token=abc", "+backend.secret=x", "backend.api_key=sk-123",
                "++backend.apiKey=sk-1", "+backend.openai_api_key=sk-1", "+backend.key=sk-1", "+backend.secret_key=x",
                "+backend.auth_token=x", "+backend.password=x", "+backend.access-token=x", "+backend.bearer=x"):
        with pytest.raises(UserError, match="secrets are never taken from the command line") as err:
            refuse_secret_overrides([bad])
        assert bad.split("=", 1)[1] not in str(err.value)


def test_the_missing_key_errors_advice_is_accepted_on_the_command_line(monkeypatch):
    """The error for a missing API key recommends an override; the command line must take it."""
    import re

    from groundthink.datagen.backends.openai_http import OpenAIBackend
    from groundthink.datagen.cli import refuse_secret_overrides

    monkeypatch.delenv("NO_SUCH_KEY_VAR", raising=False)
    with pytest.raises(FatalBackendError) as err:
        OpenAIBackend(base_url="http://127.0.0.1:9/v1", model="m", api_key_env="NO_SUCH_KEY_VAR")
    advice = re.findall(r"backend\.\w+=\w+", str(err.value))
    assert advice == ["backend.allow_missing_key=true"]
    refuse_secret_overrides(advice)


def test_a_refused_invocation_removes_only_a_folder_it_left_empty(tmp_path):
    from groundthink.datagen.cli import _remove_if_unused

    fresh = tmp_path / "fresh"
    lock = RunLock(fresh).acquire()
    (fresh / "datagen.log").touch()
    (fresh / "rejects.jsonl").touch()
    _remove_if_unused(fresh, lock)
    assert not fresh.exists() and tmp_path.exists()
    RunLock(fresh).acquire().release()  # the name is free again
    # Anything beyond empty scaffolding (earlier records, a manifest, a log with text) keeps the folder as it is.
    for name, text in (("manifest.json", "{}"), ("data/data-00000.jsonl", '{"id": "a"}\n'), ("datagen.log", "x")):
        kept = tmp_path / name.replace("/", "_")
        lock = RunLock(kept).acquire()
        (kept / name).parent.mkdir(parents=True, exist_ok=True)
        (kept / name).write_text(text)
        _remove_if_unused(kept, lock)
        lock.release()
        assert (kept / name).read_text() == text and (kept / ".lock").exists()


def test_the_closing_lines_list_only_what_the_folder_holds(tmp_path):
    from groundthink.datagen.cli import _closing

    (tmp_path / "data").mkdir()
    for name in ("rejects.jsonl", "config.yaml", "manifest.json"):
        (tmp_path / name).touch()
    text = _closing(tmp_path, {"status": "completed", "phases": []}, None, None)
    assert "(data/, rejects.jsonl, config.yaml, manifest.json)" in text and "phases/" not in text
    (tmp_path / "phases").mkdir()
    assert "(data/, phases/, rejects.jsonl" in _closing(tmp_path, {"status": "completed"}, None, None)
