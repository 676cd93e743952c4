"""Monitoring: Prometheus metrics on the monitoring port, request ids through every process,
one log line per request, and model information."""

from __future__ import annotations

import json
import shutil
import subprocess
import time

import aiohttp
import pytest
from prometheus_client.parser import text_string_to_metric_families

from service import Phi3MiniService
from service.model_files import count_parameters
from shared.config import load_config
from tests.helpers import ServiceProcess, demo_model_dir

pytestmark = pytest.mark.integration

FAMILIES = {
    "phi3_mini_requests", "phi3_mini_request_latency_seconds", "phi3_mini_time_to_first_token_seconds",
    "phi3_mini_inter_token_latency_seconds", "phi3_mini_prompt_tokens", "phi3_mini_generation_tokens",
    "phi3_mini_requests_in_flight", "phi3_mini_requests_running", "phi3_mini_requests_waiting",
    "phi3_mini_kv_cache_usage_ratio", "phi3_mini_batching_limit", "phi3_mini_requests_refused",
    "phi3_mini_engine_restarts", "phi3_mini_model_load_seconds", "phi3_mini_process_resident_memory_bytes",
    "phi3_mini_process_cpu_seconds", "phi3_mini_tokens_per_cpu_second", "phi3_mini_tokens_per_gigabyte_second",
    "phi3_mini_event_loop_lag_seconds",
}


async def scrape(service: ServiceProcess) -> tuple[str, dict[str, dict[tuple, float]]]:
    async with aiohttp.ClientSession() as session:
        async with session.get(f"http://127.0.0.1:{service.metrics_port}/metrics") as resp:
            assert resp.status == 200
            text = await resp.text()
    samples: dict[str, dict[tuple, float]] = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            samples.setdefault(s.name, {})[tuple(sorted(s.labels.items()))] = s.value
    return text, samples


async def complete(service: ServiceProcess, body: dict, headers: dict | None = None) -> tuple[int, dict, dict]:
    async with aiohttp.ClientSession() as session:
        async with session.post(service.base_url + "/v1/completions", json=body, headers=headers or {}) as resp:
            return resp.status, await resp.json(), resp.headers.copy()  # type: ignore[return-value]


async def test_metrics_parse_and_hold_every_family(service: ServiceProcess) -> None:
    await complete(service, {"prompt": "warm", "max_tokens": 2})
    text, _ = await scrape(service)
    names = {f.name for f in text_string_to_metric_families(text)}
    assert FAMILIES <= names, FAMILIES - names


async def test_loop_lag_of_the_gateway_and_the_worker_on_metrics_and_efficiency(service: ServiceProcess) -> None:
    """Each process's event-loop lateness (the worst over the last 10 s): a gauge per process on
    /metrics, and the same two figures on /efficiency, in milliseconds."""
    _, samples = await scrape(service)
    lag = samples["phi3_mini_event_loop_lag_seconds"]
    assert set(lag) == {(("process", "gateway"),), (("process", "engine"),)}, lag
    assert all(0 <= value < 60 for value in lag.values()), lag  # measured, in seconds
    async with aiohttp.ClientSession() as session:
        async with session.get(service.base_url + "/efficiency") as resp:
            doc = await resp.json()
    shown = doc["loop_lag_ms"]
    assert set(shown) == {"gateway", "engine"} and all(0 <= v < 60_000 for v in shown.values()), shown
    # and the orchestrator measures every process, vLLM's EngineCore (its own process here) too
    roles = {p["role"] for p in doc["measurements"]["processes"]}
    assert {"engine", "gateway", "orchestrator", "engine-core"} <= roles, roles


@pytest.mark.skipif(shutil.which("promtool") is None, reason="promtool (Debian's prometheus) not installed")
async def test_promtool_accepts_the_metrics(service: ServiceProcess) -> None:
    text, _ = await scrape(service)
    result = subprocess.run(["promtool", "check", "metrics"], input=text, capture_output=True, text=True, timeout=30)
    assert result.returncode == 0, result.stdout + result.stderr


