"""`citadel-llm serve` as a supervisor: roles, restarts after kill -9, clean stop, no orphans.

These tests kill processes, so they run their own service instead of the shared one.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import signal
import socket
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest

from tests.helpers import ServiceProcess, busy_cores, longest_tokens, running, wait_for

pytestmark = pytest.mark.integration
REQUEST_TIMEOUT_S = 6  # long enough for a stream to fill the socket buffers of a client that stops reading


GRACEFUL_S = 2.0
SMALL_QUEUE_DEADLINE_S = 120


@pytest.fixture(scope="module")
def own_service() -> Iterator[ServiceProcess]:
    # a fast health probe and short deadlines, so that stalls, deadlines and slow clients show in
    # seconds; vLLM's EngineCore in its own process (the demo model's default), which these
    # tests kill, stop and look for
    with running(ServiceProcess(health_check_interval="1", request_timeout_s=str(REQUEST_TIMEOUT_S), max_queue="64",
                                client_timeout_s="1", engine_core="process")) as svc:
        yield svc


@pytest.fixture(scope="module")
def small_queue() -> Iterator[ServiceProcess]:
    """A queue of 4 behind 16 sequences, no latency refusals, a long deadline, a short graceful
    stop, and 1 s for a client's writes to drain; the last test of the module stops it."""
    with running(ServiceProcess(max_queue="4", efficiency_mode="false", stop_timeout_s=str(GRACEFUL_S),
                                request_timeout_s=str(SMALL_QUEUE_DEADLINE_S), client_timeout_s="1")) as svc:
        yield svc


def complete(svc: ServiceProcess, max_tokens: int = 2) -> dict:
    req = urllib.request.Request(svc.base_url + "/v1/completions", method="POST",
                                 data=json.dumps({"prompt": "hi", "max_tokens": max_tokens}).encode(),
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=30) as resp:
        return json.loads(resp.read())


def health_status(svc: ServiceProcess) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(svc.base_url + "/health", timeout=5) as resp:
            return resp.status, json.loads(resp.read())["status"]
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())["status"]


def test_each_role_shows_in_its_command_line(own_service: ServiceProcess) -> None:
    roles = own_service.children()
    assert set(roles) == {"engine", "gateway", "orchestrator"}

def test_engine_processes_do_not_load_what_vllm_leaves_unused_on_cpu(own_service: ServiceProcess) -> None:
    """triton (vLLM turns it off without a CPU backend), gRPC under OpenTelemetry (tracing
    is never configured), scikit-learn with pandas and pyarrow, scipy and OpenCV (installed in
    this venv; transformers and vLLM would import them for features a text server never uses)
    stay out of the engine worker and of its spawned EngineCore: ~85 + 150 MB each."""
    assert importlib.util.find_spec("sklearn"), "the test extra (lm-eval) installs what the check looks for"
    engine = own_service.children()["engine"]
    engine_core = [p for p in engine.children(recursive=True) if "EngineCore" in " ".join(p.cmdline())]
    assert engine_core, "vLLM's EngineCore runs as the engine worker's child"
    for proc in (engine, *engine_core):
        libraries = Path(f"/proc/{proc.pid}/maps").read_text()
        assert "libtorch_cpu.so" in libraries  # the check reads the right process
        assert "libtriton.so" not in libraries and "cygrpc" not in libraries, proc.cmdline()
        for package in ("sklearn", "scipy", "pandas", "pyarrow", "cv2"):
            assert f"/site-packages/{package}/" not in libraries, (package, proc.cmdline())
    assert 1 <= complete(own_service)["usage"]["completion_tokens"] <= 2  # and it serves like this



