"""One client never hurts another: the breaks an attack on the running service found, each by
name, on the real processes. Each of these failed before its fix."""

from __future__ import annotations

import asyncio
import gzip
import json
import socket
import time

import aiohttp
import pytest

from tests.helpers import ServiceProcess

pytestmark = pytest.mark.integration
HUGE = 2**64  # beyond what the engine's wire protocol carries


def raw_http(svc: ServiceProcess, request: bytes, timeout_s: float = 30) -> tuple[int, dict[str, str], bytes]:
    """One request as bytes on a socket (for what HTTP clients refuse to send)."""
    with socket.create_connection(("127.0.0.1", svc.port), timeout=timeout_s) as sock:
        sock.sendall(request)
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = {k.lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
    return int(lines[0].split()[1]), headers, body


def post_raw(svc: ServiceProcess, path: str, body: bytes, *extra_headers: bytes) -> tuple[int, dict[str, str], bytes]:
    head = (f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\n").encode() + b"".join(h + b"\r\n" for h in extra_headers)
    return raw_http(svc, head + b"\r\n" + body)


BAD_INTEGERS = [
    ("/v1/completions", {"prompt": [1, 2, HUGE], "max_tokens": 1}, "prompt"),
    ("/v1/completions", {"prompt": [[5, HUGE]], "max_tokens": 1}, "prompt"),
    ("/v1/completions", {"prompt": "a", "max_tokens": 1, "stop_token_ids": [HUGE]}, "stop_token_ids"),
    ("/v1/completions", {"prompt": "a", "max_tokens": 1, "top_k": HUGE}, "top_k"),
    ("/v1/completions", {"prompt": "a", "max_tokens": 1, "logit_bias": {str(HUGE): 1}}, "logit_bias"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "a"}], "max_tokens": 1, "top_k": HUGE},
     "top_k"),
    ("/detokenize", {"tokens": [2**70]}, "tokens"),
]


async def test_break_2_bad_integers_are_400s_naming_the_field_and_release_their_slot(service: ServiceProcess) -> None:
    """Each of these took a queue slot for good (a 500 on the way to the worker); max_queue of
    them left every later request refused with 429."""
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=60)) as session:
        for path, body, field in BAD_INTEGERS:
            async with session.post(service.base_url + path, json=body) as resp:
                doc = await resp.json()
                assert resp.status == 400, (path, body, doc)
                assert doc["error"]["param"] == field and doc["error"]["type"] == "invalid_request_error", doc
        # more of them than max_queue (256) holds, and then the service still serves
        sem = asyncio.Semaphore(32)

        async def one(i: int) -> int:
            path, body, _ = BAD_INTEGERS[i % len(BAD_INTEGERS)]
            async with sem, session.post(service.base_url + path, json=body) as resp:
                return resp.status

        statuses = await asyncio.gather(*(one(i) for i in range(300)))
        assert set(statuses) == {400}
        async with session.post(service.base_url + "/v1/completions", json={"prompt": "hi", "max_tokens": 2}) as resp:
            assert resp.status == 200, await resp.text()
        async with session.post(service.base_url + "/tokenize", json={"prompt": "hi"}) as resp:
            assert resp.status == 200, await resp.text()


@pytest.mark.parametrize("name, body, headers", [
    ("deep nesting", b'{"prompt": ' + b"[" * 10_000 + b"]" * 10_000 + b"}", ()),
    ("invalid UTF-8", b'{"prompt": "caf\xe9", "max_tokens": 1}', ()),
    ("corrupt gzip", b"\x1f\x8b\x08\x00garbage-not-gzip", (b"Content-Encoding: gzip",)),
    ("non-UTF-8 request id", b'{"prompt": "a", "max_tokens": 1}', (b"X-Request-Id: id-\xff\xfe",)),
])
def test_break_3_undecodable_input_is_a_400_in_openai_json(service: ServiceProcess, name: str, body: bytes,
                                                          headers: tuple[bytes, ...]) -> None:
    status, response_headers, payload = post_raw(service, "/v1/completions", body, *headers)
    assert status == 400, (name, status, payload[:300])
    doc = json.loads(payload)
    assert doc["error"]["type"] == "invalid_request_error" and doc["error"]["message"], doc
    assert response_headers["content-type"].startswith("application/json")
    assert response_headers.get("x-request-id", "").isascii()


def test_break_3_gzip_bodies_that_are_valid_still_work(service: ServiceProcess) -> None:
    body = gzip.compress(json.dumps({"prompt": "hi", "max_tokens": 2}).encode())
    status, _, payload = post_raw(service, "/v1/completions", body, b"Content-Encoding: gzip")
    assert status == 200, payload[:300]


def test_service_answers_at_normal_speed_after_the_breaks(service: ServiceProcess) -> None:
    started = time.monotonic()
    status, _, payload = post_raw(service, "/v1/completions", json.dumps({"prompt": "hi", "max_tokens": 2}).encode())
    assert status == 200, payload[:300]
    assert time.monotonic() - started < 30
