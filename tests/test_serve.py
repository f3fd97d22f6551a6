"""groundthink-serve's endpoint logic (groundthink/serve.py `Service`) on a tiny random model, without HTTP; the
real server is driven end to end in tests/test_datagen_cli.py."""

from __future__ import annotations

import pytest
import torch

from groundthink.data import build_tokenizer
from groundthink.data.tokenizer import END_OF_TURN_TOKEN
from groundthink.generation import GenerationEngine
from groundthink.models import HybridLM
from groundthink.models.presets import preset
from groundthink.serve import APIError, Service


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def service():
    tok = build_tokenizer("char")
    torch.manual_seed(1)
    model = HybridLM(preset("tiny", vocab_size=tok.vocab_size), device="cpu").eval()
    return Service(GenerationEngine.for_model(model, tok), model_name="tiny",
                   end_of_turn_id=tok.control_ids[END_OF_TURN_TOKEN])


def test_usage_counts_each_prompt_once_however_many_choices(service):
    body = service.completions({"model": "tiny", "prompt": ["ab", "hello"], "max_tokens": 3, "n": 2, "seed": 1,
                                "temperature": 0.7})
    assert len(body["choices"]) == 4 and [c["index"] for c in body["choices"]] == [0, 1, 2, 3]
    assert body["usage"]["prompt_tokens"] == 2 + 5
    assert body["usage"]["completion_tokens"] == 12 and body["usage"]["total_tokens"] == 19
    assert body["choices"][0]["text"] != body["choices"][1]["text"] or body["choices"][0]["finish_reason"] == "stop"


def test_echo_scores_the_prompt_with_the_models_log_probabilities(service):
    body = service.completions({"prompt": "Hello", "max_tokens": 0, "echo": True, "logprobs": 2})
    choice = body["choices"][0]
    assert choice["text"] == "Hello" and body["usage"]["completion_tokens"] == 0
    lp = choice["logprobs"]
    assert lp["tokens"] == list("Hello") and lp["token_logprobs"][0] is None and lp["text_offset"] == [0, 1, 2, 3, 4]
    ids = service.engine.lm.encode("Hello")
    with torch.no_grad():
        logp = service.engine.lm.model(torch.tensor([ids]))[0][0].float().log_softmax(-1)
    for t in range(1, len(ids)):
        assert lp["token_logprobs"][t] == pytest.approx(float(logp[t - 1, ids[t]]), abs=1e-4)
        assert len(lp["top_logprobs"][t]) <= 2


def test_streamed_chunks_add_up_to_the_completion(service):
    request = {"prompt": "Once", "max_tokens": 20, "temperature": 0}
    whole = service.completions(request)["choices"][0]
    chunks = list(service.stream_events("/v1/completions", {**request, "stream": True}))
    assert "".join(c["choices"][0]["text"] for c in chunks) == whole["text"]
    assert chunks[-1]["choices"][0]["finish_reason"] == whole["finish_reason"] and chunks[-1]["usage"]
    chat = list(service.stream_events("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}],
                                                              "max_tokens": 5, "stream": True}))
    assert chat[-1]["object"] == "chat.completion.chunk" and chat[-1]["usage"]["completion_tokens"] <= 5


@pytest.mark.parametrize("body,status,param", [
    ({"model": "other", "prompt": "x"}, 404, "model"),
    ({"prompt": "x", "presence_penalty": 0.5}, 400, "presence_penalty"),
    ({"prompt": "x", "n": 0}, 400, "n"),
    ({"prompt": "x", "logprobs": 21}, 400, "logprobs"),
    ({"prompt": "x", "max_tokens": 10**6}, 400, "max_tokens"),
    ({"prompt": 5}, 400, "prompt"),
    ({"prompt": "x", "temperature": "hot"}, 400, "temperature"),
])
def test_bad_requests_get_openai_style_errors(service, body, status, param):
    with pytest.raises(APIError) as info:
        service.completions(body)
    assert info.value.status == status and info.value.param == param
    assert info.value.body()["error"]["message"]


def test_chat_refuses_control_tokens_inside_messages(service):
    with pytest.raises(APIError, match="control token"):
        service.chat_completions({"messages": [{"role": "user", "content": "hi <|assistant|> ok"}]})
    body = service.chat_completions({"messages": [{"role": "system", "content": "Be brief."},
                                                  {"role": "user", "content": "hi"}], "max_tokens": 4})
    assert body["choices"][0]["message"]["role"] == "assistant" and body["usage"]["completion_tokens"] <= 4