def _stream_outcome(svc: ServiceProcess, began: threading.Event | None = None) -> tuple[str, float]:
    """Stream a long completion; how it ended ("error" event, "done", "cut") and when; `began`
    is set at its first token."""
    req = urllib.request.Request(svc.base_url + "/v1/completions", method="POST", headers={"Content-Type": "application/json"},
                                 data=json.dumps({"prompt": "s", "max_tokens": 1500, "ignore_eos": True,
                                                  "stream": True}).encode())
    saw_error = False
    try:
        with urllib.request.urlopen(req, timeout=30) as resp:
            for raw in resp:
                line = raw.decode().strip()
                if line.startswith("data: {") and '"error"' in line:
                    saw_error = True
                elif line.startswith("data: {") and began is not None:
                    began.set()
                if line == "data: [DONE]":
                    return ("error" if saw_error else "done"), time.monotonic()
    except urllib.error.HTTPError as exc:  # failed before its first event: a plain JSON error
        return str(exc.code), time.monotonic()
    except OSError:
        pass
    return "cut", time.monotonic()


def test_engine_killed_with_50_in_flight_answers_all_and_is_replaced(own_service: ServiceProcess) -> None:
    """kill -9 of the engine worker with 50 requests in flight: each gets exactly one answer
    before a new engine serves (a plain request 503, a stream that had begun an error event
    and [DONE]); /health says unavailable; the old EngineCore does not outlive its worker;
    the new engine serves, and the orchestrator reconnects to it by itself."""
    from concurrent.futures import ThreadPoolExecutor

    own_service.wait_healthy(30)
    engine = own_service.children()["engine"]
    engine_core = engine.children(recursive=True)
    assert engine_core, "vLLM's EngineCore runs as the engine worker's child"

    began = threading.Event()

    def one(i: int) -> tuple[str, float]:
        if i % 3 == 0:
            return _stream_outcome(own_service, began)
        status, _ = post(own_service, {"prompt": "x", "max_tokens": 1500, "ignore_eos": True})
        return str(status), time.monotonic()

    with ThreadPoolExecutor(max_workers=50) as pool:
        futures = [pool.submit(one, i) for i in range(50)]
        # the requests are in the engine (or on their way to it) when it dies: killed at a stream's
        # first token, not at the next sample of a gauge (on a busy host that came after the
        # requests' 6 s deadline: every one answered 504 before the kill)
        assert began.wait(30), "a stream's first token"
        engine.send_signal(signal.SIGKILL)
        wait_for(lambda: health_status(own_service) == (503, "unavailable"), 30, "/health to say unavailable")
        outcomes = [f.result(timeout=60) for f in futures]
    wait_for(lambda: not any(p.is_running() and p.status() != psutil.STATUS_ZOMBIE for p in engine_core),
             30, "the old EngineCore to exit")
    own_service.wait_healthy(240)
    back_at = time.monotonic()
    non_streaming = [o for i, o in enumerate(outcomes) if i % 3]
    streams = [o for i, o in enumerate(outcomes) if i % 3 == 0]
    # none waited for the new engine: answered 503 at the kill, not served or cut later
    assert all(status == "503" and at < back_at for status, at in non_streaming), non_streaming
    # a stream that had begun ends with an error event and [DONE]; one that had not gets a 503
    assert all(how in ("error", "503") and at < back_at for how, at in streams), streams
    assert any(how == "error" for how, _ in streams), streams
    new_engine = own_service.children()["engine"]
    assert new_engine.pid != engine.pid
    assert complete(own_service)["choices"][0]["finish_reason"] in ("stop", "length")
    wait_for(lambda: orchestrator_engine_pid(own_service) == new_engine.pid, 30, "the orchestrator to reconnect")
    assert engine_running(own_service) == 0  # nothing of the 50 is left behind in the new engine


def orchestrator_engine_pid(svc: ServiceProcess) -> int | None:
    """The engine worker pid in the orchestrator's last report, if it reached the engine."""
    with urllib.request.urlopen(svc.base_url + "/efficiency", timeout=10) as resp:
        doc = json.loads(resp.read())
    report = doc["orchestrator"] or {}
    return report.get("engine_pid") if report.get("connected_to_engine") else None


