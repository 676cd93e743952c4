"""One client never hurts another: the breaks an attack on the running service found, each by
name, on the real processes. Each of these failed before its fix."""

from __future__ import annotations

import asyncio
import gzip
import json
import socket
import urllib.request
import time
from pathlib import Path

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


def _log_lines_since(svc: ServiceProcess, offset: int) -> list[dict]:
    text = svc.log_path.read_bytes()[offset:].decode(errors="replace")
    lines = []
    for line in text.splitlines():
        try:
            lines.append(json.loads(line))
        except ValueError:
            pass
    return lines


async def test_break_4_a_client_gone_mid_stream_is_a_499_without_a_traceback(service: ServiceProcess) -> None:
    offset = service.log_path.stat().st_size
    body = {"prompt": "hang up on me", "max_tokens": 400, "ignore_eos": True, "stream": True}

    async def hang_up(i: int) -> str:
        headers = {"X-Request-Id": f"hangup-{i}"}
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=60)) as session:
            async with session.post(service.base_url + "/v1/completions", json=body, headers=headers) as resp:
                if resp.status == 429:  # refused at once by efficiency mode: nothing to hang up on
                    return headers["X-Request-Id"]
                assert resp.status == 200
                for _ in range(1 + i % 5):  # a few events, then the connection is dropped
                    await resp.content.readline()
                resp.connection.transport.abort()  # type: ignore[union-attr]
        return headers["X-Request-Id"]

    async def hang_up_early(i: int) -> str:
        """Gone at any moment: before the first event, while the stream is being prepared."""
        request_id = f"hangup-early-{i}"
        data = json.dumps(body).encode()
        reader, writer = await asyncio.open_connection("127.0.0.1", service.port)
        writer.write(f"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     f"X-Request-Id: {request_id}\r\nContent-Length: {len(data)}\r\n\r\n".encode() + data)
        await writer.drain()
        await asyncio.sleep(0.002 * i)
        writer.transport.abort()
        return request_id

    ids = set(await asyncio.gather(*(hang_up(i) for i in range(15)), *(hang_up_early(i) for i in range(60))))

    def logged() -> list[dict]:
        return [e for e in _log_lines_since(service, offset) if e.get("request_id") in ids and "status" in e]

    deadline = time.monotonic() + 30
    while len(logged()) < len(ids) and time.monotonic() < deadline:
        await asyncio.sleep(0.2)
    lines = _log_lines_since(service, offset)
    statuses = [e["status"] for e in logged()]
    assert 499 in statuses and set(statuses) <= {499, 429}, statuses  # 429: refused before it began
    assert not [e for e in lines if e.get("event") == "unhandled error"], "a disconnect logged as an unhandled error"
    # and they were aborted in the engine: nothing of them keeps running
    async with aiohttp.ClientSession() as session:
        for _ in range(100):
            async with session.get(f"http://127.0.0.1:{service.metrics_port}/metrics") as resp:
                text = await resp.text()
            running = next(float(x.split()[1]) for x in text.splitlines() if x.startswith("phi3_mini_requests_running "))
            if running == 0:
                break
            await asyncio.sleep(0.2)
        assert running == 0


def test_break_7_a_runtime_dir_of_another_user_is_refused(tmp_path: Path) -> None:
    """An existing /tmp/citadel-llm-0-<port> owned by another user, mode 0777, was used as it
    was: a link placed there let the root orchestrator overwrite a root-owned file."""
    import os
    import subprocess
    import sys

    if os.getuid() != 0:
        pytest.skip("needs root to make a dir of another user")
    theirs = tmp_path / "theirs"
    theirs.mkdir()
    theirs.chmod(0o777)
    os.chown(theirs, 65534, 65534)
    victim = tmp_path / "victim"
    victim.write_bytes(b"precious")
    (theirs / "efficiency.json").symlink_to(victim)
    env = {**ServiceProcess().env, "PHI_3_MINI_RUNTIME_DIR": str(theirs)}
    for role in ("serve", "engine", "orchestrator"):
        proc = subprocess.Popen([sys.executable, "-m", "service.cli", role], env=env, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT)
        try:
            out, _ = proc.communicate(timeout=8 if role == "orchestrator" else 120)
        except subprocess.TimeoutExpired:
            proc.terminate()
            out, _ = proc.communicate(timeout=30)
        text = out.decode(errors="replace")
        assert "belongs to uid 65534" in text, text[-2000:]
        if role in ("serve", "engine"):
            assert proc.returncode == 2, text[-2000:]  # a failed start, before loading anything
    assert victim.read_bytes() == b"precious"
    assert not (theirs / "engine.sock").exists()


def _longest_tokens(count: int) -> list[int]:
    from tests.helpers import demo_model_dir

    vocab = json.loads((demo_model_dir() / "tokenizer.json").read_text())["model"]["vocab"]
    return [i for _, i in sorted(((-len(tok), i) for tok, i in vocab.items()))[:count]]


async def test_break_1_an_answer_too_large_for_a_frame_fails_alone(service: ServiceProcess) -> None:
    """One valid request whose answer passed the 16 MiB frame cap dropped the worker's shared
    connection: every other request in flight got 503 and /health flickered."""
    bias = {str(t): 100 for t in _longest_tokens(2)}
    big = {"prompt": "a", "max_tokens": 2040, "n": 16, "logprobs": 20, "ignore_eos": True, "logit_bias": bias}
    normal = {"prompt": "others", "max_tokens": 200, "ignore_eos": True}
    health: list[int] = []
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=280)) as session:
        async def post(body: dict) -> tuple[int, dict]:
            async with session.post(service.base_url + "/v1/completions", json=body) as resp:
                return resp.status, await resp.json()

        async def others() -> list[tuple[int, dict]]:
            results = []
            while not big_task.done():
                results += await asyncio.gather(*(post(normal) for _ in range(4)))
            return results

        async def poll_health() -> None:
            while not big_task.done():
                async with session.get(service.base_url + "/health") as resp:
                    health.append(resp.status)
                await asyncio.sleep(0.2)

        big_task = asyncio.ensure_future(post(big))
        other_results, _ = await asyncio.gather(others(), poll_health())
        status, doc = await big_task
    assert status == 400 and doc["error"]["code"] == "answer_too_large", (status, str(doc)[:300])
    assert "16 MiB frame cap" in doc["error"]["message"]
    # every other request was served in full (or refused at once by efficiency mode), none lost
    assert {s for s, _ in other_results} <= {200, 429} and 200 in {s for s, _ in other_results}, other_results
    assert all(d["usage"]["completion_tokens"] == 200 for s, d in other_results if s == 200)
    assert set(health) == {200}, health


