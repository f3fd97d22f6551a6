"""The generation engine (groundthink/generation.py) on a tiny random HybridLM: sampling, stops, log-probabilities,
streaming text, carried state and constant memory."""

from __future__ import annotations

import pytest
import torch

from groundthink.data import build_tokenizer
from groundthink.generation import (
    GenerationEngine,
    GenerationError,
    IncrementalDetokenizer,
    SamplingParams,
)
from groundthink.models import HybridLM
from groundthink.models.presets import preset


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    # Token-by-token decoding is many tiny ops: on 2 shared cores a second intra-op thread makes it ~20x slower.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def tok():
    return build_tokenizer("char")


@pytest.fixture(scope="module")
def model(tok):
    torch.manual_seed(0)
    # "HA": a hybrid layer and an attention layer whose window (16) is shorter than the streams below.
    return HybridLM(preset("tiny", vocab_size=tok.vocab_size, pattern="HA", attn_window=16), device="cpu").eval()


@pytest.fixture(scope="module")
def engine(model, tok):
    return GenerationEngine.for_model(model, tok)


def greedy(n: int, **kw) -> SamplingParams:
    return SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True, **kw)


def test_greedy_stream_matches_hybridlm_generate(engine, model, tok):
    prompt = "The quick brown fox"
    done = engine.complete(prompt, greedy(40))
    reference, _ = model.generate(tok.encode(prompt), 40, temperature=0.0)
    assert done.token_ids == reference[0].tolist()
    assert done.finish_reason == "length" and done.completion_tokens == 40
    assert done.prompt_tokens == len(tok.encode(prompt)) and done.total_tokens == done.prompt_tokens + 40


def test_chunked_prefill_and_carried_cache_equal_one_pass(model, tok):
    prompt = "A longer prompt that is fed in several chunks of seven tokens."
    whole = GenerationEngine.for_model(model, tok, prefill_chunk=512).complete(prompt, greedy(20))
    chunked = GenerationEngine.for_model(model, tok, prefill_chunk=7).complete(prompt, greedy(20))
    assert chunked.token_ids == whole.token_ids
    # Continuing a stream from its cache gives what one pass over the concatenated text gives.
    engine = GenerationEngine.for_model(model, tok)
    first = engine.stream(tok.encode(prompt[:20]), greedy(0))
    first.drain()
    continued = engine.stream(tok.encode(prompt[20:]), greedy(20), cache=first.cache).drain()
    assert continued.token_ids == whole.token_ids


def test_memory_is_constant_while_streaming(engine, model):
    stream = engine.stream("x", greedy(300))
    sizes = []
    for i, _ in enumerate(stream):
        if i in (5, 299):
            sizes.append(sum(t.numel() for t in stream.cache.tensors()))
    assert len(sizes) == 2 and sizes[0] == sizes[1] == model.state_size()


def test_seeds_reproduce_and_truncation_settings_reduce_to_greedy(engine):
    a = engine.complete("Once", SamplingParams(max_tokens=30, temperature=1.0, seed=7, ignore_eos=True))
    b = engine.complete("Once", SamplingParams(max_tokens=30, temperature=1.0, seed=7, ignore_eos=True))
    c = engine.complete("Once", SamplingParams(max_tokens=30, temperature=1.0, seed=8, ignore_eos=True))
    assert a.token_ids == b.token_ids and a.token_ids != c.token_ids
    g = engine.complete("Once", greedy(30)).token_ids
    assert engine.complete("Once", SamplingParams(max_tokens=30, top_k=1, seed=3, ignore_eos=True)).token_ids == g
    assert engine.complete("Once", SamplingParams(max_tokens=30, top_p=1e-6, seed=3, ignore_eos=True)).token_ids == g


def test_stop_sequence_cuts_text_and_streamed_deltas_add_up(engine):
    reference = engine.complete("Hello", greedy(60)).text
    stop = reference[10:13]
    cut = reference.find(stop)
    stream = engine.stream("Hello", greedy(60, stop=(stop,)))
    deltas = [event.text for event in stream]
    done = stream.completion
    assert done.text == reference[:cut] and done.finish_reason == "stop" and done.stop_reason == stop
    assert "".join(deltas) == done.text and stop not in "".join(deltas)


def test_stop_token_ids_and_end_of_text(engine, tok):
    reference = engine.complete("Hello", greedy(30))
    stop_id = reference.token_ids[5]
    first = reference.token_ids.index(stop_id)
    done = engine.complete("Hello", greedy(30, stop_token_ids=(stop_id,)))
    assert done.token_ids == reference.token_ids[: first + 1] and done.finish_reason == "stop"
    assert done.stop_reason == stop_id and done.text == tok.decode(reference.token_ids[:first])


def test_logprobs_are_the_models_own_distribution(engine, model, tok):
    prompt = "Logprobs"
    done = engine.complete(prompt, SamplingParams(max_tokens=12, temperature=0.9, seed=1, logprobs=3,
                                                  ignore_eos=True))
    ids = tok.encode(prompt) + done.token_ids
    with torch.no_grad():
        logp = model(torch.tensor([ids]))[0][0].float().log_softmax(-1)
    n = len(tok.encode(prompt))
    for step, item in enumerate(done.logprobs):
        row = logp[n - 1 + step]
        assert item.token_id == done.token_ids[step]
        assert item.logprob == pytest.approx(float(row[item.token_id]), abs=1e-4)
        assert [t.token_id for t in item.top] == row.topk(3).indices.tolist()
        assert [t.logprob for t in item.top] == pytest.approx(row.topk(3).values.tolist(), abs=1e-4)


def test_continuation_scores_are_exact_and_batching_changes_nothing(engine, model, tok):
    prompt, choices = "Answer:", [" A", "B", " maybe"]
    scores = engine.continuation_logprobs(prompt, choices)
    for choice, score in zip(choices, scores):
        ids = tok.encode(prompt + choice)
        n = len(tok.encode(prompt))
        with torch.no_grad():
            logp = model(torch.tensor([ids]))[0][0].float().log_softmax(-1)
        manual = sum(float(logp[t - 1, ids[t]]) for t in range(n, len(ids)))
        assert score == pytest.approx(manual, abs=1e-4)
    one_by_one = [engine.score_pairs([(prompt, c)], batch_size=1)[0] for c in choices]
    assert scores == pytest.approx(one_by_one, abs=1e-5)


def test_incremental_detokenizer_never_splits_a_character(tok):
    text = "héllo ✓ naïve 🎉 done"
    ids = tok.encode(text)
    detok = IncrementalDetokenizer(tok.decode)
    deltas = [detok.add(i) for i in ids] + [detok.flush()]
    assert "".join(deltas) == text
    assert all("\ufffd" not in d for d in deltas)


@pytest.mark.parametrize("bad,field", [({"temperature": -1.0}, "temperature"), ({"top_p": 0.0}, "top_p"),
                                       ({"top_k": 0}, "top_k"), ({"max_tokens": -1}, "max_tokens"),
                                       ({"stop": ("",)}, "stop"), ({"logprobs": -2}, "logprobs")])
def test_bad_sampling_settings_are_named(engine, bad, field):
    with pytest.raises(GenerationError, match=field):
        engine.complete("x", SamplingParams(**bad))
