"""What the engine worker knows about vLLM's state: the scheduler's last report (via a
vLLM stat logger) and the worker's own token and request counts."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from vllm.v1.metrics.loggers import StatLoggerBase


class SchedulerSnapshot(StatLoggerBase):
    """Keeps the last SchedulerStats vLLM reports after each engine step; logs nothing."""

    def __init__(self, vllm_config: Any = None, engine_index: int = 0) -> None:
        self.running = 0
        self.waiting = 0
        self.kv_cache_usage = 0.0
        self.last_step = time.monotonic()  # when vLLM last reported an engine step
        self.on_step: Callable[[], None] | None = None  # called after every engine step

    def record(self, scheduler_stats: Any, iteration_stats: Any, mm_cache_stats: Any = None,
               engine_idx: int = 0) -> None:
        self.last_step = time.monotonic()
        if self.on_step is not None:
            self.on_step()
        if scheduler_stats is not None:
            self.running = scheduler_stats.num_running_reqs
            self.waiting = scheduler_stats.num_waiting_reqs + scheduler_stats.num_skipped_waiting_reqs
            self.kv_cache_usage = scheduler_stats.kv_cache_usage

    def log_engine_initialized(self) -> None:
        pass

    def factory(self, vllm_config: Any, engine_index: int = 0) -> SchedulerSnapshot:
        return self


class Counters:
    """Totals the worker counts as requests finish."""

    def __init__(self) -> None:
        self.prompt_tokens = 0
        self.generation_tokens = 0
        self.requests_finished = 0
