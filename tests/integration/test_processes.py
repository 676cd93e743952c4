"""`citadel-llm serve` as a supervisor: roles, restarts after kill -9, clean stop, no orphans.

These tests kill processes, so they run their own service instead of the shared one.
"""

from __future__ import annotations

import importlib.util
import json
import os
import signal
import socket
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest

from tests.helpers import ServiceProcess, wait_for

pytestmark = pytest.mark.integration
REQUEST_TIMEOUT_S = 6  # long enough for a stream to fill the socket buffers of a client that stops reading


@pytest.fixture(scope="module")
def own_service() -> Iterator[ServiceProcess]:
    # a fast health probe and short deadlines, so that stalls, deadlines and slow clients show in seconds
    svc = ServiceProcess(health_check_interval="1", request_timeout_s=str(REQUEST_TIMEOUT_S), max_queue="64",
                         client_timeout_s="1").start()
    try:
        svc.wait_healthy()
        yield svc
    finally:
        svc.stop()


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
    assert complete(own_service)["choices"][0]["text"] is not None



def _stream_outcome(svc: ServiceProcess) -> tuple[str, float]:
    """Stream a long completion; how it ended ("error" event, "done", "cut") and when."""
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
                if line == "data: [DONE]":
                    return ("error" if saw_error else "done"), time.monotonic()
    except urllib.error.HTTPError as exc:  # failed before its first event: a plain JSON error
        return str(exc.code), time.monotonic()
    except OSError:
        pass
    return "cut", time.monotonic()


def test_engine_killed_with_50_in_flight_answers_all(own_service: ServiceProcess) -> None:
    from concurrent.futures import ThreadPoolExecutor

    own_service.wait_healthy(30)

    def one(i: int) -> tuple[str, float]:
        if i % 3 == 0:
            return _stream_outcome(own_service)
        status, _ = post(own_service, {"prompt": "x", "max_tokens": 1500, "ignore_eos": True})
        return str(status), time.monotonic()

    with ThreadPoolExecutor(max_workers=50) as pool:
        futures = [pool.submit(one, i) for i in range(50)]
        time.sleep(1.0)
        engine = own_service.children()["engine"]
        killed_at = time.monotonic()
        engine.send_signal(signal.SIGKILL)
        outcomes = [f.result(timeout=30) for f in futures]
    non_streaming = [o for i, o in enumerate(outcomes) if i % 3]
    streams = [o for i, o in enumerate(outcomes) if i % 3 == 0]
    assert all(status == "503" and at - killed_at < 2.0 for status, at in non_streaming), \
        [(status, round(at - killed_at, 2)) for status, at in non_streaming]
    # a stream that had begun ends with an error event and [DONE]; one that had not gets a 503
    assert all(how in ("error", "503") for how, _ in streams), streams
    assert any(how == "error" for how, _ in streams), streams
    wait_for(lambda: health_status(own_service)[0] == 503, 5, "/health to say 503")
    own_service.wait_healthy(240)


def test_engine_killed_is_restarted_and_served_again(own_service: ServiceProcess) -> None:
    engine = own_service.children()["engine"]
    engine_core = engine.children(recursive=True)
    assert engine_core, "vLLM's EngineCore runs as the engine worker's child"
    engine.send_signal(signal.SIGKILL)
    wait_for(lambda: health_status(own_service) == (503, "unavailable"), 10, "/health to say unavailable")
    # the killed worker's EngineCore is not left behind
    wait_for(lambda: not any(p.is_running() and p.status() != psutil.STATUS_ZOMBIE for p in engine_core),
             15, "the old EngineCore to exit")
    own_service.wait_healthy(240)
    new_engine = own_service.children()["engine"]
    assert new_engine.pid != engine.pid
    assert complete(own_service)["choices"]
    # the orchestrator reconnects to the new worker's control socket by itself
    wait_for(lambda: orchestrator_engine_pid(own_service) == new_engine.pid, 15, "the orchestrator to reconnect")


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


def engine_running(svc: ServiceProcess) -> float:
    with urllib.request.urlopen(f"http://127.0.0.1:{svc.metrics_port}/metrics", timeout=10) as resp:
        text = resp.read().decode()
    return next(float(line.split()[1]) for line in text.splitlines() if line.startswith("phi3_mini_requests_running "))


