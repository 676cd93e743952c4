"""/v1/completions end to end: real gateway, real Unix socket, real vLLM engine on the demo model."""

from __future__ import annotations

import contextlib
import json
from collections.abc import Mapping

import aiohttp
import openai
import pytest

pytestmark = pytest.mark.integration

PROMPT = "Performance test"


async def post(base_url: str, body: object, raw: bytes | None = None,
               headers: dict[str, str] | None = None) -> tuple[int, dict, Mapping[str, str]]:
    data = raw if raw is not None else json.dumps(body).encode()
    hdrs = {"Content-Type": "application/json", **(headers or {})}
    async with aiohttp.ClientSession() as session:
        async with session.post(base_url + "/v1/completions", data=data, headers=hdrs) as resp:
            return resp.status, await resp.json(content_type=None), resp.headers.copy()


def assert_error(status: int, body: dict, expected_status: int, param: str | None = None) -> None:
    assert status == expected_status, body
    err = body["error"]
    assert set(err) == {"message", "type", "param", "code"}
    assert err["message"]
    if param is not None:
        assert err["param"] == param, err


async def test_health_body_when_ready(base_url: str) -> None:
    async with aiohttp.ClientSession() as session, session.get(base_url + "/health") as resp:
        assert resp.status == 200
        body = await resp.json()
    assert body["status"] == "healthy"
    assert body["model"] == "phi-3-mini"
    assert body["context_length"] == 2048
    assert body["efficiency_mode"] is True
    assert body["timestamp"].startswith("20")


async def test_models_lists_served_names(base_url: str) -> None:
    async with aiohttp.ClientSession() as session, session.get(base_url + "/v1/models") as resp:
        body = await resp.json()
    assert body["object"] == "list"
    ids = [m["id"] for m in body["data"]]
    assert ids == ["phi-3-mini", "microsoft/Phi-3-mini-4k-instruct"]
    assert all(m["max_model_len"] == 2048 for m in body["data"])


async def test_completion_raw_http(base_url: str) -> None:
    status, body, headers = await post(base_url, {"prompt": PROMPT, "max_tokens": 7, "ignore_eos": True})
    assert status == 200, body
    assert body["object"] == "text_completion"
    assert body["model"] == "phi-3-mini"
    assert len(body["choices"]) == 1
    choice = body["choices"][0]
    assert choice["index"] == 0 and choice["finish_reason"] == "length" and choice["text"]
    assert body["usage"] == {"prompt_tokens": body["usage"]["prompt_tokens"], "completion_tokens": 7,
                             "total_tokens": body["usage"]["prompt_tokens"] + 7}
    assert body["usage"]["prompt_tokens"] > 0
    assert headers["X-Request-Id"] and body["id"].endswith(headers["X-Request-Id"])


async def test_request_id_is_echoed(base_url: str) -> None:
    status, body, headers = await post(base_url, {"prompt": PROMPT, "max_tokens": 1},
                                       headers={"X-Request-Id": "my-trace-42"})
    assert status == 200
    assert headers["X-Request-Id"] == "my-trace-42"


def test_openai_client_completion(base_url: str) -> None:
    client = openai.OpenAI(base_url=base_url + "/v1", api_key="unused", max_retries=0)
    result = client.completions.create(model="phi-3-mini", prompt=PROMPT, max_tokens=5, extra_body={"ignore_eos": True})
    assert result.choices[0].finish_reason == "length"
    assert result.usage is not None and result.usage.completion_tokens == 5
    # the full model name is served too
    result = client.completions.create(model="microsoft/Phi-3-mini-4k-instruct", prompt=PROMPT, max_tokens=2)
    assert result.model == "microsoft/Phi-3-mini-4k-instruct"


def test_openai_client_streaming(base_url: str) -> None:
    client = openai.OpenAI(base_url=base_url + "/v1", api_key="unused", max_retries=0)
    stream = client.completions.create(model="phi-3-mini", prompt=PROMPT, max_tokens=6, stream=True,
                                       stream_options={"include_usage": True}, extra_body={"ignore_eos": True})
    chunks = list(stream)
    text_chunks = [c for c in chunks if c.choices]
    assert len(text_chunks) >= 2  # tokens arrive as they are made, not in one piece
    assert text_chunks[-1].choices[0].finish_reason == "length"
    assert all(c.choices[0].finish_reason is None for c in text_chunks[:-1])
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 6