def test_gateway_killed_is_restarted(own_service: ServiceProcess) -> None:
    gateway = own_service.children()["gateway"]
    gateway.send_signal(signal.SIGKILL)
    wait_for(lambda: own_service.replaced("gateway", gateway), 20, "a new gateway")
    own_service.wait_healthy(60)
    assert complete(own_service)["choices"]


def test_orchestrator_killed_is_restarted_without_disturbing_serving(own_service: ServiceProcess) -> None:
    orchestrator = own_service.children()["orchestrator"]
    orchestrator.send_signal(signal.SIGKILL)
    assert complete(own_service)["choices"]
    wait_for(lambda: own_service.replaced("orchestrator", orchestrator), 20, "a new orchestrator")


def post(svc: ServiceProcess, body: dict, timeout_s: float = 30) -> tuple[int, dict]:
    req = urllib.request.Request(svc.base_url + "/v1/completions", method="POST", data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout_s) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def _gauge(svc: ServiceProcess, name: str) -> float:
    with urllib.request.urlopen(f"http://127.0.0.1:{svc.metrics_port}/metrics", timeout=10) as resp:
        text = resp.read().decode()
    return next(float(line.split()[1]) for line in text.splitlines() if line.startswith(name + " "))


def engine_running(svc: ServiceProcess) -> float:
    return _gauge(svc, "phi3_mini_requests_running")


def gateway_in_flight(svc: ServiceProcess) -> float:
    return _gauge(svc, "phi3_mini_requests_in_flight")


def tokens_for(svc: ServiceProcess, seconds: float, n: int = 1) -> int:
    """How many tokens a request of n sequences generates in about `seconds` on this machine,
    from a timed 64-token request (at most what the context holds)."""
    started = time.monotonic()
    status, _ = post(svc, {"prompt": "pace", "max_tokens": 64, "n": n, "ignore_eos": True})
    assert status == 200
    per_token_s = (time.monotonic() - started) / 64
    return max(64, min(2000, int(seconds / per_token_s)))


# 16 sequences of 2,000 tokens each: ~2,000 engine steps of a batch of 16, which no CPU runs
# within REQUEST_TIMEOUT_S (a step of the demo model's batch costs milliseconds in vLLM's
# scheduling and sampling alone), so a request of it always meets its deadline
OUTLASTS_THE_DEADLINE = {"max_tokens": 2000, "n": 16, "ignore_eos": True}


def admission(svc: ServiceProcess) -> dict:
    """/efficiency's admission counters, and the refusals by reason of the engine and the gateway."""
    with urllib.request.urlopen(svc.base_url + "/efficiency", timeout=10) as resp:
        doc = json.loads(resp.read())
    return {**doc["admission"], "refused": doc["refused"]["engine"], "gateway": doc["refused"]["gateway"]}


def test_deadline_gives_504_and_aborts_in_the_engine(own_service: ServiceProcess) -> None:
    started = time.monotonic()
    status, body = post(own_service, {"prompt": "long", **OUTLASTS_THE_DEADLINE}, timeout_s=120)
    elapsed = time.monotonic() - started
    assert status == 504, body
    assert body["error"]["code"] == "timeout" and body["error"]["type"] == "timeout_error", body
    assert elapsed >= REQUEST_TIMEOUT_S - 0.1  # never before its deadline
    wait_for(lambda: engine_running(own_service) == 0, 30, "the engine to drop the request")


