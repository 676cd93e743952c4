"""Model information (`Phi3MiniService(config).get_model_info()`, the spec's validation command):
from the running engine when it answers, else from the configuration and the model folder."""

from __future__ import annotations

import json
import math
import struct
from pathlib import Path
from typing import Any

from shared.config import Phi3MiniConfig

HANDSHAKE_TIMEOUT_S = 5.0


def count_parameters(model_dir: str | Path) -> int:
    """Parameters in the safetensors files, from their headers (no weights are read)."""
    total = 0
    for path in sorted(Path(model_dir).glob("*.safetensors")):
        with open(path, "rb") as f:
            (size,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(size))
        total += sum(math.prod(t["shape"]) for k, t in header.items() if k != "__metadata__")
    return total


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
    if config.dtype != "auto":
        return config.dtype
    import torch

    return "float32" if not torch.cuda.is_available() else "auto"


def _handshake(config: Phi3MiniConfig) -> Any:
    """The running engine's Welcome, or None when no engine answers."""
    import socket

    import msgspec

    from shared import protocol as p
    from shared.framing import FrameEncoder

    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(HANDSHAKE_TIMEOUT_S)
            sock.connect(str(config.engine_socket_path()))
            sock.sendall(FrameEncoder().encode(p.Hello(p.PROTOCOL_VERSION, "model-info")))
            size = int.from_bytes(_recv_exactly(sock, 4), "big")
            msg = msgspec.msgpack.decode(_recv_exactly(sock, size), type=p.WorkerMessage)
    except (OSError, msgspec.DecodeError):
        return None
    return msg if isinstance(msg, p.Welcome) else None


def _recv_exactly(sock: Any, n: int) -> bytes:
    buf = b""
    while len(buf) < n:
        chunk = sock.recv(n - len(buf))
        if not chunk:
            raise ConnectionError("engine closed the connection")
        buf += chunk
    return buf
