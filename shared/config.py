"""The service's configuration: one typed struct, loaded from YAML then environment.

`load_config()` reads the spec-shaped YAML file (sections `service`, `model`,
`efficiency`, `performance`, `monitoring`), then applies `PHI_3_MINI_<NAME>`
environment variables, and validates everything in one place so that a bad
value stops the start with one line naming the setting, the value and the rule.
"""

from __future__ import annotations

import os
import typing
from pathlib import Path
from typing import Annotated, Any, Literal

import msgspec
from msgspec import Meta

ENV_PREFIX = "PHI_3_MINI_"
CONFIG_FILE_ENV = "PHI_3_MINI_CONFIG"
DEFAULT_CONFIG_FILE = Path(__file__).resolve().parent.parent / "deploy" / "config" / "phi-3-mini.yaml"

Port = Annotated[int, Meta(ge=1, le=65535)]
Positive = Annotated[int, Meta(ge=1)]
NonNegative = Annotated[int, Meta(ge=0)]
Fraction = Annotated[float, Meta(gt=0.0, le=1.0)]
PositiveFloat = Annotated[float, Meta(gt=0.0)]
NonNegativeFloat = Annotated[float, Meta(ge=0.0)]
Dtype = Literal["auto", "float32", "float16", "bfloat16"]
LogLevel = Literal["DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"]


