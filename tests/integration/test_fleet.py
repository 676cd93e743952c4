"""Two replicas on the demo model behind a real nginx running deploy/nginx/citadel-llm.conf:
requests spread over both, a replica's refusals spill over to the other, a killed engine
costs only the requests it held, and a rolling restart loses nothing.

Replica "a" has the test defaults; replica "b" is small on purpose (two sequences at once,
max_queue 1), so that a handful of concurrent requests is enough to make it refuse. The
latency target is far away on both, so that neither refuses for being slow on a slow machine:
every refusal here is b's max_queue. Every load is bounded in requests and in time."""

from __future__ import annotations

import http.client
import json
import signal
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass

import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.helpers import STARTUP_TIMEOUT_S, ServiceProcess
from tests.nginx import Nginx

pytestmark = [pytest.mark.integration, pytest.mark.fleet, pytest.mark.timeout(3 * STARTUP_TIMEOUT_S)]

API_KEY = "fleet-test-key"
AUTH = {"Authorization": f"Bearer {API_KEY}"}
# enforce_eager: no torch.compile, so that a replica (re)starts in seconds, not minutes; what
# is tested here does not depend on how fast a step is.
COMMON = {"api_key": API_KEY, "target_latency_ms": "600000", "stop_timeout_s": "10", "enforce_eager": "true"}
REQUEST_TIMEOUT_S = 60.0
LOAD_TIME_S = 2 * STARTUP_TIMEOUT_S  # the most any one load below may run: two restarts


@dataclass
class Fleet:
    a: ServiceProcess
    b: ServiceProcess
    nginx: Nginx


@pytest.fixture(scope="module")
def fleet() -> Iterator[Fleet]:
    a = ServiceProcess(**COMMON)
    b = ServiceProcess(**COMMON, max_num_seqs="2", max_queue="1")
    nginx = Nginx([a.port, b.port])
    try:
        a.start()
        b.start()
        a.wait_healthy()
        b.wait_healthy()
        nginx.start()
        yield Fleet(a, b, nginx)
    finally:
        nginx.stop()
        for replica in (a, b):
            replica.stop()


# ------------------------------------------------------------------------------ client
@dataclass
class Result:
    rid: str
    stream: bool
    started: float
    ended: float = 0.0
    status: int = 0
    ok: bool = False
    error_event: bool = False  # a stream that ended with the service's error event
    detail: str = ""


def call(base_url: str, stream: bool = False, rid: str | None = None, max_tokens: int = 8,
         headers: dict[str, str] | None = None) -> Result:
    """One completion through nginx; never raises."""
    rid = rid or uuid.uuid4().hex
    result = Result(rid, stream, time.monotonic())
    host, port = base_url.removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=REQUEST_TIMEOUT_S)
    body = json.dumps({"prompt": "The fleet", "max_tokens": max_tokens, "stream": stream, "ignore_eos": True})
    try:
        conn.request("POST", "/v1/completions", body=body,
                     headers={"Content-Type": "application/json", "X-Request-Id": rid,
                              **(AUTH if headers is None else headers)})
        resp = conn.getresponse()
        result.status = resp.status
        if not stream or resp.status != 200:
            text = resp.read()
            result.detail = text[:300].decode(errors="replace")
            result.ok = resp.status == 200 and bool(json.loads(text).get("choices"))
        else:
            events, done = 0, False
            while (line := resp.readline()) and not done:
                if not line.startswith(b"data: "):
                    continue
                data = line[6:].strip()
                if data == b"[DONE]":
                    done = True
                elif b'"error"' in data[:20]:
                    result.error_event = True
                    result.detail = data[:300].decode(errors="replace")
                else:
                    events += 1
            result.ok = done and events > 0 and not result.error_event
            if not done:
                result.detail = result.detail or f"stream cut after {events} events"
    except (OSError, http.client.HTTPException, ValueError) as exc:
        result.detail = f"{type(exc).__name__}: {exc}"
    finally:
        conn.close()
        result.ended = time.monotonic()
    return result


