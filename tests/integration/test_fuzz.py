"""Property-based requests on every route that takes a body, mixing valid values with values
from the whole JSON space (unbounded and huge integers, NaN and Infinity as JSON extensions,
deep nesting, strings of every Unicode class including lone surrogates, wrong types in every
field). No 5xx and every response valid against /openapi.json. The gateway's validation gets
the full count (520 on each generation route, 300 on /tokenize and /detokenize) against the
real gateway app over a scripted worker (tests/scripted_engine.py); a smaller sample of the same
generator goes end to end through the real engine, which then is healthy with nothing left
running. Fixed seed."""

from __future__ import annotations

import http.client
import json
from collections.abc import Iterator
from typing import Any

import jsonschema
import pytest
from hypothesis import HealthCheck, given, seed, settings
from hypothesis import strategies as st

from tests.helpers import ServiceProcess, free_port
from tests.scripted_engine import scripted_gateway

EXAMPLES = 520
END_TO_END_SHARE = 12  # one example in 12 of each route also goes through the real engine

any_text = st.text(st.characters(categories=["Cs", "Lu", "Ll", "Lo", "Nd", "So", "Zs", "Cc", "Co", "Mn", "Cf"]),
                   max_size=12)
json_values = st.recursive(st.none() | st.booleans() | st.integers() | st.floats() | any_text,
                           lambda inner: st.lists(inner, max_size=3) | st.dictionaries(any_text, inner, max_size=3),
                           max_leaves=12)
garbage = st.one_of(st.none(), st.booleans(), st.integers(-10**12, 10**12), st.integers(),
                    st.integers(2**63 - 2, 2**70), st.integers(-(2**70), -(2**63)),
                    st.floats(),  # NaN and +-Infinity go out as the JSON extensions NaN / Infinity
                    st.text(max_size=12), any_text, st.lists(st.integers(-5, 5), max_size=3), st.just({}),
                    st.just([]), st.just("NaN"), json_values)
small_text = st.text(alphabet=st.characters(codec="utf-8", exclude_categories=("Cs",)), max_size=40)
token_ids = st.lists(st.one_of(st.integers(-3, 5000), st.integers(2**63 - 2, 2**70)), min_size=0, max_size=12)
stops = st.one_of(small_text, st.lists(small_text, max_size=20))
common = {
    "model": st.one_of(st.sampled_from(["phi-3-mini", "microsoft/Phi-3-mini-4k-instruct", "gpt-4"]), garbage),
    # never null or absent: "what fits in the context" would make each request thousands of tokens long
    "max_tokens": st.one_of(st.integers(-2, 6), st.text(max_size=3), st.floats(allow_nan=False), st.just([])),
    "temperature": st.one_of(st.floats(-1, 3, allow_nan=False), garbage),
    "top_p": st.one_of(st.floats(-0.5, 1.5, allow_nan=False), garbage),
    "top_k": st.one_of(st.integers(-3, 50), garbage),
    "min_p": st.one_of(st.floats(-0.1, 1.1, allow_nan=False), garbage),
    "n": st.one_of(st.integers(-1, 20), garbage),
    "stop": st.one_of(stops, garbage),
    "stop_token_ids": st.one_of(token_ids, garbage),
    "seed": st.one_of(st.integers(-5, 2**64), garbage),
    "stream": st.one_of(st.booleans(), garbage),
    "stream_options": st.one_of(st.fixed_dictionaries({"include_usage": st.booleans()}), garbage),
    "ignore_eos": st.one_of(st.booleans(), garbage),
    "min_tokens": st.one_of(st.integers(-1, 4), garbage),
    "presence_penalty": st.one_of(st.floats(-3, 3, allow_nan=False), garbage),
    "frequency_penalty": st.one_of(st.floats(-3, 3, allow_nan=False), garbage),
    "repetition_penalty": st.one_of(st.floats(-1, 3, allow_nan=False), garbage),
    "logit_bias": st.one_of(st.dictionaries(st.one_of(st.integers(-2, 6000).map(str), small_text),
                                            st.floats(-150, 150, allow_nan=False), max_size=4), garbage),
    "user": st.one_of(small_text, garbage),
    "bogus_param": garbage,
}
completion_fields = {**common,
                     "prompt": st.one_of(small_text, st.lists(small_text, max_size=4), token_ids,
                                         st.lists(token_ids, max_size=3), garbage),
                     "echo": st.one_of(st.booleans(), garbage),
                     "logprobs": st.one_of(st.integers(-1, 25), garbage)}
message = st.fixed_dictionaries({"role": st.sampled_from(["system", "user", "assistant", "tool", ""]),
                                 "content": st.one_of(small_text, garbage)})
