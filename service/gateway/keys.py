"""Typed application state of the gateway."""

from __future__ import annotations

import asyncio

from aiohttp import web

from service.gateway.engine_client import EngineClient
from shared.config import Phi3MiniConfig

CONFIG = web.AppKey("config", Phi3MiniConfig)
CLIENT = web.AppKey("engine_client", EngineClient)
STARTED = web.AppKey("started", float)  # unix time the gateway started
DRAINING = web.AppKey("draining", asyncio.Event)  # set on SIGTERM: new work gets 503
