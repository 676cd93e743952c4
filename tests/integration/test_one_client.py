"""One client never hurts another: the breaks an attack on the running service found, each by
name, on the real processes. Each of these failed before its fix.

They run on a busy host: CPU-bound processes started here keep both cores taken for the whole
module (a noisy neighbour, a compile, a conversion on the same box), and /health is watched
all along. A slow engine is not a stalled one: every bad input still gets its 4xx, a normal
request its 200, /health stays 200 and nothing fails with 503 (it did: one large answer on a
busy host turned the engine "stalled" and every client got 503). The tokenize flood (break 5)
and the stalled stream readers (break 6) run on a busy host too, on a service with a 1 s probe
and client timeout: tests/integration/test_processes.py."""

from __future__ import annotations

import asyncio
import gzip
import json
import os
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import aiohttp
import pytest

from tests.helpers import ServiceProcess, busy_cores, longest_tokens, wait_for

pytestmark = pytest.mark.integration
HUGE = 2**64  # beyond what the engine's wire protocol carries
BUSY_FOR_S = 900  # the burners' own bound; the module stops them when it ends


@pytest.fixture(scope="module", autouse=True)
def busy_host(service: ServiceProcess) -> Iterator[None]:
    """A CPU-bound process per core, at the service's own priority, for the whole module; and
    /health polled every 0.25 s meanwhile, which must answer 200 every time."""
    seen: list[int | str] = []
    done = threading.Event()

    def watch() -> None:
        while not done.wait(0.25):
            try:
                with urllib.request.urlopen(service.base_url + "/health", timeout=30) as resp:
                    seen.append(resp.status)
            except urllib.error.HTTPError as exc:
                seen.append(f"{exc.code} {exc.read()[:200]!r}")
            except OSError as exc:
                seen.append(repr(exc))

    watcher = threading.Thread(target=watch, name="health-watch")
    with busy_cores(BUSY_FOR_S):
        watcher.start()
        try:
            yield
        finally:
            done.set()
            watcher.join(60)
    assert seen and all(status == 200 for status in seen), [s for s in seen if s != 200][:10]


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


def test_service_still_serves_after_the_breaks(service: ServiceProcess) -> None:
    status, _, payload = post_raw(service, "/v1/completions", json.dumps({"prompt": "hi", "max_tokens": 2}).encode())
    assert status == 200, payload[:300]
    assert 1 <= json.loads(payload)["usage"]["completion_tokens"] <= 2


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
    procs = {}
    for role in ("serve", "engine", "orchestrator"):  # side by side: each is seconds of imports
        with open(tmp_path / f"{role}.log", "wb") as out:
            procs[role] = subprocess.Popen([sys.executable, "-m", "service.cli", role], env=env, stdout=out,
                                           stderr=subprocess.STDOUT)
    try:
        for role, proc in procs.items():
            out_path = tmp_path / f"{role}.log"
            if role == "orchestrator":  # it keeps running, refusing to write its report each interval
                wait_for(lambda: b"belongs to uid 65534" in out_path.read_bytes(), 120, "the orchestrator's refusal")
            else:
                assert proc.wait(120) == 2, out_path.read_text(errors="replace")[-2000:]  # a failed start
            assert "belongs to uid 65534" in out_path.read_text(errors="replace"), role
    finally:
        for proc in procs.values():
            if proc.poll() is None:
                proc.terminate()
                proc.wait(30)
    assert victim.read_bytes() == b"precious"
    assert not (theirs / "engine.sock").exists()


async def test_break_1_an_answer_too_large_for_a_frame_fails_alone(service: ServiceProcess) -> None:
    """One valid request whose answer passed the 16 MiB frame cap dropped the worker's shared
    connection: every other request in flight got 503 and /health flickered."""
    bias = {str(t): 100 for t in longest_tokens(2)}
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


# Break 6 (a stream whose client stops reading made the gateway buffer all the engine produced)
# is tested on a service with a 1 s client_timeout_s: tests/integration/test_processes.py,
# test_streams_whose_clients_stop_reading_are_aborted_at_a_bounded_cost.


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