class Phi3MiniConfig(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """Every setting of one service instance, with the spec's defaults."""

    # -- service
    host: str = "127.0.0.1"
    port: Port = 11403
    runtime_dir: str = ""  # folder for the Unix sockets; "" = $RUNTIME_DIRECTORY or a private tmp dir
    request_timeout_s: PositiveFloat = 300.0  # deadline of one request, end to end
    max_body_bytes: Positive = 1 << 20  # request bodies above this get 413
    max_queue: Positive = 256  # requests waiting for the engine at once; beyond them, 429 at once
    client_timeout_s: PositiveFloat = 15.0  # for a request's head, its body, and each streamed write to drain
    api_key: str = ""  # when set, every route but /health needs "Authorization: Bearer <api_key>"
    rate_limit_rps: NonNegativeFloat = 0.0  # a hard cap on requests/s (429 beyond it); 0 = off
    # the whole graceful stop: requests in flight get this long to finish, then a 503 (at most
    # 20, so that serve's whole stop fits the unit's TimeoutStopSec=90: see supervisor.stop_budget_s)
    stop_timeout_s: Annotated[float, Meta(gt=0.0, le=20.0)] = 10.0
    # -- model
    model_path: str = "/opt/models/microsoft-Phi-3-mini-4k-instruct"
    model_name: str = "microsoft/Phi-3-mini-4k-instruct"
    served_model_name: str = "phi-3-mini"
    demo_model_dir: str = "~/.cache/citadel-llm/demo-phi3"  # used when model_path holds no weights
    max_model_len: Positive = 2048
    tensor_parallel_size: Positive = 1
    pipeline_parallel_size: Positive = 1  # layers split over this many GPUs or nodes (vLLM's)
    # vLLM's executor for tensor/pipeline parallelism: "" = vLLM's choice ("mp" on one node,
    # "ray" across nodes); "uni" keeps everything in one process
    distributed_executor_backend: Literal["", "mp", "ray", "uni", "external_launcher"] = ""
    gpu_memory_utilization: Fraction = 0.6  # GPU hosts only; on CPU the KV cache is sized from memory_gb
    dtype: Dtype = "auto"  # "auto": on a CPU host bfloat16 where it has bf16 instructions, else float32; else the model's
    # vLLM's quantization method ("gptq", "awq", "compressed-tensors", ...); "" = what the
    # checkpoint's quantization_config says (a 4-bit checkpoint needs nothing here)
    quantization: Annotated[str, Meta(pattern=r"^[a-z0-9_-]*$")] = ""
    # the KV cache's element type: "auto" = the serving dtype; "fp8" (= fp8_e4m3) or fp8_e5m2
    # hold twice the tokens of bfloat16 (four times float32's) in the same memory
    kv_cache_dtype: Literal["auto", "fp8", "fp8_e4m3", "fp8_e5m2"] = "auto"
    seed: NonNegative = 0
    # -- efficiency
    efficiency_mode: bool = True
    memory_gb: PositiveFloat = 4.0
    cpu_cores: Positive = 2
    max_throughput_rps: PositiveFloat = 100.0  # the rate the latency steering keeps room for (not a cap)
    memory_optimization: bool = True
    cpu_optimization: bool = True
    # OpenMP threads of the engine's forward pass; 0 = every core for a model of 50M parameters
    # or more, else cpu_cores - 1 (one core left to the gateway, tokenizer and scheduler)
    engine_threads: NonNegative = 0
    # Where vLLM's EngineCore runs on a CPU host: "process" (vLLM's own layout, a second process),
    # "thread" (a thread of the engine worker: one copy of vLLM and torch fewer), "auto" =
    # thread for a model of 50M parameters or more, else process. GPU hosts: always process.
    engine_core: Literal["auto", "process", "thread"] = "auto"
    # -- performance
    max_num_batched_tokens: Positive = 1024
    max_num_seqs: Positive = 32
    target_latency_ms: PositiveFloat = 500.0
    target_throughput_rps: PositiveFloat = 100.0  # reported on /efficiency beside the measured rate; steers nothing
    swap_space: NonNegative = 0  # GiB of CPU swap for preempted sequences (GPU hosts)
    enforce_eager: bool = False
    # -- monitoring
    metrics_port: Port = 11404
    metrics_host: str = "127.0.0.1"
    health_check_interval: PositiveFloat = 10.0  # seconds
    metrics_collection_interval: PositiveFloat = 5.0  # seconds
    log_level: LogLevel = "INFO"

    @property
    def served_names(self) -> tuple[str, ...]:
        return (self.served_model_name, self.model_name)

    def socket_dir(self) -> Path:
        if self.runtime_dir:
            return Path(self.runtime_dir)
        if os.environ.get("RUNTIME_DIRECTORY"):  # set by systemd's RuntimeDirectory=
            return Path(os.environ["RUNTIME_DIRECTORY"].split(":")[0])
        return Path(f"/tmp/citadel-llm-{os.getuid()}-{self.port}")

    def engine_socket_path(self) -> Path:
        return self.socket_dir() / "engine.sock"

    def control_socket_path(self) -> Path:
        """The engine worker's control socket: stats and limits, for the orchestrator."""
        return self.socket_dir() / "control.sock"

    def efficiency_report_path(self) -> Path:
        """The orchestrator's last report, which the gateway shows on /efficiency."""
        return self.socket_dir() / "efficiency.json"


class ConfigError(ValueError):
    """A setting has a value it may not have; str() is the one-line reason."""

    def __init__(self, name: str, value: Any, rule: str, source: str = "") -> None:
        self.name, self.value, self.rule, self.source = name, value, rule, source
        where = f" (from {source})" if source else ""
        super().__init__(f"invalid setting {name}={value!r}{where}: {rule}")


# Which YAML section each setting lives in: the spec's file layout.
SECTIONS: dict[str, tuple[str, ...]] = {
    "service": ("host", "port", "runtime_dir", "request_timeout_s", "client_timeout_s", "max_body_bytes",
                "max_queue", "api_key", "rate_limit_rps", "stop_timeout_s"),
    "model": (
        "model_path", "model_name", "served_model_name", "demo_model_dir", "max_model_len",
        "tensor_parallel_size", "pipeline_parallel_size", "distributed_executor_backend",
        "gpu_memory_utilization", "dtype", "quantization", "kv_cache_dtype", "seed",
    ),
    "efficiency": (
        "efficiency_mode", "memory_gb", "cpu_cores", "max_throughput_rps",
        "memory_optimization", "cpu_optimization", "engine_threads", "engine_core",
    ),
    "performance": (
        "max_num_batched_tokens", "max_num_seqs", "target_latency_ms",
        "target_throughput_rps", "swap_space", "enforce_eager",
    ),
    "monitoring": (
        "metrics_port", "metrics_host", "health_check_interval",
        "metrics_collection_interval", "log_level",
    ),
}
FIELDS = frozenset(Phi3MiniConfig.__struct_fields__)
assert FIELDS == {f for names in SECTIONS.values() for f in names}, "SECTIONS out of date"


def _flatten_yaml(doc: dict[str, Any], path: str) -> dict[str, tuple[Any, str]]:
    flat: dict[str, tuple[Any, str]] = {}
    for section, body in doc.items():
        if section not in SECTIONS:
            raise ConfigError(section, "…", f"unknown section; allowed: {', '.join(SECTIONS)}", path)
        if not isinstance(body, dict):
            raise ConfigError(section, body, "a section must be a mapping", path)
        for key, value in body.items():
            if key not in SECTIONS[section]:
                raise ConfigError(
                    f"{section}.{key}", value,
                    f"unknown setting; section {section} has: {', '.join(SECTIONS[section])}", path,
                )
            flat[key] = (value, f"{path}: {section}.{key}")
    return flat


def _parse_env_value(name: str, raw: str) -> Any:
    """Environment values are strings; turn them into what the field expects."""
    if name in ("efficiency_mode", "memory_optimization", "cpu_optimization", "enforce_eager"):
        lowered = raw.strip().lower()
        if lowered in ("1", "true", "yes", "on"):
            return True
        if lowered in ("0", "false", "no", "off"):
            return False
        return raw
    if name == "log_level":
        return raw.strip().upper()
    return raw


def load_config(
    path: str | Path | None = None, environ: dict[str, str] | None = None
) -> Phi3MiniConfig:
    """Load the YAML file (if any), apply `PHI_3_MINI_*` overrides, validate."""
    import yaml

    env = os.environ if environ is None else environ
    if path is None:
        path = env.get(CONFIG_FILE_ENV) or (DEFAULT_CONFIG_FILE if DEFAULT_CONFIG_FILE.exists() else None)
    values: dict[str, tuple[Any, str]] = {}
    if path is not None:
        text = Path(path).read_text()
        doc = yaml.safe_load(text) or {}
        if not isinstance(doc, dict):
            raise ConfigError("config", str(path), "the file must hold a mapping of sections")
        values.update(_flatten_yaml(doc, str(path)))
    for key, raw in env.items():
        if not key.startswith(ENV_PREFIX) or key == CONFIG_FILE_ENV:
            continue
        name = key[len(ENV_PREFIX):].lower()
        if name not in FIELDS:
            raise ConfigError(key, raw, "unknown setting; see `citadel-llm config show`")
        values[name] = (_parse_env_value(name, raw), key)
    return _build(values)


def _build(values: dict[str, tuple[Any, str]]) -> Phi3MiniConfig:
    # Validate field by field first, so that the error names where the bad value came from.
    for name, (value, source) in values.items():
        try:
            msgspec.convert(value, _FIELD_TYPES[name], strict=False)
        except msgspec.ValidationError as exc:
            rule = str(exc).split(" - at ")[0]
            choices = typing.get_args(_FIELD_TYPES[name])
            if typing.get_origin(_FIELD_TYPES[name]) is Literal:
                rule += "; allowed: " + ", ".join(choices)
            raise ConfigError(name, value, rule, source) from None
    config = msgspec.convert({k: v for k, (v, _) in values.items()}, Phi3MiniConfig, strict=False)
    if config.max_num_batched_tokens < config.max_num_seqs:
        name = "max_num_batched_tokens"
        raise ConfigError(
            name, config.max_num_batched_tokens, f"must be >= max_num_seqs ({config.max_num_seqs})",
            values.get(name, (None, ""))[1],
        )
    _check_against_model(config, values.get("max_model_len", (None, ""))[1])
    return config


def model_config_file(config: Phi3MiniConfig) -> Path | None:
    """The config.json of the model the engine will load: the configured weights, else the
    demo model once it has been made; None before either exists."""
    for folder in (config.model_path, config.demo_model_dir):
        path = Path(folder).expanduser() / "config.json"
        if path.is_file():
            return path
    return None


def _check_against_model(config: Phi3MiniConfig, source: str) -> None:
    """What vLLM would refuse at load time about the model, refused here instead, so that
    `config show` and every process agree before an engine starts (and exits 2 for it)."""
    import json

    path = model_config_file(config)
    if path is None:
        return
    try:
        limit = json.loads(path.read_text()).get("max_position_embeddings")
    except (OSError, ValueError):
        return  # an unreadable model is the model check's to report (model verify, engine start)
    if isinstance(limit, int) and config.max_model_len > limit:
        raise ConfigError("max_model_len", config.max_model_len,
                          f"the model at {path.parent} supports at most {limit} tokens "
                          "(its max_position_embeddings)", source)


_FIELD_TYPES: dict[str, Any] = typing.get_type_hints(Phi3MiniConfig, include_extras=True)


def to_sections(config: Phi3MiniConfig) -> dict[str, dict[str, Any]]:
    """The configuration as the YAML file lays it out (for `config show`)."""
    data = msgspec.to_builtins(config)
    if data["api_key"]:
        data["api_key"] = "********"  # never print the secret
    return {section: {k: data[k] for k in names} for section, names in SECTIONS.items()}
