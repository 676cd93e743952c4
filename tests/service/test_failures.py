"""The engine worker's one mapping from how a request ended to its final message: the
client's errors are 4xx naming the field, the server's 5xx, and a bug is a 500, never a 400."""

from __future__ import annotations

import pytest
from vllm.exceptions import VLLMValidationError
from vllm.v1.engine.exceptions import EngineDeadError

from service.engine.admission import Refused
from service.engine.server import RequestError, failure_for
from shared.framing import PeerNotReading


@pytest.mark.parametrize(("exc", "status", "code", "param"), [
    (RequestError("max_tokens=5000 does not fit", "max_tokens"), 400, None, "max_tokens"),
    (VLLMValidationError("top_p must be in (0, 1]", parameter="top_p"), 400, None, "top_p"),
    (Refused("queue full", "queue_full", 1.0), 429, "overloaded", None),
    (Refused("over the cap", "rate_limit", 0.2), 429, "rate_limit_exceeded", None),
    (EngineDeadError(), 503, "engine_dead", None),
    (PeerNotReading("30 s"), 503, "gateway_not_reading", None),
    # the worker's own bugs, whatever their type: never blamed on the client
    (ValueError("a bug"), 500, "internal_error", None),
    (TypeError("a bug"), 500, "internal_error", None),
    (KeyError("a bug"), 500, "internal_error", None),
    (TimeoutError(), 500, "internal_error", None),
])
def test_each_kind_of_ending_has_its_status(exc: Exception, status: int, code: str | None, param: str | None) -> None:
    failure = failure_for(7, exc)
    assert (failure.rid, failure.status, failure.code, failure.param) == (7, status, code, param)


def test_a_refusal_says_when_to_retry() -> None:
    assert failure_for(1, Refused("busy", "too_slow", 2.5)).retry_after_s == 2.5