async def test_streaming_raw_sse_ends_with_done_and_carries_the_whole_answer(base_url: str) -> None:
    greedy = {"prompt": PROMPT, "max_tokens": 4, "temperature": 0, "ignore_eos": True}
    async with aiohttp.ClientSession() as session:
        async with session.post(base_url + "/v1/completions", json={**greedy, "stream": True}) as resp:
            assert resp.status == 200
            assert resp.headers["Content-Type"].startswith("text/event-stream")
            raw = (await resp.read()).decode()
    events = [e for e in raw.split("\n\n") if e]
    assert all(e.startswith("data: ") for e in events)
    assert events[-1] == "data: [DONE]"
    text = "".join(c["text"] for e in events[:-1] for c in json.loads(e[6:])["choices"])
    status, whole, _ = await post(base_url, greedy)
    assert status == 200 and text == whole["choices"][0]["text"]  # the deltas add up to the answer


def test_list_prompt_and_n(base_url: str) -> None:
    client = openai.OpenAI(base_url=base_url + "/v1", api_key="unused", max_retries=0)
    result = client.completions.create(model="phi-3-mini", prompt=["one", "two", "three"], max_tokens=3, n=2,
                                       extra_body={"ignore_eos": True})
    assert sorted(c.index for c in result.choices) == list(range(6))
    assert result.usage is not None and result.usage.completion_tokens == 18


def test_n_gives_distinct_samples(base_url: str) -> None:
    client = openai.OpenAI(base_url=base_url + "/v1", api_key="unused", max_retries=0)
    result = client.completions.create(model="phi-3-mini", prompt=PROMPT, max_tokens=12, n=3,
                                       temperature=1.0, extra_body={"ignore_eos": True})
    assert len(result.choices) == 3
    assert len({c.text for c in result.choices}) > 1


def test_seed_reproduces(base_url: str) -> None:
    client = openai.OpenAI(base_url=base_url + "/v1", api_key="unused", max_retries=0)
    texts = [client.completions.create(model="phi-3-mini", prompt=PROMPT, max_tokens=10, seed=1234,
                                       temperature=1.0).choices[0].text for _ in range(2)]
    other = client.completions.create(model="phi-3-mini", prompt=PROMPT, max_tokens=10, seed=99,
                                      temperature=1.0).choices[0].text
    assert texts[0] == texts[1]
    assert other != texts[0]


def test_stop_cuts_the_text(base_url: str) -> None:
    client = openai.OpenAI(base_url=base_url + "/v1", api_key="unused", max_retries=0)
    full = client.completions.create(model="phi-3-mini", prompt=PROMPT, max_tokens=24, seed=7,
                                     extra_body={"ignore_eos": True}).choices[0].text
    assert len(full) > 6
    stop = full[4:7]
    cut = client.completions.create(model="phi-3-mini", prompt=PROMPT, max_tokens=24, seed=7, stop=[stop])
    choice = cut.choices[0]
    assert choice.finish_reason == "stop"
    assert stop not in choice.text
    assert full.startswith(choice.text)


async def test_prompt_as_token_ids(base_url: str) -> None:
    status, body, _ = await post(base_url, {"prompt": [55, 306, 1034], "max_tokens": 2})
    assert status == 200, body
    assert body["usage"]["prompt_tokens"] == 3


# ------------------------------------------------------------------ bad input: clear 4xx, nothing lost
async def test_bad_json(base_url: str) -> None:
    status, body, _ = await post(base_url, None, raw=b'{"prompt": "x",')
    assert_error(status, body, 400)


async def test_non_object_body(base_url: str) -> None:
    status, body, _ = await post(base_url, ["prompt"])
    assert_error(status, body, 400)


async def test_wrong_content_type(base_url: str) -> None:
    status, body, _ = await post(base_url, None, raw=b"prompt=x", headers={"Content-Type": "application/x-www-form-urlencoded"})
    assert_error(status, body, 400)


@pytest.mark.parametrize(("field", "value"), [
    ("max_tokens", "ten"), ("max_tokens", 0), ("max_tokens", -5), ("temperature", -1.0),
    ("temperature", "hot"), ("top_p", 0), ("n", 0), ("n", 1000), ("stream", "yes"), ("stop", 5),
    ("stop", ["s"] * 100), ("seed", -1),
])
async def test_wrong_types_and_ranges_name_the_field(base_url: str, field: str, value: object) -> None:
    status, body, _ = await post(base_url, {"prompt": PROMPT, field: value})
    assert_error(status, body, 400, field)


async def test_missing_prompt(base_url: str) -> None:
    status, body, _ = await post(base_url, {"max_tokens": 3})
    assert_error(status, body, 400, "prompt")


