"""citadel-llm's service: the gateway, the engine worker, and their supervisor."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from service.model_info import Phi3MiniService

__all__ = ["Phi3MiniService"]


def __getattr__(name: str) -> object:
    if name == "Phi3MiniService":  # imported lazily: `python -m service engine` must stay light
        from service.model_info import Phi3MiniService

        return Phi3MiniService
    raise AttributeError(name)