async def test_a_request_moves_its_counters(service: ServiceProcess) -> None:
    _, before = await scrape(service)
    key = (("endpoint", "/v1/completions"), ("status", "200"))
    status, body, _ = await complete(service, {"prompt": "count me", "max_tokens": 9, "ignore_eos": True})
    assert status == 200
    _, after = await scrape(service)

    def delta(name: str, labels: tuple = ()) -> float:
        return after[name].get(labels, 0.0) - before.get(name, {}).get(labels, 0.0)

    assert delta("phi3_mini_requests_total", key) == 1
    assert delta("phi3_mini_request_latency_seconds_count", (("endpoint", "/v1/completions"),)) == 1
    assert delta("phi3_mini_time_to_first_token_seconds_count") == 1
    assert delta("phi3_mini_generation_tokens_total") == body["usage"]["completion_tokens"] == 9
    assert delta("phi3_mini_prompt_tokens_total") == body["usage"]["prompt_tokens"]
    limits = after["phi3_mini_batching_limit"]
    # the limits in force: at most the tests' ceilings (16 and 512), lower where the
    # orchestrator's latency steering has brought them down after the tests before
    assert 1 <= limits[(("limit", "max_num_seqs"),)] <= 16
    assert 1 <= limits[(("limit", "max_num_batched_tokens"),)] <= 512
    roles = {dict(k)["role"] for k in after["phi3_mini_process_resident_memory_bytes"]}
    assert {"gateway", "engine", "engine_core", "orchestrator"} <= roles
    assert after["phi3_mini_model_load_seconds"][()] > 0
    assert after["phi3_mini_tokens_per_cpu_second"][()] > 0


async def test_bad_requests_are_counted_by_status(service: ServiceProcess) -> None:
    _, before = await scrape(service)
    await complete(service, {"prompt": "x", "max_tokens": -1})
    _, after = await scrape(service)
    key = (("endpoint", "/v1/completions"), ("status", "400"))
    assert after["phi3_mini_requests_total"][key] - before["phi3_mini_requests_total"].get(key, 0) == 1


async def test_streaming_tokens_add_up(service: ServiceProcess) -> None:
    _, before = await scrape(service)
    async with aiohttp.ClientSession() as session:
        async with session.post(service.base_url + "/v1/completions",
                                json={"prompt": "s", "max_tokens": 7, "stream": True, "ignore_eos": True}) as resp:
            await resp.read()
    _, after = await scrape(service)
    assert after["phi3_mini_generation_tokens_total"][()] - before["phi3_mini_generation_tokens_total"][()] == 7
    assert after["phi3_mini_inter_token_latency_seconds_count"][()] > before["phi3_mini_inter_token_latency_seconds_count"][()]


def _log_lines(service: ServiceProcess) -> list[dict]:
    lines = []
    for raw in service.log_path.read_text(errors="replace").splitlines():
        if raw.startswith("{"):
            try:
                lines.append(json.loads(raw))
            except ValueError:
                pass
    return lines


def _wait_for_line(service: ServiceProcess, predicate, timeout_s: float = 5.0) -> dict:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        for line in _log_lines(service):
            if predicate(line):
                return line
        time.sleep(0.1)
    raise AssertionError("log line not found")


async def test_request_id_reaches_the_header_and_the_log_line(service: ServiceProcess) -> None:
    status, body, headers = await complete(service, {"prompt": "id me", "max_tokens": 3, "ignore_eos": True},
                                           {"X-Request-Id": "trace-1234"})
    assert status == 200 and headers["X-Request-Id"] == "trace-1234"
    line = _wait_for_line(service, lambda ln: ln.get("request_id") == "trace-1234" and ln.get("role") == "gateway")
    assert line["route"] == "/v1/completions" and line["status"] == 200
    assert line["prompt_tokens"] == body["usage"]["prompt_tokens"]
    assert line["generated_tokens"] == 3
    assert line["ttft_ms"] > 0 and line["e2e_ms"] >= line["ttft_ms"]


async def test_request_id_reaches_the_engine_worker(service: ServiceProcess) -> None:
    status, _, headers = await complete(service, {"prompt": [7] * 2047, "max_tokens": 50},
                                        {"X-Request-Id": "trace-into-worker"})
    assert status == 400 and headers["X-Request-Id"] == "trace-into-worker"
    line = _wait_for_line(service, lambda ln: ln.get("request_id") == "trace-into-worker" and ln.get("role") == "engine")
    assert line["param"] == "max_tokens"