def tokens_for(svc: ServiceProcess, seconds: float, n: int = 1) -> int:
    """How many tokens a request of n sequences generates in about `seconds` on this machine,
    from a timed 64-token request (at most what the context holds)."""
    started = time.monotonic()
    status, _ = post(svc, {"prompt": "pace", "max_tokens": 64, "n": n, "ignore_eos": True})
    assert status == 200
    per_token_s = (time.monotonic() - started) / 64
    return max(64, min(2000, int(seconds / per_token_s)))


def test_deadline_gives_504_and_aborts_in_the_engine(own_service: ServiceProcess) -> None:
    # a request that would take three deadlines on this machine
    tokens = tokens_for(own_service, seconds=3 * REQUEST_TIMEOUT_S, n=16)
    started = time.monotonic()
    status, body = post(own_service, {"prompt": "long", "max_tokens": tokens, "n": 16, "ignore_eos": True})
    elapsed = time.monotonic() - started
    assert status == 504, body
    assert body["error"]["code"] == "timeout"
    assert REQUEST_TIMEOUT_S - 0.5 < elapsed < REQUEST_TIMEOUT_S + 4
    wait_for(lambda: engine_running(own_service) == 0, 2, "the engine to drop the request")


def test_overload_is_refused_at_once_with_429(own_service: ServiceProcess) -> None:
    from concurrent.futures import ThreadPoolExecutor

    # 100 at once are more than the 32 vLLM runs plus the 64 that may wait, as long as the
    # first ones are still running when the last arrive: each takes about a second on this
    # machine (60 tokens was 0.3 s on a fast one: the burst drained as it arrived, none
    # refused), and the waves that are let in end well inside the 6 s deadline
    started = time.monotonic()
    status, _ = post(own_service, {"prompt": "pace", "max_tokens": 32, "n": 16, "ignore_eos": True})
    assert status == 200
    tokens = max(8, min(1000, int(1.0 / ((time.monotonic() - started) / 32))))

    def timed(_: int) -> tuple[int, float, dict]:
        started = time.monotonic()
        status, body = post(own_service, {"prompt": "busy", "max_tokens": tokens, "ignore_eos": True})
        return status, time.monotonic() - started, body

    with ThreadPoolExecutor(max_workers=100) as pool:
        results = list(pool.map(timed, range(100)))
    statuses = [status for status, _, _ in results]
    assert statuses.count(200) >= 30  # the queue's worth is served…
    refused = [(elapsed, body) for status, elapsed, body in results if status == 429]
    assert refused, statuses  # …and the rest refused, none lost
    assert set(statuses) <= {200, 429}
    assert all(body["error"]["code"] == "overloaded" for _, body in refused)
    # refused at once: the median refusal takes a small part of what the median answer takes
    served = sorted(elapsed for status, elapsed, _ in results if status == 200)
    assert sorted(elapsed for elapsed, _ in refused)[len(refused) // 2] < served[len(served) // 2] / 4


def test_stalled_engine_turns_health_503_and_recovers(own_service: ServiceProcess) -> None:
    own_service.wait_healthy(30)
    engine = own_service.children()["engine"]
    engine.suspend()  # SIGSTOP
    try:
        stopped_at = time.monotonic()
        wait_for(lambda: health_status(own_service) == (503, "stalled"), 3.0, "/health to say stalled")
        assert time.monotonic() - stopped_at < 3.0  # two health-check intervals (1 s here) and polling slack
        started = time.monotonic()
        status, body = post(own_service, {"prompt": "x", "max_tokens": 2})
        assert status == 503 and time.monotonic() - started < 1.0, body
    finally:
        engine.resume()  # SIGCONT
    wait_for(lambda: health_status(own_service) == (200, "healthy"), 10, "/health to recover")
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


def _read_until_closed(sock: socket.socket, timeout_s: float) -> bool:
    sock.settimeout(timeout_s)
    try:
        while sock.recv(1 << 20):
            pass
        return True
    except TimeoutError:
        return False
    except OSError:  # reset
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
        began = time.monotonic()
        served = complete(own_service)  # a well-behaved client meanwhile
        assert served["choices"] and time.monotonic() - began < 1.0
        while len(closed_at) < len(socks) and time.monotonic() - started < 10:  # a byte every 0.2 s each
            for i, sock in enumerate(socks):
                if i not in closed_at and _closed_by_server(sock):
                    closed_at[i] = time.monotonic() - started
            time.sleep(0.2)
    finally:
        for sock in socks:
            sock.close()
    assert len(closed_at) == len(socks), f"{len(socks) - len(closed_at)} trickling connections still open"
    assert all(0.8 < t < 3.0 for t in closed_at.values()), sorted(closed_at.values())  # client_timeout_s=1


def test_trickled_body_gets_408(own_service: ServiceProcess) -> None:
    with socket.create_connection(("127.0.0.1", own_service.port), timeout=10) as sock:
        sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                     b"Content-Length: 100\r\n\r\n{\"prompt\": ")
        started = time.monotonic()
        head = sock.recv(65536).decode(errors="replace")
        assert time.monotonic() - started < 3.0
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
        wait_for(lambda: engine_running(own_service) == 1, 5, "the request to be running")
        core.suspend()  # SIGSTOP: the EngineCore alone, the worker still answers its probes
        try:
            wait_for(lambda: health_status(own_service) == (503, "stalled"), 8.0, "/health to say stalled")
            status, body = pending.result(10)
            assert status == 503 and "stalled" in json.dumps(body), body
        finally:
            core.resume()
    wait_for(lambda: health_status(own_service) == (200, "healthy"), 15, "/health to recover")
    assert post(own_service, {"prompt": "x", "max_tokens": 2})[0] == 200


