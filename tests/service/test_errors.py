"""Mapping msgspec's validation errors to OpenAI errors that name the field."""

from __future__ import annotations

import json

import msgspec
import pytest

from service.gateway.errors import error_body, from_validation
from service.gateway.schemas import CompletionRequest

decode = msgspec.json.Decoder(CompletionRequest).decode


@pytest.mark.parametrize(("body", "param"), [
    ({"prompt": "x", "max_tokens": "a"}, "max_tokens"),
    ({"prompt": "x", "temperature": 9}, "temperature"),
    ({"prompt": "x", "stream_options": {"include_usage": "no"}}, "stream_options.include_usage"),
    ({"prompt": "x", "stop": ["a", ""]}, "stop"),
    ({"prompt": "x", "bogus": 1}, "bogus"),
    ({}, "prompt"),
    ({"prompt": "x", "stream_options": {"bogus": 1}}, "stream_options.bogus"),
    ({"prompt": "x", "response_format": {"type": "xml"}}, "response_format.type"),
    ({"prompt": "x", "response_format": {"type": "json_schema"}}, "response_format.json_schema"),
    ({"prompt": "x", "response_format": {"type": "json_schema", "json_schema": {"schema": {}}}},
     "response_format.json_schema.name"),
    ({"prompt": "x", "response_format": {"type": "json_schema", "json_schema": {"name": "a", "schema": []}}},
     "response_format.json_schema.schema"),
])
def test_param_is_named(body: dict, param: str) -> None:
    with pytest.raises(msgspec.ValidationError) as info:
        decode(json.dumps(body))
    err = from_validation(info.value)
    assert err.status == 400
    assert err.param == param
    assert param in err.message


def test_error_body_is_openai_shaped() -> None:
    body = json.loads(error_body(400, "bad", "n"))
    assert body == {"error": {"message": "bad", "type": "invalid_request_error", "param": "n", "code": None}}
    assert json.loads(error_body(503, "gone"))["error"]["type"] == "service_unavailable_error"
