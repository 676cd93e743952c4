"""Model information (`Phi3MiniService(config).get_model_info()`, the spec's validation command):
from the running engine when it answers, else from the configuration and the model folder."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from service.model_files import count_parameters
from shared.config import Phi3MiniConfig


class Phi3MiniService:
    """A handle on one configured service instance."""

    def __init__(self, config: Phi3MiniConfig | None = None) -> None:
        from shared.config import load_config

        self.config = config if config is not None else load_config()

    def get_model_info(self) -> dict[str, Any]:
        from shared import protocol as p

        config = self.config
        welcome = _handshake(config)
        if welcome is not None:
            path, dtype, load_s, demo = welcome.model_path, welcome.dtype, welcome.load_seconds, welcome.demo_model
            params = welcome.parameter_count
        else:
            path, demo = _static_model(config)
            dtype = _static_dtype(config)
            load_s, params = None, count_parameters(path) if Path(path).exists() else 0
        return {
            "model_name": config.model_name,
            "model_path": str(path),
            "served_model_name": config.served_model_name,
            "served_names": list(config.served_names),
            "context_length": config.max_model_len,
            "dtype": dtype,
            "parameter_count": params,
            "demo_model": demo,
            "load_seconds": load_s,
            "engine_running": welcome is not None,
            "limits": {"max_num_seqs": config.max_num_seqs,
                       "max_num_batched_tokens": config.max_num_batched_tokens,
                       "max_model_len": config.max_model_len},
            "efficiency_mode": config.efficiency_mode,
            "protocol_version": p.PROTOCOL_VERSION,
        }


def _static_model(config: Phi3MiniConfig) -> tuple[str, bool]:
    from service.demo_model import is_demo_model

    path = Path(config.model_path).expanduser()
    if (path / "config.json").exists():
        return str(path), is_demo_model(path)
    return str(Path(config.demo_model_dir).expanduser()), True


def _static_dtype(config: Phi3MiniConfig) -> str:
    """What the engine would serve in: the engine's own rule (bfloat16 for `auto` on a CPU with
    bf16 instructions), not a second one."""
    from service.engine.settings import cpu_host, serving_dtype

    return serving_dtype(config, Path(_static_model(config)[0]), cpu_host())


def _handshake(config: Phi3MiniConfig) -> Any:
    """The running engine's Welcome, or None when no engine answers."""
    from shared.engine_client import handshake

    return handshake(config.engine_socket_path(), "model-info")