def test_overload_is_refused_with_429_and_every_request_is_answered_once(own_service: ServiceProcess) -> None:
    """100 requests at once, each longer than its deadline, against 16 running and 64 waiting:
    whatever the machine's speed, the first 80 in hold their places until their deadline, so
    at least 20 are refused. Every request gets exactly one answer from the documented set
    (429 `overloaded` with Retry-After, 504 at its deadline; 200 if a machine did finish one),
    /efficiency counts exactly the refusals the clients saw, and nothing is left behind."""
    from concurrent.futures import ThreadPoolExecutor

    before = admission(own_service)
    body = {"prompt": "busy", "max_tokens": 2000, "ignore_eos": True}

    def one(_: int) -> tuple[int, dict, str | None]:
        req = urllib.request.Request(own_service.base_url + "/v1/completions", method="POST",
                                     data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=120) as resp:
                return resp.status, json.loads(resp.read()), None
        except urllib.error.HTTPError as exc:
            return exc.code, json.loads(exc.read()), exc.headers.get("Retry-After")

    with ThreadPoolExecutor(max_workers=100) as pool:
        results = list(pool.map(one, range(100)))
    statuses = [status for status, _, _ in results]
    assert len(results) == 100 and set(statuses) <= {200, 429, 504}, statuses
    refused = [(answer, retry) for status, answer, retry in results if status == 429]
    assert len(refused) >= 100 - 16 - 64, statuses
    assert all(answer["error"]["code"] == "overloaded" and retry and int(retry) >= 1 for answer, retry in refused)
    assert all(answer["error"]["code"] == "timeout" for status, answer, _ in results if status == 504)
    assert all(answer["usage"]["completion_tokens"] == 2000 for status, answer, _ in results if status == 200)
    wait_for(lambda: engine_running(own_service) == 0, 30, "the engine to drop what passed its deadline")
    after = admission(own_service)
    refused_by_engine = sum(after["refused"].values()) - sum(before["refused"].values())
    assert refused_by_engine == len(refused), (before, after)
    # the gateway's counters (/metrics' phi3_mini_requests_refused_total) say the same
    assert after["gateway"]["overloaded"] - before["gateway"]["overloaded"] == len(refused), (before, after)
    assert after["gateway"]["deadline"] - before["gateway"]["deadline"] == statuses.count(504), (before, after)
    assert after["admitted_total"] - before["admitted_total"] == 100 - len(refused), (before, after)
    wait_for(lambda: (now := admission(own_service))["in_flight"] == 0 == now["queued"], 30,
             "in-flight and queued back to 0")


def test_stalled_engine_turns_health_503_and_recovers(own_service: ServiceProcess) -> None:
    own_service.wait_healthy(30)
    engine = own_service.children()["engine"]
    engine.suspend()  # SIGSTOP
    try:
        wait_for(lambda: health_status(own_service) == (503, "stalled"), 30, "/health to say stalled")
        # refused by the gateway itself, not sent to a stopped engine to wait for its deadline
        status, body = post(own_service, {"prompt": "x", "max_tokens": 2}, timeout_s=REQUEST_TIMEOUT_S - 1)
        assert status == 503 and body["error"]["code"] == "engine_unavailable", body
        assert "stalled" in body["error"]["message"], body
    finally:
        engine.resume()  # SIGCONT
    wait_for(lambda: health_status(own_service) == (200, "healthy"), 30, "/health to recover")
    assert post(own_service, {"prompt": "x", "max_tokens": 2})[0] == 200


def _closed_by_server(sock: socket.socket) -> bool:
    """True once the server has closed or reset the connection (never blocks)."""
    try:
        sock.sendall(b"X-Slow: 1\r\n")
        return sock.recv(4096) == b""
    except BlockingIOError:
        return False
    except OSError:
        return True


def test_trickled_headers_are_cut_off_without_holding_back_others(own_service: ServiceProcess) -> None:
    socks = []
    for _ in range(20):
        sock = socket.create_connection(("127.0.0.1", own_service.port), timeout=5)
        sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\n")
        sock.setblocking(False)
        socks.append(sock)
    started = time.monotonic()
    closed_at: dict[int, float] = {}
    try:
        served = complete(own_service)  # a well-behaved client meanwhile
        assert served["choices"]
        while len(closed_at) < len(socks) and time.monotonic() - started < 30:  # a byte every 0.2 s each
            for i, sock in enumerate(socks):
                if i not in closed_at and _closed_by_server(sock):
                    closed_at[i] = time.monotonic() - started
            time.sleep(0.2)
    finally:
        for sock in socks:
            sock.close()
    assert len(closed_at) == len(socks), f"{len(socks) - len(closed_at)} trickling connections still open"
    # client_timeout_s=1 for the whole head: never before it, however fast the bytes come
    assert all(t > 0.9 for t in closed_at.values()), sorted(closed_at.values())


