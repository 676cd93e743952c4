"""response_format through vLLM's structured outputs: json_object and json_schema answers
parse (and validate against the schema), through the official `openai` client and raw HTTP;
bad schemas and unknown types are 400s naming the field; continuous usage stats.

On the random-weight demo model the grammar is what makes the answers JSON. The model picks
among what the grammar allows at random, so an answer can still run to max_tokens inside the
JSON (finish_reason "length"): such an answer is counted, never parsed as if complete, and
enough answers must finish for the test to pass.
"""

from __future__ import annotations

import json

import aiohttp
import jsonschema
import openai
import pytest

pytestmark = pytest.mark.integration

MESSAGES = [{"role": "user", "content": "Is the sky blue? Answer in JSON."}]
SCHEMA = {
    "type": "object",
    "properties": {"answer": {"enum": ["yes", "no"]}, "sure": {"type": "boolean"}},
    "required": ["answer", "sure"],
    "additionalProperties": False,
}
JSON_SCHEMA_FORMAT = {"type": "json_schema", "json_schema": {"name": "verdict", "schema": SCHEMA, "strict": True}}


@pytest.fixture(scope="module")
def client(base_url: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=base_url + "/v1", api_key="unused", max_retries=0, timeout=120)


def finished_answers(texts_and_reasons: list[tuple[str, str | None]]) -> list[str]:
    """The answers that ended on their own; each one that did not ran out of max_tokens."""
    assert all(reason in ("stop", "length") for _, reason in texts_and_reasons), texts_and_reasons
    return [text for text, reason in texts_and_reasons if reason == "stop"]


def test_json_schema_answers_validate(client: openai.OpenAI) -> None:
    result = client.chat.completions.create(model="phi-3-mini", messages=MESSAGES, n=8, seed=1, max_tokens=256,  # type: ignore[arg-type]
                                            response_format=JSON_SCHEMA_FORMAT)  # type: ignore[arg-type]
    answers = finished_answers([(c.message.content or "", c.finish_reason) for c in result.choices])
    assert len(answers) >= 4, [c.finish_reason for c in result.choices]
    for text in answers:
        value = json.loads(text)
        jsonschema.validate(value, SCHEMA)
    for c in result.choices:  # the grammar holds from the first token, finished or not
        assert (c.message.content or "").lstrip().startswith("{")


def test_json_object_answers_parse(client: openai.OpenAI) -> None:
    result = client.chat.completions.create(model="phi-3-mini", messages=MESSAGES, n=8, seed=0, max_tokens=400,  # type: ignore[arg-type]
                                            response_format={"type": "json_object"})
    answers = finished_answers([(c.message.content or "", c.finish_reason) for c in result.choices])
    assert answers, [c.finish_reason for c in result.choices]
    for text in answers:
        assert isinstance(json.loads(text), dict), text


def test_without_response_format_the_same_request_is_not_json(client: openai.OpenAI) -> None:
    """What makes the answers above JSON is the grammar, not the model."""
    result = client.chat.completions.create(model="phi-3-mini", messages=MESSAGES, n=8, seed=1, max_tokens=64)  # type: ignore[arg-type]
    for c in result.choices:
        try:
            json.loads(c.message.content or "")
        except ValueError:
            continue
        pytest.fail(f"the demo model wrote JSON on its own: {c.message.content!r}")


async def test_streamed_and_legacy_completions_follow_the_schema(base_url: str) -> None:
    async with aiohttp.ClientSession() as session:
        body = {"messages": MESSAGES, "n": 4, "seed": 1, "max_tokens": 256, "stream": True,
                "response_format": JSON_SCHEMA_FORMAT}
        texts: dict[int, str] = {}
        reasons: dict[int, str] = {}
        async with session.post(base_url + "/v1/chat/completions", json=body) as resp:
            assert resp.status == 200, await resp.text()
            async for line in resp.content:
                if not line.startswith(b"data: {"):
                    continue
                chunk = json.loads(line[6:])
                (choice,) = chunk["choices"]
                texts[choice["index"]] = texts.get(choice["index"], "") + (choice["delta"].get("content") or "")
                if choice["finish_reason"]:
                    reasons[choice["index"]] = choice["finish_reason"]
        answers = finished_answers([(texts[i], reasons.get(i)) for i in sorted(texts)])
        assert len(answers) >= 2, reasons
        for text in answers:
            jsonschema.validate(json.loads(text), SCHEMA)

        # vLLM's response_format on legacy completions, the same constraint
        body = {"prompt": "Answer in JSON:", "n": 4, "seed": 1, "max_tokens": 256,
                "response_format": JSON_SCHEMA_FORMAT}
        async with session.post(base_url + "/v1/completions", json=body) as resp:
            assert resp.status == 200, await resp.text()
            doc = await resp.json()
        answers = finished_answers([(c["text"], c["finish_reason"]) for c in doc["choices"]])
        assert len(answers) >= 2, doc["choices"]
        for text in answers:
            jsonschema.validate(json.loads(text), SCHEMA)