class Load:
    """`concurrency` clients in a closed loop, alternating plain and streamed requests, until
    stop() or `max_requests` or `max_s`, whichever comes first."""

    def __init__(self, base_url: str, concurrency: int, max_requests: int, max_s: float = LOAD_TIME_S,
                 max_tokens: int = 8, pause_s: float = 0.0) -> None:
        self.base_url, self.max_tokens, self.pause_s = base_url, max_tokens, pause_s
        self.results: list[Result] = []
        self._left, self._lock = max_requests, threading.Lock()
        self._deadline = time.monotonic() + max_s
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._run, args=(i,), daemon=True) for i in range(concurrency)]

    def __enter__(self) -> Load:
        for thread in self._threads:
            thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _run(self, index: int) -> None:
        stream = bool(index % 2)
        while not self._stop.is_set() and time.monotonic() < self._deadline:
            with self._lock:
                if self._left <= 0:
                    return
                self._left -= 1
            result = call(self.base_url, stream=stream, max_tokens=self.max_tokens)
            with self._lock:
                self.results.append(result)
            stream = not stream
            self._stop.wait(self.pause_s)  # a steady load, not a saturating one

    def stop(self) -> list[Result]:
        self._stop.set()
        for thread in self._threads:
            thread.join(REQUEST_TIMEOUT_S + 5)
        return self.results

    def done(self) -> bool:
        return not any(thread.is_alive() for thread in self._threads)

    def count(self) -> int:
        with self._lock:
            return len(self.results)