def test_trickled_body_gets_408(own_service: ServiceProcess) -> None:
    with socket.create_connection(("127.0.0.1", own_service.port), timeout=30) as sock:
        sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                     b"Content-Length: 100\r\n\r\n{\"prompt\": ")
        started = time.monotonic()
        head = sock.recv(65536).decode(errors="replace")
        assert time.monotonic() - started > 0.9  # client_timeout_s=1: the body had that long
    assert head.startswith("HTTP/1.1 408"), head
    body = json.loads(head.split("\r\n\r\n", 1)[1])
    assert body["error"]["code"] == "request_timeout"


def test_a_stopped_engine_core_with_requests_in_flight_is_a_stall(own_service: ServiceProcess) -> None:
    """No output while the EngineCore computes is a slow step, not a stall (the health probe
    looks at its CPU time); no output while it uses no CPU is one: requests in flight get
    503 and /health says stalled until it runs again."""
    from concurrent.futures import ThreadPoolExecutor

    from shared.process_tree import role_of

    own_service.wait_healthy(30)
    [core] = [proc for proc in own_service.tree() if role_of(proc) == "engine-core"]
    with ThreadPoolExecutor(1) as pool:
        pending = pool.submit(post, own_service, {"prompt": "x", "max_tokens": 1500, "ignore_eos": True})
        wait_for(lambda: engine_running(own_service) == 1, 30, "the request to be running")
        core.suspend()  # SIGSTOP: the EngineCore alone, the worker still answers its probes
        try:
            wait_for(lambda: health_status(own_service) == (503, "stalled"), 30, "/health to say stalled")
            status, body = pending.result(30)
            # failed as stalled, or at its own deadline (6 s) if the verdict came later than that
            assert (status, body["error"]["code"]) in ((503, "engine_unavailable"), (504, "timeout")), body
            assert status == 504 or "stalled" in body["error"]["message"], body
        finally:
            core.resume()
    wait_for(lambda: health_status(own_service) == (200, "healthy"), 30, "/health to recover")
    assert post(own_service, {"prompt": "x", "max_tokens": 2})[0] == 200


def test_break_5_tokenizing_megabytes_does_not_starve_the_worker(own_service: ServiceProcess) -> None:
    """30 concurrent /tokenize of ~1 MB each made the 1 s progress probe time out: the engine
    was marked stalled, /health went 503 and completions got 503. Here on a host whose cores
    others take: the flood is answered, completions meanwhile are served, /health stays 200."""
    import random
    import threading
    from concurrent.futures import ThreadPoolExecutor

    own_service.wait_healthy(30)
    words = [f"w{random.Random(i).randrange(10**6)}" for i in range(5000)]
    text = " ".join(random.Random(1).choice(words) for _ in range(140_000))[:1_000_000]
    health: list[tuple[int, str]] = []
    done = threading.Event()

    def tokenize(_: int) -> int:
        req = urllib.request.Request(own_service.base_url + "/tokenize", data=json.dumps({"prompt": text}).encode(),
                                     headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=60) as resp:
                return resp.status
        except urllib.error.HTTPError as exc:
            return exc.code

    def watch() -> None:
        while not done.is_set():
            health.append(health_status(own_service))
            time.sleep(0.2)

    watcher = threading.Thread(target=watch)
    watcher.start()
    try:
        with busy_cores(300), ThreadPoolExecutor(max_workers=30) as pool:
            flood = [pool.submit(tokenize, i) for i in range(30)]
            served = 0
            while not served or (not all(f.done() for f in flood) and served < 100):
                status, body = post(own_service, {"prompt": "meanwhile", "max_tokens": 8, "ignore_eos": True})
                assert status == 200 and body["usage"]["completion_tokens"] == 8, (status, body)
                served += 1
            statuses = [f.result() for f in flood]
    finally:
        done.set()
        watcher.join(10)
    assert set(statuses) <= {200, 504}, statuses  # answered, or past the tokenize deadline; never 5xx else
    assert 200 in statuses
    assert health and all(code == 200 for code, _ in health), health
    assert served >= 1


