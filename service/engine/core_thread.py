"""vLLM's EngineCore on a thread of the engine worker, instead of in a process of its own.

vLLM's AsyncLLM always spawns its EngineCore: a second process that imports vLLM and torch
again and talks to the front end over ZMQ. On a CPU host the front end's copy is pure
overhead: 605 MB of resident memory under SmolLM2-135M (issue 16), memory the KV cache
could have had. Here the EngineCore is built and stepped on one dedicated thread of this
process; AsyncLLM's front end (input processing, detokenizing, streams) is unchanged and
reaches it through `ThreadedCoreClient`, which stands where vLLM's AsyncMPClient stands.

The thread owns the EngineCore: it builds it (the model's OpenMP team belongs to the thread
that runs the forward pass), steps it while it has requests, and sleeps on its inbox when
idle. The event loop hands it requests and aborts through a queue and gets outputs back with
`call_soon_threadsafe`. torch releases the GIL for the forward pass, so the event loop runs
during the step as it would beside a separate process; the scheduler's Python runs under the
GIL. Aborts also go to the EngineCore's own aborts queue, which it reads between the forward
pass and the scheduler's update, as in vLLM's EngineCoreProc.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import queue
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from shared.logging import get_logger

log = get_logger(__name__)

BUILD_TIMEOUT_S = 3600.0  # a full-size model warms up for minutes on 2 cores
STOP_TIMEOUT_S = 30.0
PR_SET_NAME = 15  # prctl(2)


@dataclass
class _Resources:
    """What AsyncLLM reads of its client's resources."""

    engine_dead: bool = False