def test_break_5_tokenizing_megabytes_does_not_starve_the_worker(own_service: ServiceProcess) -> None:
    """30 concurrent /tokenize of ~1 MB each made the 1 s progress probe time out: the engine
    was marked stalled, /health went 503 and completions got 503."""
    import random
    import threading
    from concurrent.futures import ThreadPoolExecutor

    own_service.wait_healthy(30)
    words = [f"w{random.Random(i).randrange(10**6)}" for i in range(5000)]
    text = " ".join(random.Random(1).choice(words) for _ in range(140_000))[:1_000_000]
    started = time.monotonic()
    complete(own_service, max_tokens=8)
    unloaded_s = time.monotonic() - started
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
        with ThreadPoolExecutor(max_workers=30) as pool:
            flood = [pool.submit(tokenize, i) for i in range(30)]
            latencies = []
            while not all(f.done() for f in flood) and len(latencies) < 100:
                started = time.monotonic()
                status, body = post(own_service, {"prompt": "meanwhile", "max_tokens": 8, "ignore_eos": True})
                assert status == 200 and body["usage"]["completion_tokens"] == 8, (status, body)
                latencies.append(time.monotonic() - started)
            statuses = [f.result() for f in flood]
    finally:
        done.set()
        watcher.join(10)
    assert set(statuses) <= {200, 504}, statuses  # answered, or past the tokenize deadline; never 5xx else
    assert 200 in statuses
    assert health and all(code == 200 for code, _ in health), health
    assert latencies and max(latencies) < max(2.0, 20 * unloaded_s), (unloaded_s, latencies)


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
    # a request that generates for about 3 s on this machine (within the 6 s deadline): the
    # drain must keep the listener open, answering 503, until it is done
    tokens = tokens_for(own_service, seconds=3.0)
    result: dict = {}
    in_flight = threading.Thread(target=lambda: result.update(
        zip(("status", "body"), post(own_service, {"prompt": "drain me", "max_tokens": tokens, "ignore_eos": True}))))
    in_flight.start()
    wait_for(lambda: engine_running(own_service) == 1, 5, "the request to be in flight")
    started = time.monotonic()
    assert own_service.proc is not None
    own_service.proc.send_signal(signal.SIGTERM)
    wait_for(lambda: health_status(own_service) == (503, "draining"), 5, "/health to say draining")
    refused, body = post(own_service, {"prompt": "late", "max_tokens": 2})
    assert refused == 503 and body["error"]["code"] == "draining"
    in_flight.join(30)
    assert result["status"] == 200 and result["body"]["usage"]["completion_tokens"] == tokens  # finished, not cut
    code = own_service.stop(timeout_s=60)
    assert code == 0
    assert time.monotonic() - started < 60
    wait_for(lambda: not any(p.is_running() and p.status() != psutil.STATUS_ZOMBIE for p in tree), 10,
             "every process of the tree to exit")
    assert not (own_service.runtime_dir / "engine.sock").exists()