def test_the_health_probe_is_not_counted_as_traffic(own_service: ServiceProcess) -> None:
    def admitted() -> int:
        with urllib.request.urlopen(own_service.base_url + "/efficiency", timeout=10) as resp:
            return int(json.loads(resp.read())["admission"]["admitted_total"])

    before = admitted()
    time.sleep(3.5)  # three probes at health_check_interval=1 on an idle engine
    assert admitted() == before


def test_sigterm_drains_then_stops_everything_cleanly(own_service: ServiceProcess) -> None:
    import threading

    tree = own_service.tree()
    assert len(tree) >= 5  # serve, engine, EngineCore, gateway, orchestrator
    # a request that generates for about 3 s at the pace measured now (within the 6 s
    # deadline): the drain keeps the listener open, answering 503, while it runs
    tokens = tokens_for(own_service, seconds=3.0)
    result: dict = {}
    in_flight = threading.Thread(target=lambda: result.update(
        zip(("status", "body"), post(own_service, {"prompt": "drain me", "max_tokens": tokens, "ignore_eos": True}))))
    in_flight.start()
    wait_for(lambda: engine_running(own_service) == 1, 30, "the request to be in flight")
    assert own_service.proc is not None
    own_service.proc.send_signal(signal.SIGTERM)
    wait_for(lambda: health_status(own_service) == (503, "draining"), 30, "/health to say draining")
    refused, body = post(own_service, {"prompt": "late", "max_tokens": 2})
    assert refused == 503 and body["error"]["code"] == "draining"
    in_flight.join(60)
    assert not in_flight.is_alive()
    # kept running through the drain, never cut by the stop: finished in full, or at its own
    # deadline if this machine slowed down after the measurement
    if result["status"] == 200:
        assert result["body"]["usage"]["completion_tokens"] == tokens, result
    else:
        assert result["status"] == 504 and result["body"]["error"]["code"] == "timeout", result
    code = own_service.stop(timeout_s=60)
    assert code == 0
    wait_for(lambda: not any(p.is_running() and p.status() != psutil.STATUS_ZOMBIE for p in tree), 10,
             "every process of the tree to exit")
    assert not (own_service.runtime_dir / "engine.sock").exists()


def test_waiting_means_one_thing_and_is_counted_in_one_place(small_queue: ServiceProcess) -> None:
    """max_queue counts requests waiting to run (in the engine's queue or vLLM's), not those
    running: 16 running and 4 waiting are all served; beyond that the engine refuses."""
    from concurrent.futures import ThreadPoolExecutor

    svc = small_queue
    tokens = tokens_for(svc, seconds=1.0)  # alone; in a batch of 20 longer, and far longer than sending 30 takes
    body = {"prompt": "queue", "max_tokens": tokens, "ignore_eos": True}
    with ThreadPoolExecutor(max_workers=20) as pool:
        statuses = [status for status, _ in pool.map(lambda _: post(svc, body, timeout_s=120), range(20))]
    assert statuses == [200] * 20, statuses  # the gateway used to refuse all but 4 of them

    with ThreadPoolExecutor(max_workers=30) as pool:
        results = list(pool.map(lambda _: post(svc, body, timeout_s=120), range(30)))
    statuses = [status for status, _ in results]
    assert set(statuses) == {200, 429} and statuses.count(200) >= 20, statuses
    assert all(answer["error"]["code"] == "overloaded" for status, answer in results if status == 429)
    with urllib.request.urlopen(svc.base_url + "/efficiency", timeout=10) as resp:
        refused = json.loads(resp.read())["refused"]
    assert refused["engine"]["queue_full"] == statuses.count(429)  # all of them by the engine's admission