def poll(predicate, timeout_s: float, what: str) -> None:  # type: ignore[no-untyped-def]
    """wait_for at a gentler pace: these predicates scrape a replica, and a replica that is
    (re)starting on a shared 2-core machine needs the CPU more than the test does."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.5)
    raise AssertionError(f"timed out after {timeout_s} s waiting for {what}")


def metric(replica: ServiceProcess, name: str, **labels: str) -> float:
    """The sum of a counter's samples matching labels, from the replica's own /metrics."""
    conn = http.client.HTTPConnection("127.0.0.1", replica.metrics_port, timeout=10)
    try:
        conn.request("GET", "/metrics", headers=AUTH)
        text = conn.getresponse().read().decode()
    finally:
        conn.close()
    total = 0.0
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                total += sample.value
    return total


def answered(replica: ServiceProcess) -> float:
    return metric(replica, "phi3_mini_requests_total", endpoint="/v1/completions", status="200")


def healthy(replica: ServiceProcess) -> bool:
    try:
        conn = http.client.HTTPConnection("127.0.0.1", replica.port, timeout=2)
        conn.request("GET", "/health")
        return conn.getresponse().status == 200
    except OSError:
        return False
    finally:
        conn.close()


def failures(results: list[Result]) -> list[Result]:
    return [r for r in results if not r.ok]


def report(what: str, **figures: object) -> None:
    print(f"\n[fleet] {what}: " + ", ".join(f"{k}={v}" for k, v in figures.items()), flush=True)


# ------------------------------------------------------------------------------- tests
def test_requests_spread_over_both_replicas(fleet: Fleet) -> None:
    before = answered(fleet.a), answered(fleet.b)
    with Load(fleet.nginx.base_url, concurrency=2, max_requests=20) as load:
        poll(load.done, LOAD_TIME_S, "the load to finish")
    results = load.stop()
    assert len(results) == 20 and not failures(results), failures(results)[:3]
    after = answered(fleet.a), answered(fleet.b)
    assert after[0] > before[0] and after[1] > before[1], (before, after)
    assert (after[0] - before[0]) + (after[1] - before[1]) == 20
    streamed = [r for r in results if r.stream]
    assert streamed and all(r.ok for r in streamed)  # SSE through nginx, [DONE] included


def test_api_key_and_request_ids_through_the_proxy(fleet: Fleet) -> None:
    denied = call(fleet.nginx.base_url, headers={})
    assert denied.status == 401 and "invalid_api_key" in denied.detail  # not retried, not masked
    conn = http.client.HTTPConnection("127.0.0.1", fleet.nginx.port, timeout=REQUEST_TIMEOUT_S)
    try:  # no id from the client: nginx makes one, and the replica answers with that one
        conn.request("POST", "/v1/completions", body=json.dumps({"prompt": "x", "max_tokens": 2}),
                     headers={"Content-Type": "application/json", **AUTH})
        resp = conn.getresponse()
        body = json.loads(resp.read())
        made = resp.getheader("X-Request-Id")
    finally:
        conn.close()
    assert resp.status == 200 and made and body["id"] == f"cmpl-{made}"
    given = call(fleet.nginx.base_url, rid=f"client-{uuid.uuid4().hex}", stream=True)
    assert given.ok
    poll(lambda: {made, given.rid} <= {line.get("rid") for line in fleet.nginx.log_lines()}, 10,
             "both ids in nginx's access log")
    # the replica that served it logged the same id: its line may land after nginx's (the gateway
    # logs a request once its response is out, and serve relays the line), so it is waited for too
    def replica_logs() -> str:
        return fleet.a.log_path.read_text(errors="replace") + fleet.b.log_path.read_text(errors="replace")

    poll(lambda: made in replica_logs() and given.rid in replica_logs(), 10, "both ids in a replica's log")


def test_refusals_spill_over_to_the_replica_with_room(fleet: Fleet) -> None:
    refused_before = metric(fleet.b, "phi3_mini_requests_refused_total")
    with Load(fleet.nginx.base_url, concurrency=12, max_requests=120, max_tokens=16) as load:
        poll(load.done, LOAD_TIME_S, "the load to finish")
    results = load.stop()
    refused = metric(fleet.b, "phi3_mini_requests_refused_total") - refused_before
    spilled = [line for line in fleet.nginx.log_lines() if line.get("upstream_status", "").startswith("429, ")]
    report("spill-over", requests=len(results), refused_by_b=refused, spilled_in_log=len(spilled),
           statuses=sorted({r.status for r in results}))
    assert refused > 0  # b refused: its admission was full
    assert not failures(results), failures(results)[:3]  # and no client saw it
    assert spilled and all(line["status"] == "200" for line in spilled)


def test_a_killed_engine_costs_only_the_requests_it_held(fleet: Fleet) -> None:
    a = fleet.a
    poll(lambda: healthy(a) and healthy(fleet.b), STARTUP_TIMEOUT_S, "both replicas healthy")
    answered_before = answered(a)
    with Load(fleet.nginx.base_url, concurrency=2, max_requests=2000, max_tokens=32, pause_s=0.1) as load:
        poll(lambda: answered(a) >= answered_before + 4, 60, "replica a to take work")
        killed_at, sent_before = time.monotonic(), load.count()
        a.children()["engine"].send_signal(signal.SIGKILL)
        poll(lambda: not healthy(a), 30, "replica a to notice its engine is gone")
        # the load goes on for 40 more requests, all of which must reach replica b; then it
        # stops, so that the restart does not compete with it for the two cores
        poll(lambda: load.count() >= sent_before + 40, 120, "40 requests after the kill")
    results = load.stop()
    at_kill = answered(a)  # what it answered before the kill; nothing since (its engine is gone)
    poll(lambda: healthy(a), STARTUP_TIMEOUT_S, "replica a's engine to be restarted")
    healthy_at = time.monotonic()
    # back: it takes its share of a new load
    with Load(fleet.nginx.base_url, concurrency=2, max_requests=400, max_tokens=8) as after:
        poll(lambda: answered(a) > at_kill, 60, "replica a to take work again")
        back_at = time.monotonic()
    results += after.stop()
    failed = failures(results)
    in_flight = [r for r in results if r.started < killed_at < r.ended]
    report("kill -9 of a's engine", requests=len(results), in_flight_at_kill=len(in_flight), failed=len(failed),
           failed_streams_with_error_event=sum(r.error_event for r in failed),
           healthy_after_s=round(healthy_at - killed_at, 1), takes_work_after_s=round(back_at - killed_at, 1),
           takes_work_after_healthy_s=round(back_at - healthy_at, 1))
    # Only requests that were in flight when the engine died failed, and a failed stream
    # ended with the service's error event; everything after was answered.
    assert all(r.started < killed_at for r in failed), failed[:3]
    assert len(failed) <= len(in_flight)
    assert all(r.error_event for r in failed if r.stream), failed[:3]
    assert len([r for r in results if r.started > killed_at and r.ok]) >= 40


def test_a_rolling_restart_loses_no_request(fleet: Fleet) -> None:
    poll(lambda: healthy(fleet.a) and healthy(fleet.b), STARTUP_TIMEOUT_S, "both replicas healthy")
    terms: list[float] = []
    with Load(fleet.nginx.base_url, concurrency=2, max_requests=20_000, max_tokens=16, pause_s=0.2) as load:
        for replica in (fleet.a, fleet.b):
            poll(lambda: load.count() >= 4, 60, "the load to run")
            terms.append(time.monotonic())
            assert replica.stop() == 0
            replica.start()
            replica.wait_healthy()
            started = load.count()
            poll(lambda: load.count() >= started + 4, 60, "requests after the restart")
    results = load.stop()
    failed = failures(results)
    in_flight = [r for r in results if any(r.started < t < r.ended for t in terms)]
    report("rolling restart", requests=len(results), in_flight_at_sigterm=len(in_flight), failed=len(failed),
           duration_s=round(max(r.ended for r in results) - min(r.started for r in results), 1))
    assert all(any(r.started < t < r.ended for t in terms) for r in failed), failed[:3]
    assert len(results) > 8
