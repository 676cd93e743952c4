"""ThreadedCoreClient's hand-offs between the event loop and the EngineCore's thread: requests
in, outputs out, aborts to both of the core's queues, and a core that fails (at its start or
in a step) reported to the front end instead of hanging it. A stand-in core with vLLM's
EngineCore interface; the real one runs on this path in the real-model tests."""

from __future__ import annotations

import asyncio
import queue
from types import SimpleNamespace
from typing import Any

import pytest

from service.engine import core_thread


class StandInCore:
    """Steps once per request added: each step answers every request it holds with its id."""

    fail_start = False
    fail_step = False

    def __init__(self, vllm_config: Any, executor_class: Any, log_stats: bool) -> None:
        if self.fail_start:
            raise ValueError("not enough memory for the KV cache")
        self.held: list[str] = []
        self.aborted: list[str] = []
        self.aborts_queue: queue.Queue[list[str]] = queue.Queue()
        self.scheduler = self
        self.shut = False

    def has_requests(self) -> bool:
        return bool(self.held)

    def preprocess_add_request(self, request: Any) -> tuple[Any, int]:
        if getattr(request, "request_id", "") == "bad":
            raise ValueError("a request this core cannot take")
        return request, 0

    def add_request(self, request: str, wave: int) -> None:
        self.held.append(request)

    def abort_requests(self, ids: list[str]) -> None:
        self.aborted += ids
        self.held = [r for r in self.held if r not in ids]

    def step_fn(self) -> tuple[dict[int, list[str]], bool]:
        if self.fail_step:
            raise RuntimeError("the forward pass failed")
        done, self.held = self.held, []
        return {0: done}, True

    def post_step(self, executed: bool) -> None:
        pass

    def get_supported_tasks(self) -> tuple[str, ...]:
        return ("generate",)

    def shutdown(self) -> None:
        self.shut = True


@pytest.fixture(autouse=True)
def stand_in(monkeypatch: pytest.MonkeyPatch) -> type[StandInCore]:
    import vllm.v1.engine.core

    monkeypatch.setattr(vllm.v1.engine.core, "EngineCore", StandInCore)
    monkeypatch.setattr(StandInCore, "fail_start", False)
    monkeypatch.setattr(StandInCore, "fail_step", False)
    return StandInCore


async def test_requests_go_in_and_their_outputs_come_back() -> None:
    client = core_thread.ThreadedCoreClient(None, None, False)
    try:
        await client.add_request_async("a")
        assert await asyncio.wait_for(client.get_output_async(), 10) == ["a"]
        await client.add_request_async("b")
        assert await asyncio.wait_for(client.get_output_async(), 10) == ["b"]
        assert await client.get_supported_tasks_async() == ("generate",)
        assert client.thread.name == "EngineCore" and client.thread.is_alive()
    finally:
        client.shutdown()
    assert not client.thread.is_alive() and client._core.shut


async def test_an_abort_reaches_the_core_and_its_between_steps_queue() -> None:
    client = core_thread.ThreadedCoreClient(None, None, False)
    try:
        await client.abort_requests_async(["x"])
        assert client._core.aborts_queue.get(timeout=5) == ["x"]
        await client.add_request_async("c")  # handled after the abort: the inbox keeps order
        assert await asyncio.wait_for(client.get_output_async(), 10) == ["c"]
        assert client._core.aborted == ["x"]
    finally:
        client.shutdown()


async def test_a_request_that_fails_its_preprocessing_fails_alone() -> None:
    from vllm.v1.engine import FinishReason

    client = core_thread.ThreadedCoreClient(None, None, False)
    try:
        await client.add_request_async(SimpleNamespace(request_id="bad"))
        failed = await asyncio.wait_for(client.get_output_async(), 10)
        assert failed.finished_requests == {"bad"}
        assert [(o.request_id, o.finish_reason) for o in failed.outputs] == [("bad", FinishReason.ERROR)]
        await client.add_request_async("next")  # the engine serves on
        assert await asyncio.wait_for(client.get_output_async(), 10) == ["next"]
        assert not client.resources.engine_dead and client.thread.is_alive()
    finally:
        client.shutdown()


async def test_a_core_that_cannot_start_fails_the_start(stand_in: type[StandInCore]) -> None:
    stand_in.fail_start = True
    with pytest.raises(RuntimeError, match="EngineCore failed to start") as info:
        core_thread.ThreadedCoreClient(None, None, False)
    assert "KV cache" in str(info.value.__cause__)


async def test_a_step_that_fails_marks_the_engine_dead_for_every_caller(stand_in: type[StandInCore]) -> None:
    from vllm.v1.engine.exceptions import EngineDeadError

    client = core_thread.ThreadedCoreClient(None, None, False)
    stand_in.fail_step = True
    await client.add_request_async("d")
    for _ in range(2):  # AsyncLLM's output handler, then anyone after it
        with pytest.raises(EngineDeadError):
            await asyncio.wait_for(client.get_output_async(), 10)
    assert client.resources.engine_dead
    with pytest.raises(EngineDeadError):
        await client.add_request_async("e")
    client.thread.join(5)
    assert not client.thread.is_alive() and client._core.shut


async def test_while_open_async_llm_builds_this_client() -> None:
    from vllm.v1.engine import async_llm

    shipped = vars(async_llm.EngineCoreClient)["make_async_mp_client"]
    with core_thread.core_on_a_thread():
        client = async_llm.EngineCoreClient.make_async_mp_client(None, None, False, None, 1, 0, renderer=None)
    try:
        assert isinstance(client, core_thread.ThreadedCoreClient)
    finally:
        client.shutdown()
    assert vars(async_llm.EngineCoreClient)["make_async_mp_client"] is shipped  # vLLM's own once closed
