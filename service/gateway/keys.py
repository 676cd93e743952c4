"""Typed application and request state of the gateway."""

from __future__ import annotations

import asyncio

from aiohttp import web

from shared.engine_client import EngineClient
from service.gateway.health import HealthMonitor
from service.gateway.metrics import Metrics
from service.gateway.request_record import RequestRecord
from shared.config import Phi3MiniConfig
from shared.loop_lag import LoopLag

CONFIG = web.AppKey("config", Phi3MiniConfig)
CLIENT = web.AppKey("engine_client", EngineClient)
METRICS = web.AppKey("metrics", Metrics)
HEALTH = web.AppKey("health", HealthMonitor)
STARTED = web.AppKey("started", float)  # unix time the gateway started
DRAINING = web.AppKey("draining", asyncio.Event)  # set on SIGTERM: new work gets 503
LOOP_LAG = web.AppKey("loop_lag", LoopLag)  # this process's event loop lateness

# per-request state
REQUEST_ID = web.RequestKey("request_id", str)
RECORD = web.RequestKey("record", RequestRecord)  # set by generation handlers

__all__ = ["CLIENT", "CONFIG", "DRAINING", "HEALTH", "LOOP_LAG", "METRICS", "RECORD", "REQUEST_ID", "STARTED", "RequestRecord"]