def test_break_6_a_stream_reader_that_stops_reading_costs_a_bounded_amount(service: ServiceProcess) -> None:
    """Two streams whose clients stopped reading made the gateway buffer everything the engine
    kept producing (RSS 94 -> 187 MB) until the 15 s stall deadline."""
    import psutil

    gateway = service.children()["gateway"]
    bias = {str(t): 100 for t in _longest_tokens(2)}  # long tokens: large events
    body = json.dumps({"prompt": "a", "max_tokens": 2000, "n": 16, "logprobs": 5, "ignore_eos": True,
                       "logit_bias": bias, "stream": True}).encode()
    before = gateway.memory_info().rss
    peak = before
    socks = []
    started = time.monotonic()
    try:
        for _ in range(2):
            sock = socket.create_connection(("127.0.0.1", service.port))
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # and then it never reads
            sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                         + f"Content-Length: {len(body)}\r\n\r\n".encode() + body)
            socks.append(sock)
        running = 2.0
        while time.monotonic() - started < 60:
            peak = max(peak, gateway.memory_info().rss)
            with urllib.request.urlopen(f"http://127.0.0.1:{service.metrics_port}/metrics", timeout=10) as resp:
                text = resp.read().decode()
            running = next(float(x.split()[1]) for x in text.splitlines() if x.startswith("phi3_mini_requests_running "))
            if running == 0 and time.monotonic() - started > 1:
                break
            time.sleep(0.2)
        aborted_after_s = time.monotonic() - started
    finally:
        for sock in socks:
            sock.close()
    assert running == 0, "the streams nobody reads still run in the engine"
    grown_mb = (peak - before) / 2**20
    print(f"streams nobody reads: aborted after {aborted_after_s:.1f} s, gateway grew {grown_mb:.1f} MB")
    assert grown_mb < 12, f"gateway grew {grown_mb:.0f} MB"  # 2 x 64 events of ~30 KB, decoded
    assert psutil.pid_exists(gateway.pid)
    status, _, payload = post_raw(service, "/v1/completions", json.dumps({"prompt": "hi", "max_tokens": 2}).encode())
    assert status == 200, payload[:300]


@pytest.mark.parametrize("name, request_bytes", [
    ("bad method", b"G<T> /v1/models HTTP/1.1\r\nHost: x\r\n\r\n"),
    ("over-long line", b"GET /" + b"SECRETSECRET" * 1000 + b" HTTP/1.1\r\nHost: x\r\n\r\n"),
    ("over-long header", b"GET /v1/models HTTP/1.1\r\nHost: x\r\nX-Big: " + b"SECRETSECRET" * 1000 + b"\r\n\r\n"),
    ("malformed header", b"GET /v1/models HTTP/1.1\r\nHost: x\r\nNo colon SECRETSECRET\r\n\r\n"),
])
def test_break_10_aiohttps_own_protocol_errors_are_openai_json(service: ServiceProcess, name: str,
                                                               request_bytes: bytes) -> None:
    status, headers, payload = raw_http(service, request_bytes)
    assert 400 <= status < 500, (name, status, payload[:200])
    assert headers["content-type"].startswith("application/json"), (name, headers)
    doc = json.loads(payload)
    assert doc["error"]["type"] == "invalid_request_error" and doc["error"]["code"] == "invalid_http_request"
    assert b"SECRET" not in payload and b"G<T>" not in payload  # nothing of the request is echoed