async def test_unknown_parameter_is_named(base_url: str) -> None:
    status, body, _ = await post(base_url, {"prompt": PROMPT, "temprature": 0.5})
    assert_error(status, body, 400, "temprature")


async def test_unimplemented_parameter_is_refused_not_ignored(base_url: str) -> None:
    status, body, _ = await post(base_url, {"prompt": PROMPT, "best_of": 3})
    assert_error(status, body, 400, "best_of")


async def test_unknown_model(base_url: str) -> None:
    status, body, _ = await post(base_url, {"prompt": PROMPT, "model": "gpt-4"})
    assert_error(status, body, 404, "model")
    assert body["error"]["code"] == "model_not_found"


@pytest.mark.parametrize("prompt", ["", [], [""], [[]]])
async def test_empty_prompt(base_url: str, prompt: object) -> None:
    status, body, _ = await post(base_url, {"prompt": prompt, "max_tokens": 3})
    assert_error(status, body, 400, "prompt")


async def test_prompt_longer_than_context(base_url: str) -> None:
    status, body, _ = await post(base_url, {"prompt": [55] * 2100, "max_tokens": 3})
    assert_error(status, body, 400, "prompt")
    assert "2048" in body["error"]["message"]


async def test_text_prompt_longer_than_context(base_url: str) -> None:
    status, body, _ = await post(base_url, {"prompt": "Performance test " * 1500, "max_tokens": 3})
    assert_error(status, body, 400, "prompt")


async def test_max_tokens_that_do_not_fit(base_url: str) -> None:
    status, body, _ = await post(base_url, {"prompt": [55] * 2000, "max_tokens": 100})
    assert_error(status, body, 400, "max_tokens")
    assert "48" in body["error"]["message"]  # says how many would fit


async def test_token_id_outside_vocabulary(base_url: str) -> None:
    status, body, _ = await post(base_url, {"prompt": [1, 2, 10**9], "max_tokens": 2})
    assert_error(status, body, 400, "prompt")


async def test_bad_stream_request_is_a_json_error_not_a_stream(base_url: str) -> None:
    status, body, _ = await post(base_url, {"prompt": [55] * 2100, "stream": True})
    assert_error(status, body, 400, "prompt")


async def test_unknown_route_is_openai_json(base_url: str) -> None:
    async with aiohttp.ClientSession() as session, session.get(base_url + "/v1/nope") as resp:
        assert resp.status == 404
        body = await resp.json()
    assert body["error"]["message"]


async def test_engine_still_serves_after_bad_input(base_url: str) -> None:
    status, body, _ = await post(base_url, {"prompt": PROMPT, "max_tokens": 2})
    assert status == 200, body


@pytest.mark.parametrize("when", ["before reading anything", "mid-stream", "non-streaming"])
async def test_client_disconnect_aborts_in_the_engine(service, when: str) -> None:  # type: ignore[no-untyped-def]
    """A client gone while its request runs in the engine (a stream it never read, one it read
    an event of, a plain request): the engine drops the request. A client gone before its
    request reached the engine is break 4's (test_one_client.py)."""
    import asyncio

    from tests.integration.test_processes import engine_running

    body = {"prompt": "a long answer", "max_tokens": 1900, "ignore_eos": True, "stream": when != "non-streaming"}
    first_line = asyncio.Event()

    async def client() -> None:
        async with aiohttp.ClientSession() as session:
            async with session.post(service.base_url + "/v1/completions", json=body) as resp:
                if when == "mid-stream":
                    await resp.content.readline()
                    first_line.set()
                    await asyncio.sleep(3600)  # reads nothing more
                await resp.read()

    async def engine_holds_it() -> None:
        while await asyncio.to_thread(engine_running, service) < 1:
            await asyncio.sleep(0.02)

    task = asyncio.create_task(client())
    try:
        await asyncio.wait_for(engine_holds_it(), 30)  # it reached the engine, whatever the pace
        if when == "mid-stream":
            await asyncio.wait_for(first_line.wait(), 30)
        assert not task.done(), task  # 1,900 tokens: still running
    finally:
        task.cancel()  # the client goes away: its connection closes
        with contextlib.suppress(asyncio.CancelledError):
            await task
    loop = asyncio.get_running_loop()
    deadline = loop.time() + 30
    while await asyncio.to_thread(engine_running, service) != 0:
        assert loop.time() < deadline, "the engine still runs the abandoned request after 30 s"
        await asyncio.sleep(0.05)