class ThreadedCoreClient:
    """The async client interface AsyncLLM uses, over an EngineCore on a thread of this process."""

    def __init__(self, vllm_config: Any, executor_class: Any, log_stats: bool,
                 cpus: frozenset[int] | None = None) -> None:
        self.resources = _Resources()
        self.engine_ranks_managed = [0]
        self._loop = asyncio.get_running_loop()
        self._inbox: queue.SimpleQueue[tuple[str, Any]] = queue.SimpleQueue()
        self._outputs: asyncio.Queue[Any] = asyncio.Queue()
        self._core: Any = None
        self._supported_tasks: tuple[str, ...] = ()
        self._built = threading.Event()
        self._failure: BaseException | None = None
        self.thread = threading.Thread(target=self._run, args=(vllm_config, executor_class, log_stats, cpus),
                                       name="EngineCore", daemon=True)
        self.thread.start()
        # Blocks the event loop while the model loads, as AsyncMPClient waits for its process.
        if not self._built.wait(BUILD_TIMEOUT_S):
            raise TimeoutError(f"EngineCore not built within {BUILD_TIMEOUT_S:.0f} s")
        if self._failure is not None:
            raise RuntimeError("EngineCore failed to start") from self._failure

    # --- the engine thread ---------------------------------------------------------------

    def _run(self, vllm_config: Any, executor_class: Any, log_stats: bool, cpus: frozenset[int] | None) -> None:
        from vllm.v1.engine.core import EngineCore

        _name_os_thread("EngineCore")  # as top -H and /proc/<pid>/task/*/comm show it
        try:
            if cpus:  # this thread's own CPUs; the OpenMP threads it starts inherit them
                os.sched_setaffinity(0, cpus)
            self._core = EngineCore(vllm_config, executor_class, log_stats)
            # read here, on the thread that owns the core, not from the event loop during a step
            self._supported_tasks = tuple(self._core.get_supported_tasks())
        except BaseException as exc:  # noqa: BLE001 - reported to the constructor
            self._failure = exc
            self._built.set()
            return
        self._built.set()
        core = self._core
        try:
            while True:
                block = not core.scheduler.has_requests()
                for kind, arg in self._take(block):
                    if kind == "stop":
                        return
                    if kind == "add":
                        self._add(core, arg)
                    elif kind == "abort":
                        core.abort_requests(arg)
                if not core.scheduler.has_requests():
                    continue
                outputs, executed = core.step_fn()
                core.post_step(executed)
                for out in (outputs or {}).values():
                    self._loop.call_soon_threadsafe(self._outputs.put_nowait, out)
        except BaseException as exc:  # noqa: BLE001 - the engine is dead; the front end must learn it
            log.exception("EngineCore thread failed")
            self.resources.engine_dead = True
            self._loop.call_soon_threadsafe(self._outputs.put_nowait, exc)
        finally:
            with contextlib.suppress(Exception):
                core.shutdown()

    def _add(self, core: Any, request: Any) -> None:
        """Add one request; one that fails its preprocessing fails alone, as in vLLM's
        EngineCoreProc (finished with an error), instead of taking the engine down."""
        try:
            prepared = core.preprocess_add_request(request)
        except Exception:  # noqa: BLE001 - request-scoped, reported to its caller
            log.exception("request failed its preprocessing in the EngineCore", request_id=request.request_id)
            from vllm.v1.engine import EngineCoreOutput, EngineCoreOutputs, FinishReason

            failed = EngineCoreOutputs(finished_requests={request.request_id},
                                       outputs=[EngineCoreOutput(request.request_id, [],
                                                                 finish_reason=FinishReason.ERROR)])
            self._loop.call_soon_threadsafe(self._outputs.put_nowait, failed)
            return
        core.add_request(*prepared)

    def _take(self, block: bool) -> Iterator[tuple[str, Any]]:
        """Everything in the inbox; when block, wait for at least one item first."""
        if block:
            yield self._inbox.get()
        while True:
            try:
                yield self._inbox.get_nowait()
            except queue.Empty:
                return

    # --- what AsyncLLM calls, on the event loop ------------------------------------------

    async def get_output_async(self) -> Any:
        out = await self._outputs.get()
        if isinstance(out, BaseException):
            from vllm.v1.engine.exceptions import EngineDeadError

            self._outputs.put_nowait(out)  # every later caller learns it too
            raise EngineDeadError() from out
        return out

    async def add_request_async(self, request: Any) -> None:
        self._check_alive()
        self._inbox.put(("add", request))

    async def abort_requests_async(self, request_ids: list[str]) -> None:
        if request_ids and not self.resources.engine_dead:
            self._core.aborts_queue.put_nowait(request_ids)  # read between forward pass and update
            self._inbox.put(("abort", request_ids))

    async def get_supported_tasks_async(self) -> tuple[str, ...]:
        return self._supported_tasks

    def dp_engines_running(self) -> bool:
        return False

    def get_kv_event_sources(self) -> dict[int, Any]:
        return {}

    def _check_alive(self) -> None:
        if self.resources.engine_dead:
            from vllm.v1.engine.exceptions import EngineDeadError

            raise EngineDeadError()

    def shutdown(self, timeout: float | None = None) -> None:
        if self.thread.is_alive():
            self._inbox.put(("stop", None))
            self.thread.join(STOP_TIMEOUT_S if timeout is None else timeout)


def _name_os_thread(name: str) -> None:
    """The calling thread's name as the kernel knows it (15 bytes at most)."""
    import ctypes

    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_NAME, name.encode()[:15], 0, 0, 0)


@contextlib.contextmanager
def core_on_a_thread(cpus: frozenset[int] | None = None) -> Iterator[None]:
    """While open, AsyncLLM built in this process runs its EngineCore on a thread of it,
    bound to `cpus` when given."""
    from vllm.v1.engine import async_llm

    client_class = async_llm.EngineCoreClient
    original = client_class.__dict__["make_async_mp_client"]

    def make(vllm_config: Any, executor_class: Any, log_stats: bool, *args: Any, **kwargs: Any) -> Any:
        return ThreadedCoreClient(vllm_config, executor_class, log_stats, cpus)

    client_class.make_async_mp_client = staticmethod(make)
    try:
        yield
    finally:
        client_class.make_async_mp_client = original