def test_streams_whose_clients_stop_reading_are_aborted_at_a_bounded_cost(small_queue: ServiceProcess) -> None:
    """Two clients that stop reading their streams (16 choices with 5 top logprobs of long
    tokens: large events), on a host whose cores others take: once the socket buffers are full and a write has not drained for
    client_timeout_s (1 s here), the gateway aborts each stream and the engine drops it. The
    gateway buffers at most STREAM_BACKLOG events a stream meanwhile (it grew 94 -> 187 MB
    before that bound), and the service serves the next client. How long the buffers take to
    fill depends on the machine's speed: the wait is bounded by the request's deadline."""
    svc = small_queue
    gateway = svc.children()["gateway"]
    bias = {str(t): 100 for t in longest_tokens(2)}
    body = json.dumps({"prompt": "a", "max_tokens": 2000, "n": 16, "logprobs": 5, "ignore_eos": True,
                       "logit_bias": bias, "stream": True}).encode()
    offset = svc.log_path.stat().st_size
    before = peak = gateway.memory_info().rss
    socks = []
    with contextlib.ExitStack() as stack:
        stack.enter_context(busy_cores(SMALL_QUEUE_DEADLINE_S + 60))  # on a host whose cores others take
        stack.callback(lambda: [sock.close() for sock in socks])
        for _ in range(2):
            sock = socket.create_connection(("127.0.0.1", svc.port))
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # and then it never reads
            sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                         + f"Content-Length: {len(body)}\r\n\r\n".encode() + body)
            socks.append(sock)

        def aborted() -> bool:
            nonlocal peak
            peak = max(peak, gateway.memory_info().rss)
            return svc.log_path.read_bytes()[offset:].count(b'"stream aborted"') >= 2

        wait_for(aborted, SMALL_QUEUE_DEADLINE_S, "the gateway to abort both stalled streams")
        wait_for(lambda: engine_running(svc) == 0, 30, "the engine to drop the stalled requests")
        # the gateway holds nothing of them (what the kernel had buffered still trickles out
        # to a reader this slow: draining it is not the test)
        wait_for(lambda: gateway_in_flight(svc) == 0, 30, "the gateway to let both go")
        assert health_status(svc) == (200, "healthy")
    grown_mb = (peak - before) / 2**20
    assert grown_mb < 12, f"gateway grew {grown_mb:.0f} MB"  # 2 x 64 events of ~30 KB, decoded
    assert complete(svc)["usage"]["completion_tokens"] >= 1


def test_a_stop_ends_within_stop_timeout_s_and_answers_what_was_still_running(small_queue: ServiceProcess) -> None:
    """One deadline for the whole graceful stop: requests that would run far past it get
    their answer when it is up (503, or a stream's error event), and serve exits 0 soon after."""
    import threading

    graceful_s = GRACEFUL_S
    svc = small_queue
    tokens = tokens_for(svc, seconds=15 * graceful_s, n=4)  # far past the deadline
    body = {"prompt": "long", "max_tokens": tokens, "n": 4, "ignore_eos": True}
    results: dict[str, object] = {}

    def stream() -> None:
        req = urllib.request.Request(svc.base_url + "/v1/completions", method="POST",
                                     data=json.dumps({**body, "stream": True}).encode(),
                                     headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=60) as resp:
            results["stream"] = resp.read().decode()

    threads = [threading.Thread(target=lambda: results.update(plain=post(svc, body, timeout_s=60))),
               threading.Thread(target=stream)]
    for thread in threads:
        thread.start()
    wait_for(lambda: engine_running(svc) == 8, 30, "both requests (4 sequences each) to be generating")
    assert svc.proc is not None
    started = time.monotonic()
    svc.proc.send_signal(signal.SIGTERM)
    for thread in threads:
        thread.join(30)
    answered_s = time.monotonic() - started
    status, answer = results["plain"]  # type: ignore[misc]
    assert status == 503 and answer["error"]["code"] == "engine_unavailable", answer
    assert "stopping" in answer["error"]["message"]
    events = str(results["stream"])
    assert '"error"' in events and events.rstrip().endswith("data: [DONE]"), events[-300:]
    # at the deadline (less the second kept for writing them out): the drain waited, and not
    # for the requests (15 times as long), whatever this machine's pace
    assert graceful_s - 1.5 < answered_s < 5 * graceful_s, f"answered {answered_s:.1f} s after SIGTERM"
    code = svc.proc.wait(30)
    assert code == 0 and time.monotonic() - started < 10 * graceful_s


