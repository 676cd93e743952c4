"""Entry of the engine worker process (`citadel-llm engine`).

Steps: set the engine's environment → load vLLM → listen on the Unix socket →
serve until SIGTERM/SIGINT, engine death or parent death → drain → shut down.
Exit codes tell `serve` what happened: 0 stopped, 1 died while running, 2 failed to start.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import os
import signal
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from shared import protocol as p
from shared import sd_notify
from shared.config import Phi3MiniConfig

if TYPE_CHECKING:
    from service.engine.server import EngineServer
from shared.logging import get_logger
from shared.process_tree import child_pids
from shared.runtime_dir import ensure_private_dir

log = get_logger(__name__)

EXIT_STOPPED, EXIT_DIED, EXIT_START_FAILED = 0, 1, 2
PARENT_POLL_S = 1.0


def run_engine(config: Phi3MiniConfig) -> int:
    from service.engine import settings
    from service.engine.lean_imports import skip_unused_modules

    cpu = settings.cpu_host()
    os.environ.update(settings.prepare_environment(config, cpu))
    _route_vllm_logging(config)
    skip_unused_modules()  # before vLLM is imported; its spawned EngineCore does it in service.cli
    try:
        return asyncio.run(_main(config, cpu))
    except KeyboardInterrupt:
        return EXIT_STOPPED


def _route_vllm_logging(config: Phi3MiniConfig) -> None:
    """vLLM's records, here and in the EngineCore it spawns, as this service's JSON lines."""
    import json

    from shared.logging import vllm_logging_config
    from shared.runtime_dir import UnsafeRuntimeDir, ensure_private_dir, write_private_file

    level = os.environ["VLLM_LOGGING_LEVEL"]
    path = config.socket_dir() / "vllm-logging.json"
    try:
        ensure_private_dir(path.parent)
        write_private_file(path, json.dumps(vllm_logging_config(level, "engine")).encode())
    except (OSError, UnsafeRuntimeDir):
        return  # the start fails on the runtime dir later, with its own message
    os.environ["VLLM_LOGGING_CONFIG_PATH"] = str(path)


async def _main(config: Phi3MiniConfig, cpu: bool) -> int:
    from service.engine import server as server_module
    from service.engine import settings
    from service.engine.server import EngineServer

    server_module._debug = config.log_level == "DEBUG"

    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    parent = os.getppid()

    socket_path = config.engine_socket_path()
    engine = None
    try:
        started = time.monotonic()
        ensure_private_dir(config.socket_dir())  # before the slow part: an unsafe dir stops the start
        model = settings.resolve_model(config)
        from service.model_files import count_parameters
        from shared.optimizations import engine_core_on_a_thread

        parameters = count_parameters(model.path)
        on_thread = engine_core_on_a_thread(config, parameters, cpu)
        args = settings.engine_args(config, model, cpu, core_on_thread=on_thread)
        from vllm.v1.engine.async_llm import AsyncLLM

        log.info("engine loading", model_path=str(model.path), demo_model=model.demo,
                 dtype=args.dtype, max_num_seqs=args.max_num_seqs,
                 max_num_batched_tokens=args.max_num_batched_tokens,
                 kv_cache_bytes=args.kv_cache_memory_bytes, memory_fraction=round(args.gpu_memory_utilization, 4),
                 omp_threads=os.environ.get("OMP_NUM_THREADS"),
                 engine_core="thread" if on_thread else "process")
        from service.engine.admission import Admission, Limits
        from service.engine.stats import SchedulerSnapshot

        scheduler = SchedulerSnapshot()
        if on_thread:
            from service.engine.core_thread import core_on_a_thread

            settings.unpin_this_process(config)  # threads started from here on stay off the engine's CPUs
            with core_on_a_thread(frozenset(settings.engine_cpu_list(config)) if config.cpu_optimization else None):
                engine = AsyncLLM.from_engine_args(args, stat_loggers=[scheduler.factory])
        else:
            engine = AsyncLLM.from_engine_args(args, stat_loggers=[scheduler.factory])
            settings.unpin_this_process(config)  # off the cores the spawned EngineCore bound
        load_s = time.monotonic() - started
        cache = engine.vllm_config.cache_config
        kv_tokens = (cache.num_gpu_blocks or 0) * cache.block_size
        kv_bytes = kv_tokens * settings.kv_plan(config, model.path, args.dtype).per_token
        log.info("kv cache", blocks=cache.num_gpu_blocks, block_size=cache.block_size, tokens=kv_tokens,
                 bytes=kv_bytes, full_sequences=round(kv_tokens / config.max_model_len, 1))
        welcome = p.Welcome(
            protocol_version=p.PROTOCOL_VERSION,
            model_name=config.model_name,
            model_path=str(model.path),
            served_names=list(config.served_names),
            max_model_len=config.max_model_len,
            dtype=str(engine.model_config.dtype).removeprefix("torch."),
            demo_model=model.demo,
            load_seconds=round(load_s, 3),
            engine_pid=os.getpid(),
            parameter_count=parameters,
            kv_cache_tokens=kv_tokens,
            kv_cache_bytes=kv_bytes,
            engine_core="thread" if on_thread else "process",
        )
        sched = engine.vllm_config.scheduler_config  # built with the ceilings; admission keeps below them
        admission = Admission(Limits(sched.max_num_seqs, sched.max_num_batched_tokens), config.max_queue,
                              config.target_latency_ms / 1000, config.rate_limit_rps, config.efficiency_mode)
        scheduler.on_step = admission.step
        pid = os.getpid()
        server = EngineServer(engine, welcome, engine.model_config.get_vocab_size(), admission, scheduler,
                              core_pids=(lambda: [pid]) if on_thread else child_pids)
        # Everything loaded so far lives as long as the process: move it out of the garbage
        # collector's reach, or each full collection walks millions of objects (~1 s pauses).
        gc.collect()
        gc.freeze()
        listener = await _listen(loop, server.connection, socket_path)
        control = await _listen(loop, server.control_connection, config.control_socket_path())
    except settings.StartRefused as exc:  # a configuration or host that cannot serve: its reason, no traceback
        log.error("engine failed to start", reason=str(exc))
        return EXIT_START_FAILED
    except Exception:
        log.exception("engine failed to start")
        if engine is not None:
            engine.shutdown()
        return EXIT_START_FAILED

    log.info("engine ready", socket=str(socket_path), load_seconds=round(load_s, 2),
             demo_model=model.demo, pid=os.getpid())
    sd_notify.notify(f"READY=1\nSTATUS=engine ready, model loaded in {load_s:.1f} s")
    if model.demo:
        log.warning("SERVING THE RANDOM-WEIGHT DEMO MODEL: its output is noise", model_path=str(model.path))
    exit_code = EXIT_STOPPED
    try:
        server.loop_lag.start()
        watch = loop.create_task(_watch(engine, server, parent), name="engine-watch")
        watchdog = loop.create_task(_systemd_watchdog(server), name="systemd-watchdog")
        stopped = loop.create_task(stop.wait(), name="stop-signal")
        done, _ = await asyncio.wait({watch, stopped}, return_when=asyncio.FIRST_COMPLETED)
        if watch in done:
            reason = watch.result()
            log.error("engine worker stopping", reason=reason)
            exit_code = EXIT_DIED if reason == "engine dead" else EXIT_STOPPED
        sd_notify.notify("STOPPING=1")
        for task in (watch, stopped, watchdog):
            task.cancel()
        await asyncio.gather(watch, stopped, watchdog, return_exceptions=True)
        # Ordered shutdown: stop accepting, drain, cancel the rest, release the engine.
        listener.close()
        control.close()
        if exit_code == EXIT_STOPPED:
            await server.drain(config.stop_timeout_s)
        else:
            await server.drain(0)
    finally:
        await server.loop_lag.close()
        with contextlib.suppress(Exception):
            listener.close()
            control.close()
        engine.shutdown()
        for path in (socket_path, config.control_socket_path()):
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
        log.info("engine stopped", exit_code=exit_code)
    return exit_code


async def _listen(loop: asyncio.AbstractEventLoop, factory: Callable[[], asyncio.Protocol],
                  path: Path) -> asyncio.Server:
    ensure_private_dir(path.parent)  # UnsafeRuntimeDir: a failed start, with its reason in the log
    with contextlib.suppress(FileNotFoundError):
        path.unlink()  # a stale socket from a killed worker
    old_umask = os.umask(0o177)  # the socket file is created 0600
    try:
        return await loop.create_unix_server(factory, str(path))
    finally:
        os.umask(old_umask)


async def _watch(engine: Any, server: EngineServer, parent: int) -> str:
    """Return why the worker must stop: engine death or the parent gone."""
    dead = server.dead
    while True:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(dead.wait(), PARENT_POLL_S)
        if dead.is_set() or engine.errored:
            return "engine dead"
        if os.getppid() != parent:
            return "parent gone"


async def _systemd_watchdog(server: EngineServer) -> None:
    """Ping systemd's watchdog only while the engine makes progress: idle, or producing
    output within the interval. A stuck engine stops the pings and systemd restarts it."""
    interval = sd_notify.watchdog_interval_s()
    if interval is None:
        return
    while True:
        await asyncio.sleep(interval)
        if server.making_progress(stall_s=interval * 2):
            sd_notify.notify("WATCHDOG=1")
