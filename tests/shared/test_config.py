"""Configuration: the spec's defaults, YAML sections, environment overrides, one-line errors."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from shared.config import DEFAULT_CONFIG_FILE, ConfigError, Phi3MiniConfig, load_config, to_sections

SPEC_DEFAULTS = {
    "port": 11403, "memory_gb": 4, "cpu_cores": 2,
    "model_path": "/opt/models/microsoft-Phi-3-mini-4k-instruct",
    "model_name": "microsoft/Phi-3-mini-4k-instruct", "max_model_len": 2048,
    "tensor_parallel_size": 1, "gpu_memory_utilization": 0.6, "max_num_batched_tokens": 1024,
    "max_num_seqs": 32, "efficiency_mode": True, "max_throughput_rps": 100,
    "memory_optimization": True, "cpu_optimization": True, "target_latency_ms": 500,
    "target_throughput_rps": 100, "swap_space": 0, "enforce_eager": False, "metrics_port": 11404,
    "health_check_interval": 10, "metrics_collection_interval": 5, "log_level": "INFO",
}


def test_struct_defaults_are_the_specs() -> None:
    config = Phi3MiniConfig()
    for name, value in SPEC_DEFAULTS.items():
        assert getattr(config, name) == value, name


def test_shipped_yaml_matches_the_defaults() -> None:
    assert load_config(DEFAULT_CONFIG_FILE, environ={}) == Phi3MiniConfig()


def test_shipped_yaml_has_the_specs_sections() -> None:
    doc = yaml.safe_load(DEFAULT_CONFIG_FILE.read_text())
    assert set(doc) == {"service", "model", "efficiency", "performance", "monitoring"}


def test_dtype_auto_is_bfloat16_only_where_the_cpu_computes_it(tmp_path: Path) -> None:
    from service.engine.settings import resolve_dtype

    def cpu(flags: str) -> Path:
        path = tmp_path / f"cpuinfo-{len(flags)}"
        path.write_text(f"processor\t: 0\nmodel name\t: AMD EPYC\nflags\t\t: fpu sse2 avx2 {flags}\n\n")
        return path

    assert resolve_dtype(Phi3MiniConfig(), cpu=True, cpuinfo=cpu("")) == "float32"  # AVX2 only
    assert resolve_dtype(Phi3MiniConfig(), cpu=True, cpuinfo=cpu("avx512f avx512bw")) == "float32"
    assert resolve_dtype(Phi3MiniConfig(), cpu=True, cpuinfo=cpu("avx512f avx512_bf16")) == "bfloat16"
    assert resolve_dtype(Phi3MiniConfig(), cpu=True, cpuinfo=cpu("amx_tile amx_bf16")) == "bfloat16"
    assert resolve_dtype(Phi3MiniConfig(dtype="float32"), cpu=True, cpuinfo=cpu("avx512_bf16")) == "float32"
    assert resolve_dtype(Phi3MiniConfig(dtype="float16"), cpu=False) == "float16"


def test_yaml_then_environment(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text("service:\n  port: 9000\nperformance:\n  max_num_seqs: 8\n")
    config = load_config(path, environ={"PHI_3_MINI_MAX_NUM_SEQS": "4", "PHI_3_MINI_EFFICIENCY_MODE": "false",
                                        "PHI_3_MINI_TARGET_LATENCY_MS": "250", "PHI_3_MINI_LOG_LEVEL": "debug",
                                        "PHI_3_MINI_RUNTIME_DIR": "/run/x", "PHI_3_MINI_HOST": "0.0.0.0"})
    assert config.port == 9000
    assert config.max_num_seqs == 4
    assert config.efficiency_mode is False
    assert config.target_latency_ms == 250.0
    assert config.log_level == "DEBUG"
    assert config.engine_socket_path() == Path("/run/x/engine.sock")
    assert config.host == "0.0.0.0"


def _other_value(name: str, value: object) -> object:
    """A valid value of the setting that is not its default: an override that is parsed but
    ignored fails the test below."""
    import msgspec

    field = next(f for f in msgspec.inspect.type_info(Phi3MiniConfig).fields if f.name == name)
    kind = field.type.types[0] if isinstance(field.type, msgspec.inspect.UnionType) else field.type
    if isinstance(kind, msgspec.inspect.LiteralType):
        return next(v for v in kind.values if v != value)
    if isinstance(value, bool):
        return not value
    if isinstance(value, int):
        return value + 1
    if isinstance(value, float):
        return value / 2 if value else 0.5
    if isinstance(kind, msgspec.inspect.StrType) and kind.pattern:  # a name, not a path
        return f"{value}-other" if value else "other"
    return f"{value}-other" if value else "/tmp/other"


def test_every_setting_has_an_environment_variable() -> None:
    for name in Phi3MiniConfig.__struct_fields__:
        value = _other_value(name, getattr(Phi3MiniConfig(), name))
        raw = str(value).lower() if isinstance(value, bool) else str(value)
        env = {f"PHI_3_MINI_{name.upper()}": raw, "PHI_3_MINI_CONFIG": str(DEFAULT_CONFIG_FILE)}
        assert getattr(load_config(None, environ=env), name) == value, name


@pytest.mark.parametrize(("env", "fragments"), [
    ({"PHI_3_MINI_PORT": "0"}, ["port", "'0'", "PHI_3_MINI_PORT", ">= 1"]),
    ({"PHI_3_MINI_PORT": "70000"}, ["port", "<= 65535"]),
    ({"PHI_3_MINI_MAX_NUM_SEQS": "many"}, ["max_num_seqs", "'many'", "int"]),
    ({"PHI_3_MINI_DTYPE": "int8"}, ["dtype", "'int8'", "float32"]),
    ({"PHI_3_MINI_GPU_MEMORY_UTILIZATION": "1.5"}, ["gpu_memory_utilization", "1.5"]),
    ({"PHI_3_MINI_EFFICIENCY_MODE": "maybe"}, ["efficiency_mode", "maybe", "bool"]),
    ({"PHI_3_MINI_LOG_LEVEL": "LOUD"}, ["log_level", "LOUD", "INFO"]),
    ({"PHI_3_MINI_MAX_NUM_BATCHED_TOKENS": "8"}, ["max_num_batched_tokens", "max_num_seqs"]),
    ({"PHI_3_MINI_MAX_MODLE_LEN": "4"}, ["PHI_3_MINI_MAX_MODLE_LEN", "unknown"]),
])
def test_invalid_values_name_setting_value_and_rule(env: dict[str, str], fragments: list[str]) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(DEFAULT_CONFIG_FILE, environ=env)
    message = str(info.value)
    assert "\n" not in message
    for fragment in fragments:
        assert fragment in message, message


def test_invalid_yaml_value_names_the_file(tmp_path: Path) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text("performance:\n  max_num_seqs: -3\n")
    with pytest.raises(ConfigError, match=r"max_num_seqs=-3 \(from .*bad.yaml: performance.max_num_seqs\)"):
        load_config(path, environ={})


def test_unknown_yaml_key_or_section(tmp_path: Path) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text("model:\n  max_len: 5\n")
    with pytest.raises(ConfigError, match="model.max_len"):
        load_config(path, environ={})
    path.write_text("network:\n  port: 5\n")
    with pytest.raises(ConfigError, match="unknown section"):
        load_config(path, environ={})


def test_sections_round_trip(tmp_path: Path) -> None:
    config = Phi3MiniConfig(port=12000, max_num_seqs=7)
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(to_sections(config)))
    assert load_config(path, environ={}) == config


def _cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    import os

    base = {k: v for k, v in os.environ.items() if not k.startswith("PHI_3_MINI_")}
    return subprocess.run([sys.executable, "-m", "service", *args], capture_output=True, text=True,
                          env={**base, **(env or {})}, timeout=60)


def test_config_show_prints_the_configuration_in_force() -> None:
    result = _cli("config", "show", env={"PHI_3_MINI_MAX_NUM_SEQS": "12"})
    assert result.returncode == 0, result.stderr
    shown = yaml.safe_load(result.stdout)
    assert shown["performance"]["max_num_seqs"] == 12
    assert shown["service"]["port"] == 11403


def test_invalid_value_stops_the_start_with_one_line() -> None:
    result = _cli("serve", env={"PHI_3_MINI_MAX_MODEL_LEN": "zero"})
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1
    assert "max_model_len" in lines[0] and "zero" in lines[0]


def test_rate_limit_rps_is_off_by_default_and_set_by_environment() -> None:
    assert load_config(DEFAULT_CONFIG_FILE, environ={}).rate_limit_rps == 0
    assert load_config(DEFAULT_CONFIG_FILE, environ={"PHI_3_MINI_RATE_LIMIT_RPS": "50"}).rate_limit_rps == 50
    with pytest.raises(ConfigError, match="rate_limit_rps"):
        load_config(DEFAULT_CONFIG_FILE, environ={"PHI_3_MINI_RATE_LIMIT_RPS": "-1"})


def test_max_model_len_beyond_the_model_is_refused_by_config_show(tmp_path: Path) -> None:
    """What vLLM would refuse at load time is refused when the configuration is read: by
    `config show`, and so by every process before an engine starts."""
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text(json.dumps({"max_position_embeddings": 4096}))
    env = {"PHI_3_MINI_MODEL_PATH": str(model)}
    assert _cli("config", "show", env={**env, "PHI_3_MINI_MAX_MODEL_LEN": "4096"}).returncode == 0
    result = _cli("config", "show", env={**env, "PHI_3_MINI_MAX_MODEL_LEN": "4097"})
    assert result.returncode == 2
    [line] = result.stderr.strip().splitlines()
    assert "max_model_len=4097" in line and "at most 4096" in line and "PHI_3_MINI_MAX_MODEL_LEN" in line