chat_fields = {**common,
               "messages": st.one_of(st.lists(message, max_size=4), garbage),
               "logprobs": st.one_of(st.booleans(), garbage),
               "top_logprobs": st.one_of(st.integers(-1, 25), garbage),
               "max_completion_tokens": st.one_of(st.integers(-1, 6), st.text(max_size=2))}


valid_common = {
    "model": st.sampled_from(["phi-3-mini", "microsoft/Phi-3-mini-4k-instruct"]),
    "max_tokens": st.integers(1, 6), "temperature": st.floats(0, 2), "top_p": st.floats(0.05, 1),
    "top_k": st.integers(-1, 50), "min_p": st.floats(0, 1), "n": st.integers(1, 3),
    "stop": st.one_of(st.text(min_size=1, max_size=4), st.lists(st.text(min_size=1, max_size=4), max_size=3)),
    "seed": st.integers(0, 2**63 - 1), "stream": st.booleans(),
    "ignore_eos": st.booleans(), "min_tokens": st.integers(0, 2),
    "presence_penalty": st.floats(-2, 2), "frequency_penalty": st.floats(-2, 2),
    "repetition_penalty": st.floats(0.5, 2), "user": small_text,
    "logit_bias": st.dictionaries(st.integers(0, 4000).map(str), st.floats(-100, 100), max_size=3),
}
valid_completion = {**valid_common, "prompt": st.one_of(st.text(min_size=1, max_size=40),
                                                        st.lists(st.integers(0, 4000), min_size=1, max_size=8)),
                    "echo": st.booleans(), "logprobs": st.integers(0, 5)}
valid_chat = {**valid_common,
              "messages": st.lists(st.fixed_dictionaries({"role": st.sampled_from(["system", "user", "assistant"]),
                                                          "content": st.text(max_size=30)}), min_size=1, max_size=3),
              "logprobs": st.booleans()}


def bodies(hostile: dict[str, Any], valid: dict[str, Any], required: str) -> st.SearchStrategy[Any]:
    """Half well-formed requests that reach the engine, half hostile ones."""
    def build(fields: dict[str, Any]) -> st.SearchStrategy[dict[str, Any]]:
        return st.fixed_dictionaries({required: fields[required], "max_tokens": fields["max_tokens"]},
                                     optional={k: v for k, v in fields.items() if k not in (required, "max_tokens")})
    hostile_bodies = build(hostile).map(lambda d: {k: v for k, v in d.items() if k != "bogus_param" or len(d) % 7 == 0})
    return st.one_of(build(valid), hostile_bodies, garbage, deep_bodies(required))


def deep_bodies(field: str) -> st.SearchStrategy[bytes]:
    """Nesting far deeper than any parser's recursion limit, as raw JSON."""
    def body(depth: int, opener: bytes) -> bytes:
        closer = b"]" if opener == b"[" else b"}"
        inner = opener * depth if opener == b"[" else b'{"a":' * depth
        return b'{"' + field.encode() + b'": ' + inner + b"1" * (opener == b"{") + closer * depth + b"}"
    return st.builds(body, st.integers(50, 20_000), st.sampled_from([b"[", b"{"]))


class Checker:
    def __init__(self, port: int) -> None:
        self.conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
        with_doc = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
        with_doc.request("GET", "/openapi.json")
        self.doc = json.loads(with_doc.getresponse().read())
        with_doc.close()
        self.sent = 0
        self.statuses: dict[int, int] = {}

    def validator(self, path: str, status: int, stream: bool) -> jsonschema.Draft202012Validator:
        responses = self.doc["paths"][path]["post"]["responses"]
        content = responses[str(status)]["content"]
        schema = content["text/event-stream"]["x-event-schema"] if stream else content["application/json"]["schema"]
        return jsonschema.Draft202012Validator({**schema, "components": self.doc["components"]})

    def post(self, path: str, body: Any) -> None:
        raw = body if isinstance(body, bytes) else json.dumps(body).encode()
        self.conn.request("POST", path, body=raw, headers={"Content-Type": "application/json"})
        resp = self.conn.getresponse()
        data = resp.read()
        self.sent += 1
        self.statuses[resp.status] = self.statuses.get(resp.status, 0) + 1
        assert resp.status < 500, (resp.status, body, data[:500])
        if resp.status == 200 and resp.getheader("Content-Type", "").startswith("text/event-stream"):
            events = [e for e in data.decode().split("\n\n") if e]
            assert events[-1] == "data: [DONE]", events[-3:]
            chunk_check = self.validator(path, 200, stream=True)
            error_check = self.validator(path, 400, stream=False)
            for event in events[:-1]:
                payload = json.loads(event.removeprefix("data: "))
                (error_check if "error" in payload else chunk_check).validate(payload)
            return
        self.validator(path, resp.status, stream=False).validate(json.loads(data))


