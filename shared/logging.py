"""structlog set-up, once per process: JSON lines on stdout, readable console on a terminal.

One format for everything a process logs: structlog's own events, and the standard
library's records (vLLM, transformers, asyncio, aiohttp) rendered by the same processors
(`structlog.stdlib.ProcessorFormatter`). vLLM's EngineCore, a process vLLM spawns, never
runs `configure_logging`: vLLM configures it from the dictConfig file that
`vllm_logging_config()` describes (`VLLM_LOGGING_CONFIG_PATH`), whose formatter is
`stdlib_formatter` below. A request's id is bound with contextvars (`bind_request_id`) and
appears on every line logged while it is handled.
"""

from __future__ import annotations

import logging
import sys
from typing import Any

import structlog


def _add_role(role: str) -> structlog.typing.Processor:
    def add_role(_: object, __: str, event: dict) -> dict:
        event.setdefault("role", role)
        return event

    return add_role


def _shared_processors(role: str) -> list[structlog.typing.Processor]:
    processors: list[structlog.typing.Processor] = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
    ]
    if role:
        processors.append(_add_role(role))
    return processors


def _renderer(tty: bool) -> structlog.typing.Processor:
    return structlog.dev.ConsoleRenderer() if tty else structlog.processors.JSONRenderer()


def stdlib_formatter(role: str = "", tty: bool = False) -> logging.Formatter:
    """Standard-library records as the same lines as structlog's events (with the logger's
    name); usable from a logging dictConfig as {"()": "shared.logging.stdlib_formatter"}."""
    return structlog.stdlib.ProcessorFormatter(
        foreign_pre_chain=[*_shared_processors(role), structlog.stdlib.add_logger_name],
        processors=[structlog.stdlib.ProcessorFormatter.remove_processors_meta,
                    structlog.processors.format_exc_info, _renderer(tty)],
    )


def configure_logging(level: str = "INFO", role: str = "") -> None:
    """Configure structlog and the stdlib root logger (vLLM and libraries log through it)."""
    level_no = logging.getLevelName(level.upper())
    tty = sys.stdout.isatty()
    structlog.configure(
        processors=[*_shared_processors(role), structlog.processors.format_exc_info, _renderer(tty)],
        wrapper_class=structlog.make_filtering_bound_logger(level_no),
        logger_factory=structlog.PrintLoggerFactory(sys.stdout),
        cache_logger_on_first_use=True,
    )
    handler = logging.StreamHandler(sys.stdout)
    handler.setFormatter(stdlib_formatter(role, tty))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level_no)
    logging.captureWarnings(True)  # Python's warnings as records too (logger "py.warnings")


def vllm_logging_config(level: str, role: str) -> dict[str, Any]:
    """vLLM's logging, in every process it runs in, as this service's JSON lines (a dictConfig
    for VLLM_LOGGING_CONFIG_PATH)."""
    return {
        "version": 1,
        "disable_existing_loggers": False,
        "formatters": {"citadel": {"()": "shared.logging.stdlib_formatter", "role": role}},
        "handlers": {"citadel": {"class": "logging.StreamHandler", "formatter": "citadel",
                                 "stream": "ext://sys.stdout", "level": level}},
        "loggers": {"vllm": {"handlers": ["citadel"], "level": level, "propagate": False}},
    }


def bind_request_id(request_id: str) -> None:
    """Every line logged from here on in this task (and the tasks it starts) carries it."""
    structlog.contextvars.bind_contextvars(request_id=request_id)


def get_logger(name: str = "citadel") -> structlog.stdlib.BoundLogger:
    return structlog.get_logger(name)
