"""The optional API key: every route but /health needs it, on the real aiohttp app."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest
from aiohttp.test_utils import TestClient

from service.engine.server import _peer_uid
from service.gateway.app import create_app, create_metrics_app
from shared.config import Phi3MiniConfig, to_sections


@pytest.fixture()
async def client(aiohttp_client, tmp_path: Path) -> TestClient:  # type: ignore[no-untyped-def]
    app = create_app(Phi3MiniConfig(api_key="s3cret", runtime_dir=str(tmp_path)))
    return await aiohttp_client(app)


async def test_health_needs_no_key(client: TestClient) -> None:
    resp = await client.get("/health")
    assert resp.status == 503  # no engine behind it here: "loading", but not 401
    assert (await resp.json())["status"] == "loading"


@pytest.mark.parametrize("headers", [{}, {"Authorization": "Bearer wrong"}, {"Authorization": "s3cret"},
                                     {"Authorization": "Basic s3cret"}])
async def test_every_other_route_needs_the_key(client: TestClient, headers: dict[str, str]) -> None:
    for method, path in (("GET", "/v1/models"), ("POST", "/v1/completions"), ("POST", "/v1/chat/completions"),
                         ("POST", "/tokenize"), ("GET", "/version"), ("GET", "/openapi.json"), ("GET", "/nope")):
        resp = await client.request(method, path, headers=headers, json={"prompt": "x"})
        assert resp.status == 401, path
        body = await resp.json()
        assert body["error"]["code"] == "invalid_api_key" and body["error"]["type"] == "authentication_error"
        assert resp.headers["WWW-Authenticate"] == "Bearer"


async def test_the_right_key_passes(client: TestClient) -> None:
    resp = await client.get("/v1/models", headers={"Authorization": "Bearer s3cret"})
    assert resp.status == 200


async def test_metrics_port_has_the_same_check_and_error(aiohttp_client, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    main = create_app(Phi3MiniConfig(api_key="s3cret", runtime_dir=str(tmp_path)))
    api = await aiohttp_client(main)
    metrics = await aiohttp_client(create_metrics_app(main))
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "Basic s3cret"}):
        resp = await metrics.get("/metrics", headers=headers)
        assert resp.status == 401 and resp.headers["WWW-Authenticate"] == "Bearer"
        body = await resp.json()  # OpenAI's error JSON, as on the API port
        assert body["error"]["code"] == "invalid_api_key" and body["error"]["type"] == "authentication_error"
    for scheme in ("Bearer", "bearer", "BEARER"):  # RFC 7235: the scheme is case-insensitive, on both ports
        resp = await metrics.get("/metrics", headers={"Authorization": f"{scheme} s3cret"})
        assert resp.status == 200 and "phi3_mini_requests_in_flight" in await resp.text()
        assert (await api.get("/v1/models", headers={"Authorization": f"{scheme} s3cret"})).status == 200


async def test_no_cors_headers(client: TestClient) -> None:
    resp = await client.options("/v1/completions", headers={"Origin": "http://evil.example",
                                                            "Access-Control-Request-Method": "POST"})
    assert not any(h.lower().startswith("access-control-") for h in resp.headers)


def test_config_show_masks_the_key() -> None:
    shown = to_sections(Phi3MiniConfig(api_key="s3cret"))
    assert shown["service"]["api_key"] == "********"


def test_peer_uid_of_a_unix_socket() -> None:
    import asyncio
    import os

    left, right = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)

    class T(asyncio.BaseTransport):
        def get_extra_info(self, name: str, default: object = None) -> object:
            return left if name == "socket" else default

    try:
        assert _peer_uid(T()) == os.getuid()
    finally:
        left.close()
        right.close()