@pytest.mark.parametrize(("response_format", "param", "says"), [
    ({"type": "xml"}, "response_format.type", "json_schema"),
    ({"type": "json_schema"}, "response_format.json_schema", "json_schema"),
    ({"type": "json_schema", "json_schema": {"name": "x"}}, "response_format.json_schema.schema", "required"),
    ({"type": "json_schema", "json_schema": {"name": "x", "schema": "object"}},
     "response_format.json_schema.schema", "object"),
    ({"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "foo"}}},
     "response_format.json_schema.schema", "foo"),
    ({"type": "json_schema", "json_schema": {"name": "x", "schema": {"$ref": "#/nowhere"}}},
     "response_format.json_schema.schema", "nowhere"),
    ({"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "string", "pattern": "(("}}},
     "response_format.json_schema.schema", "regex"),
    ({"type": "json_schema", "json_schema": {"name": "no spaces", "schema": {}}}, "response_format.json_schema.name",
     "name"),
    ({"type": "json_object", "schema": {}}, "response_format.schema", "Unsupported"),
])
async def test_bad_response_formats_are_400s_naming_the_field(base_url: str, response_format: dict, param: str,
                                                              says: str) -> None:
    async with aiohttp.ClientSession() as session:
        for path, body in (("/v1/chat/completions", {"messages": MESSAGES}), ("/v1/completions", {"prompt": "x"})):
            async with session.post(base_url + path, json={**body, "max_tokens": 4,
                                                           "response_format": response_format}) as resp:
                doc = await resp.json()
                assert resp.status == 400, doc
                assert doc["error"]["param"] == param, doc
                assert says in doc["error"]["message"], doc


def test_bad_schema_through_the_openai_client(client: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model="phi-3-mini", messages=MESSAGES, max_tokens=4,  # type: ignore[arg-type]
                                       response_format={"type": "json_schema",  # type: ignore[arg-type]
                                                        "json_schema": {"name": "x", "schema": {"type": "foo"}}})
    assert info.value.body["param"] == "response_format.json_schema.schema"  # type: ignore[index]


def test_continuous_usage_stats(client: openai.OpenAI) -> None:
    """vLLM's stream_options.continuous_usage_stats (benchmark clients read tokens per chunk):
    every chunk carries its choice's usage so far, the final usage chunk the totals."""
    for create, kwargs in ((client.completions.create, {"prompt": "Hello there"}),
                           (client.chat.completions.create, {"messages": MESSAGES})):
        chunks = list(create(model="phi-3-mini", max_tokens=6, n=2, stream=True, extra_body={"ignore_eos": True},  # type: ignore[operator]
                             stream_options={"include_usage": True, "continuous_usage_stats": True}, **kwargs))
        *deltas, last = chunks
        assert last.choices == [] and last.usage.completion_tokens == 12
        prompt_tokens = last.usage.prompt_tokens
        seen: dict[int, int] = {}
        for chunk in deltas:
            usage, (choice,) = chunk.usage, chunk.choices
            assert usage is not None and usage.prompt_tokens == prompt_tokens
            assert usage.total_tokens == prompt_tokens + usage.completion_tokens
            assert usage.completion_tokens >= seen.get(choice.index, 0)  # counts only grow
            seen[choice.index] = usage.completion_tokens
        assert seen == {0: 6, 1: 6}
        # without continuous_usage_stats, only the last chunk has usage
        chunks = list(create(model="phi-3-mini", max_tokens=3, stream=True, extra_body={"ignore_eos": True},  # type: ignore[operator]
                             stream_options={"include_usage": True}, **kwargs))
        assert [c.usage is not None for c in chunks] == [False] * (len(chunks) - 1) + [True]
