"""structlog set-up, once per process: JSON lines on stdout, readable console on a terminal."""

from __future__ import annotations

import logging
import sys

import structlog


def configure_logging(level: str = "INFO", role: str = "") -> None:
    """Configure structlog and the stdlib root logger (vLLM logs through it)."""
    level_no = logging.getLevelName(level.upper())
    renderer: structlog.typing.Processor
    if sys.stdout.isatty():
        renderer = structlog.dev.ConsoleRenderer()
    else:
        renderer = structlog.processors.JSONRenderer()
    processors: list[structlog.typing.Processor] = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
    ]
    if role:
        processors.append(_add_role(role))
    structlog.configure(
        processors=[*processors, structlog.processors.format_exc_info, renderer],
        wrapper_class=structlog.make_filtering_bound_logger(level_no),
        logger_factory=structlog.PrintLoggerFactory(sys.stdout),
        cache_logger_on_first_use=True,
    )
    logging.basicConfig(level=level_no, stream=sys.stderr, format="%(asctime)s %(levelname)s %(name)s: %(message)s")


def _add_role(role: str) -> structlog.typing.Processor:
    def add_role(_: object, __: str, event: dict) -> dict:
        event.setdefault("role", role)
        return event

    return add_role


def get_logger(name: str = "citadel") -> structlog.stdlib.BoundLogger:
    return structlog.get_logger(name)