GRACEFUL_S = 2.0


@pytest.fixture(scope="module")
def small_queue() -> Iterator[ServiceProcess]:
    """A queue of 4 behind 16 sequences, no latency refusals, and a short graceful stop; the
    last test of the module stops it."""
    svc = ServiceProcess(max_queue="4", efficiency_mode="false", stop_timeout_s=str(GRACEFUL_S),
                         request_timeout_s="120").start()
    try:
        svc.wait_healthy()
        yield svc
    finally:
        svc.stop()


def test_waiting_means_one_thing_and_is_counted_in_one_place(small_queue: ServiceProcess) -> None:
    """max_queue counts requests waiting to run (in the engine's queue or vLLM's), not those
    running: 16 running and 4 waiting are all served; beyond that the engine refuses."""
    from concurrent.futures import ThreadPoolExecutor

    svc = small_queue
    tokens = tokens_for(svc, seconds=4.0)
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


def test_stream_whose_client_stops_reading_is_aborted(small_queue: ServiceProcess) -> None:
    """A client that stops reading a stream: once the socket buffers are full and a write has
    not drained for client_timeout_s, the gateway aborts the stream and the engine drops it,
    with the gateway's memory bounded meanwhile. How long the buffers take to fill depends on
    this machine's speed, so the wait is bounded by the request's deadline (120 s here), not by
    a guess: a fixed 8 s wait beside a 6 s deadline failed once in CI."""
    svc = small_queue
    gateway = svc.children()["gateway"]
    rss_before = gateway.memory_info().rss
    # ~1 MB/s of events on a fast machine (16 choices with 20 top logprobs each)
    body = json.dumps({"prompt": "x", "stream": True, "n": 16, "max_tokens": 1500, "logprobs": 20,
                       "ignore_eos": True}).encode()
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # a reader that takes nothing
        sock.connect(("127.0.0.1", svc.port))
        sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                     b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
        wait_for(lambda: "client stopped reading" in svc.log_path.read_text(), 110,
                 "the gateway to abort the stalled stream")
        wait_for(lambda: engine_running(svc) == 0, 10, "the engine to drop the stalled request")
        assert gateway.memory_info().rss - rss_before < 64 << 20
        assert _read_until_closed(sock, 5)  # the connection is gone
    assert complete(svc)["choices"]


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
    wait_for(lambda: engine_running(svc) == 8, 10, "both requests (4 sequences each) to be generating")
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
    # at the deadline (less the second kept for writing them out): the drain waited, no longer
    assert graceful_s - 1.5 < answered_s < graceful_s + 3, f"answered {answered_s:.1f} s after SIGTERM"
    code = svc.proc.wait(30)
    assert code == 0 and time.monotonic() - started < graceful_s + 10


def test_engine_exits_when_its_parent_dies() -> None:
    svc = ServiceProcess().start()
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
    log = _failed_start_log(ServiceProcess(model_path=str(model)))
    assert "engine failed to start" in log and "child cannot start: stopping the service" in log
    engine_starts = [line for line in log.splitlines() if '"child started"' in line and '"engine"' in line]
    assert len(engine_starts) == 1, engine_starts  # never restarted


def test_weights_that_do_not_fit_memory_gb_are_refused_before_loading() -> None:
    """memory_gb too small for the weights themselves: the engine says so in one line and exits
    2 before it loads anything (loaded, they would be killed by a cgroup's limit, or refused by
    vLLM after the whole load), and serve stops with exit 2."""
    log = _failed_start_log(ServiceProcess(memory_gb="1"))  # less 0.9 GiB for the others and 0.25 of headroom
    [line] = [json.loads(ln) for ln in log.splitlines() if '"engine failed to start"' in ln]
    assert "do not fit memory_gb=1" in line["reason"] and "raise memory_gb" in line["reason"], line
    assert '"engine loading"' not in log  # logged just before vLLM loads the weights