def test_engine_exits_when_its_parent_dies() -> None:
    svc = ServiceProcess(engine_core="process").start()  # the EngineCore, a grandchild, exits too
    try:
        svc.wait_healthy()
        tree = svc.tree()
        assert svc.proc is not None
        os.kill(svc.proc.pid, signal.SIGKILL)  # serve itself, with no chance to clean up
        wait_for(lambda: not any(p.is_running() and p.status() != psutil.STATUS_ZOMBIE for p in tree[1:]),
                 30, "the children of a killed serve to exit")
        # a new start on the same runtime dir works despite whatever was left there
        again = ServiceProcess()
        again.env.update({"PHI_3_MINI_RUNTIME_DIR": str(svc.runtime_dir)})
        again.runtime_dir = svc.runtime_dir
        again.start()
        try:
            again.wait_healthy()
            assert complete(again)["choices"]
        finally:
            assert again.stop() == 0
    finally:
        if svc.proc is not None and svc.proc.poll() is None:
            svc.proc.kill()



def _failed_start_log(svc: ServiceProcess) -> str:
    """Start a service whose start must fail; its log, once serve has exited 2."""
    svc.start()
    try:
        assert svc.proc is not None
        code = svc.proc.wait(180)
    finally:
        svc.stop()
    assert code == 2, svc.tail()
    return svc.log_path.read_text(errors="replace")


def test_a_start_that_cannot_succeed_stops_serve_with_exit_2(tmp_path: Path) -> None:
    """Weights vLLM cannot load: the engine exits 2 once, and serve stops everything and
    exits 2 too (which the unit's RestartPreventExitStatus=2 does not restart), instead of
    restarting the engine forever."""
    from tests.helpers import demo_model_dir

    model = tmp_path / "broken-model"
    model.mkdir()
    for src in demo_model_dir().iterdir():
        if src.name != "model.safetensors" and src.is_file():
            (model / src.name).write_bytes(src.read_bytes())
    (model / "model.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{broken}")
    log = _failed_start_log(ServiceProcess(model_path=str(model), engine_core="process"))
    assert "engine failed to start" in log and "child cannot start: stopping the service" in log
    engine_starts = [line for line in log.splitlines() if '"child started"' in line and '"engine"' in line]
    assert len(engine_starts) == 1, engine_starts  # never restarted


def test_weights_that_do_not_fit_memory_gb_are_refused_before_loading() -> None:
    """memory_gb too small for the weights themselves: the engine says so in one line and exits
    2 before it loads anything (loaded, they would be killed by a cgroup's limit, or refused by
    vLLM after the whole load), and serve stops with exit 2."""
    # less 0.9 GiB for the others (the EngineCore in its own process) and 0.25 of headroom
    log = _failed_start_log(ServiceProcess(memory_gb="1", engine_core="process"))
    [line] = [json.loads(ln) for ln in log.splitlines() if '"engine failed to start"' in ln]
    assert "do not fit memory_gb=1" in line["reason"] and "raise memory_gb" in line["reason"], line
    assert '"engine loading"' not in log  # logged just before vLLM loads the weights