@pytest.fixture(scope="module")
def gateway_checker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Checker]:
    """The real gateway app over a scripted worker: the gateway's own validation at full count."""
    port = free_port()
    with scripted_gateway(tmp_path_factory.mktemp("scripted"), port):
        checker = Checker(port)
        yield checker
        checker.conn.close()


@pytest.fixture(scope="module")
def checker(service: ServiceProcess) -> Iterator[Checker]:
    checker = Checker(service.port)
    yield checker
    checker.conn.close()


FUZZ = settings(max_examples=EXAMPLES, deadline=None, database=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow,
                                       HealthCheck.data_too_large, HealthCheck.filter_too_much])


tokenize_fields = {"model": common["model"], "max_tokens": garbage,  # max_tokens: an unknown field here
                   "prompt": st.one_of(small_text, any_text, garbage),
                   "messages": st.one_of(st.lists(message, max_size=3), garbage),
                   "add_special_tokens": st.one_of(st.booleans(), garbage), "bogus_param": garbage}
valid_tokenize = {"model": valid_common["model"], "max_tokens": st.just(None),
                  "prompt": st.text(min_size=1, max_size=60), "messages": st.just(None),
                  "add_special_tokens": st.booleans()}
detokenize_fields = {"model": common["model"], "max_tokens": garbage, "tokens": st.one_of(token_ids, garbage),
                     "bogus_param": garbage}
valid_detokenize = {"model": valid_common["model"], "max_tokens": st.just(None),
                    "tokens": st.lists(st.integers(0, 4000), max_size=20)}


def _drop_none(body: Any) -> Any:
    return {k: v for k, v in body.items() if v is not None} if isinstance(body, dict) else body


ROUTES = [
    ("/v1/completions", completion_fields, valid_completion, "prompt", EXAMPLES),
    ("/v1/chat/completions", chat_fields, valid_chat, "messages", EXAMPLES),
    ("/tokenize", tokenize_fields, valid_tokenize, "prompt", 300),
    ("/detokenize", detokenize_fields, valid_detokenize, "tokens", 300),
]
ROUTE_IDS = ["completions", "chat", "tokenize", "detokenize"]


def fuzz(checker: Checker, path: str, strategy: st.SearchStrategy[Any], examples: int) -> None:
    """`examples` generated bodies posted in order (a fixed seed: the same ones every run)."""
    before = checker.sent

    @seed(20261127)
    @settings(FUZZ, max_examples=examples)
    @given(strategy)
    def run(body: Any) -> None:
        checker.post(path, body)

    checker.statuses.clear()
    run()
    assert checker.sent - before >= examples - examples // 25
    print(path, "statuses", checker.statuses)


@pytest.mark.parametrize(("path", "hostile", "valid", "required", "examples"), ROUTES, ids=ROUTE_IDS)
def test_fuzz_route_through_the_gateway(gateway_checker: Checker, path: str, hostile: dict[str, Any],
                                        valid: dict[str, Any], required: str, examples: int) -> None:
    fuzz(gateway_checker, path, bodies(hostile, valid, required).map(_drop_none), examples)
    # the generator gets past validation, not only into its errors
    assert gateway_checker.statuses.get(200, 0) >= examples // 20, gateway_checker.statuses


@pytest.mark.integration
@pytest.mark.parametrize(("path", "hostile", "valid", "required", "examples"), ROUTES, ids=ROUTE_IDS)
def test_fuzz_route_end_to_end(checker: Checker, path: str, hostile: dict[str, Any], valid: dict[str, Any],
                               required: str, examples: int) -> None:
    fuzz(checker, path, bodies(hostile, valid, required).map(_drop_none), examples // END_TO_END_SHARE)
    assert checker.statuses.get(200, 0) >= 2, checker.statuses  # the engine answered some of them


@pytest.mark.integration
def test_engine_healthy_after_fuzzing(checker: Checker, service: ServiceProcess) -> None:
    assert service.wait_healthy(10)["status"] == "healthy"
    before = checker.statuses.get(200, 0)
    checker.post("/v1/completions", {"prompt": "still fine", "max_tokens": 8, "ignore_eos": True})
    assert checker.statuses.get(200, 0) == before + 1
    # nothing leaked: no request left running in the engine
    conn = http.client.HTTPConnection("127.0.0.1", service.metrics_port, timeout=30)
    conn.request("GET", "/metrics")
    text = conn.getresponse().read().decode()
    conn.close()
    running = [line for line in text.splitlines() if line.startswith("phi3_mini_requests_running ")]
    assert running and float(running[0].split()[1]) == 0