def test_vllms_own_records_are_the_same_json_lines(service: ServiceProcess) -> None:
    """vLLM logs through the standard library, in the engine worker and in the EngineCore it
    spawns: its records reach the journal as this service's JSON lines, with the role."""
    vllm_lines = [ln for ln in _log_lines(service) if str(ln.get("logger", "")).startswith("vllm")]
    assert vllm_lines, "no vLLM record came out as a JSON line"
    assert all(ln["role"] == "engine" and ln["level"] and ln["timestamp"] and ln["event"] for ln in vllm_lines)
    assert {ln["logger"] for ln in vllm_lines} & {"vllm.v1.engine.core", "vllm.v1.engine.core_client"}  # the EngineCore's
    plain = [raw for raw in service.log_path.read_text(errors="replace").splitlines()
             if raw.startswith(("INFO ", "WARNING ", "DEBUG ", "(EngineCore"))]
    assert not plain, plain[:5]  # vLLM's own text format


async def test_generated_request_id_when_none_given(service: ServiceProcess) -> None:
    _, body, headers = await complete(service, {"prompt": "x", "max_tokens": 1})
    assert len(headers["X-Request-Id"]) >= 16
    assert body["id"] == f"cmpl-{headers['X-Request-Id']}"


async def test_model_info_route(service: ServiceProcess) -> None:
    async with aiohttp.ClientSession() as session:
        async with session.get(service.base_url + "/v1/models/phi-3-mini") as resp:
            info = await resp.json()
        async with session.get(service.base_url + "/v1/models/nope") as resp:
            assert resp.status == 404
    assert info["id"] == "phi-3-mini"
    assert info["max_model_len"] == 2048
    assert info["dtype"] == "float32"
    assert info["parameter_count"] == count_parameters(demo_model_dir())
    assert info["demo_model"] is True and info["load_seconds"] > 0
    assert info["limits"]["max_num_seqs"] == 16
    # the demo model's EngineCore keeps vLLM's own process (engine_core: auto); its cache
    # holds at least one full sequence
    assert info["engine_core"] == "process"
    assert info["kv_cache_tokens"] >= 2048 and info["kv_cache_bytes"] > 0


def test_get_model_info_from_the_running_engine(service: ServiceProcess) -> None:
    config = load_config(environ={k: v for k, v in service.env.items() if k.startswith("PHI_3_MINI_")})
    info = Phi3MiniService(config).get_model_info()
    assert info["engine_running"] is True
    assert info["model_name"] == "microsoft/Phi-3-mini-4k-instruct"
    assert info["served_model_name"] == "phi-3-mini"
    assert info["context_length"] == 2048
    assert info["dtype"] == "float32"
    assert info["parameter_count"] == count_parameters(demo_model_dir()) > 1_000_000
    assert info["load_seconds"] > 0
    assert info["limits"]["max_num_seqs"] == 16
    assert info["efficiency_mode"] is True


def test_get_model_info_without_an_engine(tmp_path) -> None:  # type: ignore[no-untyped-def]
    from shared.config import Phi3MiniConfig

    config = Phi3MiniConfig(runtime_dir=str(tmp_path), model_path=str(demo_model_dir()))
    info = Phi3MiniService(config).get_model_info()
    assert info["engine_running"] is False
    assert info["model_path"] == str(demo_model_dir())
    assert info["parameter_count"] == count_parameters(demo_model_dir())
    assert info["load_seconds"] is None


async def test_in_flight_gauge_counts_requests_being_handled(service: ServiceProcess) -> None:
    import asyncio

    async with aiohttp.ClientSession() as session:
        async def long_one() -> None:
            async with session.post(service.base_url + "/v1/completions",
                                    json={"prompt": "long", "max_tokens": 400, "ignore_eos": True}) as resp:
                await resp.read()

        tasks = [asyncio.create_task(long_one()) for _ in range(3)]
        try:
            await asyncio.sleep(0.3)
            _, during = await scrape(service)
        finally:
            await asyncio.gather(*tasks)
    assert during["phi3_mini_requests_in_flight"][()] >= 3
    assert during["phi3_mini_requests_running"][()] >= 1
    _, after = await scrape(service)
    assert after["phi3_mini_requests_in_flight"][()] == 0
